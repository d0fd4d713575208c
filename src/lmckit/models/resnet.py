"""CIFAR-style ResNet-20/32/44 (He et al. 2016, option B shortcuts with norm).

Stage ``s`` has ``n`` basic blocks of ``16 * 2**s * width_mult`` channels.
Permutation groups: one residual stream per stage (``S0``, ``S1``, ``S2``:
the stem, every block output and every shortcut of that stage share it) and
one inner group per block (``B{s}.{b}``: conv1's output channels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import check_norm, norm2d, scaled
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.bn1 = norm2d(norm, cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.bn2 = norm2d(norm, cout)
        self.act2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=norm == "none"), norm2d(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        norm: str = "batchnorm",
        blocks_per_stage: int | None = None,
    ):
        super().__init__()
        check_norm(norm)
        n = blocks_per_stage if blocks_per_stage is not None else (depth - 2) // 6
        widths = [scaled(16, width_mult), scaled(32, width_mult), scaled(64, width_mult)]
        self.widths, self.n = widths, n
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=norm == "none")
        self.bn1 = norm2d(norm, widths[0])
        self.act1 = nn.ReLU()
        cin = widths[0]
        stages = []
        for s, w in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (s > 0 and b == 0) else 1, norm))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def hidden_modules(self) -> dict[str, list[nn.Module]]:
        sites: dict[str, list[nn.Module]] = {"S0": [self.act1]}
        for s, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for b, block in enumerate(layer):
                sites.setdefault(f"S{s}", []).append(block.act2)
                sites[f"B{s}.{b}"] = [block.act1]
        return sites

    def permutation_rules(self, b) -> None:
        """Declare the permutation groups and the axes they move on ``b`` (a ``perm.SpecBuilder``)."""
        s0 = b.group("S0", self.widths[0])
        b.out_axis("conv1", s0)
        b.out_axis("bn1", s0)
        prev = s0
        for s, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            stream = b.group(f"S{s}", self.widths[s])
            for i, block in enumerate(layer):
                p = f"layer{s + 1}.{i}"
                inner = b.group(f"B{s}.{i}", block.conv1.out_channels)
                b.out_axis(f"{p}.conv1", inner)
                b.out_axis(f"{p}.bn1", inner)
                b.in_axis(f"{p}.conv1", prev)
                b.in_axis(f"{p}.conv2", inner)
                b.out_axis(f"{p}.conv2", stream)
                b.out_axis(f"{p}.bn2", stream)
                if len(block.shortcut):
                    b.in_axis(f"{p}.shortcut.0", prev)
                    b.out_axis(f"{p}.shortcut.0", stream)
                    b.out_axis(f"{p}.shortcut.1", stream)
                prev = stream
        b.in_axis("head", prev)


def _resnet(depth: int, n: int | None = None):
    def make(
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width_mult: float = 1.0,
        norm: str = "batchnorm",
    ):
        return ResNet(depth, in_channels, num_classes, width_mult, norm, n)

    return make


for _d in (20, 32, 44):
    register_model(f"resnet{_d}", f"ResNet-{_d} (CIFAR-style, norm on shortcuts; width_mult, norm)")(_resnet(_d))
register_model("resnet_tiny", "ResNet with 1 block per stage and width 1/4, for tests", tiny=True)(
    lambda in_channels=3, image_size=32, num_classes=10, width_mult=0.25, norm="batchnorm": ResNet(
        8, in_channels, num_classes, width_mult, norm, 1
    )
)
