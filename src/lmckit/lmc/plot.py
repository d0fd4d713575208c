"""Figures for interpolation curves and plane landscapes.

Drawn on bare :class:`matplotlib.figure.Figure` objects rendered by the Agg
canvas: no pyplot global state, no GUI backend, safe in threads and notebooks.
Accuracies are drawn as fractions in [0, 1] (the unit of every lmckit JSON and
API), losses as cross-entropy in nats; legends sit below the panels; loss
surfaces use the report's colour map (:data:`lmckit.plotting.LOSS_CMAP`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import LmcError
from .barrier import BarrierResult
from .landscape import LandscapeResult


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _bn_label(mode: bool | str) -> str:
    return {True: "BN statistics reset", False: "no BN reset", "repair": "REPAIR"}.get(mode, str(mode))


def _save(fig, path: str | Path) -> Path:
    from ..plotting import save_figure

    path = Path(path)
    return save_figure(fig, path, dpi=150, fmt=path.suffix.lstrip(".").lower() or "png", bbox_inches="tight")


def plot_curves(
    results: Mapping[str, BarrierResult], path: str | Path, split: str | None = None, title: str | None = None
) -> Path:
    """Loss (left) and accuracy (right) against lambda, one line per labelled result.

    Parameters
    ----------
    results:
        ``{label: BarrierResult}``, e.g. ``{"naive": r0, "weight matching": r1}``.
    path:
        Output image (.png, .pdf, .svg), written atomically.
    split:
        Which split to draw (default: the first split of the first result).
        With ``split="all"`` every split of every result is drawn
        (test solid, train dashed).
    """
    if not results:
        raise LmcError("no curves to plot")
    first = next(iter(results.values()))
    fig = _figure(figsize=(10, 4))
    ax_l, ax_a = fig.subplots(1, 2)
    styles = {"test": "-", "train": "--", "val": ":"}
    for k, (label, res) in enumerate(results.items()):
        color = f"C{k}"
        if split == "all":
            splits = res.splits
        else:
            s = split or first.splits[0]
            if s not in res.curves:
                raise LmcError(f"curve {label!r} has no {s!r} split (it has {', '.join(res.splits)})")
            splits = [s]
        for s in splits:
            c = res.curves[s]
            lab = label if len(splits) == 1 else f"{label} ({s})"
            ls = styles.get(s, "-")
            lab_l = f"{lab}: loss barrier {c.loss_barrier:.4f}"
            lab_a = f"{lab}: accuracy barrier {c.accuracy_barrier:.4f}"
            ax_l.plot(c.lambdas, c.loss, ls, color=color, marker=".", label=lab_l)
            ax_a.plot(c.lambdas, list(c.accuracy), ls, color=color, marker=".", label=lab_a)
            for ax, vals in ((ax_l, c.endpoint_loss), (ax_a, list(c.endpoint_accuracy))):
                ax.plot([0.0, 1.0], list(vals), "o", color=color, markersize=8, markeredgecolor="black")
    shown = split if split not in (None, "all") else (first.splits[0] if split is None else "train/test")
    for ax, ylabel in ((ax_l, f"{shown} loss (cross-entropy, nats)"), (ax_a, f"{shown} accuracy (fraction)")):
        ax.set_xlabel("interpolation coefficient $\\lambda$")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xticklabels(["0\n(model A)", "0.25", "0.5", "0.75", "1\n(model B)"])
        ax.grid(alpha=0.3)
    # legends below each panel, outside the data
    for ax in (ax_l, ax_a):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    fig.suptitle(title or f"Linear interpolation between two models ({_bn_label(first.bn_reset)})")
    fig.tight_layout()
    return _save(fig, path)


def plot_landscape(
    panels: LandscapeResult | Mapping[str, LandscapeResult | Mapping[str, Any]],
    path: str | Path,
    metric: str = "loss",
    title: str | None = None,
    levels: int = 16,
    split: str | None = None,
) -> Path:
    """Filled contours of ``metric`` ("loss" or "accuracy") over the plane of three models, models marked.

    The one landscape figure (``lmckit landscape`` and the report's three-model section). ``panels``: one
    :class:`LandscapeResult`, or ``{panel title: LandscapeResult or its dict}`` (e.g. one panel per
    matching method). Every panel shares one colour scale, the same axis limits (grey: outside a panel's
    evaluated grid) and an equal aspect ratio, so panels compare directly. Loss is drawn on log-spaced
    levels (losses far from the models are orders of magnitude above those near them), accuracy (a
    fraction in [0, 1]) on linear ones, with the colour maps of :mod:`lmckit.plotting` (dark = low).
    """
    if metric not in ("loss", "accuracy"):
        raise LmcError(f"unknown landscape metric {metric!r}", "use loss or accuracy")
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    from ..plotting import ACCURACY_CMAP, LOSS_CMAP, save_figure, subplot_grid

    if isinstance(panels, LandscapeResult):
        panels = {"": panels}
    items = [(t, ld.to_dict() if isinstance(ld, LandscapeResult) else ld) for t, ld in panels.items()]
    if not items:
        raise LmcError("no landscape to plot")
    split = split or items[0][1].get("split", "test")
    zs = [np.asarray(ld[metric], dtype=float) for _, ld in items]
    if metric == "loss":
        zs = [np.maximum(z, 1e-4) for z in zs]
    lo, hi = float(min(z.min() for z in zs)), float(max(z.max() for z in zs))
    if metric == "loss":
        hi = hi if hi > lo * 1.001 else lo * 1.001
        lv, norm, cmap = np.geomspace(lo, hi, levels), LogNorm(vmin=lo, vmax=hi), LOSS_CMAP
    else:
        hi = hi if hi > lo else lo + 1e-6
        lv, norm, cmap = np.linspace(lo, hi, levels), Normalize(vmin=lo, vmax=hi), ACCURACY_CMAP
    xlim = (min(min(ld["xs"]) for _, ld in items), max(max(ld["xs"]) for _, ld in items))
    ylim = (min(min(ld["ys"]) for _, ld in items), max(max(ld["ys"]) for _, ld in items))
    fig, axes = subplot_grid(len(items), 3.6)
    cs = None
    for ax, (name, ld), z in zip(axes, items, zs):
        cs = ax.contourf(ld["xs"], ld["ys"], z, levels=lv, norm=norm, cmap=cmap)
        pts = list(ld["models"].items())
        tri = [p for _, p in pts] + [pts[0][1]]
        ax.plot([p[0] for p in tri], [p[1] for p in tri], "w--", lw=0.8)
        for label, (x, y) in pts:
            ax.plot([x], [y], "o", color="white", markeredgecolor="black", ms=6)
            ax.annotate(
                label, (x, y), color="white", fontsize=7, fontweight="bold", xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_facecolor("0.85")  # outside this panel's evaluated grid (the axes are shared by all panels)
        ax.set_aspect("equal", adjustable="box")
        if name:
            ax.set_title(name, fontsize=8)
        ax.set_xlabel("coordinate along θ_B − θ_A (L2 units)", fontsize=7)
        if ax is axes[0]:
            ax.set_ylabel("orthogonal coordinate (L2 units)", fontsize=7)
    shared = "; shared by all panels" if len(items) > 1 else ""
    if metric == "loss":
        ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 6)})  # readable values, log-spaced
        cbar = fig.colorbar(cs, ax=[a for a in axes if a.get_visible()], shrink=0.85, ticks=ticks, format="%.3g")
        cbar.minorticks_off()
        cbar.set_label(f"{split} loss (nats, log scale{shared})", fontsize=7)
    else:
        cbar = fig.colorbar(cs, ax=[a for a in axes if a.get_visible()], shrink=0.85)
        cbar.set_label(f"{split} accuracy (fraction{shared})", fontsize=7)
    bn = items[0][1].get("bn_reset")
    default = f"{split} {metric} on the plane of three models" + (f" ({_bn_label(bn)})" if bn is not None else "")
    fig.suptitle(title or default, fontsize=9)
    return save_figure(fig, path, dpi=90, metadata={"Software": None}, bbox_inches="tight")
