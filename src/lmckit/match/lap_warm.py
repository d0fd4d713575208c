"""Warm-started exact linear assignment: shortest augmenting paths from the previous solution's potentials.

STE re-solves each permutation group's assignment problem at every training
step, for a cost matrix that moved by one gradient step since the last
solve. A solver that starts from nothing (scipy's ``linear_sum_assignment``,
lapx) repeats all ``n`` augmentations every time. :func:`solve_warm` instead
starts from the previous assignment ``p`` and the previous optimal column
potentials ``v``:

1. *Dual repair.* For the new (minimisation) costs ``c`` set
   ``u_i = min_j (c_ij - v_j)``; then every reduced cost
   ``c_ij - u_i - v_j`` is ``>= 0`` (dual feasibility), and row ``i`` keeps
   its column ``p(i)`` exactly when that column attains the minimum (the edge
   is tight; the comparison is of the identical floating-point expression,
   so no tolerance enters). The other rows and their columns are freed.
2. *Augmentation.* Each free row is assigned by one shortest augmenting
   path over the reduced costs (Dijkstra on the dense bipartite graph) with
   the dual update of Jonker and Volgenant (1987) as formulated by Crouse
   (2016, Algorithm 1), the algorithm scipy's solver runs; an augmenting path
   keeps every kept row's edge tight.
3. *Centring.* Optimal potentials are far from unique, and the ones the
   augmentations leave have many non-assigned edges with zero reduced cost
   (ties that the next small change of ``c`` breaks, freeing the row). One
   pass moves each row's potential half-way towards its runner-up edge
   (``u_i += m_i / 2``, ``v_{p(i)} -= m_i / 2`` with ``m_i`` the smallest
   reduced cost of row ``i`` off its assigned column): the assigned edges
   stay tight and every reduced cost stays ``>= 0`` (each falls by at most
   ``m_i / 2``), so the potentials stay optimal while fewer rows are freed
   at the next call.

The result is an optimal assignment of ``c`` together with optimal
potentials (LP duality: the assignment is tight, the duals feasible), by the
same argument as for the from-scratch algorithm, which is the special case
"no previous assignment, ``v = 0``". When the optimum is unique (generic for
real-valued costs) it is the assignment every exact solver returns; among
ties any optimal one may be returned. Cost of a call: ``O(n^2)`` for the
repair plus one augmentation per freed row (``O(n)`` per Dijkstra step; paths
are short while many columns are free).

The kernel is compiled with numba (a dependency of lmckit; compiled on first
use and cached on disk). Without numba, :func:`available` is False and
callers use :func:`lmckit.match.lap.solve`.

References: H. W. Kuhn (1955); R. Jonker and A. Volgenant (1987), "A
shortest augmenting path algorithm for dense and sparse linear assignment
problems"; D. F. Crouse (2016), "On implementing 2D rectangular assignment
algorithms", IEEE TAES 52(4).
"""

from __future__ import annotations

import numpy as np

from .lap import check_square

_NUMBA: bool | None = None  # whether numba imports; looked up lazily (its import costs ~0.4 s)

#: Passes of the potential centring after each solve (see :func:`solve_warm`); 1 was fastest on the MLP's
#: STE (benchmarks/bench_ste.py, 512 units: 1.6 ms per solve; 2.6, 1.9 and 2.7 ms with 0, 2 and 4 passes).
CENTER_PASSES = 1


#: Potentials ``v`` passed in whose spread (max - min) exceeds this many times ``n`` times the spread of the
#: costs are ignored (started from 0); the potentials this function returns are shortest-path lengths over at
#: most ``n`` edges, so they spread about ``n`` times the costs' spread at most.
V_SPREAD_LIMIT = 1e3


def available() -> bool:
    """Whether the compiled warm-start solver can be used (numba importable; imported on the first call)."""
    global _NUMBA
    if _NUMBA is None:
        try:  # numba is a dependency; tolerate a platform without its wheels (callers fall back to scipy)
            import numba  # noqa: F401

            _NUMBA = True
        except ImportError:  # pragma: no cover - exercised only where numba is missing
            _NUMBA = False
    return _NUMBA


