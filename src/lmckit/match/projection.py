"""Repeated warm-started weight-matching projections (the inner loop of STE).

STE (:mod:`lmckit.match.ste`) projects its learned copy ``theta~`` onto the
permutation orbit of model B at every training step,
``pi_t = WM(theta~_t, theta_b)`` warm-started at ``pi_{t-1}``, and
``theta~`` moves by one optimiser step between projections. Recomputing that
projection with :func:`lmckit.match.weight.weight_matching` from scratch
repeats work whose answer is almost always "nothing changes". A
:class:`WarmProjector` runs *the same* coordinate descent (same seeded visiting
order, same per-group skip rule, same acceptance threshold, same cost
matrices) but keeps state between calls, and solves each assignment problem
warm-started from its previous solution:

Warm-started assignment solves
------------------------------
Each group's LAP is solved by :func:`lmckit.match.lap_warm.solve_warm` from
the group's previous assignment and the optimal column potentials of its
previous solve: the potentials are repaired for the new cost matrix in
``O(n^2)`` (row potentials ``u_i = min_j (c_ij - v_j)``), every row whose
assigned column stays tight keeps it, and only the others are re-assigned by
shortest augmenting paths (Jonker and Volgenant 1987; Crouse 2016). The
result is an optimal assignment, as from scipy's solver, so the descent is
unchanged wherever the optimum is unique (generic for real-valued costs; on
exact ties the two solvers may pick different assignments of equal
objective, as two exact solvers may); when nothing needs to move, the solve is the ``O(n^2)``
repair (which proves the old assignment optimal, LP duality) plus the re-assignment of the few
rows whose assigned edge ties another one up to rounding. On the MLP's
STE (``benchmarks/bench_ste.py``) this is several times cheaper than a solve
from scratch. Without numba, or with ``solver="cold"``, every solve starts
from scratch (:func:`lmckit.match.lap.solve`).

Cost matrices: ``theta~`` changes densely at every step, so each group's
terms are computed once per call (one matrix product per (tensor, axis)
term, against B in its original unit order with A's other axes gathered by
the inverse permutations, so B is never permuted or copied), and within a
call a neighbour's move of ``s`` units is folded in by a rank-``s``
correction, ``O(n^2 s)``, as in :mod:`lmckit.match.weight`; the LAP negates
the group's sum in place and restores it.

Result equality with :func:`weight_matching` (``restarts=1``) holds exactly
in exact arithmetic; in floating point the cost matrices are built as :func:`weight_matching`
builds them (products from the unpermuted B, rank-s corrections), so the
permutations agree in practice (``tests/test_projection.py`` and ``benchmarks/bench_ste.py`` check it).
Specs in which a group moves two axes of one tensor (a quadratic term) are
passed to :func:`weight_matching` unchanged.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import torch

from ..errors import LmcError
from ..perm.spec import Perms, PermutationSpec, is_segmented
from . import lap_warm
from .weight import (
    DEFAULT_TOL,
    RANK_UPDATE_MAX_FRACTION,
    RANK_UPDATE_REFRESH,
    _add_product,
    _flat,
    _lap,
    objective_keys,
    weight_matching,
)


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
    solver:
        ``"warm"`` (default): each group's assignment problem warm-started from
        its previous solution (:mod:`lmckit.match.lap_warm`; needs numba,
        otherwise the same as ``"cold"``); ``"cold"``: every solve from scratch
        (:func:`lmckit.match.lap.solve`). Both are exact.
    every:
        **Approximation** (default 1: off): project only at every ``every``-th
        call and return ``init`` unchanged at the others (a projection held
        for ``every`` steps). Changes the result; see :func:`ste_projector`.
    step_sweeps:
        **Approximation** (default 0: off): at most this many sweeps per call,
        so the descent continues across calls from where it stopped (the
        projection tracks the moving optimum instead of reaching it at every
        step). Changes the result; see :func:`ste_projector`.

    Notes
    -----
    Calls with ``full=True`` (STE's end-of-epoch projection, the one it
    scores) ignore both approximations: they run the descent to convergence.
    ``projector(sd_a, init, seed)`` returns what
    ``weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=max_iter,
    init_perms=init, restarts=1, tol=tol).perms`` returns (see the module
    docstring); ``stats`` counts calls, sweeps, solves, rows freed by the warm solves and moves.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        sd_b: Mapping[str, torch.Tensor],
        max_iter: int = 100,
        device: torch.device | str | None = None,
        tol: float = DEFAULT_TOL,
        solver: str = "warm",
        every: int = 1,
        step_sweeps: int = 0,
    ):
        self.spec = spec
        self.sd_b = sd_b
        self.max_iter, self.tol = int(max_iter), float(tol)
        if solver not in ("warm", "cold"):
            raise ValueError(f"solver must be 'warm' or 'cold', got {solver!r}")
        self.warm = solver == "warm" and lap_warm.available()
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        if int(step_sweeps) < 0:
            raise ValueError(f"step_sweeps must be >= 0, got {step_sweeps}")
        self.step_sweeps = int(step_sweeps)
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
        self.norm_b = {k: float(torch.linalg.vector_norm(self.B[k], dtype=torch.float64)) for k in keys}
        self.solvable = [g for g in self.groups if spec.sizes[g] > 1]
        # Every cost term is computed against B in its original unit order (fixed for the whole run), with
        # A's other axes gathered by the inverse permutations of their groups (see _term):
        # R = B^{(a)} per (entry, axis), and the biases/norm vectors of a group stacked.
        self.right = {(k, a): _flat(self.B[k], a) for g in self.groups for k, a in self.mats[g]}
        self.vec_b = {g: torch.stack([self.B[k] for k in self.vecs[g]], 1) for g in self.groups if self.vecs[g]}
        self.others = {
            (k, a): [(i, h) for i, h in enumerate(self.axes[k]) if h is not None and i != a]
            for g in self.groups
            for k, a in self.mats[g]
        }
        self._v: dict[str, np.ndarray] = {}  # optimal column potentials of each group's last warm solve
        self.stats = {
            "calls": 0,
            "sweeps": 0,
            "solves": 0,
            "freed": 0,
            "skipped": 0,
            "held": 0,
            "moves": 0,
            "fallback": 0,
            "terms_built": 0,
            "terms_updated": 0,
        }

    # ------------------------------------------------------------------ cost matrices
    def _updatable(self, k: str, a: int) -> str | None:
        """The one group on the other axis of a 2-D entry (its moves are rank-s corrections), else ``None``."""
        o = self.others[(k, a)]
        return o[0][1] if self.B[k].dim() == 2 and len(o) == 1 else None

    def _term(self, A: Mapping[str, torch.Tensor], k: str, a: int, inv: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_c A^{(a)}[i, c] pi(B)^{(a)}[j, c]`` with rows ``j`` in B's original order of the group on ``a``.

        Position ``c`` of ``pi(B)`` on another axis holds unit ``p_h[c]`` of B, so the term equals
        ``A^{(a)}`` with that axis gathered by ``argsort(p_h)``, times B's own ``B^{(a)T}``.
        """
        t = A[k]
        for i, h in self.others[(k, a)]:
            t = t.index_select(i, inv[h])
        return _flat(t, a) @ self.right[(k, a)].t()

    def _build(self, g: str, A, vec_a, perms, inv, stamps) -> list:
        """Group ``g``'s cost sum from scratch (float64): ``[sum, {term: p_h or stamp}, rank updates]``."""
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        seen = {}
        for k, a in self.mats[g]:
            c += self._term(A, k, a, inv)
            h = self._updatable(k, a)
            seen[(k, a)] = perms[h] if h is not None else tuple(stamps[x] for _, x in self.others[(k, a)])
            self.stats["terms_built"] += 1
        if vec_a[g] is not None:
            c += vec_a[g] @ self.vec_b[g].t()
        return [c, seen, 0]

    def _cost(self, g: str, ent, A, vec_a, perms, inv, stamps):
        """Group ``g``'s cost matrix in B's original unit order, brought up to date with its neighbours' moves.

        A 2-D term whose other group ``h`` moved the positions ``S`` since it was summed changes by
        ``A^{(a)}[:, S] (B^{(a)}[:, p_new[S]] - B^{(a)}[:, p_old[S]])^T`` (``O(n^2 |S|)``, as in
        :mod:`lmckit.match.weight`); any other change of a term, more than half the units moved, or
        :data:`lmckit.match.weight.RANK_UPDATE_REFRESH` corrections in a row rebuild the sum.
        """
        if ent is None:
            return self._build(g, A, vec_a, perms, inv, stamps)
        stale = []
        for (k, a), was in ent[1].items():
            h = self._updatable(k, a)
            if h is None:
                if was != tuple(stamps[x] for _, x in self.others[(k, a)]):
                    return self._build(g, A, vec_a, perms, inv, stamps)
                continue
            if was is perms[h]:
                continue
            moved = torch.nonzero(was != perms[h]).flatten()
            if moved.numel() > RANK_UPDATE_MAX_FRACTION * was.numel():
                return self._build(g, A, vec_a, perms, inv, stamps)
            if moved.numel():
                stale.append((k, a, moved, was, perms[h]))
        if not stale:
            return ent
        if ent[2] >= RANK_UPDATE_REFRESH:
            return self._build(g, A, vec_a, perms, inv, stamps)
        for k, a, moved, p_old, p_new in stale:
            o = 1 - a
            a_s = A[k].index_select(o, moved)
            d = self.B[k].index_select(o, p_new[moved]) - self.B[k].index_select(o, p_old[moved])
            if a == 0:
                _add_product(ent[0], a_s, d)
            else:
                _add_product(ent[0], a_s.t(), d.t())
            ent[1][(k, a)] = p_new
            self.stats["terms_updated"] += 1
        ent[2] += 1
        return ent

    # ------------------------------------------------------------------ projection
    def __call__(self, sd_a: Mapping[str, torch.Tensor], init: Perms, seed: int, full: bool = False) -> Perms:
        """``WM(sd_a, theta_b)`` warm-started at ``init`` with group order seeded by ``seed`` (CPU LongTensors).

        ``full``: run to convergence whatever the approximations (``every``, ``step_sweeps``) say.
        """
        self.stats["calls"] += 1
        if not full and (self.stats["calls"] - 1) % self.every:
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
        vec_a = {g: (torch.stack([A[k] for k in self.vecs[g]], 1) if self.vecs[g] else None) for g in self.groups}
        norm_a = {k: float(torch.linalg.vector_norm(A[k], dtype=torch.float64)) for k in self.keys}
        scale = {g: sum(norm_a[k] * self.norm_b[k] for k in {k for k, _ in self.members[g]}) for g in self.groups}

        perms = {g: init[g].to(dev).to(torch.long) for g in self.spec.sizes}
        inv = {g: torch.argsort(p) for g, p in perms.items()}
        perms_np = {g: perms[g].cpu().numpy() for g in self.groups}
        rng = np.random.default_rng([int(seed), 0])
        clock = 0
        moved_at = {g: 0 for g in self.groups}
        stamps = {g: 0 for g in self.spec.sizes}
        solved_at: dict[str, int] = {}
        sums: dict[str, list] = {}
        sweeps = self.max_iter if full or not self.step_sweeps else min(self.max_iter, self.step_sweeps)
        for _ in range(sweeps):
            changed = False
            order = [self.solvable[i] for i in rng.permutation(len(self.solvable))]
            for g in order:
                last = solved_at.get(g)
                if last is not None and all(moved_at[h] <= last for h in self.neighbours[g]):
                    self.stats["skipped"] += 1
                    continue
                solved_at[g] = clock
                n = self.spec.sizes[g]
                sums[g] = self._cost(g, sums.get(g), A, vec_a, perms, inv, stamps)
                c_np = sums[g][0].cpu().numpy()
                p_old = perms_np[g]
                self.stats["solves"] += 1
                if self.warm:
                    p_new, self._v[g], freed = lap_warm.solve_warm(c_np, p_old, self._v.get(g))
                    self.stats["freed"] += freed
                else:
                    p_new = _lap(c_np, inplace=dev.type == "cpu")  # the sum is ours: negated and restored in place
                if np.array_equal(p_new, p_old):
                    continue
                rows = np.arange(n)
                delta = float(c_np[rows, p_new].sum() - c_np[rows, p_old].sum())
                if not delta > self.tol * scale[g]:
                    continue
                p_new_t = torch.from_numpy(np.ascontiguousarray(p_new, dtype=np.int64)).to(dev)
                perms[g], perms_np[g], inv[g] = p_new_t, p_new, torch.argsort(p_new_t)
                clock += 1
                moved_at[g] = clock
                stamps[g] += 1
                self.stats["moves"] += 1
                changed = True
            self.stats["sweeps"] += 1
            if not changed:
                break
        return {g: perms[g].to("cpu") for g in self.spec.sizes}


