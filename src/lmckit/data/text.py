"""Token datasets for language models: fixed-length windows of token ids, batched like image datasets.

A :class:`TextDataset` holds, per split, an int64 tensor ``(N, T + 1)`` of
token windows; a batch is ``(x, y) = (w[:, :-1], w[:, 1:])``: inputs ``(B, T)``
and next-token targets ``(B, T)``. It offers the interface of
:class:`lmckit.data.dataset.Dataset` that matching and evaluation use
(``name``, ``splits``, ``size``, ``tensors``, ``batches``), so activation
matching and STE run on it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import LmcError

#: Byte-level tokenizer: one token per UTF-8 byte, vocabulary 256.
BYTE_VOCAB = 256


def byte_tokens(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids in ``[0, 256)`` (shape ``(len(bytes),)``)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows ``(N, context + 1)`` of a 1-D token stream (the tail that does not fill one is dropped).

    Consecutive windows share one token (the last target of one is the first input of the next).
    Raises :class:`LmcError` when the stream is shorter than one window.
    """
    if context < 1:
        raise LmcError(f"context length must be at least 1, got {context}")
    n = (tokens.numel() - 1) // context
    if n < 1:
        raise LmcError(f"a token stream of {tokens.numel()} tokens is shorter than one window of {context + 1}")
    idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    return tokens[idx]


@dataclass
class TextDataset:
    """Token windows per split (``"train"``, ``"val"``, ``"test"``): int64 ``(N, T + 1)``."""

    name: str
    windows: dict[str, torch.Tensor]
    vocab_size: int = BYTE_VOCAB
    source: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.vocab_size)

    @property
    def context(self) -> int:
        return int(next(iter(self.windows.values())).shape[1] - 1)

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if s in self.windows]

    def _check_split(self, split: str) -> torch.Tensor:
        if split not in self.windows:
            raise LmcError(
                f"dataset {self.name} has no {split!r} split (it has {', '.join(self.splits())})",
                "pick another split",
            )
        return self.windows[split]

    def size(self, split: str) -> int:
        return int(self._check_split(split).shape[0])

    def tensors(
        self, split: str, device: torch.device | str = "cpu", limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(N, T)`` of the split (or its first ``limit`` windows) on ``device``."""
        w = self._check_split(split)
        if limit is not None:
            w = w[:limit]
        w = w.to(device)
        return w[:, :-1], w[:, 1:]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        limit: int | None = None,
        drop_last: bool = False,
        augment: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches of token ids ``(B, T)`` by index (``augment`` is ignored for text)."""
        if batch_size <= 0:
            raise LmcError(f"batch size must be positive, got {batch_size}")
        w_all = self._check_split(split).to(device)
        n = w_all.shape[0] if limit is None else min(limit, w_all.shape[0])
        order = (torch.randperm(n, generator=generator) if shuffle else torch.arange(n)).to(w_all.device)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            w = w_all[order[start : start + batch_size]]
            yield w[:, :-1], w[:, 1:]
