"""Evaluation of a model on a dataset split: mean cross-entropy and accuracy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Dataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, split: str = "test", *, batch_size: int = 2000,
             device: torch.device | str | None = None, limit: int | None = None) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` (in eval mode) on ``split``.

    The model's train/eval mode is restored afterwards. The dataset is read
    batch by batch; nothing is copied whole.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    try:
        for x, y in dataset.batches(split, batch_size, device=device, limit=limit):
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)
