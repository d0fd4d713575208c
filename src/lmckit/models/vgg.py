"""CIFAR-style VGG: 3x3 convs (+ norm + ReLU), max-pools, one linear head.

Pools use ``ceil_mode=True`` so 28- and 32-pixel inputs both end at 1x1 after
five pools (28 -> 14 -> 7 -> 4 -> 2 -> 1); a global average pool (a no-op at
1x1, needed for the shallower tiny variant) feeds the linear head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import check_norm, norm2d, scaled
from .registry import register_model

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg_tiny": [4, "M", 8, "M", 8, "M"],
}


class VGG(nn.Module):
    def __init__(
        self,
        cfg: list,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        norm: str = "batchnorm",
        image_size: int = 32,
    ):
        super().__init__()
        del image_size  # any input size works (global pool before the head)
        check_norm(norm)
        self.norm = norm
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.pool_after: list[bool] = []
        c = in_channels
        for item in cfg:
            if item == "M":
                self.pool_after[-1] = True
                continue
            out = scaled(item, width_mult)
            self.convs.append(nn.Conv2d(c, out, 3, padding=1))
            self.norms.append(norm2d(norm, out))
            self.acts.append(nn.ReLU())
            self.pool_after.append(False)
            c = out
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm, act, pool in zip(self.convs, self.norms, self.acts, self.pool_after):
            x = act(norm(conv(x)))
            if pool:
                x = self.pool(x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    def hidden_modules(self) -> dict[str, nn.Module]:
        return {f"P{i}": a for i, a in enumerate(self.acts)}

    def permutation_rules(self, b) -> None:
        """Declare the permutation groups and the axes they move on ``b`` (a ``perm.SpecBuilder``)."""
        n = len(self.convs)
        for i in range(n):
            g = b.group(f"P{i}", self.convs[i].out_channels)
            b.out_axis(f"convs.{i}", g)
            b.out_axis(f"norms.{i}", g)
            if i + 1 < n:
                b.in_axis(f"convs.{i + 1}", g)
        b.in_axis("head", f"P{n - 1}")


def _vgg(name: str):
    def make(
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width_mult: float = 1.0,
        norm: str = "batchnorm",
    ):
        return VGG(CFGS[name], in_channels, num_classes, width_mult, norm, image_size)

    return make


for _n in ("vgg11", "vgg13", "vgg16"):
    register_model(_n, f"{_n.upper()} (CIFAR-style, one linear head; width_mult, norm)")(_vgg(_n))
register_model("vgg_tiny", "3-conv VGG with 4-8 channels, for tests", tiny=True)(_vgg("vgg_tiny"))
