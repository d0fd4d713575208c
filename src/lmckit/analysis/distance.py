"""L2 distance between two models before and after permutation (docs/definitions.md, "Distance reduction").

    d0 = ||theta_a - theta_b||_2,   d1 = ||theta_a - pi(theta_b)||_2,   reduction = 1 - d1 / d0.

Which entries count: every floating-point state-dict entry that is a
parameter: weights, biases and norm affine (scale/shift). BatchNorm running
statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) are
buffers, not parameters of the function being matched, and are left out.
Integer entries are left out too. Per-layer records group the entries of one
module (``fc1.weight`` with ``fc1.bias``; a norm layer's scale with its
shift), keyed by the module name.

All sums are done in float64.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import LmcError
from ..perm import PermutationSpec, apply_permutation
from ..perm.spec import check_spec
from .layers import is_stat_key, module_of


def counted_keys(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> list[str]:
    """State-dict keys included in the distance, in state-dict order."""
    return [k for k in spec.axes if k in state and state[k].is_floating_point() and not is_stat_key(k)]


def distances(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor] | None = None,
    sd_b_after: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Distances between ``theta_a`` and ``theta_b`` before and after applying ``perms`` to ``theta_b``.

    Parameters
    ----------
    spec: the models' permutation spec (both state dicts must fit it).
    sd_a, sd_b: state dicts (not modified).
    perms: permutation of ``theta_b`` (``None``: identity, so ``after == before``).
    sd_b_after: ``theta_b`` already aligned (e.g. a transform of a larger symmetry class,
        :func:`lmckit.perm.symmetry.apply_transform`), used for "after" instead of ``perms`` (not both).

    Returns
    -------
    dict with ``l2_before`` (d0), ``l2_after`` (d1), ``reduction`` (1 - d1/d0,
    0 when d0 = 0), ``entries`` (keys counted) and ``per_layer``: one record per
    module, in network order, with ``name``, ``keys``, ``shape`` (of its first
    entry, the weight), ``numel``, ``l2_before``, ``l2_after``, ``reduction``.
    """
    check_spec(spec)
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    if sd_b_after is not None:
        if perms is not None:
            raise LmcError("distances: pass perms or sd_b_after, not both")
        spec.check_state(sd_b_after, "aligned model B")
        sd_bp = sd_b_after
    else:
        sd_bp = apply_permutation(spec, perms, sd_b) if perms is not None else sd_b
    keys = counted_keys(spec, sd_a)
    per: dict[str, dict[str, Any]] = {}
    for k in keys:
        a = sd_a[k].detach().to("cpu", torch.float64)
        b0 = sd_b[k].detach().to("cpu", torch.float64)
        b1 = sd_bp[k].detach().to("cpu", torch.float64)
        rec = per.setdefault(
            module_of(k),
            {"name": module_of(k), "keys": [], "shape": list(sd_a[k].shape), "numel": 0, "_sq0": 0.0, "_sq1": 0.0},
        )
        rec["keys"].append(k)
        rec["numel"] += int(a.numel())
        rec["_sq0"] += float(((a - b0) ** 2).sum())
        rec["_sq1"] += float(((a - b1) ** 2).sum())
    sq0 = sum(r["_sq0"] for r in per.values())
    sq1 = sum(r["_sq1"] for r in per.values())
    records = []
    for r in per.values():
        d0, d1 = r.pop("_sq0") ** 0.5, r.pop("_sq1") ** 0.5
        r.update(l2_before=d0, l2_after=d1, reduction=_reduction(d0, d1))
        records.append(r)
    d0, d1 = sq0**0.5, sq1**0.5
    return {"l2_before": d0, "l2_after": d1, "reduction": _reduction(d0, d1), "entries": keys, "per_layer": records}


def _reduction(d0: float, d1: float) -> float:
    return 0.0 if d0 == 0.0 else 1.0 - d1 / d0
