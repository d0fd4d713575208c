"""Write a reproduction report: report.md, report.html, results.json, timings.json and PNG figures.

Every number in the report comes from the results tree (``results.json``);
each figure carries a one-sentence caption saying what it shows and, where a
claim of the paper attaches to it, whether the claim held in this run (the
sentence is built from the numbers by :func:`lmckit.report.results.judge_claims`).
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from ..store import atomic_write_json, atomic_write_text
from . import figures as F
from .figures import METHOD_LABEL

__all__ = ["write_report", "summary_rows", "check_finite_tree"]


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


def _pm(s: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
    if not s:
        return "-"
    if s.get("n", 1) > 1:
        return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
    return fmt.format(s["mean"])


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
            rows.append({"model": e["label"], "method": METHOD_LABEL.get(m, m),
                         f"{split} loss barrier": _pm(b.get("loss_barrier")),
                         f"{split} acc barrier": _pm(b.get("accuracy_barrier")),
                         **{f"R({g})": _pm(d["R"][g]["after"]) for g in gam},
                         "L2 reduction": _pm(d.get("distance", {}).get("reduction"), "{:.1%}")})
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return out


def _caption(res: dict[str, Any], figure: str, what: str) -> str:
    said = [c["text"] for c in res.get("claims", []) if c["figure"] == figure]
    return " ".join([what] + said)


def write_report(res: dict[str, Any], out: str | Path, timing: dict[str, Any] | None = None,
                 cache: str | None = None) -> dict[str, Path]:
    """Write everything into ``out``; return name -> path of the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_finite_tree(res)
    written: dict[str, Path] = {}
    figs: list[tuple[str, str, str]] = []  # (file, title, caption)

    root = out.resolve()

    def inside(name: str) -> Path:
        """``out / name``, refusing a name that would leave the report folder."""
        p = out / name
        if Path(name).is_absolute() or not p.resolve().is_relative_to(root) or p.resolve() == root:
            raise ValueError(f"report file name {name!r} leaves the report folder {out}")
        return p

    def fig(name: str, title: str, caption: str, draw: Callable[[Path], Path]) -> None:
        written[name] = draw(inside(name))
        figs.append((name, title, caption))

    r = res["recipe"]
    md: list[str] = [f"# lmckit reproduction: recipe `{r['name']}`", "", r.get("description", ""), ""]
    md += [f"Dataset **{r['data']['dataset']}**, seeds {r['train']['seeds']}, methods "
           f"{', '.join(METHOD_LABEL.get(m, m) for m in r['match']['methods'])}. "
           f"Barriers: max over {r['barrier']['lambdas']} evenly spaced lambdas of the gap to the linear "
           "interpolation of the endpoints; mean ± std over model pairs (R and distances also over WM searches)."]
    if cache:
        md += ["", f"Stage outputs: `{cache}` (rerun the same command to reuse them)."]
    for n in res.get("notes", []):
        md += ["", f"> note: {n}"]
    md += ["", "## Claims", ""]
    for c in res.get("claims", []):
        md.append(f"- **{'held' if c['held'] else 'did not hold'}** (claim {c['id']}): {c['text']} "
                  f"_Criterion: {c['criterion']}._")
    if not res.get("claims"):
        md.append("- (no claim can be judged from this recipe's results)")
    md += ["", "## Summary", ""] + _table(summary_rows(res))

    for i, e in enumerate(res["experiments"]):
        pre = "" if i == 0 else f"{_slug(e['label'])}_"
        md += ["", f"## {e['label']}", "", "Trained models:", ""]
        md += _table([{"seed": m["seed"], "test acc": f"{m['test_accuracy']:.4f}", "test loss": f"{m['test_loss']:.4f}",
                       "train acc": f"{m['train_accuracy']:.4f}"} for m in e["models"]])
        rows = []
        for m, d in e["methods"].items():
            if "distance" not in d and "taylor" not in d:
                continue
            dist, tay = d.get("distance", {}), d.get("taylor", {})
            bsplit = "test" if "test" in d.get("barrier", {}) else next(iter(d.get("barrier", {"-": None})))
            rows.append({"method": METHOD_LABEL.get(m, m), "d0": _pm(dist.get("l2_before"), "{:.2f}"),
                         "d1": _pm(dist.get("l2_after"), "{:.2f}"), "reduction": _pm(dist.get("reduction"), "{:.1%}"),
                         f"measured midpoint barrier ({bsplit})": _pm(_mid_barrier(d, bsplit)),
                         "measured midpoint barrier (Taylor's train subset)": _pm(tay.get("measured_midpoint")),
                         "Taylor estimate": _pm(tay.get("taylor_midpoint"))})
        if rows:
            md += ["", "Distances and the Taylor estimate (table of claims 1 and 2):", ""] + _table(rows)
        if any("curves" in d for d in e["methods"].values()):
            fig(f"{pre}interpolation.png", f"{e['label']}: interpolation curves",
                _caption(res, "interpolation", "Loss and accuracy along the linear path between two models, naive and "
                         "after each matching (shaded: ±1 std over pairs).") if i == 0 else
                "Loss and accuracy along the linear path between two models.", lambda p, e=e: F.interpolation(e, p))
        if any("R" in d for d in e["methods"].values()):
            fig(f"{pre}R_bars.png", f"{e['label']}: alignment score R", _caption(
                res, "R_bars", "R(gamma) of the singular vectors before matching and after each method (error bars: std "
                "over pairs and searches).") if i == 0 else "R(gamma) before and after matching.",
                lambda p, e=e: F.r_bars(e, p))
        if e.get("spectra"):
            fig(f"{pre}spectra.png", f"{e['label']}: singular-value spectra",
                "Singular values of corresponding layers of two independently trained models (first pair).",
                lambda p, e=e: F.spectra(e, p))
            fig(f"{pre}per_index.png", f"{e['label']}: per-index alignment",
                "Per-index alignment (u_i . P u'_i)(v_i . Q v'_i) against singular-value rank, before and after WM. "
                + _per_index_sentence(e["spectra"]), lambda p, e=e: F.per_index(e, p))
        if e.get("projections"):
            fig(f"{pre}projections.png", f"{e['label']}: input projections", _caption(
                res, "projections", "Mean |v_i . z| of each layer's inputs z on its right-singular vectors, against "
                "rank, beside random directions.") if i == 0 else "Input projections on right-singular vectors.",
                lambda p, e=e: F.projections(e, p))
        if e.get("rank_sweep"):
            fig(f"{pre}rank.png", f"{e['label']}: accuracy against kept rank",
                _caption(res, "projections", "Test accuracy of model A and of the WM midpoint when each hidden layer keeps "
                         "only its leading singular directions (output layer whole).") if i == 0 else
                "Test accuracy against kept rank.", lambda p, e=e: F.rank(e, p))
    three = res.get("three_models")
    if three:
        md += ["", "## Three models", "", "Models 1 and 2 matched to the anchor (model 0); barrier between the two "
               "matched models and accuracy of the uniform average of the first n models:", ""]
        md += _table([{"method": METHOD_LABEL.get(m, m), "pair loss barrier": f"{d['pair_loss_barrier']:.4f}",
                       "pair acc barrier": f"{d['pair_accuracy_barrier']:.4f}",
                       **{f"avg of {x['n']} acc": f"{x['accuracy']:.4f}" for x in d["merged"]}} for m, d in three.items()])
        fig("three_models.png", "Three models: pair path and merged accuracy",
            _caption(res, "three_models", "Left: loss along the path between two models both matched to one anchor. "
                     "Right: test accuracy of the average of n aligned models."), lambda p: F.three_models(three, p))
        if any("landscape" in d for d in three.values()):
            fig("landscape.png", "Three models: loss landscape", "Loss (log scale) on the plane through the three aligned "
                "models (triangles), per matching method.", lambda p: F.landscape(three, p))
    drift = res.get("ste_drift")
    if drift:
        md += ["", "## STE drift", "", "How far STE moved from plain weight matching, per epoch (epoch 0: the start, "
               "where STE's permutation is WM's):", ""]
        md += _table([{"run": r["label"], "epochs": r["epoch"][-1],
                       "units reassigned vs WM": f"{r['changed_vs_wm'][-1]:.1%}",
                       "||theta~ - theta_a|| / ||theta_a||": f"{r['tilde_rel_dist'][-1]:.4f}",
                       "R(0.3) start -> end": f"{r['r03'][0]:.3f} -> {r['r03'][-1]:.3f}",
                       "held-out midpoint loss start -> end": f"{r['heldout_loss'][0]:.4f} -> {r['heldout_loss'][-1]:.4f}"}
                      for r in drift["runs"]])
        fig("ste_drift.png", "STE drift from weight matching", _drift_sentence(drift),
            lambda p: F.ste_drift(drift, p))
    ws = res.get("width_sweep")
    if ws:
        fig("width_sweep.png", "Width sweep", _caption(res, "width_sweep", "Loss barrier and R against the width "
            "multiplier (mean ± std over pairs)."), lambda p: F.width_sweep(ws, p))

    md += ["", "## Figures"]
    for name, title, caption in figs:
        md += ["", f"### {title}", "", f"![{title}]({name})", "", caption]
    if timing:
        md += ["", "## Timings", "", "Stage compute time (from the cache; 0 for stages reused): "
               + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(timing["stage_seconds_by_kind"].items()))]
        if timing.get("ran_with"):  # results are bit-identical only for the same threads and device
            md += ["", "Stages ran with: " + "; ".join(f"{w['threads']} torch threads on {w['device']}"
                                                       for w in timing["ran_with"]) + "."]
    text = "\n".join(md) + "\n"
    written["report.md"] = atomic_write_text(inside("report.md"), text)
    written["report.html"] = atomic_write_text(inside("report.html"), _html(text, r["name"]))
    written["results.json"] = atomic_write_text(inside("results.json"),
                                                json.dumps(res, indent=1, sort_keys=True, allow_nan=False) + "\n")
    if timing is not None:
        written["timings.json"] = atomic_write_json(inside("timings.json"), timing)
    return written


