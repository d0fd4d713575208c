"""Figures for interpolation curves and plane landscapes: each drawn by one function here, for the CLI
(``lmckit barrier --plot``, ``lmckit landscape``) and the reproduction report alike.

Drawn with pyplot on the non-interactive Agg backend (:mod:`lmckit.plotting`; no GUI, each figure
closed once written). Accuracies are drawn as fractions in [0, 1] (the unit of every lmckit JSON and
API), losses as cross-entropy in nats; legends sit below the panels; loss
surfaces use the report's colour map (:data:`lmckit.plotting.LOSS_CMAP`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import LmcError
from .barrier import BarrierResult
from .landscape import LandscapeResult


def _bn_label(mode: bool | str) -> str:
    return {True: "BN statistics reset", False: "no BN reset", "repair": "REPAIR"}.get(mode, str(mode))


def _curve_data(res: BarrierResult | Mapping[str, Any]) -> Mapping[str, Any]:
    """A :class:`BarrierResult` as mean/std curves (std 0); aggregated curves pass through."""
    if not isinstance(res, BarrierResult):
        return res
    out: dict[str, Any] = {"lambdas": list(res.curves[res.splits[0]].lambdas)}
    for s in res.splits:
        c = res.curves[s]
        zero = [0.0] * len(c.lambdas)
        out[s] = {"loss_mean": list(c.loss), "loss_std": zero, "accuracy_mean": list(c.accuracy), "accuracy_std": zero}
    return out


def _legend_name(label: str, res: Any, splits: list[str]) -> str:
    """``label``, with the barriers of a single run drawn on one split."""
    if not isinstance(res, BarrierResult) or len(splits) != 1:
        return label
    c = res.curves[splits[0]]
    return f"{label} (loss barrier {c.loss_barrier:.4f}, accuracy barrier {c.accuracy_barrier:.4f})"


def _splits(data: Mapping[str, Mapping[str, Any]], split: str | None) -> list[str]:
    """The splits to draw (``None``: the first; ``"all"``: every one); LmcError when a curve lacks one."""
    have = [s for s in next(iter(data.values())) if s != "lambdas"]
    splits = have if split == "all" else [split or have[0]]
    for label, d in data.items():
        for s in splits:
            if s not in d:
                has = ", ".join(x for x in d if x != "lambdas")
                raise LmcError(f"curve {label!r} has no {s!r} split (it has {has})")
    return splits


def plot_curves(
    results: Mapping[str, BarrierResult | Mapping[str, Any]],
    path: str | Path,
    split: str | None = None,
    title: str | None = None,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    baseline: str = "naive",
) -> Path:
    """Loss, loss of the aligned curves only (zoomed), and accuracy against lambda; one row per split.

    The one interpolation figure (``lmckit barrier --plot`` and the report). Lines are means, shaded
    +-1 std (a single run has std 0). The middle panel, drawn when ``baseline`` and another curve are
    both present, leaves out the ``baseline`` (unaligned) path so the aligned curves, which otherwise
    overlap in a thin strip, can be told apart.

    Parameters
    ----------
    results:
        ``{label: BarrierResult}``, e.g. ``{"naive": r0, "weight matching": r1}``, or aggregated curves
        ``{label: {"lambdas": [...], split: {"loss_mean", "loss_std", "accuracy_mean", "accuracy_std"}}}``.
        A single-split :class:`BarrierResult`'s legend entry carries its barriers.
    path:
        Output image (.png, .pdf, .svg), written atomically.
    split:
        Which split to draw (default: the first split of the first result); ``"all"``: one row per split.
    styles:
        Optional ``{label: matplotlib line keywords}`` (colour, line style); default colours C0, C1, ...
    """
    if not results:
        raise LmcError("no curves to plot")
    from ..plotting import pyplot, save_with_legend

    data = {k: _curve_data(v) for k, v in results.items()}
    splits = _splits(data, split)
    names = {k: _legend_name(k, r, splits) for k, r in results.items()}
    styles = styles or {k: {"color": f"C{i}"} for i, k in enumerate(data)}
    aligned = [m for m in data if m != baseline]
    cols = 3 if aligned and baseline in data else 2
    fig, grid = pyplot().subplots(len(splits), cols, figsize=(3.4 * cols, 2.9 * len(splits)), squeeze=False)
    for i, sp in enumerate(splits):
        panels = [("loss", list(data), "loss (nats)", "")]
        if cols == 3:
            panels.append(("loss", aligned, "loss (nats)", " (aligned methods, zoomed)"))
        panels.append(("accuracy", list(data), "accuracy (fraction)", ""))
        for ax, (q, which, unit, note) in zip(grid[i], panels):
            for m in which:
                d = data[m]
                lam = d["lambdas"]
                mu, sd = d[sp][f"{q}_mean"], d[sp][f"{q}_std"]
                _band(ax, lam, mu, sd, names[m], {"ls": "-", **styles.get(m, {})})
            ax.set_title(f"{sp} {q}{note}", fontsize=8)
            ax.set_xlabel("λ (0: model A, 1: model B)")
            ax.set_ylabel(f"{sp} {unit}")
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    if title is None:
        bn = next((r.bn_reset for r in results.values() if isinstance(r, BarrierResult)), None)
        title = "Linear interpolation between two models" + (f" ({_bn_label(bn)})" if bn is not None else "")
    fig.suptitle(title, fontsize=9)
    return save_with_legend(fig, Path(path), [grid[0][0]])


def _band(ax: Any, lam: Any, mu: Any, sd: Any, label: str, style: Mapping[str, Any]) -> None:
    """A mean curve with its +-1 std band."""
    ax.plot(lam, mu, label=label, lw=1.4, **style)
    lo, hi = [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)]
    ax.fill_between(lam, lo, hi, color=style.get("color"), alpha=0.2, lw=0)


def _colorbar(fig: Any, axes: list, cs: Any, metric: str, lo: float, hi: float, split: str, shared: bool) -> None:
    """One colour bar for every panel: readable log-spaced ticks for loss, linear for accuracy."""
    import numpy as np

    note = "; shared by all panels" if shared else ""
    if metric == "loss":
        ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 6)})  # readable values, log-spaced
        cbar = fig.colorbar(cs, ax=axes, shrink=0.85, ticks=ticks, format="%.3g")
        cbar.minorticks_off()
        cbar.set_label(f"{split} loss (nats, log scale{note})", fontsize=7)
    else:
        cbar = fig.colorbar(cs, ax=axes, shrink=0.85)
        cbar.set_label(f"{split} accuracy (fraction{note})", fontsize=7)


def _landscape_scale(zs: list[Any], metric: str, levels: int):
    """``(lo, hi, levels, norm, cmap)`` shared by every panel: log-spaced for loss, linear for accuracy."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    from ..plotting import ACCURACY_CMAP, LOSS_CMAP

    lo, hi = float(min(z.min() for z in zs)), float(max(z.max() for z in zs))
    if metric == "loss":
        hi = hi if hi > lo * 1.001 else lo * 1.001
        return lo, hi, np.geomspace(lo, hi, levels), LogNorm(vmin=lo, vmax=hi), LOSS_CMAP
    hi = hi if hi > lo else lo + 1e-6
    return lo, hi, np.linspace(lo, hi, levels), Normalize(vmin=lo, vmax=hi), ACCURACY_CMAP


