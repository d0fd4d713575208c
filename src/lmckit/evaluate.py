"""Evaluation of a model on a dataset split (mean cross-entropy and accuracy), and the BatchNorm
statistics reset that evaluation of a merged or interpolated network needs (Jordan et al. 2023,
"RESET"; see :mod:`lmckit.lmc.bn`). Both sit below matching, which scores candidates with them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .checks import check_device
from .data import Dataset
from .errors import LmcError


@contextlib.contextmanager
def module_mode(*models: nn.Module, train: bool = False) -> Iterator[None]:
    """Put ``models`` in eval mode (``train=True``: train mode) for the ``with`` block, then restore
    every submodule's own mode.

    The one save-and-restore of train/eval modes (evaluation, BN reset, REPAIR statistics, activation
    statistics, projections, the Taylor estimate): modes come back even when the block raises, and
    per submodule, so a model whose BatchNorm layers alone were in train mode is left that way.
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train)
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    split: str = "test",
    *,
    batch_size: int = 2000,
    device: torch.device | str | None = None,
    limit: int | None = None,
    where: str | None = None,
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` (in eval mode) on ``split``.

    Per target: per image for classifiers; per token for language models (logits ``(B, V, T)``, targets
    ``(B, T)``), the loss then in nats per token (perplexity ``exp(loss)``) and the accuracy of the
    next-token prediction.

    A non-finite mean loss (NaN or inf: weights so large that the logits overflow float32, or a
    diverged model) raises :class:`NonFiniteLoss` naming ``where`` (which model, which lambda or grid
    point) and the split: every barrier, landscape, merge, rank and study evaluation goes through here,
    so a NaN never reaches a table, a JSON record or a report as if it were a number.

    The model's train/eval mode is restored afterwards. Batches are gathered
    from the split held on the device (:meth:`Dataset.on_device`); the sums
    stay on the device (float64 loss, int64 count) and are read once at the
    end, so there is no per-batch host synchronisation.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with module_mode(model):
        for x, y in dataset.batches(split, batch_size, device=device, limit=limit):
            out = model(x)
            # float32 batch sum, accumulated in float64 (the same rounding as the earlier Python-float sum)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += int(y.numel())  # one target per image, or per token ((B, T) targets of a language model)
    loss = float(loss_sum) / max(n, 1)
    require_finite_loss(loss, where or "the model", split)
    return loss, int(correct) / max(n, 1)


class NonFiniteLoss(LmcError):
    """A loss that is NaN or infinite: the CLI exits 2 naming the model (and lambda); no NaN is printed."""


def require_finite_loss(loss: float, where: str, split: str = "") -> float:
    """Return ``loss``; raise :class:`NonFiniteLoss` naming ``where`` and ``split`` when it is NaN or inf."""
    if loss - loss != 0.0:
        on = f" on the {split} split" if split else ""
        raise NonFiniteLoss(
            f"{where}: the mean loss{on} is {loss} (not a finite number)",
            "the weights are so large that the logits overflow float32 (or the model diverged); "
            "check the checkpoint (lmckit check-spec) or use another one",
        )
    return loss


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (1d/2d/3d, SyncBatchNorm) that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics (what a BN reset recomputes).

    The one test for "is this a BatchNorm model" (BN reset, REPAIR, rank sweeps, merging).
    """
    return bool(batchnorm_layers(model))


def training_batches(
    dataset,
    num_batches: int = 10,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str = "cpu",
    split: str = "train",
) -> list[torch.Tensor]:
    """A fixed, seeded list of ``num_batches`` normalised input batches from ``split``.

    The same seed gives the same images, so every point of a curve (and both
    endpoints for REPAIR) sees the same data. Labels are not needed.
    """
    device = check_device(device)
    if num_batches < 1 or batch_size < 1:
        raise LmcError(
            f"BN reset / REPAIR needs num_batches >= 1 and batch_size >= 1 (got {num_batches}, {batch_size})"
        )
    gen = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    for x, _ in dataset.batches(split, batch_size, shuffle=True, generator=gen, device=device):
        out.append(x)
        if len(out) >= num_batches:
            break
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter of ``model`` (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module,
    dataset=None,
    *,
    num_batches: int = 10,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
    batches: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics of ``model`` in place.

    Parameters
    ----------
    model:
        The network (its BN buffers are overwritten; nothing else changes).
    dataset:
        A :class:`lmckit.data.Dataset`; ``num_batches`` seeded training batches
        of ``batch_size`` are drawn from it (see :func:`training_batches`).
        Not needed when ``batches`` is given.
    batches:
        Pre-drawn input batches (reuse them across the points of a curve).

    Notes
    -----
    Only the BN layers are put in train mode; every other module stays in
    eval mode (no dropout noise). Momentum and train/eval modes are restored
    afterwards. A model without BatchNorm is returned unchanged.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return model
    if batches is None:
        if dataset is None:
            raise LmcError("reset_bn_stats needs a dataset or pre-drawn batches")
        batches = training_batches(dataset, num_batches, batch_size, seed, device or model_device(model))
    momenta = [bn.momentum for bn in bns]
    try:
        with module_mode(model):
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for x in batches:
                model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
    return model
