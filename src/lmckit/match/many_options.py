"""Options and registration of the many-model methods (MergeMany, STE-MM, C2M3), without torch.

The registry (:mod:`lmckit.match.registry`) imports this module to list the methods
(``lmckit methods``); each algorithm, which needs torch, is imported when it runs:
:func:`lmckit.match.multi.merge_many`, :func:`lmckit.match.ste_mm.ste_mm`,
:func:`lmckit.match.c2m3.c2m3`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LmcError
from ..limits import MAX_BATCH, MAX_EPOCHS, MAX_ITER, MAX_SAMPLES
from .registry import MethodOptions, _at_most, _one_of, _positive, register_many_method
from .ste_protocols import STE_MM_PROTOCOLS

if TYPE_CHECKING:
    from .result import MultiMatchResult

MERGE_MANY_STOPS = ("perms", "distance")  # lmckit.match.multi.MERGE_MANY_STOPS (kept equal by a test)
C2M3_INITS = ("anchor", "identity", "uniform")  # lmckit.match.c2m3.INITS (kept equal by a test)


@dataclass(frozen=True)
class MergeManyOptions(MethodOptions):
    """MergeMany: passes at most, sweeps of each weight matching, stop rule.

    ``stop``: ``"perms"`` (lmckit's: a pass that changes no permutation) or ``"distance"`` (Ito et
    al.'s ``srcs/search/mult/wm.py``: the summed distance to the mean of the others is unchanged).
    """

    max_iter: int = 100
    wm_max_iter: int = 100
    stop: str = "perms"

    def validate(self) -> None:
        _positive(self, "max_iter", "wm_max_iter")
        _at_most(self, MAX_ITER, "max_iter", "wm_max_iter")
        _one_of(self, "stop", MERGE_MANY_STOPS)


@register_many_method(
    "mergemany",
    description="MergeMany: each model in a seeded random order matched by WM to the mean of the others, "
    "until nothing changes",
    reference="Ainsworth, Hayase, Srinivasa, 'Git Re-Basin', ICLR 2023, Alg. 3 (= Ito et al.'s many-model WM, "
    "github e5-a/STE-MM srcs/search/mult/wm.py, with stop='distance')",
    min_models=2,
    needs_data=False,
    options=MergeManyOptions,
    objective="S = sum_{i<j} <pi_i(theta_i), pi_j(theta_j)> before the first pass and after each; higher is better "
    "(non-decreasing)",
    label="MergeMany",
)
def _mergemany(spec, states, *, model, dataset, options: MergeManyOptions, seed, device, progress) -> MultiMatchResult:
    from .multi import merge_many

    return merge_many(
        spec,
        states,
        seed=seed,
        max_iter=options.max_iter,
        wm_max_iter=options.wm_max_iter,
        device=device,
        stop=options.stop,
    )


@dataclass(frozen=True)
class SteMmOptions(MethodOptions):
    """STE-MM: protocol (``ste-mm-random``: weights rand(N)/sum; ``ste-mm-midpoint``: 1/N each),
    epochs / lr / batch size (default: Ito et al.'s 10, 1e-3, 256), projection sweeps, training images,
    and the two projection approximations (0 and 1: off)."""

    protocol: str = "ste-mm-random"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    wm_max_iter: int = 100
    train_limit: int | None = None
    project_sweeps: int = 0
    project_every: int = 1

    def validate(self) -> None:
        _one_of(self, "protocol", STE_MM_PROTOCOLS)
        _positive(self, "epochs", "lr", "batch_size", "wm_max_iter", "train_limit", "project_every")
        _at_most(self, MAX_EPOCHS, "epochs")
        _at_most(self, MAX_BATCH, "batch_size")
        _at_most(self, MAX_ITER, "wm_max_iter", "project_sweeps", "project_every")
        _at_most(self, MAX_SAMPLES, "train_limit")
        if self.project_sweeps < 0:
            raise LmcError(f"ste-mm option project_sweeps must be >= 0 (0: off), got {self.project_sweeps}")


@register_many_method(
    "ste-mm",
    description="STE-MM: copies of the anchor trained at once by the straight-through estimator; the loss at "
    "random convex weights over the anchor and every WM-projected model (Ito et al.'s code)",
    reference="Ito, Yamada, Kumagai, 'Linear Mode Connectivity between Multiple Models modulo Permutation "
    "Symmetries', ICML 2024 (github e5-a/STE-MM, srcs/search/mult/ste.py)",
    min_models=2,
    needs_data=True,
    needs_model=True,
    options=SteMmOptions,
    objective="mean training loss at the combined point per epoch; lower is better",
    label="STE-MM",
    cost=lambda o: 30.0 * (o.epochs or 10),
)
def _ste_mm(spec, states, *, model, dataset, options: SteMmOptions, seed, device, progress) -> MultiMatchResult:
    from .ste_mm import ste_mm

    return ste_mm(
        model,
        states,
        dataset,
        spec,
        protocol=options.protocol,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        seed=seed,
        device=device,
        wm_max_iter=options.wm_max_iter,
        train_limit=options.train_limit,
        project_sweeps=options.project_sweeps,
        project_every=options.project_every,
        progress=progress,
    )


@dataclass(frozen=True)
class C2m3Options(MethodOptions):
    """C2M3: Frank-Wolfe iterations at most, start (``anchor``: pairwise WM to model 0; ``identity`` and
    ``uniform``: the reference code's), stopping tolerance and patience, refresh period."""

    max_iter: int = 200
    init: str = "anchor"
    tol: float = 1e-9
    patience: int = 5
    refresh: int = 25

    def validate(self) -> None:
        _one_of(self, "init", C2M3_INITS)
        _positive(self, "max_iter", "patience", "refresh")
        _at_most(self, MAX_ITER, "max_iter", "patience", "refresh")
        if not self.tol >= 0:
            raise LmcError(f"c2m3 option tol must be >= 0, got {self.tol}")


def _c2m3_check(spec) -> None:
    from .c2m3 import check_spec  # torch: imported only when a spec is checked

    check_spec(spec)


@register_many_method(
    "c2m3",
    description="C2M3: cycle-consistent permutations through a universe order, Frank-Wolfe over the sum of "
    "pairwise WM objectives",
    reference="Crisostomi, Fumero, Baieri, Bernard, Rodola, 'C2M3: Cycle-Consistent Multi-Model Merging', NeurIPS 2024",
    min_models=3,
    needs_data=False,
    options=C2m3Options,
    objective="S = sum_{i<j} <pi_i(theta_i), pi_j(theta_j)> at the start and at the rounded result; higher is better",
    label="C2M3",
    check_spec=_c2m3_check,
)
def _c2m3(spec, states, *, model, dataset, options: C2m3Options, seed, device, progress) -> MultiMatchResult:
    from .c2m3 import c2m3

    return c2m3(
        spec,
        states,
        seed=seed,
        max_iter=options.max_iter,
        init=options.init,
        tol=options.tol,
        patience=options.patience,
        refresh=options.refresh,
        device=device,
        progress=progress,
    )
