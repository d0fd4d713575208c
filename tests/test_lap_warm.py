"""The warm-started exact LAP (lmckit.match.lap_warm) against brute force, scipy and LP duality."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lmckit.match import lap_warm
from lmckit.match.lap_warm import solve_warm

pytestmark = pytest.mark.skipif(not lap_warm.available(), reason="numba is not installed")


def _brute_best(c: np.ndarray) -> float:
    n = c.shape[0]
    return max(sum(c[i, s[i]] for i in range(n)) for s in itertools.permutations(range(n)))


def _total(c, col):
    return float(c[np.arange(c.shape[0]), col].sum())


def _assert_optimal_duals(c, col, v, maximize=True):
    """LP duality: with u_i = m[i, col_i] - v[col_i] every reduced cost m - u - v is >= 0 (m the minimised costs)."""
    m = -c if maximize else c
    u = m[np.arange(len(col)), col] - v[col]
    assert (m - u[:, None] - v[None, :] >= -1e-9 * (1 + np.abs(m).max())).all()


def test_from_scratch_against_brute_force_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 7))
        # integer costs make ties common: any optimal assignment is accepted
        c = rng.integers(-3, 4, size=(n, n)).astype(float) if trial % 2 else rng.normal(size=(n, n))
        col, v, freed = solve_warm(c)
        assert sorted(col.tolist()) == list(range(n))
        assert _total(c, col) == pytest.approx(_brute_best(c), abs=1e-9)
        assert freed == n  # no previous assignment: every row is augmented
        _assert_optimal_duals(c, col, v)
        colmin, vmin, _ = solve_warm(c, maximize=False)
        assert _total(c, colmin) == pytest.approx(-_brute_best(-c), abs=1e-9)
        _assert_optimal_duals(c, colmin, vmin, maximize=False)


@pytest.mark.parametrize("n", [2, 30, 200])
def test_warm_start_along_a_drifting_cost_equals_scipy(n):
    """The STE situation: the cost moves a little between solves; every warm solve is scipy's optimum."""
    rng = np.random.default_rng(n)
    c = rng.normal(size=(n, n))
    col, v, _ = solve_warm(c)
    freed_total = 0
    for step in range(25):
        c = c + (0.3 if step % 7 == 0 else 1e-3) * rng.normal(size=(n, n))
        col, v, freed = solve_warm(c, col, v)
        freed_total += freed
        want = linear_sum_assignment(c, maximize=True)[1]
        assert np.array_equal(col, want), f"step {step}"  # continuous costs: the optimum is unique
        _assert_optimal_duals(c, col, v)
    if n >= 30:
        assert freed_total < 25 * n  # the warm start re-assigned fewer rows than solving from scratch would


def test_any_start_gives_the_optimum_and_an_optimal_start_frees_few_rows():
    rng = np.random.default_rng(3)
    n = 40
    c = rng.normal(size=(n, n))
    best = linear_sum_assignment(c, maximize=True)[1]
    for _ in range(5):  # a random assignment and random potentials: still optimal
        col, v, _ = solve_warm(c, rng.permutation(n), rng.normal(size=n) * 10)
        assert np.array_equal(col, best)
    col, v, _ = solve_warm(c)
    again, v2, freed = solve_warm(c, col, v)  # the certificate case: same matrix, its own optimal potentials
    # only rows whose assigned edge ties with another one up to rounding are re-assigned (to the same columns)
    assert freed <= n // 4 and np.array_equal(again, col)
    _assert_optimal_duals(c, again, v2)


def test_inputs_are_not_modified_and_bad_inputs_raise():
    rng = np.random.default_rng(4)
    c = rng.normal(size=(5, 5))
    c0 = c.copy()
    col, v, _ = solve_warm(c)
    v0, p0 = v.copy(), col.copy()
    solve_warm(c + 0.1, col, v)
    assert np.array_equal(c, c0) and np.array_equal(v, v0) and np.array_equal(col, p0)
    assert solve_warm(np.zeros((0, 0)))[0].shape == (0,)
    for bad in (np.zeros((3, 4)), np.zeros(3)):
        with pytest.raises(ValueError, match="square"):
            solve_warm(bad)
    nan = c.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        solve_warm(nan)
    with pytest.raises(ValueError, match="shape"):
        solve_warm(c, np.arange(4))
    with pytest.raises(ValueError, match="permutation"):
        solve_warm(c, np.array([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        solve_warm(c, np.array([0.5, 1.5, 2.5, 3.5, 4.5]))
    with pytest.raises(ValueError, match="complex"):
        solve_warm(c + 1j)


@pytest.mark.parametrize("scale", [1e6, 1e15, 1e17])
def test_potentials_far_beyond_the_costs_are_ignored_not_trusted(scale):
    """Huge potentials would cancel the costs in floating point: the answer must still be scipy's optimum."""
    rng = np.random.default_rng(5)
    c = rng.normal(size=(50, 50))
    want = linear_sum_assignment(c, maximize=True)[1]
    col, v, _ = solve_warm(c, np.arange(50), rng.normal(size=50) * scale)
    assert _total(c, col) == pytest.approx(_total(c, want), abs=1e-9)
    _assert_optimal_duals(c, col, v)
