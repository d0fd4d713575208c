"""What a weight objective counts, and the checks of a pair of state dicts before any matching.

:func:`objective_keys` is the set ``K`` of weight matching's objective
``J = sum_k <A_k, pi(B)_k>_F`` (:mod:`lmckit.match.weight`): every entry with
a permuted axis that is a parameter (BatchNorm statistics, :data:`STAT_SUFFIXES`,
only with ``include_buffers``). :func:`check_pair` and :func:`check_finite`
raise :class:`~lmckit.errors.LmcError` for state dicts that do not fit the
spec or hold NaN/inf; :func:`l2_distance` is ``||A - B||`` over ``K``. Every
matching method uses them, not weight matching alone.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import LmcError
from ..perm.spec import (
    PermutationSpec,
    entry_groups,
)

__all__ = ["STAT_SUFFIXES", "objective_keys", "parameter_keys", "check_pair", "check_finite", "l2_distance"]

#: State-dict suffixes that are statistics, not parameters (left out of the WM objective by default).
STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def objective_keys(
    spec: PermutationSpec, state: Mapping[str, torch.Tensor] | None = None, include_buffers: bool = False
) -> list[str]:
    """Entries that enter the WM objective: permuted, floating-point, and parameters.

    Keys whose last name component is in :data:`STAT_SUFFIXES` (BatchNorm
    running statistics) are excluded unless ``include_buffers``.
    """
    if not isinstance(spec, PermutationSpec):
        raise LmcError(f"spec must be a PermutationSpec, got {type(spec).__name__}", "use lmckit.perm.spec_for(model)")
    keys = []
    for k, ax in spec.axes.items():
        if all(not entry_groups(g) for g in ax):
            continue
        if not include_buffers and k.rsplit(".", 1)[-1] in STAT_SUFFIXES:
            continue
        if state is not None and not state[k].is_floating_point():
            continue
        keys.append(k)
    return keys


def parameter_keys(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> list[str]:
    """All floating-point parameter entries (permuted or not): the ``theta`` of the L2 distance."""
    return [k for k in spec.axes if state[k].is_floating_point() and k.rsplit(".", 1)[-1] not in STAT_SUFFIXES]


def check_pair(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    where_a: str = "model A",
    where_b: str = "model B",
) -> None:
    """Raise :class:`LmcError` unless both state dicts fit ``spec`` and are finite."""
    if not isinstance(spec, PermutationSpec):
        raise LmcError(f"spec must be a PermutationSpec, got {type(spec).__name__}", "use lmckit.perm.spec_for(model)")
    spec.check_state(sd_a, where_a)
    spec.check_state(sd_b, where_b)
    check_finite(sd_a, where_a)
    check_finite(sd_b, where_b)


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`LmcError` naming the first entry with NaN or inf (one device sync)."""
    floats = [(k, v) for k, v in state.items() if v.is_floating_point() and v.numel()]
    if not floats:
        return
    dev0 = floats[0][1].device
    # A sum is finite when every element is (20x faster than isfinite().all()); only
    # when a sum is not do we look closer (an overflowing sum of finite values passes).
    sums = torch.stack([v.detach().sum(dtype=torch.float32).to(dev0) for _, v in floats])
    if bool(torch.isfinite(sums).all()):
        return
    bad = [k for k, v in floats if not bool(torch.isfinite(v).all())]
    if not bad:
        return
    raise LmcError(
        f"{where}: tensor {bad[0]!r} contains NaN or inf" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
        "the checkpoint is corrupt or training diverged; retrain or pick another checkpoint",
    )


def l2_distance(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    keys: list[str] | None = None,
) -> float:
    """``||A - B||_2`` over ``keys`` (default: every floating-point parameter entry), in float64."""
    check_pair(spec, sd_a, sd_b)
    keys = parameter_keys(spec, sd_a) if keys is None else keys
    tot = 0.0
    for k in keys:
        d = sd_a[k].detach().double() - sd_b[k].detach().to(sd_a[k].device).double()
        tot += float((d * d).sum())
    return tot**0.5