def _drift_sentence(drift: dict[str, Any]) -> str:
    """One sentence from the drift numbers: reassignment after the last epoch against the WM seed-to-seed baseline."""
    sm = drift["summary"]
    n = len(drift["runs"])
    ch, r0, r1 = sm["changed_vs_wm_end"]["mean"], sm["r03_start"]["mean"], sm["r03_end"]["mean"]
    dist = sm["tilde_rel_dist_end"]["mean"]
    text = (f"After {sm['epochs']} STE epoch(s) the permutation differs from plain WM's on {ch:.1%} of units "
            f"(mean over {n} run{'s' if n != 1 else ''}; theta~ moved {dist:.1%} of ||theta_a|| from A, R(0.3) went "
            f"from {r0:.3f} to {r1:.3f})")
    base = drift.get("wm_vs_wm")
    if base and base.get("n"):
        b = base["mean"]
        verdict = ("more than" if ch > b + base["std"] else "less than" if ch < b - base["std"] else "about as much as")
        text += (f", against {b:.1%} between two WM searches with different seeds: STE reassigned {verdict} WM's own "
                 "seed-to-seed variation.")
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
        tail += v[len(v) // 2:]
    a = sum(lead) / max(len(lead), 1)
    b = sum(tail) / max(len(tail), 1)
    return (f"After WM the leading 10% of singular directions have mean alignment {a:.3f} against {b:.3f} for the "
            f"trailing half: WM {'aligns the dominant directions far more' if a > 2 * abs(b) else 'does not single out the dominant directions'} in this run.")


def _mid_barrier(d: dict[str, Any], split: str) -> dict[str, Any] | None:
    """Measured midpoint loss barrier: midpoint loss minus the mean endpoint loss, from the aggregated curves."""
    c = d.get("curves", {})
    if split not in c or 0.5 not in c["lambdas"]:
        return None
    lam = c["lambdas"]
    loss = c[split]["loss_mean"]
    i0, i1, im = lam.index(0.0), lam.index(1.0), lam.index(0.5)
    return {"mean": loss[im] - 0.5 * (loss[i0] + loss[i1]), "n": 1}


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return re.sub(r"(?<![\w])_(.+?)_(?![\w])", r"<i>\1</i>", s)


def _html(md: str, name: str) -> str:
    """A small, dependency-free Markdown-to-HTML rendering of the report (headings, lists, tables, images)."""
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-"):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if j == 0 else 'td'}>{_inline(c)}</{'th' if j == 0 else 'td'}>" for c in r) + "</tr>"
                for j, r in enumerate(rows)) + "</table>")
            continue
        m = re.match(r"!\[(.*)\]\((.*)\)", ln)
        if ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            body.append(f"<h{level}>{_inline(ln[level:].strip())}</h{level}>")
        elif m:
            body.append(f'<img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}">')
        elif ln.startswith("- "):
            body.append(f"<li>{_inline(ln[2:])}</li>")
        elif ln.startswith("> "):
            body.append(f"<blockquote>{_inline(ln[2:])}</blockquote>")
        elif ln.strip():
            body.append(f"<p>{_inline(ln)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
             "img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lmckit report: {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