class WeightMatchingProjector:
    """``WM(theta~, theta_b)`` by :func:`weight_matching` at every call (with the same approximations).

    Used for specs :class:`WarmProjector` does not model (attention heads,
    block axes, quadratic terms: ``weight_matching`` honours them) and for
    ``LMCKIT_STE_PROJECTION=reference``. ``every`` and ``step_sweeps`` mean
    what they mean for :class:`WarmProjector` (``step_sweeps`` is
    ``weight_matching``'s ``max_iter`` of a step's projection), and so does
    ``full``; ``stats`` counts calls, held calls and sweeps.
    """

    warm = False

    def __init__(
        self,
        spec: PermutationSpec,
        sd_b: Mapping[str, torch.Tensor],
        max_iter: int = 100,
        device: torch.device | str | None = None,
        tol: float = DEFAULT_TOL,
        every: int = 1,
        step_sweeps: int = 0,
    ):
        if int(every) < 1 or int(step_sweeps) < 0:
            raise ValueError(f"every must be >= 1 and step_sweeps >= 0, got {every}, {step_sweeps}")
        self.spec, self.sd_b, self.device, self.tol = spec, sd_b, device, float(tol)
        self.max_iter, self.every, self.step_sweeps = int(max_iter), int(every), int(step_sweeps)
        self.stats = {"calls": 0, "held": 0, "sweeps": 0}

    def __call__(self, sd_a: Mapping[str, torch.Tensor], init: Perms, seed: int, full: bool = False) -> Perms:
        """As :meth:`WarmProjector.__call__`."""
        self.stats["calls"] += 1
        if not full and (self.stats["calls"] - 1) % self.every:
            self.stats["held"] += 1
            return {g: init[g].to("cpu") for g in self.spec.sizes}
        sweeps = self.max_iter if full or not self.step_sweeps else min(self.max_iter, self.step_sweeps)
        res = weight_matching(
            self.spec,
            sd_a,
            self.sd_b,
            seed=seed,
            max_iter=sweeps,
            init_perms=init,
            restarts=1,
            device=self.device,
            tol=self.tol,
        )
        self.stats["sweeps"] += res.sweeps
        return {g: p.to("cpu") for g, p in res.perms.items()}


