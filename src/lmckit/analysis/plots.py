"""Figures of the SVD analyses (PNG, matplotlib's non-interactive Agg backend).

Each function writes one file and returns its path:

- :func:`plot_spectra`: overlaid singular-value spectra of the two models, one panel per layer.
- :func:`plot_r_bars`: total ``R(gamma)`` before/after for each gamma.
- :func:`plot_per_index`: per-index alignment ``C_ii`` against singular-value rank, before and after.
- :func:`plot_cross`: the leading block of the cross-alignment matrix ``C`` after permutation.
- :func:`plot_projections`: mean ``|v_i . z|`` of layer inputs against rank, with the random baseline.
- :func:`plot_rank_sweep`: accuracy against kept rank (model A and the midpoint).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..plotting import integer_ticks, plain_log_axis, save_figure, subplot_grid
from ..plotting import pyplot as _plt
from .svd import SVDAlignment


def _grid(n: int, size: float = 3.2):
    return subplot_grid(n, size)


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=90, tight_layout=True, bbox_inches="tight")


def _legend_below(fig, axes) -> None:
    """The first panel's legend, once, below the figure (outside every panel's data)."""
    if axes:
        h, lab = axes[0].get_legend_handles_labels()
        if h:
            fig.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(lab), fontsize=7, frameon=False)


def plot_spectra(svd: SVDAlignment, path: str | Path, labels: Sequence[str] = ("A", "B")) -> Path:
    fig, axes = _grid(len(svd.layers))
    for ax, la in zip(axes, svd.layers):
        ax.plot(la.sigma_a.numpy(), label=labels[0], lw=1.2)
        ax.plot(la.sigma_b.numpy(), label=labels[1], lw=1.2, ls="--")
        ax.set_yscale("log")
        plain_log_axis(ax)
        ax.set_title(f"{la.layer.name} {tuple(la.layer.shape)}", fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        ax.set_ylabel("singular value σ_i")
        integer_ticks(ax)
    _legend_below(fig, axes)
    fig.suptitle("Singular values of corresponding layers", fontsize=9)
    return _save(fig, Path(path))


def plot_r_bars(svd: SVDAlignment, path: str | Path, extra: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Bars of total R per gamma: before, after (and any ``extra`` methods: name -> gamma key -> R)."""
    plt = _plt()
    keys = list(svd.R)
    series = {"before": {k: svd.R[k]["before"] for k in keys}, "after": {k: svd.R[k]["after"] for k in keys}}
    for name, vals in (extra or {}).items():
        series[name] = dict(vals)
    fig, ax = plt.subplots(figsize=(1.2 + 1.4 * len(keys) * len(series) / 2, 3.2))
    w = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(keys))]
        ax.bar(xs, [vals.get(k, float("nan")) for k in keys], width=w, label=name)
    ax.set_xticks(range(len(keys)), [f"γ = {k}" for k in keys])
    ax.set_ylabel("alignment score R(γ)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title("Alignment of singular vectors", fontsize=9)
    return _save(fig, Path(path))


def plot_per_index(svd: SVDAlignment, path: str | Path, max_index: int | None = None) -> Path:
    fig, axes = _grid(len(svd.layers))
    for ax, la in zip(axes, svd.layers):
        for when, style in (("before", dict(color="0.6", lw=0.8)), ("after", dict(color="C3", lw=0.8))):
            y = la.per_index[when].numpy()
            if max_index:
                y = y[:max_index]
            ax.plot(y, label=when, **style)
        ax.axhline(0, color="k", lw=0.4)
        ax.set_title(la.layer.name, fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        ax.set_ylabel("(u_i·Pu'_i)(v_i·Qv'_i)")
        integer_ticks(ax)
    _legend_below(fig, axes)
    fig.suptitle("Per-index alignment against singular-value rank", fontsize=9)
    return _save(fig, Path(path))


def plot_cross(svd: SVDAlignment, path: str | Path, when: str = "after") -> Path:
    fig, axes = _grid(len(svd.layers))
    for ax, la in zip(axes, svd.layers):
        c = la.cross[when].numpy()
        im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{la.layer.name} ({when})", fontsize=8)
        ax.set_xlabel("singular index j (model B)")
        ax.set_ylabel("singular index i (model A)")
        integer_ticks(ax, axis="both")
    if axes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.tight_layout()  # before the colorbar: tight_layout would push the panels under it
        cbar = fig.colorbar(im, ax=axes[: len(svd.layers)], shrink=0.7)
        cbar.set_label("(u_i·Pu'_j)(v_i·Qv'_j)")
    return save_figure(fig, Path(path), dpi=90, bbox_inches="tight")


def plot_projections(proj: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    fig, axes = _grid(len(proj))
    for ax, (name, d) in zip(axes, proj.items()):
        ax.plot(d["mean_abs"], label="right singular v_i", lw=1.0)
        ax.plot(d["random_mean_abs"], label="random direction", lw=0.8, color="0.6")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        ax.set_ylabel("mean |v_i · z| over inputs z")
        integer_ticks(ax)
    _legend_below(fig, axes)
    fig.suptitle("Layer inputs projected on right-singular vectors", fontsize=9)
    return _save(fig, Path(path))


def plot_rank_sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Accuracy against kept fraction of hidden-layer rank; ``sweeps``: label -> records of :func:`rank_sweep`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for i, (label, recs) in enumerate(sweeps.items()):
        full = next((r for r in recs if r["kind"] == "full"), None)
        pts = sorted((r["kept_total"] / max(r["rank_total"], 1), r["acc"]) for r in recs if r["kind"] != "full")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}", label=label)
        if full is not None:
            ax.axhline(full["acc"], color=f"C{i}", ls=":", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("kept directions / full rank, hidden layers (log scale)")
    ax.set_ylabel("accuracy (fraction)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title("Accuracy of rank-k truncated models (dotted: untruncated)", fontsize=9)
    return _save(fig, Path(path))


def write_plots(
    folder: str | Path,
    svd: SVDAlignment,
    projections: Mapping[str, Any] | None = None,
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[Path]:
    """Write every figure that the given results allow into ``folder``; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_spectra(svd, folder / "spectra.png"),
        plot_r_bars(svd, folder / "R_bars.png"),
        plot_per_index(svd, folder / "per_index_alignment.png"),
        plot_cross(svd, folder / "cross_alignment.png"),
    ]
    if projections:
        paths.append(plot_projections(projections, folder / "input_projections.png"))
    if sweeps:
        paths.append(plot_rank_sweep(sweeps, folder / "rank_sweep.png"))
    return paths
