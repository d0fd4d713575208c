"""The built-in two-model methods' registrations: weight matching, activation matching and STE.

Each is an options dataclass and a thin adapter with the registry's common
call signature over the method's own function
(:func:`~lmckit.match.weight.weight_matching`,
:func:`~lmckit.match.activation.activation_matching`,
:func:`~lmckit.match.ste.ste_matching`), imported inside the adapter so that
registering (and listing) the methods needs no torch. The registry imports
this module first among :data:`~lmckit.match.registry.BUILTIN_METHOD_MODULES`,
so these three are the first methods in registration order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ..errors import LmcError
from ..limits import MAX_BATCH, MAX_BATCHES, MAX_EPOCHS, MAX_ITER, MAX_RESTARTS, MAX_SAMPLES
from .method_options import MethodOptions, _at_most, _one_of, _positive
from .registry import register_method
from .ste_protocols import PROTOCOLS as STE_PROTOCOLS

if TYPE_CHECKING:  # (annotations only)
    import torch

    from .result import MatchResult

__all__ = ["WeightOptions", "ActivationOptions", "SteOptions"]


@dataclass(frozen=True)
class WeightOptions(MethodOptions):
    """Weight matching: sweeps, restarts, acceptance tolerance, buffers in the objective."""

    max_iter: int = 100
    restarts: int = 1
    tol: float = 1e-7
    include_buffers: bool = False

    def validate(self) -> None:
        _positive(self, "max_iter", "restarts")
        _at_most(self, MAX_ITER, "max_iter")
        _at_most(self, MAX_RESTARTS, "restarts")
        if not self.tol >= 0:
            raise LmcError(f"option tol must be >= 0, got {self.tol}")


@register_method(
    "weight",
    description="Weight matching: coordinate descent of linear assignments maximising sum <A, pi(B)>",
    reference="Ainsworth, Hayase, Srinivasa, 'Git Re-Basin: Merging Models modulo Permutation Symmetries', ICLR 2023",
    symmetries=("permutation", "signed", "orthogonal"),
    needs_data=False,
    options=WeightOptions,
    multi=("anchor", "mergemany"),
    objective="sum_k <A_k, pi(B)_k>_F per sweep; higher is better (non-decreasing)",
    label="WM",
    record=lambda res, o: {"restarts": o.restarts, "max_iter": o.max_iter},
    iterations=lambda res, o: (
        f"sweeps:      {res.sweeps}"
        + (f" (best of {o.restarts} restarts)" if o.restarts > 1 else "")
        + (" (converged)" if res.converged else f" (max-iter {o.max_iter} reached, not converged)")
    ),
)
def _weight(spec, sd_a, sd_b, *, model, dataset, options: WeightOptions, seed, device, progress) -> MatchResult:
    from .weight import weight_matching

    return weight_matching(
        spec,
        sd_a,
        sd_b,
        seed=seed,
        max_iter=options.max_iter,
        restarts=options.restarts,
        device=device,
        tol=options.tol,
        include_buffers=options.include_buffers,
        progress=progress,
    )


@dataclass(frozen=True)
class ActivationOptions(MethodOptions):
    """Activation matching: similarity, training batches used, batch size, split."""

    similarity: str = "pearson"
    num_batches: int = 10
    batch_size: int = 500
    split: str = "train"

    def validate(self) -> None:
        _one_of(self, "similarity", ("pearson", "cross_moment"))
        _positive(self, "num_batches", "batch_size")
        _at_most(self, MAX_BATCH, "batch_size")
        _at_most(self, MAX_BATCHES, "num_batches")


@register_method(
    "activation",
    description="Activation matching: one assignment per layer maximising unit correlation on data",
    reference="Ainsworth, Hayase, Srinivasa, 'Git Re-Basin', ICLR 2023 (after Li et al., 'Convergent Learning', 2016)",
    symmetries=("permutation", "signed", "orthogonal"),
    needs_data=True,
    needs_model=True,
    options=ActivationOptions,
    multi=("anchor",),
    objective="summed similarity of matched units; higher is better",
    label="AM",
    record=lambda res, o: {
        "similarity": o.similarity,
        "num_batches": res.extra.get("batches", o.num_batches),
        "batch_size": o.batch_size,
    },
    iterations=lambda res, o: (
        "assignment:  one linear assignment per group on "
        f"{res.extra.get('batches', o.num_batches)} batches of {o.batch_size} {o.split} images (not iterative)"
    ),
)
def _activation(spec, sd_a, sd_b, *, model, dataset, options: ActivationOptions, seed, device, progress) -> MatchResult:
    from .activation import activation_matching

    model_a, model_b = _with_state(model, sd_a), _with_state(model, sd_b)
    return activation_matching(
        model_a,
        model_b,
        dataset,
        spec=spec,
        num_batches=options.num_batches,
        batch_size=options.batch_size,
        method=options.similarity,
        seed=seed,
        device=device,
        split=options.split,
    )


def _with_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` holding ``sd`` (the caller's module is not changed)."""
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(dict(sd))
    return m


