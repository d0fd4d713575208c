"""Small transformers for the symmetry-class checks (issue 29): a GPT-style causal block with RMSNorm,
and a deep-enough stack of the test patterns of :mod:`tests.helpers.arch_models`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GPTBlock(nn.Module):
    """GPT-style: Linear token embedding + learned positions, ``x + attn(rms1(x))`` with a fused ``qkv``, heads
    by ``view``/``transpose`` and causal SDPA, ``x + fc2(gelu(fc1(rms2(x))))``, final RMSNorm, head on the last
    token."""

    def __init__(self, d_in: int = 6, dim: int = 12, heads: int = 3, length: int = 5, num_classes: int = 4):
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(d_in, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.rms1 = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rms2 = nn.RMSNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.rmsf = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.embed(x) + self.pos
        q, k, v = self.qkv(self.rms1(h)).split(h.shape[-1], dim=-1)
        q = q.view(B, T, self.h, -1).transpose(1, 2)
        k = k.view(B, T, self.h, -1).transpose(1, 2)
        v = v.view(B, T, self.h, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        h = h + self.proj(o)
        h = h + self.fc2(F.gelu(self.fc1(self.rms2(h))))
        return self.head(self.rmsf(h)[:, -1])


class TanhMLP(nn.Module):
    """``fc2(tanh(fc1(x)))``: odd activation, so the hidden units admit signed permutations."""

    def __init__(self, d_in: int = 6, hidden: int = 10, out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def perturb(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Give every norm a non-trivial gain/bias (and every parameter noise) so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model
