"""Figures for interpolation curves and plane landscapes.

Drawn on bare :class:`matplotlib.figure.Figure` objects rendered by the Agg
canvas: no pyplot global state, no GUI backend, safe in threads and notebooks.
Accuracies are drawn as fractions in [0, 1] (the unit of every lmckit JSON and
API), losses as cross-entropy in nats; legends sit below the panels; loss
surfaces use the report's colour map (:data:`lmckit.plotting.LOSS_CMAP`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

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
    result: LandscapeResult, path: str | Path, metric: str = "loss", title: str | None = None, levels: int = 20
) -> Path:
    """Filled contour plot of ``metric`` ("loss" or "accuracy") over the plane, models marked.

    Loss is drawn on log-spaced levels, accuracy (a fraction in [0, 1]) on linear ones; both with the
    colour maps of the report's landscape figure (dark = low).
    """
    if metric not in ("loss", "accuracy"):
        raise LmcError(f"unknown landscape metric {metric!r}", "use loss or accuracy")
    import numpy as np

    from ..plotting import ACCURACY_CMAP, LOSS_CMAP

    z = np.asarray(result.loss if metric == "loss" else result.accuracy, dtype=float)
    fig = _figure(figsize=(6, 5))
    ax = fig.subplots()
    if metric == "loss":
        # Log-spaced levels: losses far outside the triangle are orders of magnitude
        # above those near the models and would flatten a linear colour scale.
        from matplotlib.colors import LogNorm

        z = np.clip(z, 1e-4, None)
        lo, hi = float(z.min()), float(z.max())
        lv = np.geomspace(lo, hi if hi > lo * 1.001 else lo * 1.001, levels)
        from matplotlib.ticker import LogFormatterSciNotation, LogLocator

        cs = ax.contourf(result.xs, result.ys, z, levels=lv, norm=LogNorm(vmin=lv[0], vmax=lv[-1]), cmap=LOSS_CMAP)
        cbar = fig.colorbar(cs, ax=ax, shrink=0.85, ticks=LogLocator(subs=(1.0, 3.0)), format=LogFormatterSciNotation())
    else:
        cs = ax.contourf(result.xs, result.ys, z, levels=levels, cmap=ACCURACY_CMAP)
        cbar = fig.colorbar(cs, ax=ax, shrink=0.85)
    cbar.set_label(f"{result.split} {'loss (nats, log scale)' if metric == 'loss' else 'accuracy (fraction)'}")
    pts = list(result.models.items())
    tri = [p for _, p in pts] + [pts[0][1]]
    ax.plot([p[0] for p in tri], [p[1] for p in tri], "w--", linewidth=1)
    for label, (x, y) in pts:
        ax.plot(x, y, "o", color="white", markeredgecolor="black", markersize=9)
        ax.annotate(
            label, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontsize=11, fontweight="bold"
        )
    ax.set_xlabel("coordinate along $\\theta_B - \\theta_A$ (L2 units)")
    ax.set_ylabel("orthogonal coordinate (L2 units)")
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title or f"{result.split} {metric} on the plane of three models\n({_bn_label(result.bn_reset)})")
    fig.tight_layout()
    return _save(fig, path)