def _mark_models(ax: Any, models: Mapping[str, Any]) -> None:
    """The three models as labelled white dots joined by a dashed triangle."""
    pts = list(models.items())
    tri = [p for _, p in pts] + [pts[0][1]]
    ax.plot([p[0] for p in tri], [p[1] for p in tri], "w--", lw=0.8)
    for label, (x, y) in pts:
        ax.plot([x], [y], "o", color="white", markeredgecolor="black", ms=6)
        ax.annotate(
            label, (x, y), color="white", fontsize=7, fontweight="bold", xytext=(4, 4), textcoords="offset points"
        )


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

    from ..plotting import save_figure, subplot_grid

    if isinstance(panels, LandscapeResult):
        panels = {"": panels}
    items = [(t, ld.to_dict() if isinstance(ld, LandscapeResult) else ld) for t, ld in panels.items()]
    if not items:
        raise LmcError("no landscape to plot")
    split = split or items[0][1].get("split", "test")
    zs = [np.asarray(ld[metric], dtype=float) for _, ld in items]
    if metric == "loss":
        zs = [np.maximum(z, 1e-4) for z in zs]
    lo, hi, lv, norm, cmap = _landscape_scale(zs, metric, levels)
    xlim = (min(min(ld["xs"]) for _, ld in items), max(max(ld["xs"]) for _, ld in items))
    ylim = (min(min(ld["ys"]) for _, ld in items), max(max(ld["ys"]) for _, ld in items))
    fig, axes = subplot_grid(len(items), 3.6)
    cs = None
    for ax, (name, ld), z in zip(axes, items, zs):
        cs = ax.contourf(ld["xs"], ld["ys"], z, levels=lv, norm=norm, cmap=cmap)
        _mark_models(ax, ld["models"])
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_facecolor("0.85")  # outside this panel's evaluated grid (the axes are shared by all panels)
        ax.set_aspect("equal", adjustable="box")
        if name:
            ax.set_title(name, fontsize=8)
        ax.set_xlabel("coordinate along θ_B − θ_A (L2 units)", fontsize=7)
        if ax is axes[0]:
            ax.set_ylabel("orthogonal coordinate (L2 units)", fontsize=7)
    _colorbar(fig, [a for a in axes if a.get_visible()], cs, metric, lo, hi, split, len(items) > 1)
    bn = items[0][1].get("bn_reset")
    default = f"{split} {metric} on the plane of three models" + (f" ({_bn_label(bn)})" if bn is not None else "")
    fig.suptitle(title or default, fontsize=9)
    return save_figure(fig, path, dpi=90, metadata={"Software": None}, bbox_inches="tight")
