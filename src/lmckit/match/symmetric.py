"""Weight and activation matching under symmetry classes beyond permutations (issue 29).

Generalised weight matching
---------------------------
The objective is permutation WM's (:mod:`lmckit.match.weight`),
``J(T) = sum_k <A_k, T(B)_k>_F`` (so ``||A - T(B)||^2 = ||A||^2 + ||T(B)||^2 - 2 J``,
and for the orthogonal and signed classes ``||T(B)|| = ||B||``: maximising
``J`` minimises the L2 distance), over a transform ``T`` with one element of
its class per group (:mod:`lmckit.perm.symmetry`). Coordinate descent: holding
every group but ``g`` fixed, ``J`` is linear in ``g``'s matrix ``M``
(``tr(M^T C_g) + const`` with ``C_g = sum_(k,a) A_k^(a) T_{-g}(B)_k^(a)T``, the
same cost as permutation WM's), and each step is the exact maximiser over the
class (:func:`lmckit.perm.symmetry.step`): a LAP (permutations), a LAP on
``|C|`` and a sign choice (signed), Procrustes ``U V^T`` (orthogonal;
Schoenemann 1966), Procrustes of ``B^T C B`` on the ones-complement
(LayerNorm streams). A head structure is one step, the joint optimum over the
head permutation and every member's per-head maps
(:func:`lmckit.perm.symmetry.head_step`). Entries where ``g`` moves two axes
of one tensor make ``J`` quadratic in ``M``; the step then maximises the
linearisation at the current map (as permutation WM does) and is accepted only
if ``J`` does not fall. Norm gains and biases are left out of ``J`` for
matrix classes (folded they are 1 and 0 in both models; signed moves them by
``|M|``, not linear in the signs). The invertible class has no exact step
(``J`` is unbounded on invertible maps) and is refused.

Cost per sweep: one cost matrix per (entry, axis) of every group (the same
products as permutation WM) plus, per group of ``n`` units, one ``n x n`` SVD
(orthogonal), one LAP (permutation, signed), or ``H^2`` SVDs / LAPs of
``d x d`` blocks and one ``H x H`` LAP (heads).

Generalised activation matching
-------------------------------
:func:`activation_matching_sym`: per group, the cross-covariance
``C_g = Z_A^T Z_B`` of the two models' activations of that group (the same
sites and statistics as :mod:`lmckit.match.activation`), and the same exact
step of the group's class (Procrustes on activations per stream, the joint
head step per head structure): ``argmax_M sum <Z_A, Z_B M^T>``, i.e. the map
that best aligns B's activations to A's in least squares over the class.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import LmcError
from ..perm.spec import PermutationSpec, entry_segments
from ..perm.symmetry import (
    GroupSymmetry,
    apply_transform,
    derive_symmetry,
    head_step,
    identity_transform,
    perm_matrix,
    step,
    transform_matrix,
)
from ..perm.symmetry_transforms import apply_segment
from . import lap as _lap
from .weight import STAT_SUFFIXES, check_pair

__all__ = ["SymMatchResult", "weight_matching_sym", "activation_matching_sym", "relative_distance"]


def _lap_max(cost: np.ndarray) -> np.ndarray:
    return _lap.solve(cost, maximize=True)


@dataclass
class SymMatchResult:
    """A transform aligning model B to model A under a symmetry class.

    ``transform``: ``{group: index or matrix}`` (:mod:`lmckit.perm.symmetry`'s
    convention: ``apply_transform(spec, sym, transform, sd_b)`` is aligned to A).
    ``sym``: each group's class. ``objective``: ``J`` after each sweep, starting
    at the initial transform (non-decreasing). ``sweeps``, ``converged`` (the last
    sweep raised ``J`` by less than ``tol`` relative), ``seconds``.
    """

    transform: dict[str, torch.Tensor]
    sym: dict[str, GroupSymmetry]
    symmetry: str
    objective: list[float]
    sweeps: int
    seconds: float
    method: str
    converged: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "symmetry": self.symmetry,
            "objective_before": float(self.objective[0]),
            "objective_after": float(self.objective[-1]),
            "sweeps": int(self.sweeps),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
            "classes": {g: s.cls for g, s in self.sym.items()},
            **self.extra,
        }

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.sym.values():
            counts[s.cls] = counts.get(s.cls, 0) + 1
        return (
            f"{self.method} matching ({self.symmetry}: "
            + ", ".join(f"{n} {c}" for c, n in counts.items())
            + f" groups): objective {self.objective[0]:.6g} -> {self.objective[-1]:.6g} in {self.sweeps} sweep"
            + ("s" if self.sweeps != 1 else "")
            + f", {self.seconds:.3f}s"
            + ("" if self.converged else " (stopped at max_iter, not converged)")
        )


def _objective_keys(spec: PermutationSpec, sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        k
        for k, ax in spec.axes.items()
        if any(e is not None for e in ax) and sd[k].is_floating_point() and k.rsplit(".", 1)[-1] not in STAT_SUFFIXES
    ]


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: list[str]) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in keys))


def relative_distance(
    spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]
) -> float:
    """``||A - B|| / ||A||`` over every floating-point parameter entry (float64)."""
    keys = [k for k in spec.axes if sd_a[k].is_floating_point() and k.rsplit(".", 1)[-1] not in STAT_SUFFIXES]
    num = sum(float(((sd_a[k].double() - sd_b[k].double()) ** 2).sum()) for k in keys)
    den = sum(float((sd_a[k].double() ** 2).sum()) for k in keys)
    return (num / max(den, 1e-300)) ** 0.5


def _check_classes(sym_a: Mapping[str, GroupSymmetry], sym_b: Mapping[str, GroupSymmetry]) -> None:
    for g, s in sym_a.items():
        if sym_b[g].cls != s.cls:
            raise LmcError(
                f"group {g!r} admits {s.cls} maps in model A but {sym_b[g].cls} in model B"
                + (f" ({sym_b[g].limit})" if sym_b[g].limit else ""),
                "fold both models' norms (lmckit.perm.symmetry.fold_norms) or use the permutation class",
            )


def _units(spec: PermutationSpec) -> list[list[str]]:
    units = [list(m) for _, m in spec.heads.values()]
    inside = {g for u in units for g in u}
    return units + [[g] for g in spec.sizes if g not in inside]


def _matricize(t: torch.Tensor, i: int, off: int, sn: int, inner: int) -> torch.Tensor:
    """Segment ``[off, off + sn*inner)`` of axis ``i`` as an ``(sn, rest)`` float64 matrix (unit runs as rows)."""
    return t.narrow(i, off, sn * inner).movedim(i, 0).reshape(sn, -1).double()


def _cost_full(
    spec: PermutationSpec, a_mats: Mapping[tuple, torch.Tensor], bt: Mapping[str, torch.Tensor], g: str, terms
) -> torch.Tensor:
    """``sum A^(a) T(B)^(a)T`` over ``g``'s (entry, axis, segment) terms, against B under the *current* transform.

    With ``T(B)^(a) = M B'^(a)`` (``B'``: B transformed by every other group), this is ``C_g M^T``; for the
    permutation, signed and orthogonal classes ``M^{-T} = M``, so the cost of the step is ``C_full M``.
    ``a_mats``: A's matricized segments, computed once.
    """
    n = spec.sizes[g]
    c = torch.zeros(n, n, dtype=torch.float64)
    for term in terms:
        key, i, off, sn, inner = term
        x = bt[key]
        if x.dim() == 2 and inner == 1 and off == 0 and sn == x.shape[i] and x.dtype == torch.float64:
            c.addmm_(a_mats[term], x.T if i == 0 else x)  # the matricized form as a view: no copy
        else:
            c += a_mats[term] @ _matricize(x, i, off, sn, inner).T
    return c


def _apply_delta(bt: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor], plan, d: torch.Tensor, cls: str) -> None:
    """Into ``out`` (copies of ``bt``'s entries, made on first touch): ``d`` applied to one group's segments.

    ``plan``: the group's ``(key, axis, offset, units, inner, is_norm)`` segments. The same arithmetic as
    :func:`lmckit.perm.symmetry.apply_transform` (an index moves rows; a matrix ``D`` multiplies the
    segment's units; norm gains move by ``|D|`` under the signed class and not at all under matrices).
    """
    for key, i, off, sn, inner, is_norm in plan:
        if is_norm and d.dim() == 2 and cls != "signed":
            continue
        x = out.get(key, bt[key])
        if off == 0 and sn * inner == x.shape[i]:  # the whole axis (most entries): a new tensor, no copies
            if d.dim() == 1:
                out[key] = x.index_select(i, (d[:, None] * inner + torch.arange(inner)[None, :]).reshape(-1))
            elif inner == 1 and i == 0:
                out[key] = ((d.abs() if is_norm else d) @ x.reshape(sn, -1)).reshape(x.shape)
            elif inner == 1 and i == x.dim() - 1:
                out[key] = x @ (d.abs() if is_norm else d).T
            else:
                out[key] = apply_segment(x, i, d.abs() if is_norm else d, inner)
            continue
        if key not in out:
            out[key] = bt[key].clone()
        seg = out[key].narrow(i, off, sn * inner)
        if d.dim() == 1:
            idx = (d[:, None] * inner + torch.arange(inner)[None, :]).reshape(-1)
            seg.copy_(seg.index_select(i, idx))
        else:
            seg.copy_(apply_segment(seg, i, d.abs() if is_norm else d, inner))


def weight_matching_sym(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    symmetry: str = "orthogonal",
    model: Any = None,
    seed: int = 0,
    max_iter: int = 200,
    tol: float = 1e-13,
    init: Mapping[str, torch.Tensor] | None = None,
    relax: bool = True,
    sym: Mapping[str, GroupSymmetry] | None = None,
    start: str = "permutation",
) -> SymMatchResult:
    """Transform of B (per group an element of its class under ``symmetry``) maximising ``sum <A, T(B)>``.

    Parameters
    ----------
    spec:
        The architecture's spec, with ``spec.ops`` (the zoo rules and the fx
        tracer fill it).
    sd_a, sd_b:
        State dicts (never modified; matched in float64). Models with LayerNorm/RMSNorm must be
        folded first (:func:`lmckit.perm.symmetry.fold_norms`) for their
        stream to take orthogonal maps; otherwise the stream stays permuted.
    symmetry:
        ``"permutation"``, ``"signed"`` or ``"orthogonal"`` (``"invertible"``:
        refused, no exact step; see the module docstring).
    model:
        The module (needed only to tell reading from writing axes).
    seed:
        Seeds the random order of the units (groups; head structures as one) in each sweep.
    max_iter:
        Most sweeps.
    tol:
        Stop after a sweep that raises ``J`` by less than ``tol * |J|``.
    init:
        Starting transform (default identity).
    relax:
        For ``"signed"`` without ``init``: first descend with the signed groups
        relaxed to orthogonal maps (continuous, so a planted signed permutation
        is recovered exactly where discrete descent from the identity stalls in
        a local optimum), round each map to its nearest signed permutation
        (``argmax_S tr(S^T M)``, the signed step on ``M``), then descend over
        signed permutations from there. ``extra["relaxed_sweeps"]`` counts the
        first stage's sweeps.
    sym:
        Per-group classes to use instead of deriving them (for that relaxation).
    start:
        Without ``init``: ``"permutation"`` (default) starts from permutation WM's optimum
        (:func:`lmckit.match.weight.weight_matching`, same seed and ``max_iter``), so the larger class
        only raises its ``J``; ``"identity"`` starts from the identity. On the ``vit-fmnist`` models
        descent from the identity ended at a lower L2 distance than permutation WM but a *higher* barrier
        (pair 0-1: test loss barrier 1.57 vs 1.12), from permutation WM's optimum at 0.23
        (``benchmarks/symmetry_barriers.py``). ``extra["start"]``, ``extra["start_sweeps"]`` say which.

    Returns
    -------
    SymMatchResult
        ``extra``: ``distance_before`` / ``distance_after`` (``||A - T(B)|| / ||A||``).

    Raises
    ------
    LmcError
        The models do not fit ``spec``, contain NaN/inf, admit different classes
        (e.g. only one of them folded), or ``symmetry`` is ``"invertible"`` or unknown.
    """
    t0 = time.perf_counter()
    init_given = init is not None
    check_pair(spec, sd_a, sd_b)
    if symmetry == "invertible":
        step("invertible", torch.eye(1))  # raises, with the reason
    if start not in ("permutation", "identity"):
        raise LmcError(f"unknown start {start!r}", "use 'permutation' or 'identity'")
    if sym is None:
        sym = derive_symmetry(spec, sd_a, symmetry, model=model)
        _check_classes(sym, derive_symmetry(spec, sd_b, symmetry, model=model))
    sym = dict(sym)
    relaxed_sweeps = start_sweeps = 0
    if init is None and start == "permutation" and any(s.cls != "permutation" for s in sym.values()):
        from .weight import weight_matching

        pw = weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=max_iter)
        start_sweeps = pw.sweeps
        init = {g: (pw.perms[g] if s.cls == "permutation" else perm_matrix(pw.perms[g])) for g, s in sym.items()}
        if symmetry == "signed" and relax and any(s.cls == "signed" for s in sym.values()):
            soft = {
                g: (dataclasses.replace(s, cls="orthogonal", fix_ones=False) if s.cls == "signed" else s)
                for g, s in sym.items()
            }
            first = weight_matching_sym(
                spec, sd_a, sd_b, "orthogonal", model, seed, max_iter, tol, init=init, relax=False, sym=soft
            )
            relaxed_sweeps = first.sweeps
            init = {g: (step("signed", m)[0] if sym[g].cls == "signed" else m) for g, m in first.transform.items()}
    if symmetry == "signed" and relax and init is None and any(s.cls == "signed" for s in sym.values()):
        soft = {
            g: (dataclasses.replace(s, cls="orthogonal", fix_ones=False) if s.cls == "signed" else s)
            for g, s in sym.items()
        }
        first = weight_matching_sym(spec, sd_a, sd_b, "orthogonal", model, seed, max_iter, tol, relax=False, sym=soft)
        relaxed_sweeps = first.sweeps
        init = {g: (step("signed", m)[0] if sym[g].cls == "signed" else m) for g, m in first.transform.items()}
    # float64 throughout: the steps resolve J to ~1e-16 relative, not to float32's 1e-7 (models here are small)
    sd_a = {k: (v.double() if v.is_floating_point() else v) for k, v in sd_a.items()}
    sd_b = {k: (v.double() if v.is_floating_point() else v) for k, v in sd_b.items()}
    keys = _objective_keys(spec, sd_a)
    norm = {g: set(s.norm_keys) for g, s in sym.items()}
    terms: dict[str, list[tuple[str, int, int, int, int]]] = {g: [] for g in spec.sizes}
    for key in keys:
        for i, e in enumerate(spec.axes[key]):
            if e is None:
                continue
            groups = [e] if isinstance(e, str) else list(dict.fromkeys(s[0] for s in e if s[0] is not None))
            for g in groups:
                if sym[g].cls != "permutation" and key in norm[g]:
                    continue
                for sg, sn, inner, off in entry_segments(e, sd_a[key].shape[i], spec.sizes):
                    if sg == g:
                        terms[g].append((key, i, off, sn, inner))
    a_mats = {term: _matricize(sd_a[term[0]], *term[1:]) for ts in terms.values() for term in ts}
    t = dict(init) if init is not None else identity_transform(spec, sym)
    plan: dict[str, list[tuple[str, int, int, int, int, bool]]] = {g: [] for g in spec.sizes}
    for key in keys:
        for i, e in enumerate(spec.axes[key]):
            if e is not None:
                for sg, sn, inner, off in entry_segments(e, sd_b[key].shape[i], spec.sizes):
                    if sg is not None:
                        plan[sg].append((key, i, off, sn, inner, key in norm[sg]))
    # J is linear in every group's map (so a step's gain is its value minus the old map's, both from the
    # cost) unless a group moves two axes of one entry, or signed maps move norm gains by |M| (not in C)
    linear = all(
        s.cls in ("orthogonal", "permutation")
        and len({(k, i) for k, i, *_ in plan[g]}) == len({k for k, *_ in plan[g]})
        for g, s in sym.items()
    )
    bt = apply_transform(spec, sym, t, sd_b, keys=keys)
    dots = {k: float((sd_a[k].double() * bt[k].double()).sum()) for k in keys}
    j = sum(dots.values())
    history = [j]
    gen = torch.Generator().manual_seed(int(seed))
    units = _units(spec)
    heads_of = {g: int(h) for h, ms in spec.heads.values() for g in ms}
    converged, sweeps, rejected, steps = False, 0, 0, 0
    tm = {g: transform_matrix(m) for g, m in t.items()}  # each map's matrix form (M^{-1} = M^T here)
    t_loop = time.perf_counter()
    for _ in range(int(max_iter)):
        sweeps += 1
        j_start = j
        for ui in torch.randperm(len(units), generator=gen).tolist():
            u = units[ui]
            costs = [(sym[g].cls, _cost_full(spec, a_mats, bt, g, terms[g]) @ tm[g]) for g in u]
            if u[0] in heads_of:
                mats, v_new = head_step(heads_of[u[0]], costs, lap=_lap_max)
                new = dict(zip(u, mats))
            else:
                m, v_new = step(costs[0][0], costs[0][1], fix_ones=sym[u[0]].fix_ones, lap=_lap_max)
                new = {u[0]: m}
            cand = {**t, **new}
            # only the unit's change D = M_new M_old^T (an index: old^{-1}[new]) applied to the current
            # T(B): one product per (entry, axis) of the unit instead of re-applying every group's map
            bn: dict[str, torch.Tensor] = {}
            for g, m in new.items():
                d = torch.argsort(t[g])[m] if m.dim() == 1 else m @ tm[g].T  # D M_old = M_new
                _apply_delta(bt, bn, plan[g], d, sym[g].cls)
            ks = list(bn)  # the entries the step changed (norm gains under matrices stay)
            if linear:  # J = tr(M^T C) + const: the step's value against the old map's, no pass over the entries
                dn = {}
                jn = j + v_new - sum(float((tm[g] * c).sum()) for g, (_, c) in zip(u, costs))
            else:
                dn = {k: float((sd_a[k].double() * bn[k].double()).sum()) for k in ks}
                jn = j + sum(dn[k] - dots[k] for k in ks)
            steps += 1
            if jn >= j - 1e-12 * max(abs(j), 1.0):  # exact steps never lower J; this only absorbs rounding
                t, j = cand, jn
                tm.update({g: transform_matrix(m) for g, m in new.items()})
                bt.update(bn)
                dots.update(dn)
            else:
                rejected += 1
        history.append(j)
        if j - j_start <= tol * max(abs(j), 1e-30) and sweeps > 1:
            converged = True
            break
    sweep_seconds = time.perf_counter() - t_loop
    aligned = apply_transform(spec, sym, t, sd_b)
    return SymMatchResult(
        transform=t,
        sym=sym,
        symmetry=symmetry,
        objective=history,
        sweeps=sweeps,
        seconds=time.perf_counter() - t0,
        method="weight",
        converged=converged,
        extra={
            "seed": int(seed),
            "start": "given" if init_given else start,
            "start_sweeps": start_sweeps,
            "relaxed_sweeps": relaxed_sweeps,
            "sweep_seconds": sweep_seconds,
            "steps": steps,
            "steps_rejected": rejected,
            "distance_before": relative_distance(spec, sd_a, sd_b),
            "distance_after": relative_distance(spec, sd_a, aligned),
        },
    )


def activation_matching_sym(
    spec: PermutationSpec,
    sym: Mapping[str, GroupSymmetry],
    cross: Mapping[str, torch.Tensor],
    symmetry: str,
) -> SymMatchResult:
    """Per group the map of its class maximising ``tr(M^T C_g)`` for ``C_g = E[z_A z_B^T]`` (``n x n``).

    ``cross``: per group the cross-correlation (or covariance) of A's and B's
    activations of that group's units (rows: A's units, columns: B's), as
    computed by :mod:`lmckit.match.activation` for permutation AM. Each group
    (head structures jointly) takes the exact step of its class: LAP,
    sign choice, Procrustes (restricted to ``Q 1 = 1`` under LayerNorm), joint head step. One pass, no
    iteration (the costs do not depend on the other groups' maps).
    """
    t0 = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    total = 0.0
    for u in _units(spec):
        costs = [(sym[g].cls, cross[g].double()) for g in u]
        if any(u[0] in ms for _, ms in spec.heads.values()):
            h = next(int(hh) for hh, ms in spec.heads.values() if u[0] in ms)
            mats, v = head_step(h, costs, lap=_lap_max)
            out.update(zip(u, mats))
        else:
            m, v = step(costs[0][0], costs[0][1], fix_ones=sym[u[0]].fix_ones, lap=_lap_max)
            out[u[0]] = m
        total += v
    return SymMatchResult(out, dict(sym), symmetry, [0.0, total], 1, time.perf_counter() - t0, "activation")
