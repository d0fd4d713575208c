"""Report figures drawn from the aggregated results tree (JSON numbers, not live objects).

Each figure that also exists outside the report is drawn by one function of
the experiment's own module (:mod:`lmckit.analysis.plots` for a pair's SVD
figures, :mod:`lmckit.lmc.plot` for landscapes, :mod:`lmckit.merge` for the
merged-accuracy panel), from plain data; the functions here pick that data
(mean and standard deviation over pairs and searches) out of the results
tree. Each function writes one PNG (Agg backend) and returns its path.

Conventions shared by every figure: axes labelled with their units
(accuracy as a fraction in [0, 1], loss as cross-entropy in nats), integer
ticks on integer axes (indices, epochs, model counts), one legend per figure
placed below the panels (never over the data), and panels that compare
methods drawn on one shared colour scale and the same axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..analysis import plots
from ..lmc.plot import plot_curves, plot_landscape
from ..merge import draw_merged_accuracy
from ..pipeline.recipe import NAIVE, SEARCHED_METHOD
from ..plotting import integer_ticks, save_with_legend, subplot_grid
from ..plotting import pyplot as _plt
from .architectures import layer_label
from .labels import METHOD_COLOR, METHOD_LABEL, METHOD_STYLE  # noqa: F401  (importable from here as before)

_save = save_with_legend


def _grid(n: int, size: float = 3.0):
    return subplot_grid(n, size)


def _ordered(methods: Mapping[str, Any]) -> list[str]:
    """Method names in the report's order (naive, the registry's order, MergeMany, then any other)."""
    order = list(METHOD_LABEL)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def interpolation(exp: Mapping[str, Any], path: Path) -> Path:
    """Per split: loss, loss of the aligned methods only (zoomed), accuracy, against lambda
    (:func:`lmckit.lmc.plot.plot_curves`, as ``lmckit barrier --plot``); mean over pairs, shaded +-1 std."""
    methods = [m for m in _ordered(exp["methods"]) if "curves" in exp["methods"][m]]
    curves = {METHOD_LABEL.get(m, m): exp["methods"][m]["curves"] for m in methods}
    styles = {METHOD_LABEL.get(m, m): {"color": METHOD_COLOR.get(m), "ls": METHOD_STYLE.get(m, "-")} for m in methods}
    title = f"{exp['label']}: linear interpolation (mean ± std over {len(exp['pairs'])} pair(s))"
    return plot_curves(curves, path, "all", title, styles, baseline=METHOD_LABEL[NAIVE])


def _labelled(per_layer: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer panels titled by their reader-facing label (``blocks.0.attn W_Q``, ``lstm l0 W_f (hidden)``)."""
    return {layer_label(k): v for k, v in per_layer.items()}


def spectra(exp: Mapping[str, Any], path: Path) -> Path:
    a, b = exp["pairs"][0]
    return plots.plot_spectra(_labelled(exp["spectra"]), path, labels=(f"model A (seed {a})", f"model B (seed {b})"))


def r_bars(exp: Mapping[str, Any], path: Path) -> Path:
    """R(gamma) before matching and after each method, mean +- std over pairs and searches."""
    methods = [m for m, d in exp["methods"].items() if "R" in d and m != NAIVE]  # naive = "no permutation"
    series = [("no permutation", exp["methods"][methods[0]]["R"], "before", "0.6")]
    series += [(METHOD_LABEL.get(m, m), exp["methods"][m]["R"], "after", METHOD_COLOR.get(m)) for m in methods]
    return plots.plot_r_bars(series, path)


def per_index(exp: Mapping[str, Any], path: Path) -> Path:
    return plots.plot_per_index(_labelled(exp["spectra"]), path, after_label=f"after {METHOD_LABEL[SEARCHED_METHOD]}")


def projections(exp: Mapping[str, Any], path: Path) -> Path:
    return plots.plot_projections(_labelled(exp["projections"]), path)


def rank(exp: Mapping[str, Any], path: Path) -> Path:
    return plots.plot_rank_sweep(exp["rank_sweep"], path)


def three_models(three: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for m in _ordered(three):
        d = three[m]
        c = d["pair_curve"]
        kw = dict(color=METHOD_COLOR.get(m), ls=METHOD_STYLE.get(m, "-"))
        a1.plot(c["lambdas"], c["loss"], label=METHOD_LABEL.get(m, m), **kw)
    a1.set_xlabel("λ (0: π_b(θ_b), 1: π_c(θ_c))")
    a1.set_ylabel(f"{next(iter(three.values()))['split']} loss (nats)")
    a1.set_title("Path between two models matched to one anchor", fontsize=9)
    styles = {m: {"color": METHOD_COLOR.get(m), "ls": METHOD_STYLE.get(m, "-")} for m in three}
    draw_merged_accuracy(a2, {m: three[m]["merged"] for m in _ordered(three)}, styles, labels=False)
    return _save(fig, path, [a1])


def landscape(three: Mapping[str, Any], path: Path) -> Path:
    """Loss on the plane of the three aligned models, one panel per method, on ONE shared log colour scale
    (:func:`lmckit.lmc.plot.plot_landscape`, as ``lmckit landscape``)."""
    panels = {METHOD_LABEL.get(m, m): three[m]["landscape"] for m in _ordered(three) if "landscape" in three[m]}
    title = "Loss on the plane through three aligned models (white: the models; grey: not evaluated)"
    return plot_landscape(panels, path, "loss", title=title, split="test")


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
