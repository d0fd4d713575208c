"""Write a reproduction report: report.md, report.html, results.json, timings.json and PNG figures.

Every number in the report comes from the results tree (``results.json``);
each figure carries a one-sentence caption saying what it shows and, where a
claim of the paper attaches to it, whether the claim held in this run (the
sentence is built from the numbers by :func:`lmckit.report.results.judge_claims`).
Each claim is quoted in full with its criterion and the paper's published
value where one exists; every mean ± std says its n and what varies, with a
95% Student-t interval where n >= 3.

Units (one convention, stated in the report): accuracies and accuracy
barriers are fractions in [0, 1]; relative changes (distance reduction, units
reassigned) are fractions in results.json and percentages in text; losses are
mean cross-entropy in nats.

``report.html`` is rendered from the same Markdown by markdown-it-py
(CommonMark plus tables), never by hand.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from markdown_it import MarkdownIt

from ..store import atomic_write_json, atomic_write_text, real_path
from . import figures as F
from .architectures import layer_label, write_architectures
from .figures import METHOD_LABEL
from .lm import is_language_model, write_lm
from .markdown import _CONTROL, _cell, _pm, _table, plain  # noqa: F401  (plain, _table: importable from here as before)
from .paper import write_paper
from .studies import write_studies
from .symmetry import write_symmetry

__all__ = ["write_report", "summary_rows", "check_finite_tree", "render_html"]


def check_finite_tree(obj: Any, where: str = "results") -> None:
    """Raise ``ValueError`` naming the first NaN/inf/None leaf (results.json must be NaN-free)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite_tree(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_finite_tree(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")


def _over(*stats_: dict[str, Any] | None) -> str:
    """``n=N over WHAT`` of the first aggregate that says it (for table captions)."""
    for s in stats_:
        if s and s.get("over"):
            return f"n={s['n']} {s['over']}"
    return "a single value"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (experiment, method): barriers, R and distance reduction (also printed to stdout)."""
    rows = []
    for e in res["experiments"] + res.get("width_sweep", []):
        for m, d in e["methods"].items():
            split = "test" if "test" in d.get("barrier", {}) else next(iter(d.get("barrier", {"-": None})))
            b = d.get("barrier", {}).get(split, {})
            gam = list(d.get("R", {}))
            rows.append(
                {
                    "model": e["label"],
                    "method": METHOD_LABEL.get(m, m),
                    f"{split} loss barrier": _pm(b.get("loss_barrier")),
                    f"{split} acc barrier": _pm(b.get("accuracy_barrier")),
                    **{f"R({g})": _pm(d["R"][g]["after"]) for g in gam},
                    "L2 reduction": _pm(d.get("distance", {}).get("reduction"), "{:.1%}"),
                }
            )
    return rows


def _caption(res: dict[str, Any], figure: str, what: str, model: str | None = None) -> str:
    said = [
        c["text"]
        for c in res.get("claims", [])
        if c["figure"] == figure and (model is None or c.get("model", model) == model)
    ]
    return " ".join([what] + said)


#: ``fig(name, title, caption, draw)``: a section registers a figure; ``draw(path)`` writes it and returns the path
AddFigure = Callable[[str, str, str, Callable[[Path], Path]], None]


class _Figures:
    """The report folder's files: paths confined to ``out``, the figures in the order the sections add them."""

    def __init__(self, out: Path):
        self.out, self.root = out, real_path(out, "report folder")
        self.written: dict[str, Path] = {}
        self.listed: list[tuple[str, str, str]] = []  # (file, title, caption)

    def inside(self, name: str) -> Path:
        """``out / name``, refusing a name that would leave the report folder."""
        p = self.out / name
        real = real_path(p, "report file")
        if Path(name).is_absolute() or not real.is_relative_to(self.root) or real == self.root:
            raise ValueError(f"report file name {name!r} leaves the report folder {self.out}")
        return p

    def add(self, name: str, title: str, caption: str, draw: Callable[[Path], Path]) -> None:
        self.written[name] = draw(self.inside(name))
        self.listed.append((name, title, caption))


def write_report(
    res: dict[str, Any], out: str | Path, timing: dict[str, Any] | None = None, cache: str | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``results.json``, the figures and ``timings.json`` into ``out``.

    The report is the concatenation of its sections, in order: header, how to read it, claims, the paper
    recipe's side-by-side claims (when ``res`` has them), summary,
    one section per experiment, three models, STE drift, width sweep, symmetry classes (``match.symmetry``), the
    studies, figures, timings.
    Returns file name -> path of the files written. Raises ``ValueError`` for a non-finite number in ``res``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_finite_tree(res)
    figs = _Figures(out)
    md = _header(res, cache) + _conventions(res) + _claims_section(res) + write_paper(res) + _summary_section(res)
    md += write_lm(res)  # language models: nats per token and perplexity (issue 26)
    for i, e in enumerate(res["experiments"]):
        md += _experiment_section(res, e, "" if i == 0 else f"{_slug(e['label'])}_", figs.add)
    md += _three_models_section(res, figs.add)
    md += _ste_drift_section(res, figs.add)
    md += _width_section(res, figs.add)
    md += write_symmetry(res)  # match.symmetry: classes side by side (issue 29); nothing by default
    md += write_architectures(res, figs.add)  # attention / LSTM layer kinds, model size (issue 12)
    md += write_studies(res, figs.add)
    md += _figures_section(figs.listed) + _timings_section(timing)
    text = _CONTROL.sub("", "\n".join(md) + "\n")  # whatever user text a section let through: no ESC, BEL, ...
    written = figs.written
    written["report.md"] = atomic_write_text(figs.inside("report.md"), text)
    written["report.html"] = atomic_write_text(
        figs.inside("report.html"), render_html(text, f"lmckit report: {plain(res['recipe']['name'])}")
    )
    written["results.json"] = atomic_write_text(
        figs.inside("results.json"), json.dumps(res, indent=1, sort_keys=True, allow_nan=False) + "\n"
    )
    if timing is not None:
        written["timings.json"] = atomic_write_json(figs.inside("timings.json"), timing)
    return written


def _header(res: dict[str, Any], cache: str | None) -> list[str]:
    """Title, recipe description, what ran (dataset, seeds, methods, models, STE protocol), cache, notes."""
    r = res["recipe"]
    md: list[str] = [f"# lmckit reproduction: recipe `{plain(r['name'])}`", "", plain(r.get("description", "")), ""]
    md += [
        f"Dataset **{r['data']['dataset']}**, seeds {r['train']['seeds']}, methods "
        f"{', '.join(METHOD_LABEL.get(m, m) for m in r['match']['methods'])}, model(s) "
        f"{', '.join(e['label'] for e in res['experiments'])}. Definitions: `docs/definitions.md` in the lmckit "
        "repository."
    ]
    if "ste" in r["match"]["methods"]:  # which STE protocol ran (issue 12)
        ste = r["match"]["ste"]
        md += [
            "",
            f"STE protocol: **{ste.get('protocol', 'heldout-best')}** ({ste['epochs']} epoch(s), lr {ste['lr']:g}, "
            f"batch {ste['batch_size']}, {'SGD momentum 0.9' if ste.get('protocol') == 'git-re-basin' else 'Adam'}).",
        ]
        sweeps, every = int(ste.get("project_sweeps", 0)), int(ste.get("project_every", 1))
        if sweeps or every > 1:  # the documented approximations of the per-step projection
            parts = ([f"at most {sweeps} sweep(s) per step"] if sweeps else []) + (
                [f"a projection every {every} steps"] if every > 1 else []
            )
            md[-1] += (
                f" Per-step projection approximated ({', '.join(parts)}; the end-of-epoch projection STE "
                "scores and returns runs to convergence; `match.ste.project_sweeps = 0` and `project_every = 1` "
                "give the exact one)."
            )
    if cache:
        md += ["", f"Stage outputs: `{cache}` (rerun the same command to reuse them)."]
    for n in res.get("notes", []):
        md += ["", f"> note: {plain(n)}"]
    return md


def _summary_section(res: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Summary",
        "",
        "Test split where measured; mean ± sample std (n and what varies in the "
        "columns' notes below), a single value when n = 1.",
        "",
    ] + _table(summary_rows(res))


def _experiment_section(res: dict[str, Any], e: dict[str, Any], pre: str, fig: AddFigure) -> list[str]:
    """One model's section: trained models, barrier, distance/Taylor and layer tables; its figures (``pre`` +
    name; no prefix for the first experiment)."""
    label = e["label"]
    md = ["", f"## {plain(label)}", "", "Trained models (accuracies: fractions of the full split):", ""]
    md += _table(
        [
            {
                "seed": m["seed"],
                "test acc": f"{m['test_accuracy']:.4f}",
                "test loss": f"{m['test_loss']:.4f}",
                "train acc": f"{m['train_accuracy']:.4f}",
            }
            for m in e["models"]
        ]
    )
    md += _barrier_table(e)
    md += _distance_taylor_table(e)
    md += _layer_section(e)
    _experiment_figures(res, e, pre, fig)
    return md


def _experiment_figures(res: dict[str, Any], e: dict[str, Any], pre: str, fig: AddFigure) -> None:
    """One model's figures: interpolation, R bars, spectra, per-index alignment, projections, rank sweep."""
    label = e["label"]
    if any("curves" in d for d in e["methods"].values()):
        fig(
            f"{pre}interpolation.png",
            f"{label}: interpolation curves",
            _caption(
                res,
                "interpolation",
                "Loss and accuracy along the linear path between two models, naive and "
                "after each matching (mean over pairs; shaded ±1 std; the inset zooms on the aligned "
                "methods).",
                label,
            ),
            lambda p: F.interpolation(e, p),
        )
    if any("R" in d for d in e["methods"].values()):
        fig(
            f"{pre}R_bars.png",
            f"{label}: alignment score R",
            _caption(
                res,
                "R_bars",
                "R(gamma) of the singular vectors before matching and after each method (error bars: "
                "std over pairs and searches).",
                label,
            ),
            lambda p: F.r_bars(e, p),
        )
    if e.get("spectra"):
        fig(
            f"{pre}spectra.png",
            f"{label}: singular-value spectra",
            "Singular values of corresponding layers of two independently trained models (first pair).",
            lambda p: F.spectra(e, p),
        )
        fig(
            f"{pre}per_index.png",
            f"{label}: per-index alignment",
            "Per-index alignment (u_i . P u'_i)(v_i . Q v'_i) against singular-value rank, before and after WM. "
            + _per_index_sentence(e["spectra"]),
            lambda p: F.per_index(e, p),
        )
    if e.get("projections"):
        fig(
            f"{pre}projections.png",
            f"{label}: input projections",
            _caption(
                res,
                "projections",
                "Mean |v_i . z| of each layer's inputs z on its right-singular vectors, against "
                "rank, beside random directions.",
                label,
            ),
            lambda p: F.projections(e, p),
        )
    if e.get("rank_sweep"):
        fig(
            f"{pre}rank.png",
            f"{label}: accuracy against kept rank",
            "Test accuracy of model A and of the WM midpoint when each hidden layer keeps only its leading "
            "singular directions (output layer whole).",
            lambda p: F.rank(e, p),
        )


def _three_models_section(res: dict[str, Any], fig: AddFigure) -> list[str]:
    """Models 1 and 2 matched to an anchor: pair barriers, merged accuracy, and their figures."""
    three = res.get("three_models")
    if not three:
        return []
    first = res["experiments"][0]["label"] if res["experiments"] else ""
    md = [
        "",
        "## Three models",
        "",
        f"{first}: models 1 and 2 matched to the anchor (model 0); loss and "
        "accuracy barrier between the two matched models, and test accuracy of the uniform average of the "
        f"first n models (one triple of seeds: single values, no spread; "
        f"{_n_images(res, 'three_models_test_images')} test images):",
        "",
    ]
    md += _table(
        [
            {
                "method": METHOD_LABEL.get(m, m),
                "pair loss barrier": f"{d['pair_loss_barrier']:.4f}",
                "pair acc barrier": f"{d['pair_accuracy_barrier']:.4f}",
                **{f"avg of {x['n']} acc": f"{x['accuracy']:.4f}" for x in d["merged"]},
            }
            for m, d in three.items()
        ]
    )
    fig(
        "three_models.png",
        "Three models: pair path and merged accuracy",
        _caption(
            res,
            "three_models",
            "Left: loss along the path between two models both matched to one anchor. "
            "Right: test accuracy of the average of n aligned models.",
        ),
        lambda p: F.three_models(three, p),
    )
    if any("landscape" in d for d in three.values()):
        fig(
            "landscape.png",
            "Three models: loss landscape",
            "Test loss on the plane through the three aligned "
            "models (white circles), one panel per matching method, on one shared logarithmic colour scale "
            "(darker = lower loss) and the same axes, so the panels compare directly.",
            lambda p: F.landscape(three, p),
        )
    return md


def _ste_drift_section(res: dict[str, Any], fig: AddFigure) -> list[str]:
    """How far STE moved from weight matching per epoch, and its figure."""
    drift = res.get("ste_drift")
    if not drift:
        return []
    md = [
        "",
        "## STE drift",
        "",
        "How far STE moved from plain weight matching, per epoch (epoch 0: the start, "
        "where STE's permutation is WM's). ‖θ̃ − θ_a‖ / ‖θ_a‖ is the distance STE's dense copy θ̃ travelled "
        "from model A relative to A's norm (a ratio: 7.5 means 7.5 times ‖θ_a‖); θ̃ is only used through its "
        "projection to a permutation, so a large value does not make the matched model far from A.",
        "",
    ]
    md += _table(
        [
            {
                "run": r["label"],
                "epochs": r["epoch"][-1],
                "units reassigned vs WM": f"{r['changed_vs_wm'][-1]:.1%}",
                "‖θ̃ − θ_a‖ / ‖θ_a‖": f"{r['tilde_rel_dist'][-1]:.3f}",
                "R(0.3) start → end": f"{r['r03'][0]:.3f} → {r['r03'][-1]:.3f}",
                "held-out midpoint loss start → end": f"{r['heldout_loss'][0]:.4f} → {r['heldout_loss'][-1]:.4f}",
            }
            for r in drift["runs"]
        ]
    )
    fig("ste_drift.png", "STE drift from weight matching", _drift_sentence(drift), lambda p: F.ste_drift(drift, p))
    return md


def _width_section(res: dict[str, Any], fig: AddFigure) -> list[str]:
    """Barrier and R(0.3) per width multiplier, and the width-sweep figure."""
    ws = res.get("width_sweep")
    if not ws:
        return []
    md = ["", "## Width sweep", "", f"One model pair per width ({_over(_first_barrier(ws))}); test split.", ""]
    md += _table(
        [
            {
                "width": f"x{x['width_mult']:g}",
                **{
                    f"{METHOD_LABEL.get(m, m)} loss barrier": _pm(_get_path(d, "barrier", "test", "loss_barrier"))
                    for m, d in x["methods"].items()
                },
                **{
                    f"{METHOD_LABEL.get(m, m)} R(0.3)": _pm(_get_path(d, "R", "0.3", "after"))
                    for m, d in x["methods"].items()
                    if "R" in d
                },
            }
            for x in sorted(ws, key=lambda x: x["width_mult"])
        ]
    )
    fig(
        "width_sweep.png",
        "Width sweep",
        _caption(
            res,
            "width_sweep",
            "Loss barrier and R against the width multiplier (error bars: std over pairs where there are several).",
        ),
        lambda p: F.width_sweep(ws, p),
    )
    return md


def _figures_section(figs: list[tuple[str, str, str]]) -> list[str]:
    md = ["", "## Figures"]
    for name, title, caption in figs:
        md += ["", f"### {title}", "", f"![{title}]({name})", "", caption]
    return md


def _timings_section(timing: dict[str, Any] | None) -> list[str]:
    if not timing:
        return []
    md = [
        "",
        "## Timings",
        "",
        "Stage compute time (from the cache; 0 for stages reused): "
        + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(timing["stage_seconds_by_kind"].items())),
    ]
    if timing.get("ran_with"):  # results are bit-identical only for the same threads and device
        md += [
            "",
            "Stages ran with: "
            + "; ".join(f"{w['threads']} torch threads on {w['device']}" for w in timing["ran_with"])
            + ".",
        ]
    return md


def _get_path(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _first_barrier(ws: list[dict[str, Any]]) -> dict[str, Any] | None:
    for x in ws:
        for d in x["methods"].values():
            b = _get_path(d, "barrier", "test", "loss_barrier")
            if b:
                return b
    return None


def _n_images(res: dict[str, Any], key: str) -> str:
    n = _get_path(res, "evaluation", key)
    return f"{n}" if n is not None else "all"


def _conventions(res: dict[str, Any]) -> list[str]:
    """How to read the numbers: units, statistics, evaluation set sizes."""
    ev = res.get("evaluation", {})
    r = res["recipe"]
    md = [
        "",
        "## How to read this report",
        "",
        "- **Units.** Accuracies and accuracy barriers are fractions in [0, 1] (0.873, not 87.3%) in every table, "
        "plot and in results.json; relative changes (L2 distance reduction, units reassigned) are fractions in "
        "results.json and percentages in text; losses are mean cross-entropy (nats).",
        f"- **Barriers.** Loss barrier: max over {r['barrier']['lambdas']} evenly spaced lambdas (ends included) of "
        "L(theta(lambda)) minus the straight line between the endpoints' losses; accuracy barrier likewise with "
        "the line above the path. Both are never negative (the ends, where the gap is 0, are in the maximum). The "
        "*midpoint* barrier (lambda = 1/2 only: midpoint loss minus the endpoints' mean) can be negative: the "
        "path then lies below the endpoints' line at the midpoint, i.e. the averaged model is better than the "
        "endpoints' mean (common when the barrier is ~0, as after STE, which minimises the midpoint loss).",
        "- **Statistics.** Every mean ± spread is the mean and sample standard deviation (n - 1) over the values "
        "named beside it: *model pairs* (disjoint seed pairs), or *model pairs x WM searches* for R and the "
        "distances after WM (each search starts the coordinate descent from another random order). With "
        "n >= 3 a 95% confidence interval of the mean is given, t-based (Student t, n - 1 degrees of freedom); "
        "with n < 3 no interval is given. n = 1 shows the single value. With n = 3 a t interval is wide and can "
        "reach below 0 for quantities that cannot be negative (barriers): read it as the spread, not as a "
        "possible value.",
    ]
    if ev:
        sizes = ev.get("split_sizes", {})
        bar = ", ".join(f"{n} {sp}" for sp, n in ev.get("barrier", {}).items())
        md += [
            "- **Evaluation sets** (split sizes: "
            + (", ".join(f"{sp} {n}" for sp, n in sizes.items()) or "unknown")
            + "): "
            f"barriers and interpolation curves on the first {bar} images; the Taylor estimate and its measured "
            f"midpoint on {ev.get('taylor_train_images')} seeded random training images; input projections on "
            f"{ev.get('projection_train_images')} training images; rank-k accuracy on "
            f"{ev.get('rank_test_images')} test images; activation matching on "
            f"{ev.get('activation_matching_train_images')} training images; STE trains on "
            f"{ev.get('ste_train_images')} training images; the three-model experiment on "
            f"{ev.get('three_models_test_images')} test images. Trained models' accuracies use the full splits."
        ]
    if is_language_model(res):  # token datasets: per-token units, and the evaluation sets count windows
        md = [x.replace(" images", " windows") for x in md]
        md.insert(
            4,
            "- **Language model.** Losses are next-token cross-entropy in **nats per token** (perplexity = "
            "exp(loss)); accuracies are next-token accuracies (fractions of target tokens); evaluation sizes "
            f"count windows of {_context(res)} tokens.",
        )
    return md


def _context(res: dict[str, Any]) -> str:
    from ..data.text import TEXT_DATASETS

    return str(TEXT_DATASETS.get(res["recipe"]["data"]["dataset"], ("T",))[0])


def _claims_section(res: dict[str, Any]) -> list[str]:
    """Each claim quoted in full, with its criterion, the published value (with source) and this run's verdict."""
    md = [
        "",
        "## Claims",
        "",
        "Each claim of Ito, Yamada and Kumagai (as stated in `docs/definitions.md`), the "
        "criterion by which lmckit judges it (the project's reading of the paper's words; disagree freely), the "
        "paper's published value where one exists, and what this run measured. Claims are judged per model.",
    ]
    claims = res.get("claims", [])
    if not claims:
        return md + ["", "No claim can be judged from this recipe's results."]
    models = list(dict.fromkeys(c.get("model", "") for c in claims))
    for model in models:
        if len(models) > 1 or model:
            md += ["", f"### Claims for {model}" if model else "### Claims"]
        for c in (c for c in claims if c.get("model", "") == model):
            verdict = "held" if c["held"] else "did not hold"
            md += ["", f"**Claim {c['id']}: {c.get('title', '')}: {verdict}.**", ""]
            if c.get("statement"):
                md += [f"> {c['statement']}", ""]
            md += [f"- Criterion: {c['criterion']}."]
            p = c.get("paper")
            md += [
                f"- Paper: {p['text']} (source: {p['source']})."
                if p
                else "- Paper: no published value for this setting."
            ]
            md += [f"- This run: {c['text']}"]
    return md


def _barrier_table(e: dict[str, Any]) -> list[str]:
    rows = []
    first = None
    for m, d in e["methods"].items():
        for sp, b in d.get("barrier", {}).items():
            first = first or b.get("loss_barrier")
            rows.append(
                {
                    "method": METHOD_LABEL.get(m, m),
                    "split": sp,
                    "loss barrier": _pm(b.get("loss_barrier"), "{:.4f}", ci=True),
                    "accuracy barrier": _pm(b.get("accuracy_barrier"), "{:.4f}", ci=True),
                    "midpoint loss": _pm(b.get("midpoint_loss"), "{:.4f}"),
                    "midpoint accuracy": _pm(b.get("midpoint_accuracy"), "{:.4f}"),
                }
            )
    if not rows:
        return []
    return ["", f"Barriers along the linear path ({_over(first)}; accuracies as fractions):", ""] + _table(rows)


def _distance_taylor_table(e: dict[str, Any]) -> list[str]:
    rows = []
    over = None
    tay_n = None
    for m, d in e["methods"].items():
        if "distance" not in d and "taylor" not in d:
            continue
        dist, tay = d.get("distance", {}), d.get("taylor", {})
        over = over or dist.get("reduction")
        tay_n = tay_n or tay.get("num_samples")
        bsplit = "test" if "test" in d.get("barrier", {}) else next(iter(d.get("barrier", {"-": None})))
        rows.append(
            {
                "method": METHOD_LABEL.get(m, m),
                "d0": _pm(dist.get("l2_before"), "{:.2f}"),
                "d1": _pm(dist.get("l2_after"), "{:.2f}"),
                "reduction": _pm(dist.get("reduction"), "{:.1%}", ci=True),
                f"midpoint barrier, {bsplit} (measured; mean over pairs)": _pm(_mid_barrier(d, bsplit), "{:.4f}"),
                "midpoint barrier, Taylor's train subset (measured)": _pm(tay.get("measured_midpoint"), "{:.4f}"),
                "Taylor estimate": _pm(tay.get("taylor_midpoint"), "{:.4f}"),
            }
        )
    if not rows:
        return []
    note = (
        f"Distances and the Taylor estimate (claims 1 and 2). d0, d1: L2 distance before/after matching "
        f"({_over(over)}); the Taylor columns over model pairs, on {tay_n or 'the'} training images. "
        "Midpoint barrier = midpoint loss minus the endpoints' mean loss (negative: the midpoint lies below "
        "the endpoints' line)."
    )
    return ["", note, ""] + _table(rows)


def _layer_section(e: dict[str, Any]) -> list[str]:
    """Per-layer distance, reduction, R(0) and R(0.3) for every matched pair (mean over that pair's searches)."""
    if not e.get("layers"):
        return []
    md = [
        "",
        "Per-layer tables, one per matched pair and method: L2 distance before → after matching (weights and "
        "biases of the layer), its reduction, and R(gamma) before → after (values for WM: mean over the pair's "
        "searches).",
    ]
    for t in e["layers"]:
        md += [
            "",
            f"*{METHOD_LABEL.get(t['method'], t['method'])}, seeds {t['pair'][0]}-{t['pair'][1]}"
            + (f" (mean of {t['searches']} searches)" if t["searches"] > 1 else "")
            + ":*",
            "",
        ]
        rows = []
        for row in t["rows"]:
            cells: dict[str, Any] = {"layer": layer_label(row["layer"])}
            if "l2_before" in row:
                cells["L2 distance"] = f"{row['l2_before']:.2f} → {row['l2_after']:.2f}"
                cells["reduction"] = f"{row['reduction']:.1%}"
            for g, v in row.get("R", {}).items():
                cells[f"R({g})"] = f"{v['before']:.3f} → {v['after']:.3f}"
            rows.append(cells)
        md += _table(rows)
    return md


def _drift_sentence(drift: dict[str, Any]) -> str:
    """One sentence from the drift numbers: reassignment after the last epoch against the WM seed-to-seed baseline."""
    sm = drift["summary"]
    n = len(drift["runs"])
    ch, r0, r1 = sm["changed_vs_wm_end"]["mean"], sm["r03_start"]["mean"], sm["r03_end"]["mean"]
    dist = sm["tilde_rel_dist_end"]["mean"]
    text = (
        f"After {sm['epochs']} STE epoch(s) the projection of θ̃ (the trajectory's last permutation, not "
        f"necessarily the one the protocol keeps) differs from plain WM's on {ch:.1%} of units "
        f"(mean over {n} run{'s' if n != 1 else ''}; STE's dense copy θ̃ ended {dist:.2f} × ‖θ_a‖ away from "
        f"model A (it acts only through its projection to a permutation), R(0.3) went "
        f"from {r0:.3f} to {r1:.3f})"
    )
    base = drift.get("wm_vs_wm")
    if base and base.get("n"):
        b = base["mean"]
        verdict = "more than" if ch > b + base["std"] else "less than" if ch < b - base["std"] else "about as much as"
        text += (
            f", against {b:.1%} between two WM searches with different seeds: STE reassigned {verdict} WM's own "
            "seed-to-seed variation."
        )
    else:
        text += "; no WM seed-to-seed baseline in this recipe (match.searches = 1)."
    return text


def _per_index_sentence(spectra: dict[str, Any]) -> str:
    """Mean per-index alignment over the leading 10% and the trailing half of indices, after WM, all layers."""
    lead, tail = [], []
    for d in spectra.values():
        v = d["per_index_after"]
        k = max(1, len(v) // 10)
        lead += v[:k]
        tail += v[len(v) // 2 :]
    a = sum(lead) / max(len(lead), 1)
    b = sum(tail) / max(len(tail), 1)
    verdict = (
        "aligns the dominant directions far more" if a > 2 * abs(b) else "does not single out the dominant directions"
    )
    return (
        f"After WM the leading 10% of singular directions have mean alignment {a:.3f} against {b:.3f} for the "
        f"trailing half: WM {verdict} in this run."
    )


def _mid_barrier(d: dict[str, Any], split: str) -> dict[str, Any] | None:
    """Measured midpoint loss barrier: midpoint loss minus the mean endpoint loss, from the aggregated curves."""
    c = d.get("curves", {})
    if split not in c or 0.5 not in c["lambdas"]:
        return None
    lam = c["lambdas"]
    loss = c[split]["loss_mean"]
    i0, i1, im = lam.index(0.0), lam.index(1.0), lam.index(0.5)
    return {"mean": loss[im] - 0.5 * (loss[i0] + loss[i1]), "n": 1}


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
    "img{max-width:100%}code{background:#f3f3f3}blockquote{border-left:3px solid #ccc;margin-left:0;"
    "padding-left:1em;color:#333}"
)


def render_html(md: str, title: str) -> str:
    """A standalone HTML page of the Markdown ``md``, rendered by markdown-it-py (CommonMark + tables).

    Raw HTML in the Markdown is escaped, not passed through (``html=False``); the page links its images by
    the relative paths the Markdown gives.
    """
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
