"""Evaluation of a model on a dataset split: mean cross-entropy and accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Dataset


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
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` (in eval mode) on ``split``.

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
            n += int(y.shape[0])
    return float(loss_sum) / max(n, 1), int(correct) / max(n, 1)