@dataclass(frozen=True)
class SteOptions(MethodOptions):
    """STE: protocol (which permutation a run returns; see :mod:`lmckit.match.ste`), optimiser preset
    (default: the protocol's own) and overrides, held-out set, projection sweeps, resumable state folder.

    ``state_dir`` is where the run is kept (resume, drift plot); it does not change the result.
    ``project_sweeps`` (0: off) and ``project_every`` (1: off) are the two documented approximations
    of the per-step projection (:func:`lmckit.match.ste.ste_matching`); they change the result.
    """

    protocol: str = "heldout-best"
    preset: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    heldout_size: int = 5000
    wm_max_iter: int = 100
    train_limit: int | None = None
    track_alignment: bool = True
    state_dir: str | None = None
    project_sweeps: int = 0
    project_every: int = 1

    def validate(self) -> None:
        _one_of(self, "protocol", tuple(STE_PROTOCOLS))
        if self.preset is not None:
            _one_of(self, "preset", ("adam", "git-re-basin"))
        _positive(self, "epochs", "lr", "batch_size", "heldout_size", "wm_max_iter", "train_limit")
        _at_most(self, MAX_EPOCHS, "epochs")
        _at_most(self, MAX_BATCH, "batch_size")
        _at_most(self, MAX_ITER, "wm_max_iter")
        _at_most(self, MAX_SAMPLES, "heldout_size", "train_limit")
        _positive(self, "project_every")
        if self.project_sweeps < 0:
            raise LmcError(f"ste option project_sweeps must be >= 0 (0: off), got {self.project_sweeps}")
        _at_most(self, MAX_ITER, "project_sweeps", "project_every")


@register_method(
    "ste",
    description="Straight-through estimator: learn theta~ whose WM projection minimises the midpoint loss "
    f"(protocols: {', '.join(STE_PROTOCOLS)})",
    reference="Ainsworth, Hayase, Srinivasa, 'Git Re-Basin', ICLR 2023, Sec. 3.3",
    needs_data=True,
    needs_model=True,
    options=SteOptions,
    multi=("anchor",),
    objective="best held-out midpoint loss so far; lower is better (non-increasing)",
    label="STE",
    record=lambda res, o: {
        "ste_preset": res.extra["preset"],
        "ste_protocol": res.extra["protocol"],
        "ste_settings": res.extra["settings"],
        "heldout_loss": res.extra["best_heldout_loss"],
        "changed_vs_wm": res.extra["changed_vs_wm"],
    },
    iterations=lambda res, o: f"epochs:      {res.sweeps} (protocol {o.protocol})",
    cost=lambda o: 30.0 * (o.epochs or 10),
)
def _ste(
    spec, sd_a, sd_b, *, model, dataset, options: SteOptions, seed, device, progress, alignment=None
) -> MatchResult:
    from .ste import ste_matching

    return ste_matching(
        model,
        sd_a,
        sd_b,
        dataset,
        spec=spec,
        preset=options.preset,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        seed=seed,
        device=device,
        state_dir=options.state_dir,
        progress=progress,
        heldout_size=options.heldout_size,
        wm_max_iter=options.wm_max_iter,
        track_alignment=options.track_alignment,
        train_limit=options.train_limit,
        protocol=options.protocol,
        alignment=alignment,
        project_sweeps=options.project_sweeps,
        project_every=options.project_every,
    )
