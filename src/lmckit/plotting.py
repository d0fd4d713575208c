"""Shared figure plumbing: pyplot on the Agg backend, and one atomic figure writer.

Every figure lmckit writes (interpolation curves, landscapes, SVD analyses, report figures, merged
accuracy, STE drift) goes through :func:`save_figure`: the figure is rendered into memory and written
with :func:`lmckit.store.atomic_write_bytes`, so a reader never sees a half-written image and a crash
leaves the previous file in place.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Any


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def subplot_grid(n: int, size: float):
    """A figure with ``n`` panels, at most 4 a row, each ``size`` x ``0.8 size`` inches; spare axes hidden.

    Returns ``(fig, axes)`` with ``axes`` a flat list (``n >= 1`` of them visible; ``n = 0`` gives one hidden).
    """
    import math

    plt = pyplot()
    cols = min(max(n, 1), 4)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * 0.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def save_figure(
    fig: Any, path: str | Path, dpi: int, *, fmt: str = "png", tight_layout: bool = False, **savefig_kw: Any
) -> Path:
    """Render ``fig`` and write it atomically to ``path``; close it (pyplot figures); return the path.

    Parameters
    ----------
    fig : a :class:`matplotlib.figure.Figure` (from pyplot or a bare one with an Agg canvas).
    path : the file to write; its folder is created.
    dpi : resolution passed to ``savefig``.
    fmt : image format (``png``, ``pdf``, ``svg``, ...); an unknown one is an :class:`LmcError`.
    tight_layout : call ``fig.tight_layout()`` first (its warnings, e.g. about colorbar axes, silenced).
    **savefig_kw : further ``savefig`` options (``bbox_inches``, ``metadata``, ...).
    """
    from .errors import LmcError
    from .store import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    try:
        if tight_layout:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # colorbar axes are not tight_layout-compatible; the result is fine
                fig.tight_layout()
        try:
            fig.savefig(buf, format=fmt, dpi=dpi, **savefig_kw)
        except ValueError as e:
            raise LmcError(f"cannot write a plot as {path.name}: {e}", "use a .png, .pdf or .svg file name") from None
    finally:
        plt = sys.modules.get("matplotlib.pyplot")  # a bare Figure is unknown to pyplot: closing it is a no-op
        if plt is not None:
            plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


#: one colour map for every loss surface (report panels and ``lmckit landscape``): dark = low loss
LOSS_CMAP = "viridis"
#: and for accuracy surfaces: dark = low accuracy (the same reading: bright = where the models are bad / good)
ACCURACY_CMAP = "viridis"


def integer_ticks(*axes: Any, axis: str = "x") -> None:
    """Ticks at integers only on ``axis`` ("x", "y" or "both") of each of ``axes`` (indices, epochs, counts)."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        if axis in ("x", "both"):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        if axis in ("y", "both"):
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def plain_log_axis(ax: Any, axis: str = "y") -> None:
    """Readable labels on a log axis (call after plotting): decades only on wide ranges; 1-2-5 steps on ranges
    under two decades, which would otherwise show one label or crowded minor labels like 4x10^-1."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 100:
        a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if hi / lo >= 10 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        a.set_major_formatter(FormatStrFormatter("%.2g"))
    a.set_minor_formatter(NullFormatter())


def legend_outside(fig: Any, axes: Any, ncol: int | None = None, fontsize: float = 7) -> Any:
    """One legend for the figure, below the panels (never over the data); entries deduplicated by label.

    ``axes``: the axes whose labelled artists to collect. Returns the legend (None when nothing is labelled).
    Save with ``bbox_inches="tight"`` or ``tight_layout`` so the legend is kept in the image.
    """
    handles, labels = [], []
    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if not handles:
        return None
    return fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=ncol or min(len(labels), 4),
        fontsize=fontsize,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )


def save_with_legend(fig: Any, path: Any, axes: Any = None, ncol: int | None = None, dpi: int = 90) -> Any:
    """Save ``fig`` with one legend below the panels (collected from ``axes``) and room kept for it.

    The layout every figure of the report and of the CLI shares (:func:`legend_outside`, tight layout,
    no ``Software`` metadata so the PNG bytes depend on the data only). Returns the path written.
    """
    import math
    import warnings

    leg = legend_outside(fig, axes, ncol=ncol) if axes is not None else None
    bottom = 0.0
    if leg is not None:
        rows = math.ceil(len(leg.get_texts()) / leg._ncols)  # noqa: SLF001 - matplotlib keeps ncols private
        bottom = min(0.4, (0.22 * rows + 0.1) / fig.get_size_inches()[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout(rect=(0, bottom, 1, 1))
    return save_figure(fig, path, dpi=dpi, metadata={"Software": None}, bbox_inches="tight")
