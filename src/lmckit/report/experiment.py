"""One experiment's aggregate: what its stage folders hold, summarised per method, per layer and per pair.

:func:`_experiment` reads the ``result.json`` of an experiment's training,
barrier and analysis stages (:class:`lmckit.pipeline.experiment.Experiment`)
and returns its part of the results tree: the trained models' metrics, per
method the barrier and R(gamma) summaries (:func:`lmckit.report.stats.stats`
over pairs and searches), per-layer rows and, for the first pair, the arrays
the figures draw (spectra, projections, rank sweep). Nothing is recomputed.
The main experiments (:mod:`lmckit.report.results`) and the studies
(:mod:`lmckit.report.studies`) use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..pipeline.experiment import Experiment
from ..pipeline.stages import stage_path
from ..store import read_json
from .architectures import layer_kind
from .stats import stats

__all__: list[str] = []


def _read(root: Path, spec) -> dict[str, Any]:
    return read_json(stage_path(root, spec) / "result.json", "stage result", expect=dict)


def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    cols = list(zip(*curves))
    s = [stats(c) for c in cols]
    return [x["mean"] for x in s], [x["std"] for x in s]


def _experiment(root: Path, e: Experiment, full: bool) -> dict[str, Any]:
    """One experiment's aggregate: trained models, per-method summaries, per-layer rows and (``full``) the
    first pair's spectra, projections and rank sweep."""
    out: dict[str, Any] = {"label": e.label, "width_mult": e.width_mult, "pairs": [list(p) for p in e.pairs]}
    out["models"] = [
        {
            "seed": s,
            **{
                k: v
                for k, v in _read(root, t).items()
                if k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss")
            },
        }
        for s, t in e.trains.items()
    ]
    methods: dict[str, Any] = {}
    per_pair: list[dict[str, Any]] = []
    for method in e.methods:
        methods[method], rows = _method_summary(root, e, method)
        per_pair += rows
    out["methods"] = methods
    if per_pair:
        out["layers"] = per_pair
    if full:
        out.update(_first_pair_arrays(root, e))
    return out


