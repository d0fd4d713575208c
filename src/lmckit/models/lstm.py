"""LSTM classifier on image rows: an image ``(N, C, H, W)`` is a sequence of ``H`` steps of ``C*W`` features.

``nn.LSTM(C*W, hidden, layers, batch_first=True)``, the last step's output, an
optional norm, and a linear head (Fashion-MNIST: 28 steps of 28 pixels).

Permutation symmetry (``permutation_rules``): one group per layer (``lstm`` for
one layer, ``lstm.l0``, ``lstm.l1``, ... otherwise) moving the layer's hidden
units identically inside each of the four gate blocks (i, f, g, o) of
``weight_ih``, ``weight_hh`` and both biases (block axes), the columns of
``weight_hh``, the next layer's ``weight_ih`` columns, and for the last layer
the norm and the head's columns.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import check_norm, norm1d
from .registry import register_model


class LSTMClassifier(nn.Module):
    def __init__(
        self, in_features: int = 28, hidden: int = 128, layers: int = 1, num_classes: int = 10, norm: str = "none"
    ):
        super().__init__()
        check_norm(norm)
        self.hidden, self.layers = hidden, layers
        self.lstm = nn.LSTM(in_features, hidden, num_layers=layers, batch_first=True)
        self.norm = norm1d(norm, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.transpose(1, 2).flatten(2)  # (N, H, C*W): rows are time steps
        out, _ = self.lstm(seq)
        return self.head(self.norm(out[:, -1]))

    def permutation_rules(self, b) -> None:
        """Declare the permutation groups and the axes they move on ``b`` (a ``perm.SpecBuilder``)."""
        h = self.hidden
        prev = None
        for layer in range(self.layers):
            g = b.group("lstm" if self.layers == 1 else f"lstm.l{layer}", h)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                b.move_blocks(f"lstm.{kind}_l{layer}", 0, [(g, h, 1)] * 4)
            b.move(f"lstm.weight_hh_l{layer}", 1, g)
            b.ops(g, "LSTM:lstm")  # gates are elementwise nonlinear: permutations only (lmckit.perm.symmetry)
            if prev is not None:
                b.move(f"lstm.weight_ih_l{layer}", 1, prev)
            prev = g
        b.out_axis("norm", prev)
        b.in_axis("head", prev)


@register_model(
    "lstm", "LSTM on image rows (28 steps of 28 pixels), hidden 128, 1 layer (options width, depth, width_mult, norm)"
)
def lstm(
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    width_mult: float = 1.0,
    width: int = 128,
    depth: int = 1,
    norm: str = "none",
) -> LSTMClassifier:
    hidden = max(1, int(round(width * width_mult)))
    return LSTMClassifier(in_channels * image_size, hidden, max(1, depth), num_classes, norm)


@register_model("lstm_tiny", "LSTM with 2 layers of 6 hidden units, for tests", tiny=True)
def lstm_tiny(
    in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width_mult: float = 1.0, norm: str = "none"
) -> LSTMClassifier:
    return lstm(in_channels, image_size, num_classes, width_mult, width=6, depth=2, norm=norm)
