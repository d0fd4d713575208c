"""Linear assignment (LAP) solver choice, measured rather than assumed.

Weight matching solves one dense square LAP per permutation group and sweep
(``max_P sum_i C[i, p(i)]``, Kuhn 1955; Jonker and Volgenant 1987). Two
well-kept exact solvers are available:

* :func:`scipy.optimize.linear_sum_assignment` (always installed; a
  shortest-augmenting-path LAPJV variant, Crouse 2016);
* ``lapx`` (PyPI ``lapx``, imported as ``lap``; optional extra
  ``lmckit[fast]``): Jonker-Volgenant in C++. Its ``lapjvs`` entry point runs
  the same algorithm with a float64 kernel here (``prefer_float32=False``:
  a float32 kernel could return a sub-optimal assignment on near-ties).

Which is faster depends on the size: ``benchmarks/bench_lap.py`` times both on
real weight-matching cost matrices (n = 256 to 4096) and its table is the
source of :data:`LAPX_MAX_UNITS`. :func:`solve` uses ``lapx`` for
``n <= LAPX_MAX_UNITS`` when it is installed and scipy otherwise. Both are
exact, so the assignment differs only where the LAP has several optima (ties).

Measured here (2 shared cores, lapx 0.11.1, scipy 1.x): with its exact float64
kernel lapx was never clearly faster than scipy on WM cost matrices from 256 to
4096 units (0.9-1.7x scipy's time; its float32 kernel is faster at 2048 but
not exact), so the automatic choice is scipy at every size
(``LAPX_MAX_UNITS = 0``) until a run of the benchmark on the target machine
says otherwise.

Environment: ``LMCKIT_LAP=scipy`` or ``LMCKIT_LAP=lapx`` forces one solver
(for benchmarks and bisecting); anything else means automatic choice.
"""
from __future__ import annotations

import os

import numpy as np

#: Largest group size for which lapx is used (from benchmarks/bench_lap.py; see the README table).
LAPX_MAX_UNITS = 0

_LAPX = None  # the lapx module, False when not installed, None before the first look


def _lapx():
    global _LAPX
    if _LAPX is None:
        try:
            import lap as _mod  # PyPI "lapx"

            _LAPX = _mod if hasattr(_mod, "lapjvs") else False
        except ImportError:
            _LAPX = False
    return _LAPX or None


def available() -> list[str]:
    """Names of the installed solvers (``"scipy"`` always, ``"lapx"`` when its package is present)."""
    return ["scipy"] + (["lapx"] if _lapx() is not None else [])


def choose(n: int) -> str:
    """Solver used for an ``n x n`` problem: ``"lapx"`` or ``"scipy"`` (see the module docstring)."""
    forced = os.environ.get("LMCKIT_LAP", "").strip().lower()
    if forced == "scipy":
        return "scipy"
    if _lapx() is None:
        return "scipy"
    if forced == "lapx":
        return "lapx"
    return "lapx" if int(n) <= LAPX_MAX_UNITS else "scipy"


def solve(cost: np.ndarray, maximize: bool = True, solver: str | None = None) -> np.ndarray:
    """Column assigned to each row of a square cost matrix.

    Parameters
    ----------
    cost:
        ``(n, n)`` float array; finite.
    maximize:
        Maximise (default, as weight matching does) or minimise ``sum_i cost[i, col[i]]``.
    solver:
        ``"scipy"``, ``"lapx"`` or ``None`` for :func:`choose`'s pick.

    Returns
    -------
    numpy.ndarray
        ``col`` of shape ``(n,)``, int64: row ``i`` is assigned column ``col[i]``
        (an optimal assignment; which one among ties depends on the solver).

    Raises
    ------
    ValueError
        A non-square or non-2-D ``cost``, or ``solver="lapx"`` without the package.
    """
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"the LAP needs a square 2-D cost matrix, got shape {cost.shape}")
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    name = solver or choose(n)
    if name == "lapx":
        mod = _lapx()
        if mod is None:
            raise ValueError("the lapx solver is not installed (pip install lapx)")
        c = np.ascontiguousarray(-cost if maximize else cost, dtype=np.float64)
        x, _ = mod.lapjvs(c, extend_cost=False, return_cost=False, jvx_like=False, prefer_float32=False)
        return np.asarray(x, dtype=np.int64)
    if name != "scipy":
        raise ValueError(f"unknown LAP solver {name!r}; use 'scipy' or 'lapx'")
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(cost, maximize=maximize)
    return col.astype(np.int64, copy=False)
