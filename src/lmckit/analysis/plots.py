"""Figures of the SVD analyses of a pair (PNG, matplotlib's non-interactive Agg backend).

Each figure is drawn by exactly one function here, from plain data (lists and
dicts, as in ``results.json``), for ``lmckit analyze --plot`` (one pair) and
the reproduction report (mean over pairs) alike; :func:`write_plots` converts
one pair's live results (:func:`lmckit.analysis.analyze_pair`) into that data.
Each function writes one file and returns its path:

- :func:`plot_spectra`: overlaid singular-value spectra of the two models, one panel per layer.
- :func:`plot_r_bars`: total ``R(gamma)`` before matching and after each method (mean +- std).
- :func:`plot_per_index`: per-index alignment ``C_ii`` against singular-value rank, before and after.
- :func:`plot_cross`: the leading block of the cross-alignment matrix ``C`` after permutation.
- :func:`plot_projections`: mean ``|v_i . z|`` of layer inputs against rank, with the random baseline.
- :func:`plot_rank_sweep`: accuracy against kept rank (model A and the midpoint).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..plotting import integer_ticks, plain_log_axis, save_figure, save_with_legend, subplot_grid
from ..plotting import pyplot as _plt
from .svd import SVDAlignment

#: one series of :func:`plot_r_bars`: (legend label, ``{gamma key: {when: {"mean", "std"}}}``, when, colour)
RSeries = tuple[str, Mapping[str, Mapping[str, Mapping[str, float]]], str, Any]


def plot_spectra(
    spectra: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    labels: Sequence[str] = ("model A", "model B"),
    title: str = "Singular values of corresponding layers, two seeds",
) -> Path:
    """``spectra``: layer name -> ``{"sigma_a", "sigma_b"}`` (singular values, largest first)."""
    fig, axes = subplot_grid(len(spectra), 3.0)
    for ax, (name, d) in zip(axes, spectra.items()):
        ax.plot(d["sigma_a"], lw=1.2, label=labels[0])
        ax.plot(d["sigma_b"], lw=1.2, ls="--", label=labels[1])
        ax.set_yscale("log")
        plain_log_axis(ax)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("singular value σ_i")
        integer_ticks(ax)
    fig.suptitle(title, fontsize=9)
    return save_with_legend(fig, Path(path), axes[:1])


def plot_r_bars(series: Sequence[RSeries], path: str | Path) -> Path:
    """Bars of total ``R(gamma)`` per gamma, one bar per series, with +-std error bars."""
    plt = _plt()
    gammas = list(series[0][1])
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
    return save_with_legend(fig, Path(path), [ax])


def plot_per_index(
    spectra: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, after_label: str = "after WM"
) -> Path:
    """``spectra``: layer name -> ``{"per_index_before", "per_index_after"}`` (``C_ii`` by index)."""
    fig, axes = subplot_grid(len(spectra), 3.0)
    for ax, (name, d) in zip(axes, spectra.items()):
        ax.plot(d["per_index_before"], color="0.6", lw=0.8, label="before matching")
        ax.plot(d["per_index_after"], color="C3", lw=0.8, label=after_label)
        ax.axhline(0, color="k", lw=0.4)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("(u_i·Pu'_i)(v_i·Qv'_i)")
        integer_ticks(ax)
    fig.suptitle("Per-index alignment against singular-value rank", fontsize=9)
    return save_with_legend(fig, Path(path), axes[:1])


def plot_cross(svd: SVDAlignment, path: str | Path, when: str = "after") -> Path:
    """The cross-alignment matrices ``C`` of every layer (``lmckit analyze`` only: the report has no twin)."""
    fig, axes = subplot_grid(len(svd.layers), 3.2)
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
    """``proj``: layer name -> ``{"mean_abs", "random_mean_abs"}`` (:func:`lmckit.analysis.input_projections`)."""
    fig, axes = subplot_grid(len(proj), 3.0)
    for ax, (name, d) in zip(axes, proj.items()):
        ax.plot(d["mean_abs"], lw=1.0, label="right-singular vector v_i")
        ax.plot(d["random_mean_abs"], lw=0.8, color="0.6", label="random unit direction")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (0 = largest)")
        if ax is axes[0]:
            ax.set_ylabel("mean |v_i · z| over inputs z")
        integer_ticks(ax)
    fig.suptitle("Layer inputs projected on right-singular vectors", fontsize=9)
    return save_with_legend(fig, Path(path), axes[:1])


def plot_rank_sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Accuracy against the kept fraction of hidden-layer rank.

    ``sweeps``: label (``A``, ``midpoint``) -> records with ``kind`` (full | fraction | gamma),
    ``kept_fraction`` and ``accuracy`` (a fraction in [0, 1]); see :func:`rank_records`.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for i, (who, recs) in enumerate(sweeps.items()):
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
    return save_with_legend(fig, Path(path), [ax], ncol=2)


# --------------------------------------------------------------------------- one pair's live results -> data
def rank_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`lmckit.analysis.rank_sweep` records as :func:`plot_rank_sweep` reads them."""
    return [
        {"kind": r["kind"], "kept_fraction": r["kept_total"] / max(r["rank_total"], 1), "accuracy": r["acc"]}
        for r in records
    ]


def _spectra(svd: SVDAlignment) -> dict[str, dict[str, list[float]]]:
    return {
        f"{la.layer.name} {tuple(la.layer.shape)}": {
            "sigma_a": la.sigma_a.tolist(),
            "sigma_b": la.sigma_b.tolist(),
            "per_index_before": la.per_index["before"].tolist(),
            "per_index_after": la.per_index["after"].tolist(),
        }
        for la in svd.layers
    }


def write_plots(
    folder: str | Path,
    svd: SVDAlignment,
    projections: Mapping[str, Any] | None = None,
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[Path]:
    """Write every figure that one pair's results allow into ``folder``; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp = _spectra(svd)
    R = {g: {w: {"mean": v[w], "std": 0.0} for w in ("before", "after")} for g, v in svd.R.items()}
    paths = [
        plot_spectra(sp, folder / "spectra.png", title="Singular values of corresponding layers"),
        plot_r_bars([("no permutation", R, "before", "0.6"), ("after", R, "after", "C3")], folder / "R_bars.png"),
        plot_per_index(sp, folder / "per_index_alignment.png", after_label="after"),
        plot_cross(svd, folder / "cross_alignment.png"),
    ]
    if projections:
        paths.append(plot_projections(projections, folder / "input_projections.png"))
    if sweeps:
        recs = {who: rank_records(r) for who, r in sweeps.items()}
        paths.append(plot_rank_sweep(recs, folder / "rank_sweep.png"))
    return paths
