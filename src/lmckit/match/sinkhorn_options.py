"""Options and registration of Sinkhorn re-basin (:mod:`lmckit.match.sinkhorn`), without torch.

The method registry imports this module to list the built-in methods (``lmckit
match --help``); the algorithm itself, which needs torch (and imports this
module for its options), is named by a :class:`~lmckit.match.registry.LazyFunction`
and imported when the method first runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LmcError
from ..limits import MAX_BATCH, MAX_ITER, MAX_SAMPLES
from .registry import LazyFunction, MethodOptions, _at_most, register_method

LOSSES = ("distance", "midpoint")
INITS = ("identity", "uniform")


@dataclass(frozen=True)
class SinkhornOptions(MethodOptions):
    """Options of Sinkhorn re-basin (defaults tuned on Fashion-MNIST MLPs, see docs/adding-a-method.md).

    Attributes
    ----------
    loss:
        ``"distance"`` (data-free) or ``"midpoint"`` (needs data and a model).
    steps:
        Adam steps.
    lr:
        Adam learning rate on ``M``.
    tau:
        Sinkhorn temperature (> 0).
    iters:
        Sinkhorn normalisation rounds per step.
    init, init_scale, noise:
        Start of ``M`` (see the module docstring).
    batch_size, train_limit:
        Midpoint loss: minibatch size; use only the first ``train_limit`` training images.
    check_every:
        Steps between hard-assignment checks (loss history, convergence).
    """

    loss: str = "distance"
    steps: int = 300
    lr: float = 0.1
    tau: float = 1.0
    iters: int = 10
    init: str = "identity"
    init_scale: float = 1.0
    noise: float = 0.01
    batch_size: int = 256
    train_limit: int | None = None
    check_every: int = 25

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise LmcError(f"option loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.init not in INITS:
            raise LmcError(f"option init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("steps", "iters", "batch_size", "check_every"):
            if int(getattr(self, name)) < 1:
                raise LmcError(f"option {name} must be at least 1, got {getattr(self, name)}")
        _at_most(self, MAX_ITER, "steps", "iters", "check_every")
        _at_most(self, MAX_BATCH, "batch_size")
        _at_most(self, MAX_SAMPLES, "train_limit")
        for name in ("lr", "tau"):
            v = getattr(self, name)
            if not (v > 0 and v < float("inf")):
                raise LmcError(f"option {name} must be a positive finite number, got {v}")
        for name in ("init_scale", "noise"):
            v = getattr(self, name)
            if not (v >= 0 and v < float("inf")):
                raise LmcError(f"option {name} must be a finite number >= 0, got {v}")
        if self.train_limit is not None and self.train_limit < 1:
            raise LmcError(f"option train_limit must be at least 1, got {self.train_limit}")


# --------------------------------------------------------------------------- method
#: The algorithm, named rather than imported: :mod:`lmckit.match.sinkhorn` imports this module (its options),
#: so importing it here would close an import circle; the registry imports it when the method first runs.
_SINKHORN = "lmckit.match.sinkhorn"

register_method(
    "sinkhorn",
    description="Sinkhorn re-basin: soft permutations (Sinkhorn operator with a temperature) trained by Adam, "
    "then one assignment per group",
    reference="Pena, Medeiros, Dubail, Aminbeidokhti, Granger, Pedersoli, "
    "'Re-basin via implicit Sinkhorn differentiation', CVPR 2023",
    needs_data=False,
    options=SinkhornOptions,
    multi=("anchor",),
    data_when=lambda o: o.loss == "midpoint",
    label="Sinkhorn",
    check_spec=LazyFunction(_SINKHORN, "_check_structures"),  # attention heads and block axes: refused
    cost=lambda o: o.steps / 8.0,
    objective="sum_k <A_k, pi(B)_k>_F at the identity and at the final hard permutation; higher is better",
)(LazyFunction(_SINKHORN, "sinkhorn_matching"))
