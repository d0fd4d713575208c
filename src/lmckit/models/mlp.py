"""Multi-layer perceptron: ``fc0 .. fc{depth}`` with optional norms ``norm0 ..``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LmcError
from .layers import ACTIVATIONS, check_norm, norm1d
from .registry import register_model


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units: Linear -> norm -> activation.

    Takes image batches ``(N, C, H, W)`` and flattens them itself.
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        depth: int = 3,
        width: int = 512,
        activation: str = "relu",
        norm: str = "none",
    ):
        super().__init__()
        check_norm(norm)
        if activation not in ACTIVATIONS:
            raise LmcError(f"unknown activation {activation!r}", f"choose one of {', '.join(ACTIVATIONS)}")
        self.depth, self.width, self.norm = depth, width, norm
        dims = [in_features] + [width] * depth + [num_classes]
        for i in range(depth + 1):
            setattr(self, f"fc{i}", nn.Linear(dims[i], dims[i + 1]))
            if i < depth:
                setattr(self, f"norm{i}", norm1d(norm, width))
                setattr(self, f"act{i}", ACTIVATIONS[activation]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(self.depth):
            x = getattr(self, f"act{i}")(getattr(self, f"norm{i}")(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.depth}")(x)

    def hidden_modules(self) -> dict[str, nn.Module]:
        """Module whose output is each group's activation (used by activation matching)."""
        return {f"P{i}": getattr(self, f"act{i}") for i in range(self.depth)}

    def permutation_rules(self, b) -> None:
        """Declare the permutation groups and the axes they move on ``b`` (a ``perm.SpecBuilder``)."""
        for i in range(self.depth):
            g = b.group(f"P{i}", self.width)
            b.out_axis(f"fc{i}", g)
            b.out_axis(f"norm{i}", g)
            b.in_axis(f"fc{i + 1}", g)


def _mlp(depth, width, **kw):
    def make(
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width_mult: float = 1.0,
        activation: str = "relu",
        norm: str = "none",
        depth: int = depth,
        width: int = width,
    ):
        w = max(1, int(round(width * width_mult)))
        return MLP(in_channels * image_size * image_size, num_classes, depth, w, activation, norm)

    return make


register_model("mlp", "MLP 784-512-512-512-10 (depth 3, width 512; options depth, width, width_mult, norm)")(
    _mlp(3, 512)
)
register_model("mlp_tiny", "MLP with 2 hidden layers of 16 units, for tests", tiny=True)(_mlp(2, 16))
