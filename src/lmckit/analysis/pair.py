"""The whole analysis of one pair of models: the one implementation behind ``lmckit analyze`` and the
pipeline's analysis stage (:class:`lmckit.pipeline.tasks.AnalysisStage`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..checks import check_module, check_real
from ..lmc.bn import has_batchnorm
from ..perm import PermutationSpec, apply_permutation
from .distance import distances
from .layers import midpoint_state
from .projection import input_projections, projection_summary
from .rank import rank_sweep
from .svd import DEFAULT_GAMMAS, SVDAlignment, gamma_key, state_svds, svd_alignment
from .taylor import taylor_midpoint


@dataclass
class PairAnalysis:
    """Everything :func:`analyze_pair` computed: ``summary`` (JSON-ready) and the objects the plots need.

    ``distances`` is :func:`lmckit.analysis.distances`'s result, ``taylor``
    :func:`lmckit.analysis.taylor_midpoint`'s (None when not computed).
    """

    summary: dict[str, Any]
    svd: SVDAlignment
    projections: dict[str, Any] | None = None
    sweeps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    distances: dict[str, Any] = field(default_factory=dict)
    taylor: dict[str, Any] | None = None


def _per_layer(dist: Mapping[str, Any], svd: SVDAlignment) -> list[dict[str, Any]]:
    """One record per module in state-dict (network) order: distances for all, SVD fields for weight layers."""
    svd_by_name = {la.layer.name: la for la in svd.layers}
    per_layer: list[dict[str, Any]] = []
    for d in dist["per_layer"]:
        la = svd_by_name.get(d["name"])
        rec = {
            "name": d["name"],
            "shape": d["shape"],
            "output_layer": False,
            "l2_before": d["l2_before"],
            "l2_after": d["l2_after"],
            "reduction": d["reduction"],
            "R": None,
            "kept": None,
            "rank": None,
        }
        if la is not None:
            rec.update(
                shape=list(la.layer.shape),
                output_layer=la.layer.is_output,
                R=la.R,
                rank=la.layer.rank,
                kept={g: {"a": ka, "b": kb} for g, (ka, kb) in la.kept.items()},
            )
        per_layer.append(rec)
    # matrices that are blocks of one entry (W_Q/W_K/W_V of a fused projection, LSTM/GRU gates) have SVD rows of
    # their own; their distances are in their entry's (module's) record
    seen = {d["name"] for d in dist["per_layer"]}
    for la in svd.layers:
        if la.layer.name not in seen:
            per_layer.append(
                {
                    "name": la.layer.name,
                    "shape": list(la.layer.shape),
                    "output_layer": la.layer.is_output,
                    "l2_before": None,
                    "l2_after": None,
                    "reduction": None,
                    "R": la.R,
                    "rank": la.layer.rank,
                    "kept": {g: {"a": ka, "b": kb} for g, (ka, kb) in la.kept.items()},
                }
            )
    return per_layer


def analyze_pair(
    model: nn.Module,
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor] | None = None,
    *,
    sd_b_after: Mapping[str, torch.Tensor] | None = None,
    dataset=None,
    gammas: Iterable[float] = DEFAULT_GAMMAS,
    rank_fractions: Iterable[float] = (),
    rank_split: str = "test",
    eval_limit: int | None = None,
    projection_batches: int = 4,
    taylor: bool = False,
    taylor_samples: int = 10000,
    taylor_batch_size: int = 1000,
    projections: bool = True,
    rank_sweeps: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> PairAnalysis:
    """Distances, SVD alignment, and (with a dataset) input projections, rank sweeps and the Taylor estimate.

    ``projections``, ``rank_sweeps`` and ``taylor`` choose the data-dependent
    parts (each needs ``dataset``).

    ``perms`` permutes ``theta_b`` (``None``: identity, so "after" equals
    "before"). ``sd_b_after`` is ``theta_b`` already aligned instead (a transform of a larger
    symmetry class applied to the folded model, :func:`lmckit.perm.symmetry.apply_transform`; then
    ``sd_a``/``sd_b`` are the folded models and ``perms`` is ``None``): every analysis runs on it as
    on ``pi(theta_b)``. Rank sweeps run on model A and on the midpoint
    ``(theta_a + pi(theta_b)) / 2``, at each gamma of ``gammas`` (skipping 0,
    which keeps everything) and each of ``rank_fractions``. A BatchNorm model's
    midpoint sweep needs a BN reset (``lmckit.lmc.reset_bn_stats``); without it
    the midpoint sweep is skipped with a note.

    Returns
    -------
    :class:`PairAnalysis`. ``summary`` has ``l2_before``, ``l2_after``,
    ``reduction``, ``R`` (gamma key -> before/after), ``per_layer``, ``notes``,
    ``timings`` and, when computed, ``rank_sweep``, ``input_projections``,
    ``taylor_midpoint``/``measured_midpoint``/``taylor``.
    """
    check_module(model)
    gammas = tuple(check_real(g, "gammas", 0.0, 1.0) for g in gammas)
    notes: list[str] = []
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dist = distances(spec, sd_a, sd_b, perms, sd_b_after=sd_b_after)
    timings["distances"] = time.perf_counter() - t
    t = time.perf_counter()
    svds_a, svds_b = state_svds(spec, sd_a), state_svds(spec, sd_b)
    svd = svd_alignment(spec, sd_a, sd_b, perms, gammas, svds_a=svds_a, svds_b=svds_b, sd_b_after=sd_b_after)
    timings["svd"] = time.perf_counter() - t
    if perms is None and sd_b_after is None:
        notes.append("no permutation given: 'after' equals 'before' (pass --perm from `lmckit match`)")

    per_layer = _per_layer(dist, svd)
    summary: dict[str, Any] = {
        "l2_before": dist["l2_before"],
        "l2_after": dist["l2_after"],
        "reduction": dist["reduction"],
        "R": svd.R,
        "gammas": [gamma_key(g) for g in gammas],
        "per_layer": per_layer,
        "entries_counted": len(dist["entries"]),
    }
    result = PairAnalysis(summary, svd, distances=dist)

    if dataset is not None:
        if projections:
            t = time.perf_counter()
            proj = input_projections(
                model, spec, sd_a, dataset, num_batches=projection_batches, device=device, seed=seed, svds=svds_a
            )
            timings["input_projections"] = time.perf_counter() - t
            result.projections = proj
            summary["input_projections"] = projection_summary(proj)

        t = time.perf_counter()
        sweep_gammas = [g for g in gammas if g > 0]
        fractions = list(rank_fractions)
        if sd_b_after is not None:
            sd_bp = dict(sd_b_after)
        else:
            sd_bp = apply_permutation(spec, perms, sd_b) if perms is not None else dict(sd_b)
        bn = has_batchnorm(model)
        if rank_sweeps and (sweep_gammas or fractions):
            kw = dict(
                gammas=sweep_gammas, fractions=fractions, split=rank_split, spec=spec, device=device, limit=eval_limit
            )
            result.sweeps["A"] = rank_sweep(model, sd_a, dataset, reset_bn=bn, svds=svds_a, name="model A", **kw)
            result.sweeps["midpoint"] = rank_sweep(
                model, midpoint_state(sd_a, sd_bp), dataset, reset_bn=bn, name="the midpoint of A and B", **kw
            )
            summary["rank_sweep"] = result.sweeps
            timings["rank_sweep"] = time.perf_counter() - t
        if taylor:
            tay = taylor_midpoint(
                model,
                spec,
                sd_a,
                sd_bp,
                dataset,
                num_samples=taylor_samples,
                seed=seed,
                batch_size=taylor_batch_size,
                device=device,
            )
            result.taylor = summary["taylor"] = tay
            summary["taylor_midpoint"] = tay["taylor_midpoint"]
            summary["measured_midpoint"] = tay["measured_midpoint"]
            timings["taylor"] = tay["seconds"]
    summary["notes"] = notes
    summary["timings"] = timings
    return result
