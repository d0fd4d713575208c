"""Figures of the studies section (:mod:`lmckit.report.studies`), drawn from the results tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..plotting import pyplot as _plt
from ..plotting import save_figure

COLORS = {
    "naive": "0.5",
    "wm": "C3",
    "weight": "C3",
    "activation": "C0",
    "ste": "C2",
    "merge_many": "C4",
    "heldout-best": "C2",
    "git-re-basin": "C1",
    "random-mixing": "C5",
}


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=90, tight_layout=True, metadata={"Software": None})


def directions(d: Mapping[str, Any], path: Path) -> Path:
    """Bars: test-loss barrier and R(0.3) of naive, full WM, WM-top and WM-tail (mean +- std over pairs)."""
    fig, axes = _plt().subplots(1, 3, figsize=(10, 3.2))
    names = list(d["variants"])
    for ax, (q, title) in zip(
        axes, (("loss_barrier", "test loss barrier"), ("R03", "R(0.3)"), ("reduction", "L2 distance reduction"))
    ):
        v = [d["variants"][n][q] for n in names]
        ax.bar(
            range(len(names)),
            [x["mean"] for x in v],
            yerr=[x["std"] for x in v],
            capsize=2,
            color=[COLORS.get(n, "C0" if n.startswith("top") else "C9") for n in names],
        )
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle("WM on the top / tail singular directions, applied to the full model", fontsize=9)
    return _save(fig, path)


def dose(a: Mapping[str, Any], path: Path) -> Path:
    """Barrier against R(0.3) and against the L2 distance, one point per (f, draw), coloured by f."""
    fig, axes = _plt().subplots(1, 2, figsize=(8.5, 3.2))
    pts = a["points"]
    f = [p["fraction"] for p in pts]
    for ax, (q, name, rho) in zip(
        axes,
        (
            ("R03", "R(0.3)", a["spearman_barrier_R03"]),
            ("l2_after", "L2 distance ||theta_a - pi(theta_b)||", a["spearman_barrier_l2"]),
        ),
    ):
        sc = ax.scatter([p[q] for p in pts], [p["loss_barrier"] for p in pts], c=f, cmap="viridis", s=14)
        ax.set_xlabel(name)
        ax.set_ylabel("test loss barrier")
        ax.set_title(f"Spearman rho = {rho:+.3f}", fontsize=9)
    fig.colorbar(sc, ax=axes[1], label="fraction re-assigned f")
    return _save(fig, path)


def weight_decay(w: Mapping[str, Any], path: Path) -> Path:
    """Naive/WM barriers, R(0.3) after WM, and spectrum concentration against weight decay."""
    rows = sorted(w["rows"], key=lambda r: r["weight_decay"])
    xs = list(range(len(rows)))
    fig, axes = _plt().subplots(1, 3, figsize=(10, 3.2))
    axes[0].plot(xs, [r["naive_barrier"] for r in rows], marker="o", color=COLORS["naive"], label="naive")
    axes[0].plot(xs, [r["wm_barrier"] for r in rows], marker="o", color=COLORS["wm"], label="WM")
    axes[0].set_ylabel("test loss barrier")
    axes[0].legend(fontsize=7)
    axes[1].plot(xs, [r["R03"] for r in rows], marker="o", color=COLORS["wm"], label="R(0.3) after WM")
    axes[1].plot(xs, [r["R0"] for r in rows], marker="s", color="C0", label="R(0) after WM")
    axes[1].legend(fontsize=7)
    axes[2].plot(xs, [r["concentration"] for r in rows], marker="o", color="C4")
    axes[2].set_ylabel(f"fraction sigma >= {rows[0]['gamma']:g} sigma_max")
    for ax in axes:
        ax.set_xticks(xs, [f"{r['weight_decay']:g}" for r in rows])
        ax.set_xlabel("weight decay")
    return _save(fig, path)


def many_models(m: Mapping[str, Any], path: Path) -> Path:
    """Merged accuracy, mean pairwise barrier and R(0.3) between non-anchor models against N, one line per method."""
    fig, axes = _plt().subplots(1, 3, figsize=(10, 3.2))
    for meth, rows in m["methods"].items():
        n = [r["n"] for r in rows]
        kw = dict(marker="o", ms=3, color=COLORS.get(meth), label=meth)
        axes[0].plot(n, [r["merged_accuracy"] for r in rows], **kw)
        axes[1].plot(n, [r["mean_pair_barrier"] for r in rows], **kw)
        rr = [(r["n"], r["R_non_anchor"]["0.3"]) for r in rows if r.get("R_non_anchor")]
        if rr:
            axes[2].plot([x for x, _ in rr], [y for _, y in rr], **kw)
    for ax, t in zip(
        axes,
        (
            "test accuracy of the uniform average",
            "mean pairwise test loss barrier",
            "R(0.3) between matched non-anchor models",
        ),
    ):
        ax.set_xlabel("number of models N")
        ax.set_title(t, fontsize=8)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def protocols(p: Mapping[str, Any], path: Path) -> Path:
    """Per protocol (and naive, WM): barrier, R(0.3), units reassigned vs WM, three-model pair barrier."""
    names = list(p)
    fig, axes = _plt().subplots(1, 4, figsize=(13, 3.2))
    cols = [COLORS.get(n, "C0") for n in names]
    for ax, (q, title) in zip(
        axes,
        (
            ("loss_barrier", "test loss barrier"),
            ("R03", "R(0.3)"),
            ("changed_vs_wm", "units reassigned vs WM"),
            ("three_pair_barrier", "three-model pair barrier"),
        ),
    ):
        vals = []
        for n in names:
            v = p[n].get(q)
            vals.append(v if isinstance(v, (int, float)) else (v or {}).get("mean", 0.0))
        errs = [(p[n].get(q) or {}).get("std", 0.0) if isinstance(p[n].get(q), dict) else 0.0 for n in names]
        ax.bar(range(len(names)), vals, yerr=errs, color=cols, capsize=2)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
