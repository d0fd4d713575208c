"""The science of the studies beyond the paper (issue 12): partial weight matching, alignment dose, spectra.

Pure functions on state dicts; the cached stages that run them over a recipe
live in :mod:`lmckit.pipeline.studies`.

* :func:`split_directions` / :func:`direction_matching` (study "directions"):
  weight matching computed on the dominant singular part of every weight
  matrix only (``W_k = sum_{sigma_i >= gamma sigma_max} sigma_i u_i v_i^T``,
  "WM-top") or on its remainder ``W - W_k`` ("WM-tail"), biases and norm
  parameters unchanged. The permutation is then applied to the full model B.
  The SVD view of Ito et al. (Theorem 4.1; docs/definitions.md) predicts that the
  dominant directions carry WM's objective.
* :func:`reassign_fraction` (study "alignment-dose"): starting from a
  permutation, re-assign a fraction ``f`` of the units of every group at
  random (``f = 0`` keeps it, ``f = 1`` gives a uniformly random permutation).
* :func:`spectrum_concentration` (study "weight-decay"): the fraction of
  singular values with ``sigma_i >= gamma sigma_max``, pooled over layers.
* :func:`spearman` : Spearman's rank correlation (scipy), used to say which of
  R(0.3) and the L2 distance predicts the barrier better.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .analysis.layers import layers_of
from .analysis.rank import truncate_state
from .analysis.svd import kept_count, layer_svd
from .errors import LmcError
from .match import weight_matching
from .perm import Perms, PermutationSpec

__all__ = ["split_directions", "direction_matching", "reassign_fraction", "spectrum_concentration", "spearman"]


def split_directions(
    spec: PermutationSpec, sd: Mapping[str, torch.Tensor], gamma: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """``(top, tail, kept)``: every weight matrix split into its dominant part ``W_k`` and the rest ``W - W_k``.

    Parameters
    ----------
    spec: the model's permutation spec (its ``*.weight`` entries of ndim >= 2 are the layers).
    sd: state dict (not modified).
    gamma: keep the singular components with ``sigma_i >= gamma * sigma_max`` (``gamma`` in [0, 1]);
        every weight matrix is split, the output layer included. ``gamma = 0`` keeps everything
        (``top`` equals ``sd`` to float64 round-off, ``tail`` is about 0).

    Returns
    -------
    ``top`` and ``tail`` state dicts (non-weight entries copied unchanged into both) and
    ``kept[layer] = {"kept": k, "rank": r}``.
    """

    top, kept = truncate_state(spec, sd, gamma=float(gamma), keep_output_layer=False)
    tail = dict(sd)
    for key in top:
        if top[key] is not sd[key]:
            tail[key] = sd[key] - top[key]
    return top, tail, kept


def direction_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    gamma: float,
    part: str = "top",
    seed: int = 0,
    max_iter: int = 100,
    device: torch.device | str | None = None,
):
    """Weight matching computed on the dominant (``part="top"``) or trailing (``"tail"``) directions only.

    Both models are split by :func:`split_directions` at the same ``gamma``
    (each at its own ``sigma_max``); :func:`lmckit.match.weight_matching`
    then maximises ``sum_l <W^a_part, P W^b_part Q^T>`` (biases and norm
    parameters unchanged). Apply the returned permutation to the *full*
    model B. With ``gamma = 0`` and ``part="top"`` this is plain WM.

    Returns
    -------
    MatchResult with ``extra["part"]``, ``extra["gamma"]`` and ``extra["kept"]`` (per layer, model A).
    """

    if part not in ("top", "tail"):
        raise LmcError(f"part must be 'top' or 'tail', got {part!r}")
    top_a, tail_a, kept = split_directions(spec, sd_a, gamma)
    top_b, tail_b, _ = split_directions(spec, sd_b, gamma)
    a, b = (top_a, top_b) if part == "top" else (tail_a, tail_b)
    res = weight_matching(spec, a, b, seed=seed, max_iter=max_iter, device=device)
    res.extra = {**(res.extra or {}), "part": part, "gamma": float(gamma), "kept": kept}
    return res


def reassign_fraction(perms: Mapping[str, torch.Tensor], fraction: float, generator: torch.Generator) -> Perms:
    """Re-assign ``round(fraction * n)`` units of every group (``n`` units) at random.

    For each group the positions ``S`` (a uniformly random subset of size
    ``k = round(fraction * n)``) get the entries ``perms[g][S]`` in a
    uniformly random order: ``fraction = 0`` returns ``perms`` unchanged,
    ``fraction = 1`` a uniformly random permutation (independent of
    ``perms``). Some of the re-assigned units may land where they were (a
    random shuffle is not a derangement), so the fraction of units that
    actually changed is at most ``fraction``.

    Parameters
    ----------
    perms: ``{group: LongTensor (n,)}`` permutation set (not modified).
    fraction: in [0, 1].
    generator: seeded ``torch.Generator`` (draws happen group by group in sorted order).
    """
    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise LmcError(f"the re-assigned fraction must lie in [0, 1], got {fraction}")
    out: Perms = {}
    for g in sorted(perms):
        p = perms[g].detach().to("cpu", torch.long).clone()
        n = int(p.numel())
        k = int(round(f * n))
        if k >= 2:
            pos = torch.randperm(n, generator=generator)[:k]
            p[pos] = p[pos[torch.randperm(k, generator=generator)]]
        out[g] = p
    return {g: out[g] for g in perms}


def spectrum_concentration(
    spec: PermutationSpec, sd: Mapping[str, torch.Tensor], gamma: float = 0.3
) -> dict[str, object]:
    """How concentrated the spectra are: fraction of singular values with ``sigma_i >= gamma sigma_max``.

    Returns ``{"total": sum_l k_l / sum_l r_l, "per_layer": {layer: k_l / r_l}}``
    over every weight matrix (``r_l = min(out, in*k*k)``).
    """

    per: dict[str, float] = {}
    k_tot = r_tot = 0
    for layer in layers_of(spec, sd):
        _, s, _ = layer_svd(sd[layer.key])
        k = kept_count(s, float(gamma))
        per[layer.name] = k / max(layer.rank, 1)
        k_tot += k
        r_tot += layer.rank
    return {"total": k_tot / max(r_tot, 1), "per_layer": per}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (:func:`scipy.stats.spearmanr`; 0 if undefined)."""

    from scipy.stats import spearmanr

    if len(x) != len(y) or len(x) < 3:
        return 0.0
    r = spearmanr(list(x), list(y)).statistic
    r = float(r)
    return r if math.isfinite(r) else 0.0
