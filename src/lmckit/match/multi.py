"""Matching three or more models into one common unit order.

- :func:`anchor_matching`: match every model to one anchor model (pairwise
  weight matching, or any two-model matcher); the anchor keeps its order.
- :func:`merge_many`: MergeMany (Ainsworth et al. 2023, Alg. 3). Repeatedly,
  visiting the models in a seeded random order, match model ``i`` to the mean
  of the other models (each already in the common order):

  .. math::

      \\pi_i \\leftarrow \\arg\\max_\\pi \\Big\\langle \\frac{1}{n-1} \\sum_{j \\ne i}
      \\pi_j(\\theta_j), \\; \\pi(\\theta_i) \\Big\\rangle ,

  warm-started at the current ``pi_i``, until a full pass changes no
  permutation (or ``max_iter`` passes). Each step can only raise
  ``S = sum_{i<j} <pi_i(theta_i), pi_j(theta_j)>`` (the terms that involve
  ``i`` are ``(n-1) <pi_i(theta_i), mean_{j != i}>`` and WM never lowers its
  objective), so the recorded history of ``S`` is non-decreasing. The common
  order is arbitrary; the result is expressed relative to model 0 (its
  permutation is the identity), which changes no distance between models.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import LmcError
from ..perm.spec import (
    Perms,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
)
from .result import MatchResult, MultiMatchResult, perms_equal
from .weight import STAT_SUFFIXES, check_finite, objective_keys, weight_matching

#: MergeMany's stop rules (see :func:`merge_many`).
MERGE_MANY_STOPS = ("perms", "distance")

Matcher = Callable[[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], MatchResult]


def _check_states(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], minimum: int = 2) -> None:
    if len(states) < minimum:
        raise LmcError(f"multi-model matching needs at least {minimum} models, got {len(states)}")
    for i, sd in enumerate(states):
        spec.check_state(sd, f"model {i}")
        check_finite(sd, f"model {i}")


def anchor_matching(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    anchor: int = 0,
    method: str = "weight",
    matcher: Matcher | None = None,
    seed: int = 0,
    max_iter: int = 100,
    restarts: int = 1,
    device: torch.device | str | None = None,
) -> MultiMatchResult:
    """Match every model to ``states[anchor]``.

    Parameters
    ----------
    spec, states:
        The shared permutation spec and the models' state dicts (not modified).
    anchor:
        Index of the reference model (its permutation is the identity).
    method:
        Label of the two-model method; ``"weight"`` uses :func:`weight_matching`
        with ``seed``, ``max_iter``, ``restarts``, ``device``.
    matcher:
        Any other two-model method: ``matcher(i, sd_anchor, sd_i) -> MatchResult``
        (e.g. activation matching on the models built from the states, or STE).

    Returns
    -------
    MultiMatchResult
        ``perms[i]`` aligns model ``i`` to the anchor; ``objective`` is
        ``[sum of initial objectives, sum of final objectives]`` over the
        pairwise matchings; ``pairwise[i]`` their results.
    """
    t0 = time.perf_counter()
    _check_states(spec, states)
    if not 0 <= anchor < len(states):
        raise LmcError(f"anchor index {anchor} is out of range for {len(states)} models")
    if matcher is None:
        if method != "weight":
            raise LmcError(
                f"anchor matching with method {method!r} needs a matcher function",
                "pass matcher=, or use method='weight'",
            )

        def matcher(i, sd_ref, sd_i):  # noqa: E306
            return weight_matching(spec, sd_ref, sd_i, seed=seed, max_iter=max_iter, restarts=restarts, device=device)

    perms: list[Perms] = []
    pairwise: list[MatchResult | None] = []
    before = after = 0.0
    for i, sd in enumerate(states):
        if i == anchor:
            perms.append(identity_permutation(spec))
            pairwise.append(None)
            continue
        res = matcher(i, states[anchor], sd)
        perms.append({g: res.perms[g] for g in spec.sizes})
        pairwise.append(res)
        before += res.initial_objective
        after += res.final_objective
    return MultiMatchResult(
        perms=perms,
        objective=[before, after],
        passes=len(states) - 1,
        seconds=time.perf_counter() - t0,
        method=f"anchor-{method}",
        converged=all(r is None or r.converged for r in pairwise),
        pairwise=pairwise,
        extra={"anchor": int(anchor), "seed": int(seed)},
    )


def pairwise_inner_sum(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> float:
    """``sum_{i<j} <theta_i, theta_j>`` over ``keys``.

    Computed as ``(||sum_i theta_i||^2 - sum_i ||theta_i||^2) / 2`` in float64.
    """
    tot = 0.0
    for k in keys:
        ts = [sd[k].detach().double() for sd in states]
        s = torch.stack(ts).sum(0)
        tot += 0.5 * (float((s * s).sum()) - sum(float((t * t).sum()) for t in ts))
    return tot


def _mean_state(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in states[0].items():
        out[k] = torch.stack([sd[k] for sd in states]).mean(0) if v.is_floating_point() else v
    return out


def merge_many(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    seed: int = 0,
    max_iter: int = 100,
    wm_max_iter: int = 100,
    init_perms: Sequence[Mapping[str, Any]] | None = None,
    device: torch.device | str | None = None,
    stop: str = "perms",
) -> MultiMatchResult:
    """MergeMany: match each model to the mean of the others until nothing changes.

    Parameters
    ----------
    spec, states:
        The shared permutation spec and at least two state dicts (not modified).
    seed:
        Seeds the model order of each pass and the weight-matching group orders.
    max_iter:
        Maximum number of passes over all models.
    wm_max_iter:
        ``max_iter`` of each inner :func:`weight_matching` call.
    init_perms:
        Optional starting permutation per model (default identity).
    stop:
        ``"perms"`` (default): stop after a pass that changes no permutation. ``"distance"``: the
        rule of Ito et al.'s many-model WM (github e5-a/STE-MM, ``srcs/search/mult/wm.py``,
        function ``match_wm``): stop after a pass whose summed distance
        ``sum_i ||mean_{j != i} pi_j(theta_j) - pi_i(theta_i)||_2`` (each term measured right after
        model ``i`` is matched, over every parameter, BatchNorm statistics excluded) is
        ``numpy.isclose`` (relative 1e-5, absolute 1e-8) to the previous pass's; never after the
        first pass. It may stop while permutations still change (a pass whose moves change the
        distance by less than 1e-5 relative) and it runs one pass more than ``"perms"`` when the
        last moves change the distance. docs/definitions.md compares the two procedures.

    Returns
    -------
    MultiMatchResult
        ``perms[i]`` puts model ``i`` in the common order (identity for
        model 0); ``objective`` the pairwise inner-product sum ``S`` before
        the first pass and after each pass (non-decreasing); ``pairwise[i]``
        the last weight-matching result of model ``i``.
    """
    t0 = time.perf_counter()
    _check_states(spec, states)
    n = len(states)
    if int(max_iter) < 1:
        raise LmcError(f"max_iter must be at least 1, got {max_iter}")
    if stop not in MERGE_MANY_STOPS:
        raise LmcError(f"MergeMany stop rule must be one of {', '.join(MERGE_MANY_STOPS)}, got {stop!r}")
    if init_perms is None:
        perms = [identity_permutation(spec) for _ in range(n)]
    else:
        from ..perm.spec import validate_perms

        if len(init_perms) != n:
            raise LmcError(f"init_perms has {len(init_perms)} entries for {n} models")
        perms = [validate_perms(spec, dict(p), f"init_perms[{i}]") for i, p in enumerate(init_perms)]
    keys = objective_keys(spec, states[0])
    aligned = [apply_permutation(spec, perms[i], states[i]) for i in range(n)]
    history = [pairwise_inner_sum(aligned, keys)]
    rng = np.random.default_rng(int(seed))
    pairwise: list[MatchResult | None] = [None] * n
    passes, converged, steps = 0, False, 0
    dist_keys = [k for k, v in states[0].items() if v.is_floating_point() and not k.endswith(STAT_SUFFIXES)]
    old_dists = np.full(n, 1e10)  # theirs: np.ones(n) * 1e10, so the first pass never stops
    dist_history: list[float] = []
    for _ in range(int(max_iter)):
        changed = False
        new_dists = np.zeros(n)
        for i in rng.permutation(n):
            i = int(i)
            target = _mean_state([aligned[j] for j in range(n) if j != i])
            res = weight_matching(
                spec,
                target,
                states[i],
                seed=int(rng.integers(2**31)),
                max_iter=wm_max_iter,
                init_perms=perms[i],
                device=device,
            )
            pairwise[i] = res
            steps += 1
            if not perms_equal(res.perms, perms[i]):
                perms[i] = res.perms
                aligned[i] = apply_permutation(spec, perms[i], states[i])
                changed = True
            if stop == "distance":
                new_dists[i] = math.sqrt(
                    sum(float((target[k].double() - aligned[i][k].double()).pow(2).sum()) for k in dist_keys)
                )
        passes += 1
        history.append(pairwise_inner_sum(aligned, keys))
        if stop == "distance":
            dist_history.append(float(new_dists.sum()))
            if np.isclose(new_dists.sum(), old_dists.sum()):
                converged = True
                break
            old_dists = new_dists
        elif not changed:
            converged = True
            break
    to_ref = invert_permutation(perms[0])
    final = [compose_permutations(p, to_ref) for p in perms]
    return MultiMatchResult(
        perms=final,
        objective=history,
        passes=passes,
        seconds=time.perf_counter() - t0,
        method="mergemany",
        converged=converged,
        pairwise=pairwise,
        extra={
            "seed": int(seed),
            "wm_calls": steps,
            "reference": 0,
            **({"stop": stop, "distance_history": dist_history} if stop != "perms" else {}),
        },
    )