def _warm_kernel(cost, sign, col4row, v, center_passes):  # pragma: no cover - compiled by numba
    n = cost.shape[0]
    inf = np.inf
    u = np.empty(n)
    row4col = np.full(n, -1, np.int64)
    new_col4row = np.full(n, -1, np.int64)
    free = np.empty(n, np.int64)
    n_free = 0
    # 1. dual repair: u_i = min_j (c_ij - v_j); keep p(i) when it attains the minimum
    for i in range(n):
        best = inf
        for j in range(n):
            r = sign * cost[i, j] - v[j]
            if r < best:
                best = r
        u[i] = best
        j0 = col4row[i]
        if j0 >= 0 and row4col[j0] == -1 and sign * cost[i, j0] - v[j0] == best:
            new_col4row[i] = j0
            row4col[j0] = i
        else:
            free[n_free] = i
            n_free += 1
    # 2. one shortest augmenting path per free row (Crouse 2016, Alg. 1)
    spc = np.empty(n)
    path = np.full(n, -1, np.int64)
    remaining = np.empty(n, np.int64)
    sr = np.zeros(n, np.bool_)
    sc = np.zeros(n, np.bool_)
    for f in range(n_free):
        cur = free[f]
        for j in range(n):
            spc[j] = inf
            sr[j] = False
            sc[j] = False
            remaining[j] = n - 1 - j
        num_remaining = n
        min_val = 0.0
        i = cur
        sink = -1
        while sink == -1:
            index = -1
            lowest = inf
            sr[i] = True
            ui = u[i]
            for it in range(num_remaining):
                j = remaining[it]
                r = min_val + sign * cost[i, j] - ui - v[j]
                if r < spc[j]:
                    path[j] = i
                    spc[j] = r
                if spc[j] < lowest or (spc[j] == lowest and row4col[j] == -1):
                    lowest = spc[j]
                    index = it
            min_val = lowest
            if min_val == inf or index < 0:
                return new_col4row, v, -1  # infeasible (non-finite costs)
            j = remaining[index]
            if row4col[j] == -1:
                sink = j
            else:
                i = row4col[j]
            sc[j] = True
            num_remaining -= 1
            remaining[index] = remaining[num_remaining]
        u[cur] += min_val
        for i2 in range(n):
            if sr[i2] and i2 != cur:
                u[i2] += min_val - spc[new_col4row[i2]]
        for j2 in range(n):
            if sc[j2]:
                v[j2] -= min_val - spc[j2]
        j = sink
        while True:
            i2 = path[j]
            row4col[j] = i2
            tmp = new_col4row[i2]
            new_col4row[i2] = j
            j = tmp
            if i2 == cur:
                break
    # 3. centre the potentials: move each row's tight edge away from its runner-up (keeps optimality)
    delta = np.empty(n)
    for _ in range(center_passes):
        for i in range(n):
            j0 = new_col4row[i]
            ui = sign * cost[i, j0] - v[j0]
            m = inf
            for j in range(n):
                if j != j0:
                    r = sign * cost[i, j] - ui - v[j]
                    if r < m:
                        m = r
            delta[i] = 0.5 * m if 0.0 < m < inf else 0.0
        for i in range(n):
            v[new_col4row[i]] -= delta[i]
    # potentials are defined up to a common shift (u recomputed at the next repair): keep them near 0,
    # so that a long run of centred solves (which only lower v) loses no precision
    shift = v.max()
    for j in range(n):
        v[j] -= shift
    return new_col4row, v, n_free


_COMPILED = None


def _kernel():
    global _COMPILED
    if _COMPILED is None:
        import numba

        try:  # compiled once and cached beside this file (or in numba's user cache folder)
            _COMPILED = numba.njit(cache=True, nogil=True)(_warm_kernel)
        except RuntimeError:  # pragma: no cover - no writable cache location: compile in each process instead
            _COMPILED = numba.njit(cache=False, nogil=True)(_warm_kernel)
    return _COMPILED


