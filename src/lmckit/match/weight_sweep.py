"""Weight matching's sweep: coordinate descent over the groups, one exact linear assignment per move.

:func:`_descend` runs one search from a start: sweeps visit the groups in a
seeded random order (groups under a head structure as one coordinate,
solved exactly by :func:`_solve_heads`), independent groups' assignments are
solved in a small thread pool, a move is accepted only when it raises the
objective by more than the tolerance, and the search stops after a sweep that
changes nothing or after ``max_iter`` sweeps. :func:`_lap` is the one
assignment solve every method shares (solver chosen by :mod:`lmckit.match.lap`).
The cost matrices come from :mod:`lmckit.match.weight_problem`; restarts and
the public API are :mod:`lmckit.match.weight`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import torch

from ..perm.spec import (
    Perms,
)
from .lap import solve
from .weight_problem import TRIM_MIN_BYTES, _CostCache, _Problem, _trim_heap

__all__: list[str] = []


def _lap_scratch(cost: np.ndarray) -> np.ndarray:
    """:func:`_lap` on a cost matrix owned by the descent (negated in place and restored)."""
    return _lap(cost, inplace=True)


def _lap(cost: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Column assigned to each row, maximising the summed cost (solver picked per size by :mod:`.lap`).

    With ``inplace``, a writable float64 ``cost`` is negated in place for the
    solve and restored after it (negation is exact), which spares the solvers'
    negated ``n x n`` copy; only for matrices nothing else reads meanwhile.
    """

    if inplace and cost.dtype == np.float64 and cost.flags.writeable and cost.flags.c_contiguous:
        np.negative(cost, out=cost)
        try:
            return solve(cost, maximize=False)
        finally:
            np.negative(cost, out=cost)
    return solve(cost, maximize=True)


