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
not exact), so below 2048 units the automatic choice is scipy
(``LAPX_MAX_UNITS = 0``) until a run of the benchmark on the target machine
says otherwise. lapx's float32 kernel (``"lapx32"``) was 1.2-2.3x faster than
scipy at 2048 and 4096 units with the same objective on every matrix tried; it
is optimal for the costs rounded to float32, which is the precision the cost
matrices are computed in anyway (float32 products summed in float64), so it is
the automatic choice from :data:`LAPX32_MIN_UNITS` units on. Weight matching's
acceptance rule keeps its objective non-decreasing whatever the solver returns.

Environment: ``LMCKIT_LAP=scipy``, ``lapx`` or ``lapx32`` forces one solver
(for benchmarks and bisecting); anything else means automatic choice.
"""

from __future__ import annotations

import os

import numpy as np

#: Largest group size for which lapx's exact float64 kernel is used (0: never; from benchmarks/bench_lap.py).
LAPX_MAX_UNITS = 0
#: From this group size on lapx's float32 kernel is used (from benchmarks/bench_lap.py).
LAPX32_MIN_UNITS = 2048

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
    """Names of the installed solvers (``"scipy"`` always; ``"lapx"``, ``"lapx32"`` when lapx is present)."""
    return ["scipy"] + (["lapx", "lapx32"] if _lapx() is not None else [])


def choose(n: int) -> str:
    """Solver used for an ``n x n`` problem: ``"lapx"`` or ``"scipy"`` (see the module docstring)."""
    forced = os.environ.get("LMCKIT_LAP", "").strip().lower()
    if forced == "scipy":
        return "scipy"
    if _lapx() is None:
        return "scipy"
    if forced in ("lapx", "lapx32"):
        return forced
    if int(n) >= LAPX32_MIN_UNITS:
        return "lapx32"
    return "lapx" if int(n) <= LAPX_MAX_UNITS else "scipy"


def check_square(cost: np.ndarray) -> np.ndarray:
    """``cost`` itself if it is a square 2-D array, else ``ValueError`` (the one shape check of every LAP solver)."""
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"the LAP needs a square 2-D cost matrix, got shape {cost.shape}")
    return cost


def solve(cost: np.ndarray, maximize: bool = True, solver: str | None = None) -> np.ndarray:
    """Column assigned to each row of a square cost matrix.

    Parameters
    ----------
    cost:
        ``(n, n)`` float array; finite.
    maximize:
        Maximise (default, as weight matching does) or minimise ``sum_i cost[i, col[i]]``.
    solver:
        ``"scipy"``, ``"lapx"`` (float64 kernel, exact), ``"lapx32"`` (lapx's
        float32 kernel: optimal for the costs rounded to float32, so within
        about ``n * 1e-7 * max|cost|`` of the optimum) or ``None`` for
        :func:`choose`'s pick.

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
    cost = check_square(np.asarray(cost))
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    name = solver or choose(n)
    if name in ("lapx", "lapx32"):  # lapx's exact kernel; lapx32 its float32 one (same input, float64)
        mod = _lapx()
        if mod is None:
            raise ValueError(
                "the lapx solver is not installed (pip install lapx)"
                if name == "lapx"
                else "the lapx32 solver needs lapx (pip install lapx)"
            )
        c = np.ascontiguousarray(-cost if maximize else cost, dtype=np.float64)
        x, _ = mod.lapjvs(c, extend_cost=False, return_cost=False, jvx_like=False, prefer_float32=(name == "lapx32"))
        return np.asarray(x, dtype=np.int64)
    if name != "scipy":
        raise ValueError(f"unknown LAP solver {name!r}; use 'scipy', 'lapx' or 'lapx32'")
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(cost, maximize=maximize)
    return col.astype(np.int64, copy=False)
