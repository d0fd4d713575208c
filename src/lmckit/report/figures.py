"""Report figures drawn from the aggregated results tree (JSON numbers, not live objects).

The per-pair plots of :mod:`lmckit.analysis.plots` take live analysis
objects of one pair; the report needs mean and standard deviation over
pairs and searches read back from stage folders, so it draws its own
figures here. Each function writes one PNG (Agg backend) and returns its path.

Conventions shared by every figure: axes labelled with their units
(accuracy as a fraction in [0, 1], loss as cross-entropy in nats), integer
ticks on integer axes (indices, epochs, model counts), one legend per figure
placed below the panels (never over the data), and panels that compare
methods drawn on one shared colour scale and the same axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ..plotting import LOSS_CMAP, integer_ticks, legend_outside, plain_log_axis, save_figure, subplot_grid
from ..plotting import pyplot as _plt
from .architectures import layer_label

METHOD_LABEL = {"naive": "naive", "weight": "WM", "activation": "AM", "ste": "STE", "merge_many": "MergeMany"}
METHOD_COLOR = {"naive": "0.5", "weight": "C3", "activation": "C0", "ste": "C2", "merge_many": "C4"}
METHOD_STYLE = {"naive": "-", "weight": "-", "activation": "--", "ste": ":", "merge_many": "-."}


def _save(fig, path: Path, axes: Any = None, ncol: int | None = None) -> Path:
    """Save with a legend below the panels (from ``axes``) and room kept for it."""
    leg = legend_outside(fig, axes, ncol=ncol) if axes is not None else None
    bottom = 0.0
    if leg is not None:
        rows = math.ceil(len(leg.get_texts()) / leg._ncols)  # noqa: SLF001 - matplotlib keeps ncols private
        bottom = min(0.4, (0.22 * rows + 0.1) / fig.get_size_inches()[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout(rect=(0, bottom, 1, 1))
    return save_figure(fig, path, dpi=90, metadata={"Software": None}, bbox_inches="tight")


def _grid(n: int, size: float = 3.0):
    return subplot_grid(n, size)


def _ordered(methods: Mapping[str, Any]) -> list[str]:
    """Method names in the report's order (naive, WM, AM, STE, MergeMany, then any other)."""
    order = list(METHOD_LABEL)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def interpolation(exp: Mapping[str, Any], path: Path) -> Path:
    """Per split: loss, loss of the aligned methods only (zoomed), accuracy, against lambda.

    One row per split; mean over pairs, shaded +-1 std. The middle panel leaves out the naive path so that
    the aligned methods' curves, which otherwise overlap in a thin strip, can be told apart.
    """
    plt = _plt()
    methods = {m: exp["methods"][m] for m in _ordered(exp["methods"]) if "curves" in exp["methods"][m]}
    splits = [s for s in next(iter(methods.values()))["curves"] if s != "lambdas"]
    aligned = [m for m in methods if m != "naive"]
    cols = 3 if aligned and "naive" in methods else 2
    fig, grid = plt.subplots(len(splits), cols, figsize=(3.4 * cols, 2.9 * len(splits)), squeeze=False)
    for i, sp in enumerate(splits):
        panels = [("loss", list(methods), "loss (nats)", "")]
        if cols == 3:
            panels.append(("loss", aligned, "loss (nats)", " (aligned methods, zoomed)"))
        panels.append(("accuracy", list(methods), "accuracy (fraction)", ""))
        for ax, (q, which, unit, note) in zip(grid[i], panels):
            for m in which:
                d = methods[m]
                lam = d["curves"]["lambdas"]
                mu, sd = d["curves"][sp][f"{q}_mean"], d["curves"][sp][f"{q}_std"]
                ax.plot(
                    lam,
                    mu,
                    label=METHOD_LABEL.get(m, m),
                    color=METHOD_COLOR.get(m),
                    ls=METHOD_STYLE.get(m, "-"),
                    lw=1.4,
                )
                ax.fill_between(
                    lam,
                    [a - b for a, b in zip(mu, sd)],
                    [a + b for a, b in zip(mu, sd)],
                    color=METHOD_COLOR.get(m),
                    alpha=0.2,
                    lw=0,
                )
            ax.set_title(f"{sp} {q}{note}", fontsize=8)
            ax.set_xlabel("λ (0: model A, 1: model B)")
            ax.set_ylabel(f"{sp} {unit}")
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    fig.suptitle(f"{exp['label']}: linear interpolation (mean ± std over {len(exp['pairs'])} pair(s))", fontsize=9)
    return _save(fig, path, [grid[0][0]])


