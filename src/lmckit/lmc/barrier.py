"""Loss and accuracy barriers along the linear path between two models.

Definitions (docs/definitions.md): with theta(lambda) = (1 - lambda) theta_a + lambda theta_b
on a grid of lambdas that contains 0 and 1,

    loss barrier     = max_lambda  L(theta(lambda)) - [(1 - lambda) L(0) + lambda L(1)]
    accuracy barrier = max_lambda  [(1 - lambda) acc(0) + lambda acc(1)] - acc(theta(lambda))

The maximum runs over the whole grid, endpoints included (where the bracket
is 0), so a barrier is never negative. Midpoint values are those at
lambda = 1/2, which the grid always contains (:func:`lambda_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..checks import check_device, check_int, check_module, check_real
from ..errors import LmcError
from ..evaluate import evaluate, module_mode
from ..progress import NullProgress, Progress
from .bn import Repairer, has_batchnorm, reset_bn_stats, training_batches
from .interpolate import check_compatible, copy_state, interpolate_states, lambda_grid

BN_MODES = ("auto", "on", "off", "repair")


def _endpoint_index(lambdas: Sequence[float]) -> tuple[int, int]:
    lam = [float(x) for x in lambdas]
    if 0.0 not in lam or 1.0 not in lam:
        raise LmcError("the lambda grid must contain both endpoints 0 and 1")
    return lam.index(0.0), lam.index(1.0)


def point_name(lam: float, names: tuple[str, str] = ("model A", "model B")) -> str:
    """How errors name the point ``(1 - lam) A + lam B`` of a path: the endpoint itself at 0 and 1."""
    if lam == 0.0:
        return names[0]
    if lam == 1.0:
        return names[1]
    return f"the interpolation at lambda={lam:g} between {names[0]} and {names[1]}"


def _check_curve(lambdas: Sequence[float], values: Sequence[float]) -> None:
    if len(lambdas) != len(values):
        raise LmcError(f"{len(lambdas)} lambdas but {len(values)} values")
    for lam, v in zip(lambdas, values):
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam - lam != 0.0:
            raise LmcError(f"lambdas: {lam!r} is not a finite number")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v - v != 0.0:
            raise LmcError(f"the value at lambda={lam:g} is {v!r}, not a finite number", "no barrier of a NaN curve")


def loss_barrier(lambdas: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """``max_l L(l) - ((1 - l) L(0) + l L(1))`` and the lambda where it is attained.

    Returns ``(barrier, argmax_lambda)``; the first maximiser on ties.
    """
    _check_curve(lambdas, losses)
    i0, i1 = _endpoint_index(lambdas)
    l0, l1 = float(losses[i0]), float(losses[i1])
    gaps = [float(v) - ((1 - float(lam)) * l0 + float(lam) * l1) for lam, v in zip(lambdas, losses)]
    j = max(range(len(gaps)), key=lambda i: gaps[i])
    return max(gaps[j], 0.0), float(lambdas[j])


def accuracy_barrier(lambdas: Sequence[float], accs: Sequence[float]) -> tuple[float, float]:
    """``max_l ((1 - l) acc(0) + l acc(1)) - acc(l)`` and the lambda where it is attained."""
    _check_curve(lambdas, accs)
    i0, i1 = _endpoint_index(lambdas)
    a0, a1 = float(accs[i0]), float(accs[i1])
    gaps = [((1 - float(lam)) * a0 + float(lam) * a1) - float(v) for lam, v in zip(lambdas, accs)]
    j = max(range(len(gaps)), key=lambda i: gaps[i])
    return max(gaps[j], 0.0), float(lambdas[j])


@dataclass
class SplitCurve:
    """Loss and accuracy along the path on one data split, with derived barriers."""

    split: str
    lambdas: list[float]
    loss: list[float]
    accuracy: list[float]

    @property
    def endpoint_loss(self) -> tuple[float, float]:
        i0, i1 = _endpoint_index(self.lambdas)
        return self.loss[i0], self.loss[i1]

    @property
    def endpoint_accuracy(self) -> tuple[float, float]:
        i0, i1 = _endpoint_index(self.lambdas)
        return self.accuracy[i0], self.accuracy[i1]

    @property
    def loss_barrier(self) -> float:
        return loss_barrier(self.lambdas, self.loss)[0]

    @property
    def loss_barrier_lambda(self) -> float:
        return loss_barrier(self.lambdas, self.loss)[1]

    @property
    def accuracy_barrier(self) -> float:
        return accuracy_barrier(self.lambdas, self.accuracy)[0]

    @property
    def accuracy_barrier_lambda(self) -> float:
        return accuracy_barrier(self.lambdas, self.accuracy)[1]

    def _mid(self) -> int:
        if 0.5 not in self.lambdas:
            raise LmcError("the lambda grid has no midpoint 0.5")
        return self.lambdas.index(0.5)

    @property
    def midpoint_loss(self) -> float:
        return self.loss[self._mid()]

    @property
    def midpoint_accuracy(self) -> float:
        return self.accuracy[self._mid()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self.loss),
            "accuracy": list(self.accuracy),
            "loss_barrier": self.loss_barrier,
            "loss_barrier_lambda": self.loss_barrier_lambda,
            "accuracy_barrier": self.accuracy_barrier,
            "accuracy_barrier_lambda": self.accuracy_barrier_lambda,
            "midpoint_loss": self.midpoint_loss,
            "midpoint_accuracy": self.midpoint_accuracy,
            "endpoint_loss": list(self.endpoint_loss),
            "endpoint_accuracy": list(self.endpoint_accuracy),
        }


PER_SPLIT_KEYS = (
    "loss",
    "accuracy",
    "loss_barrier",
    "loss_barrier_lambda",
    "accuracy_barrier",
    "accuracy_barrier_lambda",
    "midpoint_loss",
    "midpoint_accuracy",
    "endpoint_loss",
    "endpoint_accuracy",
)


@dataclass
class BarrierResult:
    """Curves along one linear path, per split.

    ``curves[split]`` is a :class:`SplitCurve`; ``bn_reset`` records what was
    done at the points of the curve: ``True`` (BN statistics recomputed), ``False``
    (nothing) or ``"repair"``.
    """

    lambdas: list[float]
    curves: dict[str, SplitCurve]
    bn_reset: bool | str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.curves)

    def __getitem__(self, split: str) -> SplitCurve:
        return self.curves[split]

    def to_dict(self, collapse: bool = False) -> dict[str, Any]:
        """JSON-ready dict.

        Per-split quantities are ``{split: value}`` mappings; with
        ``collapse=True`` and a single split they are the bare values.
        """
        per = {s: c.to_dict() for s, c in self.curves.items()}
        out: dict[str, Any] = {"lambdas": list(self.lambdas), "splits": self.splits, "bn_reset": self.bn_reset}
        for k in PER_SPLIT_KEYS:
            if collapse and len(per) == 1:
                out[k] = next(iter(per.values()))[k]
            else:
                out[k] = {s: d[k] for s, d in per.items()}
        out.update(self.info)
        return out


def check_model_fits(
    model: nn.Module, dataset, split: str, device: torch.device | str | None = None, where: str | None = None
) -> None:
    """Raise :class:`LmcError` when ``model`` cannot take ``dataset``'s images or has another number of classes.

    Probes the model (in eval mode, restored afterwards) on two images of ``split``. ``where`` (e.g. the
    checkpoint's path) is named in the message.
    """
    device = device or next(model.parameters()).device
    x, _ = dataset.tensors(split, device=device, limit=2)
    try:
        with torch.no_grad(), module_mode(model):
            out = model(x)
    except RuntimeError as e:
        shape = "x".join(str(int(s)) for s in x.shape[1:])
        of = f" of {where}" if where else ""
        raise LmcError(
            f"dataset {dataset.name} ({shape} images) does not fit the model{of} ({type(model).__name__}, "
            f"{getattr(model, 'lmckit_config', '')}): {str(e).splitlines()[0]}; "
            "the model expects other inputs",
            "pass the --dataset the models were trained on",
        ) from None
    dims = (2, 3) if hasattr(dataset, "context") else (2,)  # token datasets: (B, V, T) logits of a language model
    if out.dim() not in dims or out.shape[1] != dataset.num_classes:
        raise LmcError(
            f"the model outputs {tuple(out.shape[1:])} logits, "
            f"dataset {dataset.name} has {dataset.num_classes} classes",
            "pass the --dataset the models were trained on",
        )


def resolve_bn_mode(model: nn.Module, mode: str | bool) -> bool | str:
    """Map ``auto|on|off|repair`` to what is done: ``True``, ``False`` or ``"repair"``."""
    check_module(model)
    if mode is True or mode is False:
        mode = "on" if mode else "off"
    if mode not in BN_MODES:
        raise LmcError(f"unknown bn_reset mode {mode!r}", f"choose one of {', '.join(BN_MODES)}")
    has_bn = has_batchnorm(model)
    if mode == "auto":
        return has_bn
    if mode == "on":
        if not has_bn:
            raise LmcError(
                f"--bn-reset on: the model ({type(model).__name__}) has no BatchNorm layers to reset",
                "use --bn-reset auto or off",
            )
        return True
    if mode == "off":
        return False
    return "repair"


def barrier_curve(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    dataset,
    splits: Sequence[str] = ("test",),
    points: int = 25,
    bn_reset: str | bool = "auto",
    *,
    lambdas: Sequence[float] | None = None,
    batch_size: int = 2000,
    limit: int | None = None,
    device: torch.device | str | None = None,
    bn_batches: int = 10,
    bn_batch_size: int = 500,
    seed: int = 0,
    reset_endpoints: bool = True,
    progress: bool | str = True,
    names: tuple[str, str] = ("model A", "model B"),
) -> BarrierResult:
    """Evaluate loss and accuracy along ``(1 - l) sd_a + l sd_b``.

    Parameters
    ----------
    model:
        A module of the architecture. It is used as the single evaluation
        workspace (each point is ``load_state_dict``-ed into it) and restored
        to its original weights at the end.
    sd_a, sd_b:
        Endpoint state dicts; ``sd_b`` already aligned (permuted) to ``sd_a``.
    dataset:
        A :class:`lmckit.data.Dataset`; batches are read by index, never copied whole.
    splits:
        Splits to evaluate (e.g. ``("train", "test")``).
    points:
        Number of evenly spaced lambdas including 0 and 1 (0.5 is added when
        absent). Ignored when ``lambdas`` is given (which must contain 0, 1, 0.5).
    bn_reset:
        ``"auto"`` (reset BN statistics when the model has BatchNorm), ``"on"``,
        ``"off"``, or ``"repair"`` (REPAIR, Jordan et al. 2023; see
        :mod:`lmckit.lmc.bn`). REPAIR is applied at interior points only
        (at the ends its target is the model's own statistics).
    reset_endpoints:
        With BN reset on, also recompute the endpoints' statistics (default
        True), so every point of the curve has its statistics estimated the
        same way and a model interpolated with (a permuted copy of) itself
        gives an exactly flat curve. False evaluates the endpoints with their
        trained running statistics.
    batch_size:
        Evaluation batch size (large is faster on CPU).
    limit:
        Evaluate on the first ``limit`` items of each split only.
    bn_batches, bn_batch_size, seed:
        The fixed training batches used by BN reset / REPAIR.
    progress:
        Show progress (True), or a description string for the progress line.
    names:
        What to call the two endpoints in errors (default ``("model A", "model B")``).

    Returns
    -------
    BarrierResult

    Raises
    ------
    NonFiniteLoss
        (an :class:`LmcError`) naming the endpoint or lambda whose loss is NaN or inf.
    """
    check_module(model)
    device = next(model.parameters()).device if device is None else check_device(device)
    if limit is not None:
        limit = check_int(limit, "limit", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    if lambdas is not None:
        lambdas = [check_real(x, "lambdas") for x in lambdas]
    if isinstance(splits, str):
        splits = (splits,)
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise LmcError("no split to evaluate", "pass --split test, train or both")
    for s in splits:
        dataset.size(s)  # raises LmcError naming the available splits
    check_compatible([sd_a, sd_b], ["model A", "model B"])
    check_model_fits(model, dataset, splits[0], device)
    lams = lambda_grid(points) if lambdas is None else [float(x) for x in lambdas]
    _endpoint_index(lams)
    if 0.5 not in lams:
        raise LmcError("lambdas must contain 0.5 (the midpoint)")
    mode = resolve_bn_mode(model, bn_reset)

    # Copies: the caller may pass model.state_dict() of the very workspace model,
    # whose tensors load_state_dict overwrites.
    sa = {k: v.detach().to(device, copy=True) for k, v in sd_a.items()}
    sb = {k: v.detach().to(device, copy=True) for k, v in sd_b.items()}
    saved = copy_state(model.state_dict())
    home = next(model.parameters()).device
    model.to(device)
    values: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in splits}
    desc = progress if isinstance(progress, str) else "barrier"
    try:
        batches = None
        repairer = None
        if mode is not False and (reset_endpoints or any(0.0 < lam < 1.0 for lam in lams)):
            batches = training_batches(dataset, bn_batches, bn_batch_size, seed, device)
            if mode == "repair":
                repairer = Repairer(model, [sa, sb], batches)
        with Progress(len(lams), desc) if progress else NullProgress() as bar:
            for lam in lams:
                state = interpolate_states(sa, sb, lam)
                interior = 0.0 < lam < 1.0
                if interior and repairer is not None:
                    state = repairer(state, lam)
                model.load_state_dict(state)
                if mode is True and (interior or reset_endpoints):
                    reset_bn_stats(model, batches=batches)
                for s in splits:
                    loss, acc = evaluate(
                        model,
                        dataset,
                        s,
                        batch_size=batch_size,
                        device=device,
                        limit=limit,
                        where=point_name(lam, names),
                    )
                    values[s][0].append(loss)
                    values[s][1].append(acc)
                bar.update(1, lam=lam, loss=values[splits[0]][0][-1])
    finally:
        model.load_state_dict(saved)
        model.to(home)
    curves = {s: SplitCurve(s, list(lams), v[0], v[1]) for s, v in values.items()}
    return BarrierResult(list(lams), curves, mode)
