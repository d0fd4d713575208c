"""Small building blocks shared by the zoo models."""

from __future__ import annotations

import torch.nn as nn

from ..errors import LmcError

NORMS = ("none", "batchnorm", "layernorm")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise LmcError(f"unknown norm {norm!r}", f"choose one of {', '.join(NORMS)}")
    return norm


def norm1d(norm: str, width: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm1d(width)
    if norm == "layernorm":
        return nn.LayerNorm(width)
    return nn.Identity()


def norm2d(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, or for "layernorm" GroupNorm(1, C): normalises over (C, H, W)
    with a per-channel affine, the usual channel-permutation-equivariant LayerNorm
    for conv nets."""
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def scaled(base: int, mult: float) -> int:
    return max(1, int(round(base * mult)))