def solve_warm(
    cost: np.ndarray,
    prev: np.ndarray | None = None,
    v: np.ndarray | None = None,
    maximize: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Optimal assignment of a square cost matrix, warm-started from a previous solution.

    Parameters
    ----------
    cost:
        ``(n, n)`` float64 matrix, finite. Not modified.
    prev:
        ``(n,)`` int64 column of each row from an earlier solve (any
        permutation, or ``None`` to start from scratch).
    v:
        ``(n,)`` float64 column potentials returned with ``prev`` (``None``:
        zeros). Potentials are for the *minimisation* form (``-cost`` when
        ``maximize``); pass back exactly what this function returned.
    maximize:
        Maximise (weight matching's sense) or minimise ``sum_i cost[i, col[i]]``.

    Returns
    -------
    (col, v, freed)
        ``col``: ``(n,)`` int64, row ``i`` assigned column ``col[i]``, an
        optimal assignment (the same as any exact solver's when the optimum is
        unique); ``v``: ``(n,)`` float64 optimal column potentials, to pass to
        the next call; ``freed``: rows that had to be re-assigned (few when
        ``prev`` is still optimal: only rows whose assigned edge ties another
        one up to rounding, re-assigned to the same column).

    Raises
    ------
    ValueError
        A non-square, complex or non-finite ``cost``; a ``prev`` that is not an
        integer permutation of ``range(n)``; a ``prev``/``v`` of the wrong
        shape or a non-finite ``v``; numba not installed (check
        :func:`available` first). A ``v`` whose spread exceeds
        :data:`V_SPREAD_LIMIT` ``* n *`` the costs' spread is ignored (it would
        lose the costs to rounding), not an error.
    """
    if not available():
        raise ValueError("the warm-started LAP solver needs numba (pip install numba)")
    if np.iscomplexobj(cost):
        raise ValueError("the LAP needs a real cost matrix, got a complex one")
    cost = check_square(np.ascontiguousarray(cost, dtype=np.float64))
    n = cost.shape[0]
    if prev is not None and not np.issubdtype(np.asarray(prev).dtype, np.integer):
        raise ValueError(f"prev must hold integer column indices, got dtype {np.asarray(prev).dtype}")
    p = np.full(n, -1, np.int64) if prev is None else np.ascontiguousarray(prev, dtype=np.int64)
    vv = np.zeros(n) if v is None else np.array(v, dtype=np.float64, copy=True)
    if p.shape != (n,) or vv.shape != (n,):
        raise ValueError(f"prev and v must have shape ({n},), got {p.shape} and {vv.shape}")
    if n == 0:
        return np.zeros(0, np.int64), vv, 0
    if not np.isfinite(cost).all() or not np.isfinite(vv).all():
        raise ValueError("the cost matrix (or v) has non-finite entries; the assignment problem is ill-posed")
    if prev is not None and not np.array_equal(np.sort(p), np.arange(n)):
        raise ValueError("prev must be a permutation of range(n)")
    # Any v gives the optimum in exact arithmetic, but potentials far larger than the costs' spread would
    # cancel the costs away in floating point: such a v (not one this function returned) is ignored.
    # (the spread of row 0 bounds the costs' spread from below: the O(n^2) spread only when that bound fails)
    limit = V_SPREAD_LIMIT * max(n, 1)
    v_spread = float(np.ptp(vv))
    if v_spread > limit * float(np.ptp(cost[0])) and v_spread > limit * float(np.ptp(cost)):
        vv = np.zeros(n)
    col, vv, freed = _kernel()(cost, -1.0 if maximize else 1.0, p, vv, CENTER_PASSES)
    if freed < 0:  # pragma: no cover - finite costs always admit an augmenting path
        raise ValueError("no augmenting path found; the assignment problem is infeasible")
    return col, vv, int(freed)