def _lap_workers() -> int:
    """Assignment problems solved at once (one per core, at most 4)."""
    return max(1, min(4, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None
# Below this size a solve takes well under a millisecond and a thread hand-off
# costs more than it saves (ResNet-20 x1 groups have 16-64 units).
_PARALLEL_MIN_UNITS = 128


def _lap_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_lap_workers(), thread_name_prefix="lmckit-lap")
    return _POOL


def _independent_runs(order: list[str], neighbours: Mapping[str, set[str]], limit: int) -> list[list[str]]:
    """Split a visiting order into maximal consecutive runs of mutually non-neighbouring groups."""
    runs: list[list[str]] = []
    for g in order:
        cur = runs[-1] if runs else None
        if cur is not None and len(cur) < limit and all(g not in neighbours[h] and h not in neighbours[g] for h in cur):
            cur.append(g)
        else:
            runs.append([g])
    return runs


def _solve_heads(n_heads: int, costs: list[np.ndarray]) -> list[np.ndarray]:
    """Exact best head-structured assignment for members sharing one head mapping.

    ``costs[m]`` is member ``m``'s ``(H d_m) x (H d_m)`` cost; returns one flat
    assignment per member, ``p[a*d + j] = h[a]*d + w_{m,a}[j]``, maximising the
    summed cost (see the module docstring). Every solve goes through :func:`_lap`.
    """
    H = int(n_heads)
    score = np.zeros((H, H))
    within: list[np.ndarray] = []
    for c in costs:
        d = c.shape[0] // H
        blocks = c.reshape(H, d, H, d)
        w = np.zeros((H, H, d), dtype=np.int64)
        rows = np.arange(d)
        for a in range(H):
            for b in range(H):
                blk = np.ascontiguousarray(blocks[a, :, b, :])
                col = _lap(blk) if d > 1 else np.zeros(1, dtype=np.int64)
                w[a, b] = col
                score[a, b] += blk[rows, col].sum()
        within.append(w)
    head = _lap(score) if H > 1 else np.zeros(1, dtype=np.int64)
    out = []
    for w in within:
        d = w.shape[2]
        out.append((head[:, None] * d + w[np.arange(H), head]).reshape(-1).astype(np.int64))
    return out


def _units(prob: _Problem) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Coordinates of the descent: one per free group, one per head structure (all its members at once)."""
    units: dict[str, list[str]] = {}
    heads: dict[str, int] = {}
    in_heads = set()
    for name, (h, members) in prob.spec.heads.items():
        if not any(g in prob.groups for g in members):
            continue
        u = f"heads:{name}"
        units[u] = list(members)
        heads[u] = int(h)
        in_heads.update(members)
    for g in prob.groups:
        if g not in in_heads and prob.spec.sizes[g] > 1:
            units[g] = [g]
    return units, heads


def _descend(
    prob: _Problem,
    init: Perms,
    rng: np.random.Generator,
    max_iter: int,
    tol: float,
    progress: Any = None,
    cache_bytes: float = float("inf"),
) -> tuple[Perms, list[float], int, bool, dict[str, int]]:
    """One coordinate-descent run from ``init``; returns perms, objective history, sweeps, converged, counters.

    ``cache_bytes`` caps the cached cost data (:class:`_CostCache`).
    """
    dev = prob.device
    n_units = prob.spec.sizes
    perms = {g: p.to(dev) for g, p in init.items()}
    inv = {g: torch.argsort(p) for g, p in perms.items()}
    perms_np = {g: perms[g].cpu().numpy() for g in prob.spec.sizes}
    # B permuted by the current permutations, kept only when some cost term needs it
    bp = prob.permuted_b(perms, prob.bp_keys)  # {} when no term needs a permuted entry
    total = prob.objective_of(perms, bp or None)
    if 8 * max((n_units[g] for g in prob.groups), default=0) ** 2 >= TRIM_MIN_BYTES:
        _trim_heap()  # the set-up's float64 blocks are free: give them back before the first cost sums are built
    history = [total]
    clock = 0  # counts accepted moves
    moved_at = {g: 0 for g in prob.spec.sizes}
    moved_at_any = {g: 0 for g in prob.spec.sizes}  # per-group move counter (cache stamps)
    cost_cache = _CostCache(cache_bytes)
    solved_at: dict[str, int] = {}
    stats = {"solves": 0, "skipped": 0, "moves": 0}
    units, unit_heads = _units(prob)
    group_unit = {g: u for u, ms in units.items() for g in ms}
    nb_groups = {u: set().union(*(prob.neighbours.get(g, set()) for g in ms)) for u, ms in units.items()}
    for u, ms in units.items():
        if u in unit_heads:
            nb_groups[u] -= set(ms) - {g for g in ms if g in prob.neighbours and g in prob.neighbours[g]}
    nb_units = {u: {group_unit[g] for g in nb_groups[u] if g in group_unit} for u in units}
    solvable = list(units)
    sweeps, converged = 0, False
    t_loop = time.perf_counter()
    for _ in range(max_iter):
        changed = False
        order = [solvable[i] for i in rng.permutation(len(solvable))]
        for batch in _independent_runs(order, nb_units, _lap_workers()):
            # Units in a batch are consecutive in the visiting order and share no
            # tensor, so neither's cost depends on the other's move: solving their
            # assignment problems concurrently (scipy releases the GIL) and then
            # accepting the moves in order is exactly the sequential sweep.
            jobs = []
            for u in batch:
                last = solved_at.get(u)
                if last is not None and all(moved_at[h] <= last for h in nb_groups[u]):
                    stats["skipped"] += 1
                    continue
                solved_at[u] = clock
                stats["solves"] += 1
                parts = []
                for g in units[u]:
                    if g in prob.mats:
                        c_lin, c_quad = prob.cost_original(g, bp, inv[g], moved_at_any, cost_cache, perms)
                    else:  # a member the objective cannot see
                        c_lin = torch.zeros(n_units[g], n_units[g], dtype=torch.float64, device=dev)
                        c_quad = None
                    c_all = c_lin if c_quad is None else c_lin + c_quad
                    parts.append((g, inv[g], c_lin, c_quad, c_all.cpu().numpy()))
                jobs.append((u, parts))
                _trim_heap()
            plain = [(i, job[1][0][4]) for i, job in enumerate(jobs) if job[0] not in unit_heads]
            if sum(c.shape[0] >= _PARALLEL_MIN_UNITS for _, c in plain) > 1:
                sol_plain = dict(zip([i for i, _ in plain], _lap_pool().map(_lap_scratch, [c for _, c in plain])))
            else:
                sol_plain = {i: _lap_scratch(c) for i, c in plain}
            for i, (u, parts) in enumerate(jobs):
                if u in unit_heads:
                    news = _solve_heads(unit_heads[u], [pt[4] for pt in parts])
                else:
                    news = [sol_plain[i]]
                moves = [(pt, p_new) for pt, p_new in zip(parts, news) if not np.array_equal(p_new, perms_np[pt[0]])]
                if not moves:
                    continue
                delta = 0.0
                trial = dict(bp)
                updates: dict[str, torch.Tensor] = {}
                for (g, inv_g, c_lin, c_quad, c_np), p_new in moves:
                    rows = np.arange(len(p_new))
                    lin_np = c_np if c_quad is None else c_lin.cpu().numpy()
                    delta += float(lin_np[rows, p_new].sum() - lin_np[rows, perms_np[g]].sum())
                    if c_quad is not None:
                        q = inv_g[torch.from_numpy(p_new).to(dev)]
                        new_quad = prob.reindex(g, q, trial, prob.quad_keys[g])
                        delta += sum(
                            float(torch.sum(prob.a64(k) * (new_quad[k] - trial[k]).double())) for k in new_quad
                        )
                        trial.update(new_quad)
                        updates.update(new_quad)
                scale = sum(prob.scale.get(pt[0], 0.0) for pt, _ in moves)
                if not delta > tol * scale:
                    continue
                for (g, inv_g, _c_lin, _c_quad, _c_np), p_new in moves:
                    p_new_t = torch.from_numpy(p_new).to(dev)
                    q = inv_g[p_new_t]  # positions in bp of the new units
                    if bp:  # one entry at a time: its old copy is freed before the next is made
                        for k in {k for k, _ in prob.members[g]}:
                            if k in bp and k not in updates:
                                bp.update(prob.reindex(g, q, bp, [k]))
                    perms[g], perms_np[g], inv[g] = p_new_t, p_new, torch.argsort(p_new_t)
                    moved_at_any[g] += 1
                    clock += 1
                    moved_at[g] = clock
                bp.update(updates)
                total += delta
                stats["moves"] += 1
                changed = True
        sweeps += 1
        history.append(total)
        if progress is not None:
            progress.update(1, objective=total)
        if not changed:
            converged = True
            break
    stats["sweep_seconds"] = time.perf_counter() - t_loop  # the sweeps alone (no set-up, no final copy)
    stats["cache_evictions"], stats["cache_peak_bytes"] = cost_cache.evictions, cost_cache.peak
    return {g: p.cpu() for g, p in perms.items()}, history, sweeps, converged, stats