def _method_summary(root: Path, e: Experiment, method: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``method``'s barriers and mean curves, R, distances, Taylor estimate and search statistics over the
    experiment's pairs, and its per-layer rows (none for ``naive``)."""
    m: dict[str, Any] = {}
    bars = [_read(root, b) for (p, meth, s), b in e.barriers.items() if meth == method]
    if bars:
        m.update(_barrier_summary(bars))
    rows: list[dict[str, Any]] = []
    ans = [(k, _read(root, a)) for k, a in e.analyses.items() if k[1] == method]
    if ans:
        m.update(_analysis_summary(ans))
        if method != "naive":
            rows = _layer_tables(method, ans)
    matches = [_read(root, st) for k, st in e.matches.items() if k[1] == method]
    if matches:
        m["match"] = {
            "sweeps": stats(x.get("sweeps", 1) for x in matches),
            "objective_after": stats(x["objective_after"] for x in matches if "objective_after" in x),
        }
        if method == "ste":  # how far STE's permutation drifted from plain WM's (fraction of units)
            m["match"]["changed_vs_wm"] = stats(x.get("changed_vs_wm") for x in matches)
    return m, rows


def _barrier_summary(bars: list[dict[str, Any]]) -> dict[str, Any]:
    """Barrier statistics per split and quantity over model pairs, and the mean ± std interpolation curves."""
    splits = bars[0]["splits"]
    out: dict[str, Any] = {
        "barrier": {
            sp: {
                q: stats((b[q][sp] for b in bars), "model pairs")
                for q in ("loss_barrier", "accuracy_barrier", "midpoint_loss", "midpoint_accuracy")
            }
            for sp in splits
        },
        "curves": {"lambdas": bars[0]["lambdas"]},
    }
    for sp in splits:
        lm, ls = _mean_curve([b["loss"][sp] for b in bars])
        am, as_ = _mean_curve([b["accuracy"][sp] for b in bars])
        out["curves"][sp] = {"loss_mean": lm, "loss_std": ls, "accuracy_mean": am, "accuracy_std": as_}
    return out


def _analysis_summary(ans: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """R(gamma) before/after, L2 distances and the Taylor estimate over model pairs (x WM searches after)."""
    gammas = list(ans[0][1]["R"])
    searches = len({k[2] for k, _ in ans})
    over = "model pairs x WM searches" if searches > 1 else "model pairs"
    # values before matching do not depend on the search: one per pair (search 0), not repeated
    first = [(k, a) for k, a in ans if k[2] == 0]
    out: dict[str, Any] = {
        "R": {
            g: {
                "before": stats((a["R"][g]["before"] for _, a in first), "model pairs"),
                "after": stats((a["R"][g]["after"] for _, a in ans), over),
            }
            for g in gammas
        },
        "distance": {
            "l2_before": stats((a["l2_before"] for _, a in first), "model pairs"),
            **{q: stats((a[q] for _, a in ans), over) for q in ("l2_after", "reduction")},
        },
    }
    tay = [a["taylor"] for _, a in ans if "taylor" in a]
    if tay:
        out["taylor"] = {
            q: stats((t[q] for t in tay), "model pairs")
            for q in ("taylor_midpoint", "measured_midpoint", "dHd", "delta_norm")
        }
        out["taylor"]["num_samples"] = int(tay[0].get("num_samples", 0))
        out["taylor"]["split"] = str(tay[0].get("split", "train"))
    return out


def _first_pair_arrays(root: Path, e: Experiment) -> dict[str, Any]:
    """Spectra, per-layer R, input projections and the rank sweep of the first analysis that computed them."""
    out: dict[str, Any] = {}
    for a in e.analyses.values():
        if not (a.arrays or a.projections or a.rank):
            continue
        d = _read(root, a)
        if a.arrays:
            out["spectra"] = {
                la["name"]: {
                    "sigma_a": la["sigma_a"],
                    "sigma_b": la["sigma_b"],
                    "per_index_before": la["per_index"]["before"],
                    "per_index_after": la["per_index"]["after"],
                }
                for la in d["R_per_layer"]
                if "sigma_a" in la
            }
            out["R_per_layer"] = {la["name"]: la["R"] for la in d["R_per_layer"]}
        if "projections" in d:
            out["projections"] = d["projections"]
        if "rank_sweep" in d:
            out["rank_sweep"] = {
                who: [
                    {
                        "kind": r["kind"],
                        "threshold": r["threshold"] if r["threshold"] is not None else 1.0,
                        "kept_fraction": r["kept_total"] / max(r["rank_total"], 1),
                        "accuracy": r["acc"],
                        "loss": r["loss"],
                    }
                    for r in recs
                ]
                for who, recs in d["rank_sweep"].items()
            }
        break
    return out


def _layer_tables(method: str, ans: list[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per matched pair of ``method``: distance, reduction and R per layer (mean over the pair's searches).

    One record per pair: ``{"pair", "method", "searches", "rows": [{"layer", "l2_before", "l2_after",
    "reduction", "R": {gamma: {"before", "after"}}}]}``, read from the analysis stages'
    ``distance_per_layer`` and ``R_per_layer``.
    """
    by_pair: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for (pair, _m, _s), a in ans:
        by_pair.setdefault(tuple(pair), []).append(a)
    out = []
    for pair, runs in by_pair.items():
        dist = [{d["name"]: d for d in a.get("distance_per_layer", [])} for a in runs]
        rr = [{d["name"]: d["R"] for d in a.get("R_per_layer", [])} for a in runs]
        names = _with_split_matrices(list(dist[0]), list(rr[0]))
        rows = []
        for name in names:
            row: dict[str, Any] = {"layer": name}
            if layer_kind(name):  # W_Q, W_K, W_V, W_O, LSTM gates (issue 12)
                row["kind"] = layer_kind(name)
            if all(name in d for d in dist):
                for q in ("l2_before", "l2_after", "reduction"):
                    row[q] = sum(d[name][q] for d in dist) / len(dist)
            if all(name in r for r in rr):
                row["R"] = {
                    g: {w: sum(r[name][g][w] for r in rr) / len(rr) for w in ("before", "after")} for g in rr[0][name]
                }
            rows.append(row)
        out.append({"pair": list(pair), "method": method, "searches": len(runs), "rows": rows})
    return out


def _with_split_matrices(modules: list[str], matrices: list[str]) -> list[str]:
    """Module rows (distances) in network order, each followed by the matrices R was measured on inside it.

    A fused attention projection (``blocks.0.attn``) or an LSTM (``lstm``) is one module for the L2
    distance but several matrices for R (``blocks.0.attn.in_proj_weight:q`` ..., ``lstm.weight_ih_l0:i`` ...):
    those get rows of their own, after their module's row. Matrices of no listed module go last.
    """
    out = list(modules)
    placed = set(out)
    for name in matrices:
        if name in placed:
            continue
        base = name.partition(":")[0]
        # the owner: a module containing the matrix, or the module itself (GPT-2's c_attn -> c_attn:q, :k, :v)
        owner = max((m for m in out if m and (base == m or base.startswith(m + "."))), key=len, default=None)
        at = len(out)
        if owner is not None:
            at = out.index(owner) + 1
            while at < len(out) and out[at] not in modules and out[at].startswith((owner + ".", owner + ":")):
                at += 1
        out.insert(at, name)
        placed.add(name)
    return out
