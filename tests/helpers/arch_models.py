"""Hand-written models for the architecture patterns of issue 11 (attention, embeddings, recurrent layers,
block permutations), each small enough for a check in milliseconds.

:data:`ARCH_MODELS` maps a pattern name to ``(factory, example_input_factory, expect)`` where ``expect``
lists facts the traced spec must show (``heads``: number of head structures; ``pinned``: keys whose
axes must stay unpermuted, i.e. what legitimately remains pinned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreLNBlock(nn.Module):
    """Pre-LN transformer on tokens: Linear embed, ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``, mean-pool head."""

    def __init__(
        self,
        d_in: int = 6,
        dim: int = 8,
        heads: int = 2,
        batch_first: bool = True,
        bias: bool = True,
        num_classes: int = 3,
    ):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(d_in, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        y = self.ln1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class HandAttention(nn.Module):
    """Hand-written attention: fused ``qkv`` Linear, ``split``, ``view``/``transpose`` into heads, SDPA."""

    def __init__(self, d_in: int = 6, dim: int = 8, heads: int = 2, num_classes: int = 3, fused: bool = True):
        super().__init__()
        self.h = heads
        self.fused = fused
        self.embed = nn.Linear(d_in, dim)
        self.ln = nn.LayerNorm(dim)
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.embed(x)
        y = self.ln(h)
        if self.fused:
            q, k, v = self.qkv(y).split(y.shape[-1], dim=-1)
        else:
            q, k, v = self.q(y), self.k(y), self.v(y)
        q = q.view(B, T, self.h, -1).transpose(1, 2)
        k = k.view(B, T, self.h, -1).transpose(1, 2)
        v = v.view(B, T, self.h, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(B, T, -1)
        h = h + self.proj(o)
        return self.head(h.mean(1))


class TokenNet(nn.Module):
    """``nn.Embedding`` + learned positional table + class token concatenated on the token axis; tied output."""

    def __init__(self, vocab: int = 11, dim: int = 8, length: int = 5):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 12)
        self.fc2 = nn.Linear(12, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.fc2(torch.relu(self.fc1(self.ln(h))))
        return F.linear(h[:, 0], self.tok.weight)  # tied input/output embedding


class LSTMNet(nn.Module):
    """``Linear -> nn.LSTM (or GRU) -> Linear`` on a sequence."""

    def __init__(
        self,
        d_in: int = 5,
        hidden: int = 7,
        layers: int = 2,
        batch_first: bool = True,
        bias: bool = True,
        cell: str = "lstm",
        num_classes: int = 3,
    ):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(d_in, 6)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(6, hidden, num_layers=layers, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        h = torch.tanh(self.inp(x))
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.rnn(h)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class _OptionABlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            sc = x
        return F.relu(out + sc)


class OptionAResNet(nn.Module):
    """CIFAR ResNet with the option-A shortcut (stride slice + zero channels by ``F.pad``), 2 stages."""

    def __init__(self, width: int = 4, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.b1 = _OptionABlock(width, width, 1)
        self.b2 = _OptionABlock(width, 2 * width, 2)
        self.b3 = _OptionABlock(2 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGGFlatten(nn.Module):
    """torchvision-VGG layout: convs, ``AdaptiveAvgPool2d((3, 3))``, ``flatten`` into a Linear classifier."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU()
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Linear(6 * 9, 10), nn.ReLU(), nn.Linear(10, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class CatNet(nn.Module):
    """UNet / DenseNet skip: ``torch.cat`` of two conv streams along channels, then a conv and a head."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x))
        b = F.relu(self.b(a))
        h = F.relu(self.bn(torch.cat([a, b], dim=1)))
        h = F.relu(self.c(h))
        return self.fc(h.mean((2, 3)))


@dataclass
class ArchCase:
    name: str
    factory: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    heads: int = 0
    #: ``"key@axis"``: axes the traced spec must permute (all of them were pinned by lmckit 0.1, except for
    #: the token model, whose table and stream 0.1 already permuted)
    permuted: list[str] = field(default_factory=list)


def _tokens() -> torch.Tensor:
    return torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


ARCH_CASES: dict[str, ArchCase] = {
    c.name: c
    for c in [
        ArchCase(
            "mha_batch_first",
            lambda: PreLNBlock(batch_first=True),
            _tokens,
            heads=1,
            permuted=[
                "embed.weight@0",
                "ln1.weight@0",
                "attn.in_proj_weight@0",
                "attn.in_proj_weight@1",
                "attn.out_proj.weight@0",
                "attn.out_proj.weight@1",
            ],
        ),
        ArchCase(
            "mha_seq_first_nobias",
            lambda: PreLNBlock(batch_first=False, bias=False),
            _tokens,
            heads=1,
            permuted=["embed.weight@0", "attn.in_proj_weight@0", "attn.out_proj.weight@1"],
        ),
        ArchCase(
            "tokens_pos_cls_tied",
            TokenNet,
            lambda: torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0)),
            permuted=["tok.weight@1", "pos@2", "cls@2", "ln.weight@0", "fc2.weight@0"],
        ),
        ArchCase(
            "lstm_2layer",
            LSTMNet,
            lambda: torch.randn(4, 5, 5),
            permuted=[
                "inp.weight@0",
                "rnn.weight_ih_l0@0",
                "rnn.weight_hh_l0@1",
                "rnn.weight_ih_l1@1",
                "rnn.bias_hh_l1@0",
            ],
        ),
        ArchCase(
            "lstm_seq_first_nobias",
            lambda: LSTMNet(layers=1, batch_first=False, bias=False),
            lambda: torch.randn(4, 5, 5),
            permuted=["rnn.weight_ih_l0@0", "rnn.weight_hh_l0@0"],
        ),
        ArchCase(
            "gru_2layer",
            lambda: LSTMNet(cell="gru"),
            lambda: torch.randn(4, 5, 5),
            permuted=["rnn.weight_ih_l0@0", "rnn.weight_hh_l1@1"],
        ),
        ArchCase(
            "resnet_option_a",
            OptionAResNet,
            _images,
            permuted=["conv.weight@0", "bn.weight@0", "b2.conv2.weight@0", "b3.bn2.weight@0", "fc.weight@1"],
        ),
        ArchCase("vgg_pool_flatten", VGGFlatten, _images, permuted=["features.3.weight@0", "classifier.0.weight@1"]),
        ArchCase("cat_skip", CatNet, _images, permuted=["a.weight@0", "b.weight@0", "bn.weight@0", "c.weight@1"]),
    ]
}

ARCH_CASES["hand_attention_fused"] = ArchCase(
    "hand_attention_fused", HandAttention, _tokens, heads=1, permuted=["qkv.weight@0", "proj.weight@1"]
)
ARCH_CASES["hand_attention_separate"] = ArchCase(
    "hand_attention_separate",
    lambda: HandAttention(fused=False),
    _tokens,
    heads=1,
    permuted=["q.weight@0", "k.weight@0", "v.weight@0", "proj.weight@1"],
)


class MatmulAttention(nn.Module):
    """GPT-style attention written out: fused ``qkv``, ``chunk``, ``reshape`` + ``permute`` into heads,
    ``q @ k.transpose(-2, -1) * scale``, a causal mask buffer, ``softmax``, ``@ v``, ``permute`` back."""

    def __init__(self, d_in: int = 6, dim: int = 12, heads: int = 3, length: int = 5, num_classes: int = 3):
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(d_in, dim)
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(length, length)).view(1, 1, length, length))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.embed(x)
        q, k, v = self.qkv(self.ln(h)).chunk(3, dim=-1)
        q = q.reshape(B, T, self.h, -1).permute(0, 2, 1, 3)
        k = k.reshape(B, T, self.h, -1).permute(0, 2, 1, 3)
        v = v.reshape(B, T, self.h, -1).permute(0, 2, 1, 3)
        att = (q @ k.transpose(-2, -1)) * (1.0 / 2.0)
        att = att.masked_fill(self.mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        o = (att @ v).permute(0, 2, 1, 3).reshape(B, T, -1)
        h = h + self.proj(o)
        return self.head(h[:, -1])


ARCH_CASES["matmul_attention_causal"] = ArchCase(
    "matmul_attention_causal",
    MatmulAttention,
    _tokens,
    heads=1,
    permuted=["qkv.weight@0", "proj.weight@1", "ln.weight@0"],
)


class TimmAttention(nn.Module):
    """timm's ViT attention: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``, ``unbind(0)``, SDPA."""

    def __init__(self, d_in: int = 6, dim: int = 8, heads: int = 2, num_classes: int = 3, index: bool = False):
        super().__init__()
        self.h = heads
        self.index = index
        self.embed = nn.Linear(d_in, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape[0], x.shape[1], self.embed.out_features
        h = self.embed(x)
        qkv = self.qkv(self.norm(h)).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        if self.index:
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        h = h + self.proj(o)
        return self.head(h.mean(1))


ARCH_CASES["timm_attention_unbind"] = ArchCase(
    "timm_attention_unbind",
    TimmAttention,
    _tokens,
    heads=1,
    permuted=["embed.weight@0", "qkv.weight@0", "proj.weight@1"],
)
ARCH_CASES["timm_attention_index"] = ArchCase(
    "timm_attention_index",
    lambda: TimmAttention(index=True),
    _tokens,
    heads=1,
    permuted=["qkv.weight@0", "proj.weight@1"],
)