def spectra(exp: Mapping[str, Any], path: Path) -> Path:
    sp = exp["spectra"]
    fig, axes = _grid(len(sp))
    a, b = exp["pairs"][0]
    for ax, (name, d) in zip(axes, sp.items()):
        ax.plot(d["sigma_a"], lw=1.2, label=f"model A (seed {a})")
        ax.plot(d["sigma_b"], lw=1.2, ls="--", label=f"model B (seed {b})")
        ax.set_yscale("log")
        plain_log_axis(ax)
        ax.set_title(layer_label(name), fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("singular value σ_i")
        integer_ticks(ax)
    fig.suptitle("Singular values of corresponding layers, two seeds", fontsize=9)
    return _save(fig, path, axes[:1])


def r_bars(exp: Mapping[str, Any], path: Path) -> Path:
    """R(gamma) before matching and after each method, mean +- std over pairs and searches."""
    plt = _plt()
    methods = [m for m, d in exp["methods"].items() if "R" in d and m != "naive"]  # naive = "no permutation"
    gammas = list(exp["methods"][methods[0]]["R"])
    series = [("no permutation", exp["methods"][methods[0]]["R"], "before", "0.6")]
    series += [(METHOD_LABEL.get(m, m), exp["methods"][m]["R"], "after", METHOD_COLOR.get(m)) for m in methods]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(gammas) * len(series) / 2, 3.4))
    w = 0.8 / len(series)
    for j, (name, R, when, color) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(gammas))]
        ax.bar(
            xs,
            [R[g][when]["mean"] for g in gammas],
            yerr=[R[g][when]["std"] for g in gammas],
            width=w,
            label=name,
            color=color,
            capsize=2,
        )
    ax.set_xticks(range(len(gammas)), [f"γ = {g}" for g in gammas])
    ax.set_ylabel("alignment score R(γ)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("Alignment of singular vectors (mean ± std)", fontsize=9)
    return _save(fig, path, [ax])


def per_index(exp: Mapping[str, Any], path: Path) -> Path:
    sp = exp["spectra"]
    fig, axes = _grid(len(sp))
    for ax, (name, d) in zip(axes, sp.items()):
        ax.plot(d["per_index_before"], color="0.6", lw=0.8, label="before matching")
        ax.plot(d["per_index_after"], color="C3", lw=0.8, label="after WM")
        ax.axhline(0, color="k", lw=0.4)
        ax.set_title(layer_label(name), fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("(u_i·Pu'_i)(v_i·Qv'_i)")
        integer_ticks(ax)
    fig.suptitle("Per-index alignment against singular-value rank", fontsize=9)
    return _save(fig, path, axes[:1])


def projections(exp: Mapping[str, Any], path: Path) -> Path:
    pr = exp["projections"]
    fig, axes = _grid(len(pr))
    for ax, (name, d) in zip(axes, pr.items()):
        ax.plot(d["mean_abs"], lw=1.0, label="right-singular vector v_i")
        ax.plot(d["random_mean_abs"], lw=0.8, color="0.6", label="random unit direction")
        ax.set_title(layer_label(name), fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("mean |v_i · z| over inputs z")
        integer_ticks(ax)
    fig.suptitle("Layer inputs projected on right-singular vectors", fontsize=9)
    return _save(fig, path, axes[:1])


def rank(exp: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for i, (who, recs) in enumerate(exp["rank_sweep"].items()):
        full = next((r for r in recs if r["kind"] == "full"), None)
        for kind, marker in (("fraction", "o"), ("gamma", "s")):
            pts = sorted((r["kept_fraction"], r["accuracy"]) for r in recs if r["kind"] == kind)
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    ms=3,
                    color=f"C{i}",
                    ls="-" if kind == "fraction" else "none",
                    label=f"{who}: {'top fraction of the rank' if kind == 'fraction' else 'σ_i >= γ σ_max'}",
                )
        if full is not None:
            ax.axhline(full["accuracy"], color=f"C{i}", ls=":", lw=0.8, label=f"{who}: untruncated")
    ax.set_xscale("log")
    ax.set_xlabel("kept directions / full rank, hidden layers (log scale)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title("Accuracy of rank-k truncated models", fontsize=9)
    return _save(fig, path, [ax], ncol=2)


def three_models(three: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for m in _ordered(three):
        d = three[m]
        c = d["pair_curve"]
        kw = dict(color=METHOD_COLOR.get(m), ls=METHOD_STYLE.get(m, "-"))
        a1.plot(c["lambdas"], c["loss"], label=METHOD_LABEL.get(m, m), **kw)
        a2.plot([r["n"] for r in d["merged"]], [r["accuracy"] for r in d["merged"]], marker="o", ms=3, **kw)
    a1.set_xlabel("λ (0: π_b(θ_b), 1: π_c(θ_c))")
    a1.set_ylabel(f"{next(iter(three.values()))['split']} loss (nats)")
    a1.set_title("Path between two models matched to one anchor", fontsize=9)
    a2.set_xlabel("number of averaged models n")
    a2.set_ylabel("test accuracy of the average (fraction)")
    a2.set_title("Merged model accuracy", fontsize=9)
    integer_ticks(a2)
    return _save(fig, path, [a1])


def landscape(three: Mapping[str, Any], path: Path) -> Path:
    """Loss on the plane of the three aligned models, one panel per method, on ONE shared log colour scale.

    Every panel uses the same colour normalisation (the min and max loss over all panels), the same
    colour map as ``lmckit landscape`` (:data:`lmckit.plotting.LOSS_CMAP`, dark = low loss), the same
    axis limits and an equal aspect ratio, so the methods compare directly.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    items = [(m, three[m]["landscape"]) for m in _ordered(three) if "landscape" in three[m]]
    zs = [np.maximum(np.asarray(ld["loss"], dtype=float), 1e-4) for _, ld in items]
    lo = float(min(z.min() for z in zs))
    hi = float(max(z.max() for z in zs))
    hi = hi if hi > lo * 1.001 else lo * 1.001
    levels = np.geomspace(lo, hi, 16)
    norm = LogNorm(vmin=lo, vmax=hi)
    xlim = (min(min(ld["xs"]) for _, ld in items), max(max(ld["xs"]) for _, ld in items))
    ylim = (min(min(ld["ys"]) for _, ld in items), max(max(ld["ys"]) for _, ld in items))
    fig, axes = _grid(len(items), size=3.6)
    cs = None
    for ax, (m, ld), z in zip(axes, items, zs):
        cs = ax.contourf(ld["xs"], ld["ys"], z, levels=levels, norm=norm, cmap=LOSS_CMAP)
        pts = list(ld["models"].items())
        tri = [p for _, p in pts] + [pts[0][1]]
        ax.plot([p[0] for p in tri], [p[1] for p in tri], "w--", lw=0.8)
        for name, (x, y) in pts:
            ax.plot([x], [y], "o", color="white", markeredgecolor="black", ms=6)
            ax.annotate(
                name, (x, y), color="white", fontsize=7, fontweight="bold", xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_facecolor("0.85")  # outside this method's evaluated grid (the axes are shared by all panels)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(f"{METHOD_LABEL.get(m, m)}", fontsize=8)
        ax.set_xlabel("coordinate along θ_B − θ_A (L2 units)", fontsize=7)
        if ax is axes[0]:
            ax.set_ylabel("orthogonal coordinate (L2 units)", fontsize=7)
    if cs is not None:
        ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 6)})  # readable values, log-spaced
        cbar = fig.colorbar(cs, ax=[a for a in axes if a.get_visible()], shrink=0.85, ticks=ticks, format="%.3g")
        cbar.minorticks_off()
        cbar.set_label("test loss (nats, log scale; shared by all panels)", fontsize=7)
    fig.suptitle("Loss on the plane through three aligned models (white: the models; grey: not evaluated)", fontsize=9)
    return save_figure(fig, path, dpi=90, metadata={"Software": None}, bbox_inches="tight")


def width_sweep(ws: list[Mapping[str, Any]], path: Path, split: str = "test", gamma: str | None = None) -> Path:
    plt = _plt()
    ws = sorted(ws, key=lambda x: x["width_mult"])
    widths = [x["width_mult"] for x in ws]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for m in ws[0]["methods"]:
        b = [x["methods"][m].get("barrier", {}).get(split, {}).get("loss_barrier") for x in ws]
        if all(v is not None for v in b):
            a1.errorbar(
                widths,
                [v["mean"] for v in b],
                yerr=[v["std"] for v in b],
                marker="o",
                ms=3,
                capsize=2,
                label=METHOD_LABEL.get(m, m),
                color=METHOD_COLOR.get(m),
            )
        R = [x["methods"][m].get("R") for x in ws]
        if all(R):
            g = gamma or list(R[0])[-1]
            a2.errorbar(
                widths,
                [r[g]["after"]["mean"] for r in R],
                yerr=[r[g]["after"]["std"] for r in R],
                marker="o",
                ms=3,
                capsize=2,
                label=f"{METHOD_LABEL.get(m, m)} R({g})",
                color=METHOD_COLOR.get(m),
            )
            a2.plot(widths, [r[g]["before"]["mean"] for r in R], ls=":", color="0.5", label=f"no permutation R({g})")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"x{w:g}" for w in widths], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("width multiplier (log scale)")
    a1.set_ylabel(f"{split} loss barrier (nats)")
    a2.set_ylabel("alignment score R(γ)")
    fig.suptitle("Width sweep", fontsize=9)
    return _save(fig, path, [a1, a2])


def ste_drift(drift: Mapping[str, Any], path: Path) -> Path:
    """STE drift against epoch, one line per STE run, in four panels.

    Panels: fraction of units assigned differently from plain WM (with the
    WM-vs-WM seed-to-seed baseline as a dashed line, shaded +-1 std),
    ``||theta~ - theta_a|| / ||theta_a||`` (a ratio), R(0.3) of the current permutation,
    and the held-out midpoint loss ``L((theta_a + pi(theta_b)) / 2)``. One legend below the panels.
    """
    runs = drift["runs"]
    fig, axes = _grid(4, size=3.2)
    panels = [
        ("changed_vs_wm", "units reassigned vs WM", "fraction of units"),
        ("tilde_rel_dist", "‖θ̃ − θ_a‖ / ‖θ_a‖", "ratio to ‖θ_a‖"),
        ("r03", "R(0.3) of current permutation", "R(0.3)"),
        ("heldout_loss", "held-out midpoint loss", "loss (nats)"),
    ]
    for ax, (k, title, ylabel) in zip(axes, panels):
        for i, r in enumerate(runs):
            ax.plot(r["epoch"], r[k], marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=r["label"])
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("STE epoch")
        ax.set_ylabel(ylabel, fontsize=7)
        integer_ticks(ax)
    base = drift.get("wm_vs_wm")
    if base and base.get("n"):
        ep = sorted({e for r in runs for e in r["epoch"]})
        lo, hi = ep[0], ep[-1]
        axes[0].axhline(base["mean"], color="k", ls="--", lw=1, label=f"WM vs WM, other search seed (n={base['n']})")
        axes[0].axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="k", alpha=0.1, lw=0)
        axes[0].set_xlim(lo - 0.1, hi + 0.1)
    axes[0].set_ylim(bottom=0)
    return _save(fig, path, axes[:1], ncol=2)