def ste_projector(
    spec: PermutationSpec,
    sd_b: Mapping[str, torch.Tensor],
    max_iter: int,
    device: torch.device | str | None,
    every: int = 1,
    step_sweeps: int = 0,
) -> WarmProjector | WeightMatchingProjector:
    """The projector STE uses for its per-step projections.

    ``LMCKIT_STE_PROJECTION``:

    * unset or ``exact``: :class:`WarmProjector` (the same permutation as
      :func:`weight_matching` at every step);
    * ``exact-cold``: the same descent with every assignment solved from
      scratch (:func:`lmckit.match.lap.solve`; for benchmarks);
    * ``reference``: :class:`WeightMatchingProjector`, i.e. :func:`weight_matching`
      itself at every step.

    Specs with attention heads or block axes (the ViT, the LSTM, ``cat``/``pad``/
    ``flatten`` axes) always get :class:`WeightMatchingProjector`: the warm
    projector models free whole-axis groups only.

    Two approximations, off by default, change STE's result (measured by
    ``benchmarks/bench_ste.py`` and on the quick recipe, see the README's speed
    section). They are STE options (``project_sweeps``, ``project_every``: in the
    stage hash and STE's resume fingerprint, set per recipe with
    ``[match.ste]``, per command with ``--option``). The end-of-epoch
    projection, which STE scores and returns, is always run to convergence:

    * ``step_sweeps = s`` (default 0: off): at most ``s`` sweeps of the
      warm-started descent per training step; the descent continues at the
      next step from where it stopped (``s = 1``: one sweep per step, one
      assignment solve per group).
    * ``every = k`` (default 1): project at every ``k``-th step only (the
      permutation of the midpoint is then up to ``k - 1`` steps old; a resumed
      run restarts the k-cycle).

    Raises
    ------
    LmcError
        An unknown ``LMCKIT_STE_PROJECTION`` mode, ``every < 1`` or ``step_sweeps < 0``.
    """

    mode = os.environ.get("LMCKIT_STE_PROJECTION", "exact").strip().lower() or "exact"
    if mode not in ("exact", "exact-cold", "reference"):
        raise LmcError(f"unknown LMCKIT_STE_PROJECTION={mode!r}", "use exact, exact-cold or reference")
    if int(every) < 1 or int(step_sweeps) < 0:
        raise LmcError(
            f"STE projection: project_every must be >= 1 and project_sweeps >= 0, got {every}, {step_sweeps}"
        )
    every, sweeps = int(every), int(step_sweeps)
    if mode == "reference" or spec.heads or any(is_segmented(e) for ax in spec.axes.values() for e in ax):
        return WeightMatchingProjector(spec, sd_b, max_iter, device, every=every, step_sweeps=sweeps)
    solver = "cold" if mode == "exact-cold" else "warm"
    return WarmProjector(spec, sd_b, max_iter, device, solver=solver, every=every, step_sweeps=sweeps)
