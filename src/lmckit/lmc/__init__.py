"""Linear mode connectivity: interpolation, BN reset, REPAIR, barriers, landscapes, plots."""

from .barrier import (
    BN_MODES,
    BarrierResult,
    SplitCurve,
    accuracy_barrier,
    barrier_curve,
    check_model_fits,
    loss_barrier,
    resolve_bn_mode,
)
from .bn import (
    Repairer,
    has_batchnorm,
    repair_interpolation,
    repair_sites,
    reset_bn_stats,
    site_stats,
    training_batches,
)
from .interpolate import (
    check_compatible,
    copy_state,
    float_keys,
    interpolate_states,
    lambda_grid,
    mix_states,
    state_vector,
)
from .landscape import LandscapeResult, PlaneBasis, plane_basis, plane_landscape

__all__ = [
    "BN_MODES",
    "BarrierResult",
    "SplitCurve",
    "accuracy_barrier",
    "barrier_curve",
    "check_model_fits",
    "loss_barrier",
    "resolve_bn_mode",
    "Repairer",
    "has_batchnorm",
    "repair_interpolation",
    "repair_sites",
    "reset_bn_stats",
    "site_stats",
    "training_batches",
    "check_compatible",
    "copy_state",
    "float_keys",
    "interpolate_states",
    "lambda_grid",
    "mix_states",
    "state_vector",
    "LandscapeResult",
    "PlaneBasis",
    "plane_basis",
    "plane_landscape",
    "plot_curves",
    "plot_landscape",
]


def __getattr__(name):  # the figures import matplotlib: load them only when asked for
    if name in ("plot_curves", "plot_landscape"):
        from . import plot

        return getattr(plot, name)
    raise AttributeError(f"module 'lmckit.lmc' has no attribute {name!r}")
