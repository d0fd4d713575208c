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


def save_figure(fig: Any, path: str | Path, dpi: int, *, fmt: str = "png", tight_layout: bool = False,
                **savefig_kw: Any) -> Path:
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
