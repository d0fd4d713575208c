"""Vision transformer (ViT) for small images: patch embedding, class token, pre-norm blocks.

``image_size / patch_size`` squared patch tokens plus a class token (Fashion-MNIST:
28 x 28 in patches of 7 x 7 -> 16 tokens + 1), a learned positional table, ``depth``
pre-norm blocks ``x + attn(ln1(x))``, ``x + mlp(ln2(x))`` with ``nn.MultiheadAttention``,
a final norm on the class token and a linear head. ``norm`` picks the norm:
``"layernorm"`` (the default: a pre-LN ViT), ``"batchnorm"`` (over the tokens), or
``"none"`` (no norm at all: ``ln1``, ``ln2`` and the final norm are identities, so the
blocks are ``x + attn(x)``, ``x + mlp(x)``; the ``vit-fmnist`` recipe trains this one).

Permutation symmetry (``permutation_rules``): the residual stream ``patch`` (patch
conv output channels, class token, positional table, every norm, ``out_proj`` and
``fc2`` rows, ``in_proj``/``fc1``/head columns); per block the MLP hidden units
``blocks.i.fc1`` and the attention's head-structured groups ``blocks.i.attn.qk``
(rows 0..2E of ``in_proj``: Q and K share it) and ``blocks.i.attn.vo`` (V rows
and ``out_proj`` columns) with one head permutation shared by both
(``spec.heads["blocks.i.attn"]``).

The rules also record the ops each group passes through (``spec.ops``, for
:mod:`lmckit.perm.symmetry`): the stream the norms (if any), the attention and
Linear readers and the residual additions; the MLP hidden units the GELU; the
head groups the attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LmcError
from .layers import check_norm
from .registry import register_model


class _TokenNorm(nn.Module):
    """Norm over the feature axis of ``(N, T, E)`` tokens: LayerNorm, BatchNorm1d over tokens, or nothing."""

    def __init__(self, norm: str, dim: int, tokens: bool = True):
        super().__init__()
        self.kind = norm
        self.tokens = tokens
        self.norm = (
            nn.LayerNorm(dim) if norm == "layernorm" else nn.BatchNorm1d(dim) if norm == "batchnorm" else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "batchnorm" and self.tokens:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, norm: str):
        super().__init__()
        self.ln1 = _TokenNorm(norm, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = _TokenNorm(norm, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Pre-norm vision transformer (pre-LN with ``norm="layernorm"``, no norm with ``"none"``); see the module."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        norm: str = "layernorm",
    ):
        super().__init__()
        check_norm(norm)
        if image_size % patch_size:
            raise LmcError(
                f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}",
                "choose a patch_size that divides the image size",
            )
        if dim % heads:
            raise LmcError(f"vit: width {dim} is not a multiple of heads {heads}", "change width, width_mult or heads")
        self.dim, self.depth, self.heads, self.norm_kind = dim, depth, heads, norm
        self.hidden = max(1, int(round(dim * mlp_ratio)))
        n_tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, self.hidden, norm) for _ in range(depth))
        self.norm = _TokenNorm(norm, dim, tokens=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t[:, 0]))

    def permutation_rules(self, b) -> None:
        """Declare the permutation groups and the axes they move on ``b`` (a ``perm.SpecBuilder``)."""
        E = self.dim
        s = b.group("patch", E)
        b.out_axis("patch", s)
        b.move("cls", 2, s)
        b.move("pos", 2, s)
        for i in range(self.depth):
            p = f"blocks.{i}"
            qk = b.group(f"{p}.attn.qk", E)
            vo = b.group(f"{p}.attn.vo", E)
            h = b.group(f"{p}.fc1", self.hidden)
            for ln in ("ln1", "ln2"):
                b.out_axis(f"{p}.{ln}.norm", s)
            b.move_blocks(f"{p}.attn.in_proj_weight", 0, [(qk, E, 1), (qk, E, 1), (vo, E, 1)])
            b.move_blocks(f"{p}.attn.in_proj_bias", 0, [(qk, E, 1), (qk, E, 1), (vo, E, 1)])
            b.move(f"{p}.attn.in_proj_weight", 1, s)
            b.move(f"{p}.attn.out_proj.weight", 1, vo)
            b.out_axis(f"{p}.attn.out_proj", s)
            b.head_structure(f"{p}.attn", self.heads, [qk, vo])
            b.out_axis(f"{p}.fc1", h)
            b.in_axis(f"{p}.fc1", s)
            b.in_axis(f"{p}.fc2", h)
            b.out_axis(f"{p}.fc2", s)
        b.out_axis("norm.norm", s)
        b.in_axis("head", s)
        norm_kind = {"layernorm": "LayerNorm", "batchnorm": "BatchNorm1d"}.get(self.norm_kind)
        stream_ops = ["Conv2d:patch", "flatten", "transpose", "cat", "add", "getitem", "Linear:head"]
        for i in range(self.depth):
            p = f"blocks.{i}"
            stream_ops += [f"MultiheadAttention:{p}.attn", f"Linear:{p}.fc1"]
            if norm_kind:
                stream_ops += [f"{norm_kind}:{p}.ln1.norm", f"{norm_kind}:{p}.ln2.norm"]
            b.ops(f"{p}.fc1", f"GELU:{p}.act")
            b.ops(f"{p}.attn.qk", f"MultiheadAttention:{p}.attn")
            b.ops(f"{p}.attn.vo", f"MultiheadAttention:{p}.attn")
        if norm_kind:
            stream_ops.append(f"{norm_kind}:norm.norm")
        b.ops(s, *stream_ops)


@register_model(
    "vit",
    "ViT: 7x7 patches (16 tokens + class token), pre-norm (LayerNorm unless norm is given), width 64, "
    "depth 4, 4 heads, MLP ratio 2 "
    "(options width, depth, heads, mlp_ratio, patch_size, width_mult, norm)",
)
def vit(
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    width_mult: float = 1.0,
    width: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    patch_size: int | None = None,
    norm: str = "layernorm",
) -> ViT:
    patch = patch_size if patch_size is not None else max(1, image_size // 4)
    dim = max(heads, int(round(width * width_mult / heads)) * heads)
    return ViT(in_channels, image_size, num_classes, patch, dim, depth, heads, mlp_ratio, norm)


@register_model("vit_tiny", "ViT with width 8, depth 1, 2 heads, for tests", tiny=True)
def vit_tiny(
    in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width_mult: float = 1.0, norm: str = "layernorm"
) -> ViT:
    return vit(in_channels, image_size, num_classes, width_mult, width=8, depth=1, heads=2, norm=norm)
