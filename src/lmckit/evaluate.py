"""Evaluation of a model on a dataset split: mean cross-entropy and accuracy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Dataset


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
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in dataset.batches(split, batch_size, device=device, limit=limit):
            out = model(x)
            # float32 batch sum, accumulated in float64 (the same rounding as the earlier Python-float sum)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    return float(loss_sum) / max(n, 1), int(correct) / max(n, 1)
