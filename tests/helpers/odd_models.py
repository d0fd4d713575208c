"""Hand-written models that are NOT in the zoo, for testing fx-traced permutation specs.

Each entry of :data:`ODD_MODELS` gives a factory, an example input shape
``(N, C, H, W)`` and what tracing must do with it:

- ``expect="ok"``: every hidden stream is permutable, no warning; ``groups``
  is the planted number of permutation groups (hand-counted below).
- ``expect="warn"``: some streams cannot be permuted; tracing must warn naming
  them and the spec must still preserve the function.
- ``expect="error"``: the model uses an op the tracer cannot see through on a
  stream it must not guess about; tracing raises ``LmcError`` or warns.

Other helpers import this file: keep the names stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualMLP(nn.Module):
    """``h = relu(fc_in(x))``, then blocks ``h = h + fc2(relu(fc1(h)))``, then ``head``.

    Groups: one residual stream (fc_in + every block's fc2) and one per block (fc1).
    """

    def __init__(self, in_features: int = 64, width: int = 12, hidden: int = 10, blocks: int = 2, num_classes: int = 5):
        super().__init__()
        self.fc_in = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(
                nn.ModuleDict({"fc1": nn.Linear(width, hidden), "act": nn.ReLU(), "fc2": nn.Linear(hidden, width)})
            )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_in(x.flatten(1)))
        for blk in self.blocks:
            h = h + blk["fc2"](blk["act"](blk["fc1"](h)))
        return self.head(h)


class SkipCNN(nn.Module):
    """Stem conv-BN-ReLU, one block with a 1x1 projection shortcut, global pool, linear head.

    Groups: stem (3 ch -> 6), block inner (conv1 -> 5), block stream (conv2 + proj -> 8).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.proj = nn.Sequential(nn.Conv2d(6, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + self.proj(x))
        return self.head(self.pool(out).flatten(1))


class LayerNormMLP(nn.Module):
    """Linear -> LayerNorm -> ReLU, twice, then a head. Groups: fc1, fc2."""

    def __init__(self, in_features: int = 64, width: int = 10, num_classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.ln1 = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width + 2)
        self.ln2 = nn.LayerNorm(width + 2)
        self.head = nn.Linear(width + 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.ln1(self.fc1(x)))
        x = F.relu(self.ln2(self.fc2(x)))
        return self.head(x)


class FunctionalNet(nn.Module):
    """Convs with functional ``F.relu``, ``F.max_pool2d``, ``torch.flatten`` after a global pool.

    Groups: conv1 (4), conv2 (6), fc1 (7).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class GELUMLP(nn.Module):
    """GELU, SiLU, Dropout, scalar multiplication and sigmoid gating by a constant.

    Groups: fc1 (9), fc2 (11).
    """

    def __init__(self, in_features: int = 64, num_classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 9)
        self.act1 = nn.GELU()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(9, 11)
        self.act2 = nn.SiLU()
        self.head = nn.Linear(11, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.drop(self.act1(self.fc1(x))) * 0.5
        x = 2.0 * self.act2(self.fc2(x)) + 0.1
        x = torch.sigmoid(x) - 0.5
        return self.head(x)


class FlattenSpatialCNN(nn.Module):
    """A conv whose 2x2 feature map is flattened into a Linear: flatten merges channels and space.

    The Linear's input axis has C*H*W entries, moved in blocks of H*W by the
    conv's permutation (a block axis). Permutable groups: conv (4), fc1 (7).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.fc1 = nn.Linear(4 * 2 * 2, 7)
        self.fc2 = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels (DenseNet/Inception style).

    The concatenation's units are the union of both branches: fc_out's input axis
    is moved block-wise by a (4) and b (5). Permutable: a, b, fc_out (6).
    """

    def __init__(self, in_features: int = 64, num_classes: int = 3):
        super().__init__()
        self.a = nn.Linear(in_features, 4)
        self.b = nn.Linear(in_features, 5)
        self.fc_out = nn.Linear(9, 6)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.head(F.relu(self.fc_out(h)))


class GroupNormNet(nn.Module):
    """GroupNorm(1, C) (permutable) on one conv and GroupNorm(2, 4) (not permutable) on another.

    Permutable groups: conv1 (6). conv2's stream must be refused with a warning.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class UnsupportedOpNet(nn.Module):
    """Uses ``torch.cumsum`` over the channel axis: not elementwise, mixes units in order.

    Tracing must refuse to guess: raise ``LmcError`` or warn and leave fc1's
    stream unpermuted, naming the op.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 8)
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = torch.cumsum(x, dim=1)
        return self.head(F.relu(self.fc2(x)))


@dataclass(frozen=True)
class OddModel:
    """One test model: ``factory()`` builds it, ``input_shape`` is an example batch shape."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    expect: str  # "ok" | "warn" | "error"
    groups: int | None = None  # planted number of permutable groups (None: not pinned)
    units: int | None = None  # planted total number of permuted units

    def example_input(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(seed))


ODD_MODELS: dict[str, OddModel] = {
    m.name: m
    for m in [
        OddModel("residual_mlp", ResidualMLP, (8, 1, 8, 8), "ok", groups=3, units=12 + 10 + 10),
        OddModel("skip_cnn", SkipCNN, (8, 3, 8, 8), "ok", groups=3, units=6 + 5 + 8),
        OddModel("layernorm_mlp", LayerNormMLP, (8, 1, 8, 8), "ok", groups=2, units=10 + 12),
        OddModel("functional_net", FunctionalNet, (8, 1, 8, 8), "ok", groups=3, units=4 + 6 + 7),
        OddModel("gelu_mlp", GELUMLP, (8, 1, 8, 8), "ok", groups=2, units=9 + 11),
        OddModel("flatten_spatial_cnn", FlattenSpatialCNN, (8, 1, 8, 8), "ok", groups=2, units=4 + 7),
        OddModel("concat_net", ConcatNet, (8, 1, 8, 8), "ok", groups=3, units=4 + 5 + 6),
        OddModel("groupnorm_net", GroupNormNet, (8, 1, 8, 8), "warn", groups=1, units=6),
        OddModel("unsupported_op", UnsupportedOpNet, (8, 1, 8, 8), "error"),
    ]
}

__all__ = [
    "ODD_MODELS",
    "OddModel",
    "ResidualMLP",
    "SkipCNN",
    "LayerNormMLP",
    "FunctionalNet",
    "GELUMLP",
    "FlattenSpatialCNN",
    "ConcatNet",
    "GroupNormNet",
    "UnsupportedOpNet",
]
