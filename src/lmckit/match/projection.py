"""Repeated warm-started weight-matching projections (the inner loop of STE).

STE (:mod:`lmckit.match.ste`) projects its learned copy ``theta~`` onto the
permutation orbit of model B at every training step,
``pi_t = WM(theta~_t, theta_b)`` warm-started at ``pi_{t-1}``, and
``theta~`` moves by one optimiser step between projections. Recomputing that
projection with :func:`lmckit.match.weight.weight_matching` from scratch
repeats work whose answer is almost always "nothing changes". A
:class:`WarmProjector` runs *the same* coordinate descent (same seeded visiting
order, same per-group skip rule, same acceptance threshold, same cost
matrices) but keeps state between calls and replaces most assignment solves
by a cheap optimality certificate:

Optimality certificate (LP duality for the assignment problem)
---------------------------------------------------------------
For a group with cost matrix ``C`` (``n x n``, maximised) and its current
assignment ``p``, suppose column potentials ``v`` satisfy

.. math::

    v_j \\ge v_{p(i)} + C_{ij} - C_{i p(i)} - \\varepsilon
    \\quad \\text{for all } i, j .

Summing over the rows of any permutation ``sigma`` (both ``p`` and ``sigma``
are bijections, so the ``v`` terms cancel) gives
``sum_i C[i, sigma(i)] - sum_i C[i, p(i)] <= n * eps``: no assignment beats
``p`` by more than ``n * eps``. (With ``u_i = C_{i p(i)} - v_{p(i)}`` these
are the dual-feasibility conditions ``u_i + v_j >= C_ij - eps`` with
complementary slackness on ``p``; Kuhn 1955, Jonker and Volgenant 1987.)
Weight matching accepts a new assignment only when it raises the objective
by more than ``tol * scale_g`` (see :mod:`lmckit.match.weight`), so with
``eps = 0.1 * tol * scale_g / n`` a certified group's solve could not have
changed anything: skipping it leaves the result of the descent unchanged.

The potentials are found by Bellman-Ford relaxation (a longest-path problem on
the "move row i from column p(i) to column j" graph, ``O(n^2)`` per pass,
vectorised), warm-started from the group's potentials of the previous call: a
gradient step changes ``C`` little, so one to a few passes usually restore
feasibility. When ``p`` is not optimal the graph has a positive cycle and the
relaxation cannot settle; after ``bf_passes`` passes the group is solved by
the LAP as weight matching would, so the certificate can only save work,
never change an answer.

What stays the same cost: the cost matrices themselves (one matrix product
per (tensor, axis) term, re-used within a call while the neighbouring
permutations do not move), since ``theta~`` changes densely at every step.

Result equality with :func:`weight_matching` (``restarts=1``) holds exactly
in exact arithmetic; in floating point the cost matrices are computed by the
same products in the same order, so the permutations agree bit for bit in
practice (``tests/test_projection.py`` and ``benchmarks/bench_ste.py`` check it).
Specs in which a group moves two axes of one tensor (a quadratic term) are
passed to :func:`weight_matching` unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..perm.spec import Perms, PermutationSpec, is_segmented
from .weight import DEFAULT_TOL, _flat, _lap, objective_keys, weight_matching

#: Relative slack of the certificate: eps = CERT_SLACK * tol * scale_g / n (see the module docstring).
CERT_SLACK = 0.1


def certify_assignment(
    cost: np.ndarray, p: np.ndarray, v: np.ndarray | None, eps: float, passes: int
) -> tuple[bool, np.ndarray]:
    """Try to prove that assignment ``p`` is optimal for ``cost`` within ``n * eps``.

    Parameters
    ----------
    cost:
        ``(n, n)`` float64 cost matrix (maximised).
    p:
        ``(n,)`` column of each row.
    v:
        ``(n,)`` column potentials to start from (e.g. the previous call's), or ``None`` (zeros).
    eps:
        Per-edge slack (>= 0); the certificate bounds any improvement by ``n * eps``.
    passes:
        Bellman-Ford relaxation passes allowed.

    Returns
    -------
    (certified, v)
        ``certified`` is True when ``v`` satisfies
        ``v_j >= v_{p(i)} + cost[i, j] - cost[i, p(i)] - eps`` for all ``i, j``
        (then ``sum cost[i, sigma(i)] <= sum cost[i, p(i)] + n * eps`` for every
        permutation ``sigma``); ``v`` the potentials reached.
    """
    n = cost.shape[0]
    v = np.zeros(n) if v is None else v.copy()
    rows = np.arange(n)
    w = cost - cost[rows, p][:, None]  # gain of moving row i from column p(i) to column j
    for _ in range(int(passes)):
        cand = (w + v[p][:, None]).max(axis=0) - eps
        if bool((cand <= v).all()):
            return True, v
        np.maximum(v, cand, out=v)
    return False, v


class WarmProjector:
    """Stateful ``WM(theta~, theta_b)`` for a fixed model B, warm-started at each call.

    Parameters
    ----------
    spec:
        Permutation spec of the architecture.
    sd_b:
        State dict of model B (not modified; its objective entries are copied once).
    max_iter:
        Sweep limit of each projection (as ``weight_matching``'s ``max_iter``).
    device:
        Where cost matrices are computed (default: the device of ``sd_b``).
    tol:
        Acceptance threshold, as in :func:`weight_matching`.
    certify:
        Use the optimality certificate to skip solves (default False: every
        solve runs, as in ``weight_matching``). Exact either way; measured on
        the MLP's STE (``benchmarks/bench_ste.py``) the certificate costs more
        than it saves, because the projection moves some group at most steps
        and the relaxation needs 5-30 passes to settle.
    bf_passes:
        Bellman-Ford passes tried before falling back to the LAP.
    every:
        **Approximation** (default 1: off): project only at every ``every``-th
        call and return ``init`` unchanged at the others (a projection held
        for ``every`` steps). Changes the result; see :func:`ste_projector`.

    Notes
    -----
    ``projector(sd_a, init, seed)`` returns what
    ``weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=max_iter,
    init_perms=init, restarts=1, tol=tol).perms`` returns (see the module
    docstring); ``stats`` counts calls, sweeps, solves, certified skips and moves.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        sd_b: Mapping[str, torch.Tensor],
        max_iter: int = 100,
        device: torch.device | str | None = None,
        tol: float = DEFAULT_TOL,
        certify: bool = False,
        bf_passes: int = 12,
        every: int = 1,
    ):
        self.spec = spec
        self.sd_b = sd_b
        self.max_iter, self.tol, self.certify, self.bf_passes = int(max_iter), float(tol), bool(certify), int(bf_passes)
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        keys = objective_keys(spec, sd_b)
        first = next((v for v in sd_b.values() if isinstance(v, torch.Tensor)), None)
        self.device = (
            torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        )
        self.dtype = torch.float64 if any(sd_b[k].dtype == torch.float64 for k in keys) else torch.float32
        self.keys = keys
        self.axes = {k: spec.axes[k] for k in keys}
        self.B = {k: sd_b[k].detach().to(device=self.device, dtype=self.dtype) for k in keys}
        members: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.sizes}
        for k in keys:
            for a, g in enumerate(self.axes[k]):
                if g is not None:
                    members[g].append((k, a))
        self.members = members
        self.groups = [g for g in spec.sizes if members[g]]
        self.mats: dict[str, list[tuple[str, int]]] = {}
        self.vecs: dict[str, list[str]] = {}
        self.neighbours: dict[str, set[str]] = {}
        self.quadratic = False
        for g in self.groups:
            mats, vecs, nb = [], [], set()
            for k, a in members[g]:
                gs = [x for x in self.axes[k] if x is not None]
                nb.update(x for x in gs if x != g)
                if gs.count(g) > 1:
                    self.quadratic = True
                elif self.B[k].dim() == 1:
                    vecs.append(k)
                else:
                    mats.append((k, a))
            self.mats[g], self.vecs[g], self.neighbours[g] = mats, vecs, nb
        self.norm_b = {k: float(torch.linalg.vector_norm(self.B[k].double())) for k in keys}
        self.solvable = [g for g in self.groups if spec.sizes[g] > 1]
        self._bp: dict[str, torch.Tensor] | None = None
        self._bp_perms: dict[str, torch.Tensor] | None = None
        self._v: dict[str, np.ndarray] = {}
        self.stats = {
            "calls": 0,
            "sweeps": 0,
            "solves": 0,
            "certified": 0,
            "skipped": 0,
            "held": 0,
            "moves": 0,
            "fallback": 0,
        }

    # ------------------------------------------------------------------ helpers
    def _permuted_b(self, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._bp is not None and all(torch.equal(self._bp_perms[g], perms[g]) for g in self.groups):
            return dict(self._bp)
        out = {}
        for k in self.keys:
            w = self.B[k]
            for a, g in enumerate(self.axes[k]):
                if g is not None:
                    w = w.index_select(a, perms[g])
            out[k] = w
        return out

    @staticmethod
    def _contribution(a: int, am: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if b.dim() == 2 and a == 1:
            return (am.t() @ b).double()
        return (am @ _flat(b, a).t()).double()

    # ------------------------------------------------------------------ projection
    def __call__(self, sd_a: Mapping[str, torch.Tensor], init: Perms, seed: int) -> Perms:
        """``WM(sd_a, theta_b)`` warm-started at ``init`` with group order seeded by ``seed`` (CPU LongTensors)."""
        self.stats["calls"] += 1
        if (self.stats["calls"] - 1) % self.every:
            self.stats["held"] += 1  # approximation: keep the last projection for every-1 of every calls
            return {g: init[g].to("cpu") for g in self.spec.sizes}
        if self.quadratic:
            self.stats["fallback"] += 1
            res = weight_matching(
                self.spec,
                sd_a,
                self.sd_b,
                seed=seed,
                max_iter=self.max_iter,
                init_perms=init,
                restarts=1,
                device=self.device,
                tol=self.tol,
            )
            return {g: p.to("cpu") for g, p in res.perms.items()}
        dev = self.device
        A = {k: sd_a[k].detach().to(device=dev, dtype=self.dtype) for k in self.keys}
        am: dict[tuple[str, int], torch.Tensor] = {}
        for g in self.groups:
            for k, a in self.mats[g]:
                am[(k, a)] = A[k] if (A[k].dim() == 2 and a == 1) else _flat(A[k], a).contiguous()
        vec_a = {g: (torch.stack([A[k] for k in self.vecs[g]], 1) if self.vecs[g] else None) for g in self.groups}
        norm_a = {k: float(torch.linalg.vector_norm(A[k].double())) for k in self.keys}
        scale = {g: sum(norm_a[k] * self.norm_b[k] for k in {k for k, _ in self.members[g]}) for g in self.groups}

        perms = {g: init[g].to(dev).to(torch.long) for g in self.spec.sizes}
        inv = {g: torch.argsort(p) for g, p in perms.items()}
        perms_np = {g: perms[g].cpu().numpy() for g in self.groups}
        bp = self._permuted_b(perms)
        rng = np.random.default_rng([int(seed), 0])
        clock = 0
        moved_at = {g: 0 for g in self.groups}
        moved_any = {g: 0 for g in self.spec.sizes}
        solved_at: dict[str, int] = {}
        cache: dict = {}
        for _ in range(self.max_iter):
            changed = False
            order = [self.solvable[i] for i in rng.permutation(len(self.solvable))]
            for g in order:
                last = solved_at.get(g)
                if last is not None and all(moved_at[h] <= last for h in self.neighbours[g]):
                    self.stats["skipped"] += 1
                    continue
                solved_at[g] = clock
                inv_g = inv[g]
                n = self.spec.sizes[g]
                c = torch.zeros(n, n, dtype=torch.float64, device=dev)
                for k, a in self.mats[g]:
                    stamp = tuple(moved_any[h] for i, h in enumerate(self.axes[k]) if h is not None and i != a)
                    hit = cache.get((k, a))
                    if hit is None or hit[0] != stamp:
                        hit = (stamp, self._contribution(a, am[(k, a)], bp[k])[:, inv_g])
                        cache[(k, a)] = hit
                    c += hit[1]
                if vec_a[g] is not None:
                    hit = cache.get((g, "vec"))
                    if hit is None:
                        bv = torch.stack([bp[k] for k in self.vecs[g]], 1)
                        hit = cache[(g, "vec")] = (vec_a[g] @ bv.t()).double()[:, inv_g]
                    c += hit
                c_np = c.cpu().numpy()
                p_old = perms_np[g]
                if self.certify:
                    eps = CERT_SLACK * self.tol * scale[g] / n
                    ok, v = certify_assignment(c_np, p_old, self._v.get(g), eps, self.bf_passes)
                    self._v[g] = v
                    if ok:
                        self.stats["certified"] += 1
                        continue  # no assignment beats p_old by more than the acceptance threshold
                self.stats["solves"] += 1
                p_new = _lap(c_np)
                if np.array_equal(p_new, p_old):
                    continue
                rows = np.arange(n)
                delta = float(c_np[rows, p_new].sum() - c_np[rows, p_old].sum())
                if not delta > self.tol * scale[g]:
                    continue
                p_new_t = torch.from_numpy(np.ascontiguousarray(p_new, dtype=np.int64)).to(dev)
                q = inv_g[p_new_t]
                for k in {k for k, _ in self.members[g]}:
                    w = bp[k]
                    for a, x in enumerate(self.axes[k]):
                        if x == g:
                            w = w.index_select(a, q)
                    bp[k] = w
                perms[g], perms_np[g], inv[g] = p_new_t, p_new, torch.argsort(p_new_t)
                clock += 1
                moved_at[g] = clock
                moved_any[g] += 1
                self.stats["moves"] += 1
                changed = True
            self.stats["sweeps"] += 1
            if not changed:
                break
        self._bp, self._bp_perms = bp, {g: perms[g] for g in self.groups}
        return {g: perms[g].to("cpu") for g in self.spec.sizes}


def ste_projector(
    spec: PermutationSpec, sd_b: Mapping[str, torch.Tensor], max_iter: int, device: torch.device | str | None
) -> WarmProjector | None:
    """The projector STE uses for its per-step projections, chosen by the environment.

    ``LMCKIT_STE_PROJECTION``:

    * unset or ``exact``: :class:`WarmProjector` (the same permutation as
      :func:`weight_matching` at every step);
    * ``certified``: the same with the optimality certificate (exact too);
    * ``reference``: ``None``, i.e. STE calls :func:`weight_matching` itself.

    ``LMCKIT_STE_PROJECT_EVERY=k`` (default 1) turns on the approximation of
    projecting at every ``k``-th step only (the permutation of the midpoint is
    then up to ``k - 1`` steps old, the end-of-epoch projection that STE
    scores included). It changes STE's result; its effect on the final
    permutation is measured by ``benchmarks/bench_ste.py --every k`` (40 steps
    of the MLP with k = 4: 55% of units assigned differently from the exact
    run, held-out midpoint loss 0.491 vs 0.482; the step 1.6x cheaper). It is
    not part of STE's resume fingerprint, and a resumed run restarts the
    k-cycle, so set it for whole runs only.

    Raises
    ------
    LmcError
        An unknown mode or a bad ``k``.
    """
    import os

    from ..errors import LmcError

    mode = os.environ.get("LMCKIT_STE_PROJECTION", "exact").strip().lower() or "exact"
    if mode not in ("exact", "certified", "reference"):
        raise LmcError(f"unknown LMCKIT_STE_PROJECTION={mode!r}", "use exact, certified or reference")
    raw = os.environ.get("LMCKIT_STE_PROJECT_EVERY", "1").strip() or "1"
    try:
        every = int(raw)
    except ValueError:
        every = 0
    if every < 1:
        raise LmcError(f"LMCKIT_STE_PROJECT_EVERY must be a positive integer, got {raw!r}")
    if mode == "reference":
        if every != 1:
            raise LmcError(
                "LMCKIT_STE_PROJECT_EVERY needs the exact or certified projection", "unset LMCKIT_STE_PROJECTION"
            )
        return None
    if spec.heads or any(is_segmented(e) for ax in spec.axes.values() for e in ax):
        # The warm projector models free whole-axis groups only; attention heads and block axes
        # (cat, pad, flatten, LSTM gates) go through weight_matching itself, which honours them.
        if every != 1:
            raise LmcError(
                "LMCKIT_STE_PROJECT_EVERY is not available for specs with attention heads or block axes",
                "unset LMCKIT_STE_PROJECT_EVERY",
            )
        return None
    return WarmProjector(spec, sd_b, max_iter, device, certify=(mode == "certified"), every=every)
