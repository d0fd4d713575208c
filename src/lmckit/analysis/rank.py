"""Rank-k truncation: keep only each layer's dominant singular directions (docs/definitions.md, Claim 4).

For a layer ``W = sum_i sigma_i u_i v_i^T`` (conv kernels read as
``out x (in*k*k)``) the truncated weight is ``W_k = sum_{i<k} sigma_i u_i v_i^T``
with either

- ``k = |{i : sigma_i >= gamma sigma_max}|`` (threshold ``gamma``), or
- ``k = ceil(fraction * r)``, ``r = min(out, in*k*k)`` the full rank of the
  matrix shape (not the numerical rank).

Only layer weights (``*.weight`` with ndim >= 2) change; biases and norm
parameters are kept. The output layer (axis-0 group ``None``) is kept whole by
default. The SVD and the reconstruction are done in float64, so ``gamma = 0``
or ``fraction = 1`` reproduces the weights to float64 round-off.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..checks import check_module, check_state
from ..errors import LmcError
from ..evaluate import evaluate
from ..lmc.bn import has_batchnorm, reset_bn_stats
from ..perm import PermutationSpec, spec_for
from .layers import layer_weight, layers_of
from .svd import SVDs, kept_count, layer_svd, state_svds


def truncate_state(
    spec: PermutationSpec,
    sd: Mapping[str, torch.Tensor],
    gamma: float | None = None,
    fraction: float | None = None,
    keep_output_layer: bool = True,
    svds: SVDs | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """Replace each (hidden) layer's weight by its dominant singular part.

    Parameters
    ----------
    spec: the model's permutation spec (defines the layers and the output layer).
    sd: state dict (not modified).
    gamma: keep ``sigma_i >= gamma * sigma_max``, ``gamma`` in [0, 1]; or
    fraction: keep the top ``ceil(fraction * r)`` directions, ``fraction`` in (0, 1].
    keep_output_layer: leave the output layer (rows = logits) whole.
    svds: precomputed :func:`~lmckit.analysis.svd.state_svds` of ``sd`` (optional; reused by sweeps).

    Returns
    -------
    ``(new_state, kept)`` with ``kept[layer name] = {"kept": k, "rank": r}`` for
    every truncated layer.
    """
    if (gamma is None) == (fraction is None):
        raise LmcError("rank truncation needs exactly one of gamma and fraction")
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise LmcError(f"truncation threshold gamma must lie in [0, 1], got {gamma}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise LmcError(f"truncation fraction must lie in (0, 1], got {fraction}")
    out = dict(sd)
    kept: dict[str, dict[str, int]] = {}
    for layer in layers_of(spec, sd):
        if keep_output_layer and layer.is_output:
            continue
        w = layer_weight(layer, sd)
        u, s, v = svds[layer.name] if svds is not None else layer_svd(w)
        k = kept_count(s, gamma) if gamma is not None else min(layer.rank, math.ceil(fraction * layer.rank - 1e-9))
        w_k = (u[:, :k] * s[:k]) @ v[:, :k].mT
        w_k = w_k.reshape(w.shape).to(w.device, w.dtype)
        if layer.split:  # one gate / Q, K, V block of a larger weight
            full = out[layer.key].clone() if out[layer.key] is sd[layer.key] else out[layer.key]
            full[layer.row_offset : layer.row_offset + layer.rows] = w_k
            w_k = full
        elif layer.col_split:  # one Q, K, V block of a transposed fused weight (columns)
            full = out[layer.key].clone() if out[layer.key] is sd[layer.key] else out[layer.key]
            full[:, layer.col_offset : layer.col_offset + int(layer.shape[1])] = w_k
            w_k = full
        out[layer.key] = w_k
        kept[layer.name] = {"kept": int(k), "rank": layer.rank}
    return out, kept


def _evaluate_state(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    dataset,
    split: str,
    batch_size: int,
    device: torch.device | str | None,
    limit: int | None,
    reset_bn: bool,
    where: str = "the model",
) -> tuple[float, float]:
    m = copy.deepcopy(model)
    m.load_state_dict(dict(sd))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    m = m.to(dev)
    if reset_bn:
        reset_bn_stats(m, dataset, device=dev)
    return evaluate(m, dataset, split, batch_size=batch_size, device=dev, limit=limit, where=where)


def rank_sweep(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    dataset,
    gammas: Iterable[float] | None = None,
    fractions: Iterable[float] | None = None,
    split: str = "test",
    *,
    spec: PermutationSpec | None = None,
    keep_output_layer: bool = True,
    batch_size: int = 2000,
    device: torch.device | str | None = None,
    limit: int | None = None,
    reset_bn: bool = False,
    svds: SVDs | None = None,
    name: str = "the model",
) -> list[dict[str, Any]]:
    """Loss and accuracy of the rank-truncated model against the threshold.

    ``name`` says which model ``sd`` is in the :class:`~lmckit.evaluate.NonFiniteLoss` raised when a
    loss is NaN or inf.

    Parameters
    ----------
    model: a module of the right architecture (only its structure is used; its
        weights are not touched: a copy is loaded with each truncated state).
    sd: the state to truncate, e.g. a trained model or the midpoint
        ``(theta_a + pi(theta_b)) / 2``.
    gammas, fractions: thresholds to sweep (either or both).
    reset_bn: recompute BatchNorm statistics on training data after each
        truncation (needs :func:`lmckit.lmc.reset_bn_stats`). The midpoint of a
        BN model is only meaningful with it; without it, a BN model's
        midpoint sweep is refused (:class:`LmcError`).

    Returns
    -------
    One record per threshold, first the untruncated model (``kind="full"``):
    ``kind`` (full | gamma | fraction), ``threshold``, ``kept`` (layer ->
    kept count), ``kept_total``, ``rank_total``, ``loss``, ``acc``.
    """
    check_module(model)
    check_state(sd, "sd")
    spec = spec or spec_for(model)
    reset = reset_bn and has_batchnorm(model)
    ev = dict(dataset=dataset, split=split, batch_size=batch_size, device=device, limit=limit, reset_bn=reset)
    loss, acc = _evaluate_state(model, sd, **ev, where=name)
    full_rank = sum(la.rank for la in layers_of(spec, sd) if not (keep_output_layer and la.is_output))
    records = [
        {
            "kind": "full",
            "threshold": None,
            "kept": {},
            "kept_total": full_rank,
            "rank_total": full_rank,
            "loss": loss,
            "acc": acc,
        }
    ]
    svds = svds if svds is not None else state_svds(spec, sd)
    todo = [("gamma", float(g)) for g in (gammas or ())] + [("fraction", float(f)) for f in (fractions or ())]
    for kind, t in todo:
        sd_k, kept = truncate_state(spec, sd, **{kind: t}, keep_output_layer=keep_output_layer, svds=svds)
        loss, acc = _evaluate_state(model, sd_k, **ev, where=f"{name} truncated at {kind} {t:g}")
        records.append(
            {
                "kind": kind,
                "threshold": t,
                "kept": {n: v["kept"] for n, v in kept.items()},
                "kept_total": sum(v["kept"] for v in kept.values()),
                "rank_total": full_rank,
                "loss": loss,
                "acc": acc,
            }
        )
    return records
