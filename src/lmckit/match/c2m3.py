"""C2M3: cycle-consistent matching of many models through a universe space, by Frank-Wolfe.

The method (Crisostomi, Fumero, Baieri, Bernard, Rodola, "C2M3: Cycle-Consistent Multi-Model
Merging", NeurIPS 2024; reference code github crisostomi/cycle-consistent-model-merging,
``src/ccmm/matching/frank_wolfe_sync_matching.py``, function
``frank_wolfe_synchronized_matching``) gives every model ``i`` and group ``g`` a map
``P_i^g`` (``n x n``) from a shared *universe* order to the model's units; the map between two
models is factored as ``P_ij = P_i P_j^T``, so every cycle composes to the identity by
construction. It maximises the sum of the pairwise weight-matching objectives

.. math::

    F(P) = \\sum_{i<j} \\sum_k \\langle U_i^k, U_j^k \\rangle , \\qquad
    U_i^k = W_i^k \\times_{a} P_i^{g(k,a)\\,T} \\text{ on every permuted axis } a

(``U_i`` is model ``i`` mapped to the universe: for a layer ``W`` with row group ``r`` and
column group ``c``, ``U = P^{rT} W P^c``, and ``<U_i, U_j> = tr(W_i^T P_ij W_j P_ij'^T)``, the
reference's ``compute_layer_similarity_sync``) over doubly-stochastic ``P`` by Frank-Wolfe:

1. the gradient ``G_i^g = dF / dP_i^g``; for an axis ``a`` of entry ``k`` in group ``g`` it is
   ``Z^{(a)} S_{-i}^{(a)T}``, with ``S_{-i} = sum_{j != i} U_j`` and ``Z`` the entry mapped on
   its other permuted axes only (``X^{(a)}``: axis ``a`` first, the rest flattened);
2. the vertex ``Q_i^g = argmax_Q <G_i^g, Q>`` over permutation matrices (one linear assignment
   per model and group, the reference's ``project_gradients``);
3. the step ``P <- (1 - t) P + t Q`` with one ``t`` in [0, 1] for all models and groups,
   chosen by a line search (the reference's ``fminbound`` over ``line_search_step_sync``);
4. until the objective stops improving (the reference: 5 iterations in a row with a gain
   below 1e-6, at most 200 iterations); then each ``P_i^g`` is rounded to the permutation
   maximising ``<P_i^g, Q>``.

Implementation choices (the project's, documented here)
-------------------------------------------------------
* ``F`` is summed as ``(||sum_i U_i||^2 - sum_i ||U_i||^2) / 2`` (N terms instead of N(N-1)/2
  pairs), and the gradient of model ``i`` uses ``S - U_i``: one matrix product per
  (model, entry, permuted axis) per iteration, as many as one weight-matching sweep has per
  (pair, entry, axis).
* Exact line search: along the segment, ``U_i(t)`` is a polynomial of degree 2 in ``t``
  (``U_0 + t U_1 + t^2 U_2``, degree 1 for entries with one permuted axis), so ``F(t)`` is a
  quartic whose coefficients are inner products; its maximum on [0, 1] is found from the real
  roots of the cubic derivative. Because ``Q`` is a permutation, ``U_1`` and ``U_2`` are index
  gathers of the maintained products ``X = W P^c`` and ``Y = P^{rT} W`` and of ``W`` (no
  matrix product); ``X``, ``Y`` and ``U`` are updated by the same gathers after the step and
  recomputed from ``P`` every ``refresh`` iterations so rounding never accumulates.
* Stopping: when the Frank-Wolfe gap ``sum <G, Q - P>`` is at most ``tol * |F|`` (a
  certificate of a stationary point), when the line search returns ``t = 0``, after
  ``patience`` iterations in a row each raising ``F`` by at most ``tol * |F|`` (the
  reference's patience rule with a relative threshold instead of its absolute 1e-6), or after
  ``max_iter`` iterations (the reference's 200).
* Start (``init``): ``"anchor"`` (lmckit's default: the permutations of pairwise weight
  matching to model 0, the reference's ``'LAP'`` initialisation of its two-model Frank-Wolfe),
  ``"identity"`` (every ``P_i = I``, the reference matcher's ``frank_wolfe_sync.yaml``) or
  ``"uniform"`` (``1/n`` plus a seeded perturbation of relative size 0.01, made doubly stochastic
  by Sinkhorn-Knopp: the reference merger's ``'sinkhorn'`` initialisation). The relaxation is not
  concave, and Frank-Wolfe stops at a stationary point near its start: on four permuted copies
  of a trained 16-unit MLP, the identity start found the planted alignment in 1 of 10 draws,
  the uniform start in 2, the anchor start in 10 (docs/definitions.md); on independently trained
  models the anchor start also reached the highest objective. Hence the default.
* Only the entries of the weight-matching objective count (parameters with a permuted axis:
  :func:`lmckit.match.weight.objective_keys`, no BatchNorm statistics); groups no such entry
  sees keep the identity. Specs with attention heads, block axes (``cat``, ``pad``, LSTM
  gates, ``flatten``) or an entry with three or more permuted axes are refused
  (:class:`LmcError`): the relaxation here acts on free whole axes.
* The result is expressed relative to model 0 (its permutation is the identity), as
  :func:`lmckit.match.multi.merge_many`'s: every pairwise map ``P_i P_j^T`` is unchanged.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..errors import LmcError
from ..perm.spec import (
    Perms,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    is_segmented,
)
from ..progress import Progress
from .multi import _check_states, pairwise_inner_sum
from .result import MultiMatchResult
from .weight import _lap, objective_keys, weight_matching

INITS = ("anchor", "identity", "uniform")


def check_spec(spec: PermutationSpec) -> None:
    """Raise :class:`LmcError` when C2M3 cannot align models of ``spec`` (see the module docstring)."""
    bad = [f"head structure {name!r}" for name in getattr(spec, "heads", {}) or {}]
    bad += [f"block axis {k}[{a}]" for k, ax in spec.axes.items() for a, e in enumerate(ax) if is_segmented(e)]
    bad += [f"{k} ({n} permuted axes)" for k, ax in spec.axes.items() if (n := sum(e is not None for e in ax)) > 2]
    if bad:
        raise LmcError(
            f"C2M3 relaxes free whole-axis permutations with at most two per tensor; this architecture's spec has "
            f"{len(bad)} parts it does not model ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})",
            "use MergeMany (--multi mergemany) or anchor matching, which honour heads and block axes",
        )


def _unf(t: torch.Tensor, a: int) -> torch.Tensor:
    """``t^{(a)}``: axis ``a`` first, the others flattened (``n x rest``)."""
    return t.movedim(a, 0).reshape(t.shape[a], -1)


def _mode(w: torch.Tensor, a: int, p: torch.Tensor) -> torch.Tensor:
    """``w`` mapped to the universe on axis ``a`` by ``p`` (``n x n``).

    ``out[.., u, ..] = sum_v p[v, u] w[.., v, ..]``; a one-hot ``p[q[u], u] = 1`` gives
    ``w.index_select(a, q)``, i.e. :func:`lmckit.perm.apply_permutation` with ``q``.
    """
    x = w.movedim(a, 0)
    shp = x.shape
    return (p.t() @ x.reshape(shp[0], -1)).reshape(shp).movedim(0, a)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a.double() * b.double()))


def _sinkhorn_knopp(m: torch.Tensor, iters: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """Alternate row and column normalisation of a positive matrix (Sinkhorn and Knopp 1967)."""
    m = m.double()
    for _ in range(iters):
        m = m / m.sum(1, keepdim=True)
        m = m / m.sum(0, keepdim=True)
        if float((m.sum(1) - 1).abs().max()) < tol:
            break
    return m


class _Entry:
    """One objective entry: its key and permuted axes ``[(axis, group)]`` (one or two)."""

    def __init__(self, key: str, axes: list[tuple[int, str]]):
        self.key, self.axes = key, axes


def _best_step(c: np.ndarray) -> float:
    """``argmax_{t in [0, 1]} sum_d c[d] t^d`` (the largest value; the smallest ``t`` on ties)."""
    cands = [0.0, 1.0]
    der = [d * c[d] for d in range(len(c) - 1, 0, -1)]  # highest degree first
    while der and der[0] == 0:
        der = der[1:]
    if len(der) > 1:
        for r in np.roots(der):
            if abs(r.imag) < 1e-12 and 0.0 < r.real < 1.0:
                cands.append(float(r.real))
    vals = [float(np.polyval(c[::-1], t)) for t in cands]
    best = max(range(len(cands)), key=lambda i: (vals[i], -cands[i]))
    return cands[best] if vals[best] > vals[0] else 0.0


def c2m3(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    seed: int = 0,
    max_iter: int = 200,
    init: str = "anchor",
    tol: float = 1e-9,
    patience: int = 5,
    refresh: int = 25,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MultiMatchResult:
    """Cycle-consistent permutations of three or more models into one order (C2M3, Frank-Wolfe).

    Parameters
    ----------
    spec:
        The shared permutation spec (see :func:`check_spec` for what is refused).
    states:
        At least three state dicts of the spec's architecture (not modified).
    seed:
        Seeds the ``"uniform"`` start and the ``"anchor"`` start's weight matchings.
    max_iter:
        Frank-Wolfe iterations at most (the reference's 200).
    init:
        ``"identity"``, ``"uniform"`` or ``"anchor"`` (module docstring).
    tol, patience:
        Stop when the Frank-Wolfe gap is at most ``tol * |F|``, or after ``patience`` iterations
        in a row each raising ``F`` by at most ``tol * |F|``.
    refresh:
        Recompute the maintained products from ``P`` every ``refresh`` iterations.
    device:
        Where to compute (default CPU).
    progress:
        Show a progress bar.

    Returns
    -------
    MultiMatchResult
        ``method="c2m3"``; ``perms[i]`` puts model ``i`` in model 0's order (identity for model
        0), so every pair of aligned models is related by ``P_i P_j^T`` (cycle error 0, see
        :func:`lmckit.match.cycle.cycle_error`); ``objective``: ``S = sum_{i<j} <pi_i(theta_i),
        pi_j(theta_j)>`` over the objective entries at the start (every model in its own
        order, or the anchor start's permutations) and at the rounded result (higher is better);
        ``passes`` the Frank-Wolfe steps taken; ``extra``: ``relaxed`` (``F`` after each
        iteration), ``steps`` (the line search's ``t``), ``gaps`` (the Frank-Wolfe gap before
        each step), ``universe`` (the permutations into the universe order before re-expressing
        them relative to model 0), ``stop`` (why it stopped).

    Raises
    ------
    LmcError
        Fewer than three models, states that do not fit ``spec`` or are not finite, a spec
        C2M3 does not model, or bad options.
    """
    t0 = time.perf_counter()
    _check_states(spec, states, minimum=3)
    check_spec(spec)
    if init not in INITS:
        raise LmcError(f"C2M3 init must be one of {', '.join(INITS)}, got {init!r}")
    if int(max_iter) < 0 or int(patience) < 1 or int(refresh) < 1 or not float(tol) >= 0:
        raise LmcError(
            f"C2M3 needs max_iter >= 0, patience >= 1, refresh >= 1 and tol >= 0, got {max_iter}, {patience}, "
            f"{refresh}, {tol}"
        )
    dev = resolve_device(device if device is not None else "cpu")
    n_models = len(states)
    keys = objective_keys(spec, states[0])
    entries = [_Entry(k, [(a, g) for a, g in enumerate(spec.axes[k]) if g is not None]) for k in keys]
    groups = sorted({g for e in entries for _, g in e.axes}, key=list(spec.sizes).index)
    W = [{e.key: states[i][e.key].detach().to(dev, torch.float32) for e in entries} for i in range(n_models)]

    # ---- start
    if init == "identity":
        P = [{g: torch.eye(spec.sizes[g], device=dev) for g in groups} for _ in range(n_models)]
    elif init == "uniform":
        gen = torch.Generator().manual_seed(int(seed))
        P = []
        for _ in range(n_models):
            d = {}
            for g in groups:
                n = spec.sizes[g]
                m = torch.ones(n, n, dtype=torch.float64) / n + torch.rand(n, n, generator=gen, dtype=torch.float64) * (
                    0.01 / n
                )
                d[g] = _sinkhorn_knopp(m).to(dev, torch.float32)
            P.append(d)
    else:  # anchor: pairwise weight matching to model 0
        P = [{g: torch.eye(spec.sizes[g], device=dev) for g in groups}]
        for i in range(1, n_models):
            res = weight_matching(spec, states[0], states[i], seed=int(seed) + i, device=dev)
            P.append({g: _perm_matrix(res.perms[g].to(dev)) for g in groups})
    start_perms = [_round(P[i], spec) for i in range(n_models)]
    start_obj = pairwise_inner_sum([apply_permutation(spec, p, sd) for p, sd in zip(start_perms, states)], keys)

    def products(i: int):
        """``X = W P^c`` and ``Y = P^{rT} W`` per two-axis entry and ``U`` per entry, from ``P``."""
        X, Y, U = {}, {}, {}
        for e in entries:
            w = W[i][e.key]
            if len(e.axes) == 1:
                ((a, g),) = e.axes
                U[e.key] = _mode(w, a, P[i][g])
            else:
                (a0, g0), (a1, g1) = e.axes
                X[e.key] = _mode(w, a1, P[i][g1])
                Y[e.key] = _mode(w, a0, P[i][g0])
                U[e.key] = _mode(X[e.key], a0, P[i][g0])
        return X, Y, U

    XYU = [products(i) for i in range(n_models)]
    relaxed, steps, gaps = [], [], []
    stop, slow, taken = "max_iter", 0, 0
    F = _relaxed_value([xyu[2] for xyu in XYU], entries)
    with Progress(int(max_iter) if progress else 0, "c2m3") as bar:
        for it in range(1, int(max_iter) + 1):
            S = {e.key: sum(XYU[i][2][e.key] for i in range(n_models)) for e in entries}
            gap = 0.0
            Q: list[dict[str, torch.Tensor]] = []
            for i in range(n_models):
                G = _gradient(W[i], *XYU[i], S, entries, {g: spec.sizes[g] for g in groups}, dev)
                qi = {}
                for g in groups:
                    gt = np.ascontiguousarray(G[g].t().double().cpu().numpy())  # rows: universe u, cols: units v
                    q = torch.as_tensor(_lap(gt, inplace=True), dtype=torch.long, device=dev)
                    qi[g] = q
                    gap += float(G[g].t().double().gather(1, q[:, None]).sum()) - _dot(G[g], P[i][g])
                Q.append(qi)
            gaps.append(gap)
            if gap <= tol * max(abs(F), 1e-30):
                stop = "gap"
                break
            # line search along P + t (Q - P): U_i(t) = U0 + t U1 + t^2 U2, F(t) a quartic
            U1: list[dict[str, torch.Tensor]] = []
            U2: list[dict[str, torch.Tensor | None]] = []
            for i in range(n_models):
                X, Y, U = XYU[i]
                u1, u2 = {}, {}
                for e in entries:
                    w = W[i][e.key]
                    if len(e.axes) == 1:
                        ((a, g),) = e.axes
                        u1[e.key] = w.index_select(a, Q[i][g]) - U[e.key]
                        u2[e.key] = None
                    else:
                        (a0, g0), (a1, g1) = e.axes
                        xq = X[e.key].index_select(a0, Q[i][g0])
                        yq = Y[e.key].index_select(a1, Q[i][g1])
                        wqq = w.index_select(a0, Q[i][g0]).index_select(a1, Q[i][g1])
                        u1[e.key] = xq + yq - 2 * U[e.key]
                        u2[e.key] = wqq - xq - yq + U[e.key]
                U1.append(u1)
                U2.append(u2)
            coef = np.zeros(5)
            for e in entries:
                k = e.key
                a0 = S[k]
                a1 = sum(U1[i][k] for i in range(n_models))
                two = [U2[i][k] for i in range(n_models) if U2[i][k] is not None]
                a2 = sum(two) if two else None
                coef += 0.5 * _square_poly(a0, a1, a2)
                for i in range(n_models):
                    coef -= 0.5 * _square_poly(XYU[i][2][k], U1[i][k], U2[i][k])
            t = _best_step(coef)
            steps.append(t)
            if t == 0.0:
                stop = "step 0"
                relaxed.append(F)
                break
            new_F = float(np.polyval(coef[::-1], t))
            # the step, and the maintained products by the same gathers
            for i in range(n_models):
                for g in groups:
                    p = P[i][g]
                    p.mul_(1.0 - t)
                    cols = torch.arange(spec.sizes[g], device=dev)
                    p[Q[i][g], cols] += t
                X, Y, U = XYU[i]
                if it % int(refresh) == 0:
                    XYU[i] = products(i)
                    continue
                for e in entries:
                    k, w = e.key, W[i][e.key]
                    U[k] = U[k] + t * U1[i][k] + (t * t * U2[i][k] if U2[i][k] is not None else 0.0)
                    if len(e.axes) == 2:
                        (a0, g0), (a1, g1) = e.axes
                        X[k] = (1.0 - t) * X[k] + t * w.index_select(a1, Q[i][g1])
                        Y[k] = (1.0 - t) * Y[k] + t * w.index_select(a0, Q[i][g0])
            relaxed.append(new_F)
            taken += 1
            slow = slow + 1 if new_F - F <= tol * max(abs(F), 1e-30) else 0
            F = new_F
            if bar is not None and progress:
                bar.update(1, objective=F, step=t)
            if slow >= int(patience):
                stop = "patience"
                break

    universe = [_round(P[i], spec) for i in range(n_models)]
    to_ref = invert_permutation(universe[0])
    final = [compose_permutations(p, to_ref) for p in universe]
    end_obj = pairwise_inner_sum([apply_permutation(spec, p, sd) for p, sd in zip(final, states)], keys)
    return MultiMatchResult(
        perms=final,
        objective=[start_obj, end_obj],
        passes=taken,
        seconds=time.perf_counter() - t0,
        method="c2m3",
        converged=stop != "max_iter",
        pairwise=[None] * n_models,
        extra={
            "init": init,
            "seed": int(seed),
            "relaxed": relaxed,
            "steps": steps,
            "gaps": gaps,
            "stop": stop,
            "universe": universe,
            "reference": 0,
        },
    )


def _gradient(
    w: Mapping[str, torch.Tensor],
    X: Mapping[str, torch.Tensor],
    Y: Mapping[str, torch.Tensor],
    U: Mapping[str, torch.Tensor],
    S: Mapping[str, torch.Tensor],
    entries: Sequence[_Entry],
    sizes: Mapping[str, int],
    dev: torch.device,
) -> dict[str, torch.Tensor]:
    """``dF / dP_i^g`` for one model: ``Z^{(a)} (S - U_i)^{(a)T}`` summed over the (entry, axis) terms of ``g``.

    ``w``: the model's entries; ``X = W P^c``, ``Y = P^{rT} W`` (two-axis entries), ``U`` the model
    in the universe, ``S`` the sum of every model's ``U``. One matrix product per term.
    """
    G = {g: torch.zeros(n, n, device=dev) for g, n in sizes.items()}
    for e in entries:
        sm = S[e.key] - U[e.key]
        if len(e.axes) == 1:
            ((a, g),) = e.axes
            G[g] += _unf(w[e.key], a) @ _unf(sm, a).t()
        else:
            (a0, g0), (a1, g1) = e.axes
            G[g0] += _unf(X[e.key], a0) @ _unf(sm, a0).t()
            G[g1] += _unf(Y[e.key], a1) @ _unf(sm, a1).t()
    return G


def _square_poly(v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor | None) -> np.ndarray:
    """Coefficients (``t^0 .. t^4``) of ``||v0 + t v1 + t^2 v2||^2``."""
    c = np.zeros(5)
    c[0] = _dot(v0, v0)
    c[1] = 2 * _dot(v0, v1)
    c[2] = _dot(v1, v1)
    if v2 is not None:
        c[2] += 2 * _dot(v0, v2)
        c[3] = 2 * _dot(v1, v2)
        c[4] = _dot(v2, v2)
    return c


def _relaxed_value(Us: Sequence[Mapping[str, torch.Tensor]], entries: Sequence[_Entry]) -> float:
    """``F = (||sum_i U_i||^2 - sum_i ||U_i||^2) / 2`` over the entries."""
    tot = 0.0
    for e in entries:
        s = sum(u[e.key] for u in Us)
        tot += 0.5 * (_dot(s, s) - sum(_dot(u[e.key], u[e.key]) for u in Us))
    return tot


def _perm_matrix(q: torch.Tensor) -> torch.Tensor:
    """The ``n x n`` matrix ``P[q[u], u] = 1`` of the permutation ``q`` (model units ``v = q[u]``)."""
    n = int(q.numel())
    m = torch.zeros(n, n, device=q.device)
    m[q, torch.arange(n, device=q.device)] = 1.0
    return m


def _round(P: Mapping[str, torch.Tensor], spec: PermutationSpec) -> Perms:
    """The permutations maximising ``sum_u P[q[u], u]`` per group (identity for groups not in ``P``)."""
    out = identity_permutation(spec)
    for g, p in P.items():
        out[g] = torch.as_tensor(_lap(np.ascontiguousarray(p.t().double().cpu().numpy())), dtype=torch.long)
    return out
