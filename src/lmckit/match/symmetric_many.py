"""Several models under a symmetry class: anchor matching and MergeMany over transforms (issue 29).

The two-model step is :func:`lmckit.match.symmetric.weight_matching_sym` (exact coordinate steps per
class). Given ``N`` models whose norms are folded (:func:`lmckit.perm.symmetry.fold_norms`; every model
must admit the same class per group):

- **anchor**: ``T_i = argmax_T <theta_0, T(theta_i)>`` for ``i >= 1``, ``T_0 = I``.
- **MergeMany** (Ainsworth et al. 2023, Alg. 3, with transforms in place of permutations): start from
  permutation MergeMany's permutations (:func:`lmckit.match.multi.merge_many`, so the larger class only
  raises the objective), then in each pass, for every model ``i`` in a seeded random order, match it to
  the mean of the others' aligned weights, ``T_i = argmax_T <mean_{j != i} T_j(theta_j), T(theta_i)>``
  starting from the current ``T_i``. Each update raises the pairwise objective
  ``S = sum_{i<j} <T_i(theta_i), T_j(theta_j)>`` (``<x, mean_{j!=i} y_j>`` is ``S``'s part in ``T_i``
  over ``N - 1``), so ``S`` never falls; stop after a pass that moves no map by more than ``tol``
  (entrywise) or raises ``S`` by less than ``rtol`` relative, or after ``passes`` passes. The result
  is expressed in model 0's frame, ``T_i <- T_0^{-1} T_i`` (the function of every model and of their
  average is unchanged: each map is linear in the weights), so ``transforms[i]`` aligns model ``i``
  to model 0 in both schemes and ``lmckit barrier M0 Mi --perm transform_i.safetensors`` measures
  the pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import LmcError
from ..perm.spec import PermutationSpec
from ..perm.symmetry import (
    GroupSymmetry,
    apply_transform,
    compose_transforms,
    derive_symmetry,
    identity_transform,
    invert_transform,
    perm_matrix,
    transform_matrix,
)
from .multi import _mean_state, merge_many, pairwise_inner_sum
from .symmetric import _check_classes, _objective_keys, relative_distance, weight_matching_sym

__all__ = ["SymMultiResult", "match_many_sym"]

State = Mapping[str, torch.Tensor]


@dataclass
class SymMultiResult:
    """Transforms aligning ``N`` folded models to model 0 under a symmetry class.

    ``transforms[i]``: model ``i`` into model 0's frame (identity for model 0); ``aligned[i]``:
    ``apply_transform(spec, sym, transforms[i], states[i])`` (float64). ``objective``: the pairwise sum
    ``S`` before and after each pass (MergeMany; anchor: before and after). ``per_model[i]``: sweeps,
    convergence and ``||theta_0 - T_i(theta_i)|| / ||theta_0||`` before/after.
    """

    transforms: list[dict[str, torch.Tensor]]
    aligned: list[dict[str, torch.Tensor]]
    sym: dict[str, GroupSymmetry]
    symmetry: str
    multi: str
    objective: list[float]
    passes: int
    converged: bool
    seconds: float
    per_model: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "symmetry": self.symmetry,
            "multi": self.multi,
            "classes": {g: s.cls for g, s in self.sym.items()},
            "objective_before": float(self.objective[0]),
            "objective_after": float(self.objective[-1]),
            "passes": int(self.passes),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
            "per_model": self.per_model,
        }


def _max_change(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    out = 0.0
    for g in a:
        if a[g].dim() == 1 and b[g].dim() == 1:
            out = max(out, 0.0 if torch.equal(a[g], b[g]) else float("inf"))
        else:
            out = max(out, float((transform_matrix(a[g]) - transform_matrix(b[g])).abs().max()))
    return out


def match_many_sym(
    spec: PermutationSpec,
    states: Sequence[State],
    symmetry: str = "orthogonal",
    model: Any = None,
    multi: str = "anchor",
    seed: int = 0,
    max_iter: int = 200,
    passes: int = 100,
    tol: float = 1e-9,
    rtol: float = 1e-10,
    progress: bool = False,
) -> SymMultiResult:
    """Align ``states[1:]`` to ``states[0]`` under ``symmetry`` (module docstring: anchor or MergeMany).

    Parameters
    ----------
    spec:
        The architecture's spec (with ``spec.ops``).
    states:
        ``N >= 2`` state dicts of models with folded norms (not modified; matched in float64).
    symmetry:
        ``"permutation"``, ``"signed"`` or ``"orthogonal"`` (``"invertible"`` is refused: no exact step).
    model:
        A folded module of the architecture (tells reading from writing axes).
    multi:
        ``"anchor"`` or ``"mergemany"``.
    seed:
        Seeds the model order of each MergeMany pass and the unit order of each matching.
    max_iter:
        Sweeps of each two-model matching.
    passes:
        Most MergeMany passes.
    tol, rtol:
        MergeMany stops after a pass in which no map entry moved by more than ``tol``, or which raised
        ``S`` by less than ``rtol * |S|`` (continuous maps approach their optimum without reaching it).
    progress:
        Print a line per model (anchor) or per pass (MergeMany) through :class:`lmckit.progress.Progress`.

    Raises
    ------
    LmcError
        Fewer than two models, an unknown scheme, models that admit different classes (one folded, one not),
        or what :func:`weight_matching_sym` refuses.
    """
    from ..progress import Progress

    t0 = time.perf_counter()
    if multi not in ("anchor", "mergemany"):
        raise LmcError(f"unknown scheme {multi!r}", "use 'anchor' or 'mergemany'")
    if isinstance(states, (str, bytes, dict)) or not isinstance(states, Sequence) or len(states) < 2:
        raise LmcError("matching several models needs a list of at least two state dicts")
    n = len(states)
    sym = derive_symmetry(spec, states[0], symmetry, model=model)
    for i in range(1, n):
        _check_classes(sym, derive_symmetry(spec, states[i], symmetry, model=model))
    sd = [{k: (v.double() if v.is_floating_point() else v) for k, v in s.items()} for s in states]
    keys = _objective_keys(spec, sd[0])
    per_model: list[dict[str, Any]] = [{} for _ in range(n)]
    if multi == "anchor":
        transforms = [identity_transform(spec, sym)]
        per_model[0] = {"relative_l2_before": 0.0, "relative_l2_after": 0.0}
        with Progress(n - 1, f"{symmetry} weight matching to model 0", unit="model") as bar:
            for i in range(1, n):
                r = weight_matching_sym(
                    spec, sd[0], sd[i], symmetry, model=model, sym=sym, seed=seed, max_iter=max_iter
                )
                transforms.append(r.transform)
                per_model[i] = {
                    "sweeps": r.sweeps,
                    "converged": r.converged,
                    "relative_l2_before": r.extra["distance_before"],
                    "relative_l2_after": r.extra["distance_after"],
                }
                if progress:
                    bar.update(1, sweeps=r.sweeps)
        aligned = [apply_transform(spec, sym, t, s) for t, s in zip(transforms, sd)]
        before = pairwise_inner_sum(sd, keys)
        return SymMultiResult(
            transforms,
            aligned,
            sym,
            symmetry,
            multi,
            [before, pairwise_inner_sum(aligned, keys)],
            1,
            all(p.get("converged", True) for p in per_model),
            time.perf_counter() - t0,
            per_model,
        )

    pm = merge_many(spec, sd, seed=seed, max_iter=passes, wm_max_iter=max_iter)
    transforms = [{g: (p[g] if sym[g].cls == "permutation" else perm_matrix(p[g])) for g in sym} for p in pm.perms]
    aligned = [apply_transform(spec, sym, t, s) for t, s in zip(transforms, sd)]
    objective = [pairwise_inner_sum(sd, keys), pairwise_inner_sum(aligned, keys)]
    gen = torch.Generator().manual_seed(int(seed))
    converged, done = False, 0
    with Progress(passes, f"{symmetry} MergeMany over {n} models", unit="pass") as bar:
        for _ in range(int(passes)):
            moved = 0.0
            for i in torch.randperm(n, generator=gen).tolist():
                target = _mean_state([aligned[j] for j in range(n) if j != i])
                r = weight_matching_sym(
                    spec,
                    target,
                    sd[i],
                    symmetry,
                    model=model,
                    sym=sym,
                    seed=int(torch.randint(2**31, (1,), generator=gen)),
                    max_iter=max_iter,
                    init=transforms[i],
                )
                moved = max(moved, _max_change(r.transform, transforms[i]))
                transforms[i] = r.transform
                aligned[i] = apply_transform(spec, sym, transforms[i], sd[i])
                per_model[i] = {"sweeps": r.sweeps, "converged": r.converged}
            done += 1
            objective.append(pairwise_inner_sum(aligned, keys))
            if progress:
                bar.update(1, moved=f"{moved:.2e}")
            if moved <= tol or objective[-1] - objective[-2] <= rtol * abs(objective[-1]):
                converged = True
                break
    # into model 0's frame: T_i <- T_0^{-1} T_i (apply T_i, then T_0^{-1})
    back = invert_transform(transforms[0])
    transforms = [compose_transforms(t, back) for t in transforms]
    transforms[0] = identity_transform(spec, sym)
    aligned = [apply_transform(spec, sym, t, s) for t, s in zip(transforms, sd)]
    for i in range(n):
        per_model[i]["relative_l2_before"] = relative_distance(spec, sd[0], sd[i])
        per_model[i]["relative_l2_after"] = relative_distance(spec, aligned[0], aligned[i])
    return SymMultiResult(
        transforms, aligned, sym, symmetry, multi, objective, done, converged, time.perf_counter() - t0, per_model
    )
