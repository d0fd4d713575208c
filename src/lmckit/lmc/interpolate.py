"""Linear interpolation and affine mixing of state dicts.

The arithmetic (``theta(lambda) = (1 - lambda) theta_a + lambda theta_b`` on float entries,
integer buffers from the first model, exact copies at the ends) is :mod:`lmckit.states`, at the
bottom of the package so that matching (STE's midpoint scoring) uses it too; it is re-exported
here. This module adds the lambda grid of a curve.
"""

from __future__ import annotations

from ..errors import LmcError
from ..limits import MAX_POINTS
from ..states import (  # noqa: F401  (re-exported: the state arithmetic lives in lmckit.states)
    State,
    check_compatible,
    copy_state,
    float_keys,
    interpolate_states,
    mix_states,
    state_vector,
)


def lambda_grid(points: int = 25) -> list[float]:
    """``points`` evenly spaced lambdas on [0, 1] (both ends included), plus 0.5.

    Computed as ``i / (points - 1)`` so that for odd ``points`` the middle
    value is exactly 0.5; for even ``points`` 0.5 is inserted so the midpoint
    is always evaluated.
    """
    if isinstance(points, bool) or not isinstance(points, (int, float)) or int(points) != points or points < 2:
        raise LmcError(f"points must be an integer >= 2 (got {points!r})", "use e.g. --points 25")
    if points > MAX_POINTS:
        raise LmcError(f"points must be at most {MAX_POINTS} (got {points!r})", "use e.g. --points 25")
    points = int(points)
    grid = [i / (points - 1) for i in range(points)]
    if 0.5 not in grid:
        grid = sorted(grid + [0.5])
    return grid
