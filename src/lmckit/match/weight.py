"""Weight matching (WM): coordinate descent over permutation groups.

Objective
---------
For two state dicts ``A`` and ``B`` of one architecture and a permutation set
``pi`` (one permutation ``p_g`` per group ``g`` of the spec),

.. math::

    J(\\pi) = \\sum_{k \\in K} \\langle A_k, \\pi(B)_k \\rangle_F ,
    \\qquad \\|A - \\pi(B)\\|^2 = \\|A\\|^2 + \\|B\\|^2 - 2 J(\\pi),

so maximising ``J`` minimises the L2 distance (Ainsworth et al. 2023, "Git
Re-Basin", Alg. 1; Ito et al. 2025, eq. for WM). ``K`` is every state-dict
entry with at least one permuted axis that is a *parameter*: weights, biases
and norm scale/shift. BatchNorm running statistics (``running_mean``,
``running_var``) and ``num_batches_tracked`` are not parameters of the
function being aligned (they are recomputed by the BN reset after
interpolation), so they are left out of ``J``; they are still permuted by the
result like every other entry. Pass ``include_buffers=True`` to count them.

Coordinate descent
------------------
Holding every group but ``g`` fixed, ``J`` is linear in ``P_g``:
``J = sum_i C_g[i, p_g[i]] + const`` with the cost matrix

.. math::

    C_g = \\sum_{(k, a) \\in g} A_k^{(a)} \\, \\big(\\pi_{-g}(B)_k^{(a)}\\big)^T ,

where ``X^{(a)}`` is tensor ``X`` with axis ``a`` moved to the front and the
rest flattened (a conv kernel read as ``out x (in*k*k)`` or
``in x (out*k*k)``), and ``pi_{-g}(B)`` is B permuted by every group except
``g``. The best ``p_g`` is a linear assignment problem (LAP), solved exactly
by :func:`scipy.optimize.linear_sum_assignment`. A sweep visits the groups in
a seeded random order; the search stops after a sweep that changes nothing,
or after ``max_iter`` sweeps.

A new ``p_g`` is accepted only when it raises ``J`` by more than
``tol * sum_k ||A_k|| ||B_k||`` (the Cauchy-Schwarz bound of the terms it
touches, so the threshold is relative to what float32 cost matrices can
resolve). Ties and float noise therefore never lower ``J``, and the recorded
objective (one value per sweep) is non-decreasing.

Speed
-----
- The entries that some cost term reads permuted (conv kernels, block axes,
  quadratic entries; :attr:`_Problem.bp_keys`) are kept permuted by the
  current permutations on every axis (``Bp``); the rest are read from B as
  it is (see the rank-s updates). The cost against ``Bp`` is
  ``C_full = sum A^{(a)} Bp^{(a)T}`` (one matrix
  product per (entry, axis); all 1-D entries of a group share one product);
  against B's original unit order it is ``C_g = C_full[:, argsort(p_g)]``
  because position ``j`` of ``Bp`` holds unit ``p_g[j]`` of B. After a new
  ``p_g`` is accepted only the tensors ``g`` touches are re-indexed, along
  ``g``'s axes.
- A group's cost matrix depends only on the permutations of its neighbours
  (groups that share an entry with it). A solve is skipped when no neighbour
  moved since the group's last solve: its LAP would return the same answer.
- Rank-s updates: each group keeps one float64 running sum, in B's original
  unit order, of its constant terms (input/output layers, biases) and of the
  terms of 2-D entries with one plain group ``h`` on the other axis. When
  ``h`` has moved only the units ``S`` since, the term changes by
  ``A^{(a)}[:, S] (B^{(a)}[:, p_new[S]] - B^{(a)}[:, p_old[S]])^T``:
  ``O(n^2 |S|)`` instead of the ``O(n^2 m)`` product. After a few sweeps
  moves touch a small fraction of the units, and at 2048 units this makes WM
  several times faster than recomputing the products. The sum is rebuilt
  from scratch after :data:`RANK_UPDATE_REFRESH` updates (so rounding never
  accumulates beyond a few float32 roundings of a term) and when a neighbour
  moved more than :data:`RANK_UPDATE_MAX_FRACTION` of its units. Other terms
  (conv kernels, block axes) are cached per term, in the input precision.
- Memory (issue 15's budget: resident peak at most 3 x (the two models +
  the largest float64 cost matrix)): the sums are built from the unpermuted
  B a block of rows at a time, into work buffers reused across terms and
  blocks (fresh ``n x n``-sized temporaries fragment the C heap: at 1024
  units it held up to three sums' worth of freed blocks); a group's old sum
  is dropped before its rebuild; only the entries some term reads permuted
  are kept permuted (not a whole permuted copy of B: 325 MB at GPT-2 small);
  float64 norms and objective terms run over blocks of rows in one float64
  buffer; the LAP negates its matrix in place; the heap's free pages are
  handed back (``malloc_trim``) before each solve and, for cost matrices of
  :data:`TRIM_MIN_BYTES` and more, after the set-up and before each rebuild. The
  cached cost data (sums and per-term products) are held in an LRU cache
  under a byte cap (``weight_matching(cache_bytes=...)``, default
  :func:`default_cache_bytes`, derived from the budget); an evicted entry is
  rebuilt when next needed. ``benchmarks/bench_wm_width.py`` and
  ``benchmarks/bench_wm_transformer.py`` measure the peak against the budget.
- Products run on the tensors' device (CUDA when present) in the input
  precision (float32 for float32/half models) and are summed in float64;
  only the LAP runs on the CPU.

An entry moved by the same group on two axes (a square stream-to-stream
weight, an LSTM's ``weight_hh``) makes ``J`` quadratic in ``P_g``; its cost
term is linearised at the current ``p_g`` (as in Git Re-Basin) and its exact
change is evaluated before a move is accepted, so the objective still never
decreases.

Block axes
----------
An axis moved by segments (``torch.cat``, padding, LSTM gate blocks, the fused
``in_proj`` of attention, ``flatten`` of a feature map; see
:mod:`lmckit.perm.spec`) contributes one term per segment of ``g``: the
segment's rows of A and of ``pi_{-g}(B)``, each unit's run of ``inner``
entries read as one row, ``A_seg^{(a)} Bp_seg^{(a)T}``.

Attention heads
---------------
Groups under a head structure (``spec.heads``: ``H`` heads; members such as
``qk`` and ``vo`` of sizes ``H*d_m``) are visited together as one coordinate.
With the others fixed, ``J`` is ``sum_m sum_i C_m[i, p_m[i]]`` and a
head-structured ``p_m`` is ``p_m[a*d_m + j] = h[a]*d_m + w_{m,a}[j]``, so

.. math::

    \\max J = \\max_h \\sum_a S[a, h[a]], \\qquad
    S[a, b] = \\sum_m \\max_{w} \\sum_j C_m[a d_m + j, b d_m + w[j]] ,

solved exactly by ``H^2`` within-head assignment problems per member (one per
pair of heads ``(a, b)``, on the ``d_m x d_m`` block of ``C_m``) and one
``H x H`` assignment on their optimal values ``S``: the exact best move of the
whole head structure, at a cost of ``H^2 * sum_m O(d_m^3)`` for the solves
(less than one unconstrained ``O((H d)^3)`` solve) plus the members' usual
cost products.

Layout
------
The objective's entries and the pair checks are :mod:`lmckit.match.objective`,
the cost matrices :mod:`lmckit.match.weight_problem`, the sweep
:mod:`lmckit.match.weight_sweep`; this module holds the public API
(:func:`weight_matching` with its restarts, :func:`default_cache_bytes`,
:func:`matching_floor_seconds`) and re-exports their names.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch

from ..checks import check_int
from ..device import resolve_device
from ..errors import LmcError
from ..limits import MAX_ITER, MAX_RESTARTS
from ..perm.spec import (
    PermutationSpec,
    identity_permutation,
    validate_perms,
    warn_low_coverage,
)
from ..progress import Progress
from .objective import (  # noqa: F401  (re-exported: importable from here as before the split)
    STAT_SUFFIXES,
    check_finite,
    check_pair,
    l2_distance,
    objective_keys,
    parameter_keys,
)
from .result import MatchResult
from .weight_problem import (  # noqa: F401  (likewise)
    RANK_UPDATE_MAX_FRACTION,
    RANK_UPDATE_REFRESH,
    TRIM_MIN_BYTES,
    UNCACHED_MAX_INNER,
    _accumulate,
    _add_product,
    _CostCache,
    _flat,
    _norm64,
    _Problem,
    _rows_per_block,
    _segflat,
    _sq64,
    _trim_heap,
)
from .weight_sweep import (  # noqa: F401  (likewise)
    _descend,
    _independent_runs,
    _lap,
    _lap_pool,
    _lap_scratch,
    _lap_workers,
    _solve_heads,
    _units,
)

DEFAULT_TOL = 1e-7


# --------------------------------------------------------------------------- public API
def weight_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    seed: int = 0,
    max_iter: int = 100,
    init_perms: Mapping[str, Any] | None = None,
    restarts: int = 1,
    device: torch.device | str | None = None,
    *,
    tol: float = DEFAULT_TOL,
    include_buffers: bool = False,
    progress: bool = False,
    cache_bytes: int | None = None,
) -> MatchResult:
    """Permutations of B that maximise ``sum_k <A_k, pi(B)_k>_F`` (minimise ``||A - pi(B)||``).

    Parameters
    ----------
    spec:
        Permutation spec of the architecture (``lmckit.perm.spec_for(model)``).
    sd_a, sd_b:
        State dicts of models A (reference) and B (to be permuted). Never modified.
    seed:
        Seeds the random group order of every sweep (restart ``r`` uses ``(seed, r)``).
    max_iter:
        Maximum number of sweeps per restart.
    init_perms:
        Warm start (e.g. the previous step's permutations in STE); default identity.
    restarts:
        Independent descents with different group orders from the same start;
        the one with the highest final objective is returned.
    device:
        Where the cost matrices are computed; default the device of ``sd_a``'s tensors.
    tol:
        Relative acceptance threshold (see the module docstring).
    include_buffers:
        Count BatchNorm running statistics in the objective (default: parameters only).
    progress:
        Show a progress line per sweep (for long interactive runs).
    cache_bytes:
        Cap on the bytes of cached cost data (the groups' running cost sums and
        cached per-term products; a whole number >= 0, or ``float("inf")`` for
        no cap); the least recently used are dropped and recomputed when next
        needed (slower, same descent up to float rounding). The entry in use is
        always kept, so with a cap below one cost matrix the cache holds just
        that entry (``extra["cost_cache_peak_bytes"]`` reports what it held).
        Default :func:`default_cache_bytes`: what the memory budget
        ``3 x (models + largest cost matrix)`` leaves after the problem's own
        tensors and the transients of a solve.

    Returns
    -------
    MatchResult
        ``perms`` (CPU LongTensors, apply to B), ``objective`` (one value per
        sweep starting at ``init_perms``, non-decreasing), ``sweeps``,
        ``seconds``, ``method="weight"``; ``extra`` holds seed, restarts, the
        final objective of each restart, solve/skip counts and the groups
        the objective cannot see (left at their initial permutation).

    Raises
    ------
    LmcError
        State dicts that do not fit the spec (architecture, width), NaN/inf
        entries, a bad ``init_perms``, or bad ``max_iter``/``restarts``/``cache_bytes``.
    """
    t0 = time.perf_counter()
    max_iter = check_int(max_iter, "max_iter", 1, MAX_ITER)
    restarts = check_int(restarts, "restarts", 1, MAX_RESTARTS)
    seed = check_int(seed, "seed")
    if cache_bytes is not None:
        _check_cache_bytes(cache_bytes)
    check_pair(spec, sd_a, sd_b)
    if init_perms is None:  # (warm starts, e.g. STE's projections, were warned about by their caller)
        warn_low_coverage(spec, "weight matching")
    init = identity_permutation(spec) if init_perms is None else validate_perms(spec, dict(init_perms), "init_perms")
    if device is None:
        first = next((v for v in sd_a.values() if isinstance(v, torch.Tensor)), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    keys = objective_keys(spec, sd_a, include_buffers)
    prob = _Problem(spec, sd_a, sd_b, keys, dev)
    cap = (
        default_cache_bytes(prob)
        if cache_bytes is None
        else (int(cache_bytes) if np.isfinite(cache_bytes) else float("inf"))
    )
    setup = time.perf_counter() - t0
    best = None
    finals = []
    bar = None
    if progress:
        bar = Progress(max_iter * restarts, "weight matching", unit="sweep")
    try:
        for r in range(int(restarts)):
            rng = np.random.default_rng([int(seed), r])
            out = _descend(prob, init, rng, int(max_iter), tol, bar, cap)
            finals.append(out[1][-1])
            if best is None or out[1][-1] > best[1][-1]:
                best = out + (r,)
    finally:
        if bar is not None:
            bar.close()
    perms, history, sweeps, converged, stats, best_r = best
    in_heads = {g for _, (_, ms) in spec.heads.items() for g in ms}
    for g in prob.unmatched:
        if g not in in_heads:  # head members move with their structure's head mapping
            perms[g] = init[g].clone()
    perms = {g: perms[g] for g in spec.sizes}
    extra = {
        "seed": int(seed),
        "restarts": int(restarts),
        "best_restart": int(best_r),
        "restart_objectives": [float(v) for v in finals],
        "max_iter": int(max_iter),
        "solves": stats["solves"],
        "skipped_solves": stats["skipped"],
        "moves": stats["moves"],
        "device": str(dev),
        "objective_entries": len(keys),
        "setup_seconds": setup,
        "sweep_seconds": stats["sweep_seconds"],
        "cost_cache_cap_bytes": cap,
        "cost_cache_peak_bytes": stats["cache_peak_bytes"],
        "cost_cache_evictions": stats["cache_evictions"],
        **prob.counters,
    }
    if prob.unmatched:
        extra["unmatched_groups"] = list(prob.unmatched)
    return MatchResult(
        perms=perms,
        objective=[float(v) for v in history],
        sweeps=sweeps,
        seconds=time.perf_counter() - t0,
        method="weight",
        converged=converged,
        extra=extra,
    )


def _check_cache_bytes(cache_bytes: Any) -> None:
    """``cache_bytes`` must be a whole number >= 0 or ``inf`` (not a bool, NaN or a fraction)."""
    number = isinstance(cache_bytes, (int, float, np.integer, np.floating)) and not isinstance(cache_bytes, bool)
    whole = number and (cache_bytes == float("inf") or (np.isfinite(cache_bytes) and cache_bytes == int(cache_bytes)))
    if not whole or cache_bytes < 0:
        raise LmcError(
            f"cache_bytes must be a whole number of bytes >= 0, float('inf') for no cap, or None for the "
            f"default cap; got {cache_bytes!r}"
        )


def default_cache_bytes(prob: _Problem) -> int:
    """Default cap on a descent's cached cost data, from the memory budget of issue 15.

    The budget is ``3 (M + C)``: ``M`` the bytes of A and B as the problem holds
    them, ``C`` the bytes of the largest float64 cost matrix. The problem holds
    ``M`` plus the permuted entries ``bp`` (:attr:`_Problem.bp_keys`), and a
    solve needs up to about ``2 C`` more while it runs (a sum being rebuilt, a
    copy of the cost for other terms or the solver). What is left,
    ``2 M + C - bp``, is the cap. On every benchmarked model (MLPs up to
    4096 units, GPT-2-small-shaped transformers) the uncapped cache stays
    below it, so it only binds where the cached sums would outgrow the models
    (wide groups between narrow layers).
    """
    m = sum(t.numel() * t.element_size() for d in (prob.A, prob.B) for t in d.values())
    c = 8 * max((prob.spec.sizes[g] for g in prob.groups), default=0) ** 2
    bp = sum(prob.B[k].numel() * prob.B[k].element_size() for k in prob.bp_keys)
    return max(0, 2 * m + c - bp)


def matching_floor_seconds(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    repeats: int = 3,
) -> float:
    """Lower bound for one WM sweep: every group's cost products plus its LAP, nothing else.

    Used by the benchmark to judge the per-sweep overhead of :func:`weight_matching`
    (best of ``repeats``).
    """
    dev = torch.device(device) if device is not None else next(iter(sd_a.values())).device
    prob = _Problem(spec, sd_a, sd_b, objective_keys(spec, sd_a), dev)
    bp = prob.permuted_b({g: p.to(dev) for g, p in identity_permutation(spec).items()})
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        units, unit_heads = _units(prob)
        for u, members in units.items():
            costs = []
            for g in members:
                if g in prob.mats:
                    c, cq = prob.cost_full(g, bp)
                    costs.append((c if cq is None else c + cq).cpu().numpy())
                else:
                    costs.append(np.zeros((prob.spec.sizes[g],) * 2))
            if u in unit_heads:
                _solve_heads(unit_heads[u], costs)
            else:
                _lap(costs[0])
        best = min(best, time.perf_counter() - t0)
    return best
