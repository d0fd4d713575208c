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
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LmcError
from .dataset import index_batches

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

    @property
    def in_channels(self) -> int:
        """1: a token id per position (the image datasets' channel count, for model factories)."""
        return 1

    @property
    def image_size(self) -> int:
        """The context length ``T``: what a model factory receives as ``image_size`` for a token dataset."""
        return self.context

    @property
    def images(self) -> dict[str, torch.Tensor]:
        """Inputs ``(N, T)`` per split (views of the windows), as :attr:`Dataset.images` holds the images."""
        return {s: w[:, :-1] for s, w in self.windows.items()}

    @property
    def labels(self) -> dict[str, torch.Tensor]:
        """Next-token targets ``(N, T)`` per split (views of the windows)."""
        return {s: w[:, 1:] for s, w in self.windows.items()}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids are fed as they are (the identity; :meth:`Dataset.normalize` scales pixels)."""
        return x

    def on_device(self, split: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(N, T)`` of the whole split on ``device`` (as :meth:`Dataset.on_device`)."""
        return self.tensors(split, device)

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
        for idx in index_batches(n, batch_size, shuffle, generator, w_all.device, drop_last):
            w = w_all[idx]
            yield w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------- corpora
#: sha256 of the corpus text lmckit reads (the King James Version as `bible -l1000` prints it: 4,298,239 bytes)
KJV_SHA256 = "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"
KJV_FILE = "kjv.txt"
#: the Debian packages that ship the corpus (the text in a compressed format, and the program that prints it)
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
KJV_INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y bible-kjv` (Debian; it brings bible-kjv-text), "
    f"or put {KJV_FILE} (sha256 {KJV_SHA256[:12]}...) in a folder and pass --data-dir"
)
#: the whole Bible, Genesis 1:1 to Revelation 22:21, one verse per line (the package's reference syntax)
KJV_RANGE = "Gen1:1-Rev22:21"
#: text datasets: name -> (context length T, description); loaded by :func:`load_text_dataset`
TEXT_DATASETS = {
    "kjv": (
        128,
        "King James Version of the Bible (1611; public domain), byte-level tokens, windows of 128 bytes; "
        "from Debian's bible-kjv-text",
    ),
}
TEXT_DATASETS["kjv-mini"] = (
    64,
    "a CPU-sized sample of kjv: windows of 64 bytes, 4096 training and 1024 held-out windows drawn (seeded) from "
    "kjv's train and test streams (the gpt2-text recipe)",
)
#: kjv-mini: (training windows, held-out windows, seed) drawn from kjv's splits
KJV_MINI = (4096, 1024, 0)
TEXT_DATASETS["text-synthetic"] = (
    32,
    "generated in memory (for tests): 96 KiB of bytes from a seeded order-1 Markov chain over 32 symbols, "
    "windows of 32",
)


def synthetic_text(n: int = 96 * 1024, symbols: int = 32, seed: int = 0) -> bytes:
    """``n`` bytes from a seeded order-1 Markov chain over ``symbols`` letters (a learnable toy language)."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3.0 * torch.randn(symbols, symbols, generator=g), dim=1)
    import bisect

    cdf = trans.double().cumsum(1).tolist()
    out = bytearray(n)
    s = 0
    for i, u in enumerate(torch.rand(n, generator=g, dtype=torch.float64).tolist()):
        s = min(bisect.bisect_left(cdf[s], u), symbols - 1)
        out[i] = 65 + s
    return bytes(out)


#: a block of this many bytes is the unit of the train/test split (every 10th block is held out)
SPLIT_BLOCK = 65536


def _kjv_from_package(bible: str | None = None, data_path: str = "/usr/lib") -> bytes:
    """Print the corpus with the Debian package's ``bible`` program (deterministic: fixed width, empty environment)."""
    import shutil
    import subprocess

    exe = bible or shutil.which("bible") or ("/usr/bin/bible" if Path("/usr/bin/bible").is_file() else None)
    if exe is None or not Path(data_path, "bible.data").is_file():
        raise LmcError(
            "text dataset kjv not found: no kjv.txt on the search path and no bible-kjv package", KJV_INSTALL_HINT
        )
    try:
        out = subprocess.run(
            [exe, "-l1000", "-p", data_path, KJV_RANGE], capture_output=True, env={}, timeout=120, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LmcError(f"text dataset kjv: running {exe} failed ({type(e).__name__}: {e})", KJV_INSTALL_HINT) from None
    return out


def _check_kjv(data: bytes, where: str) -> None:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    if digest != KJV_SHA256:
        raise LmcError(
            f"text dataset kjv from {where} has sha256 {digest[:12]}... ({len(data):,} bytes), not the expected "
            f"{KJV_SHA256[:12]}... (4,298,239 bytes): the file is truncated, damaged or another text",
            f"delete it and let lmckit write it again from the Debian package; {KJV_INSTALL_HINT}",
        )


def kjv_bytes(data_dir: str | Path | None = None) -> tuple[bytes, str]:
    """The checksummed corpus text and where it came from.

    Looks for ``kjv.txt`` in ``data_dir`` (``DIR/kjv/kjv.txt`` or ``DIR/kjv.txt``), ``$LMCKIT_DATA`` and the
    user cache; else prints it with the Debian package's ``bible`` program and writes it to the cache
    (atomically). Raises :class:`LmcError` when it is missing or its sha256 is not :data:`KJV_SHA256`.
    """
    import os

    from ..store import atomic_write_bytes
    from .cache import cache_root

    roots = [Path(d) for d in (data_dir, os.environ.get("LMCKIT_DATA")) if d]
    cands = [r / "kjv" / KJV_FILE for r in roots] + [r / KJV_FILE for r in roots]
    cache = cache_root() / "kjv" / KJV_FILE
    if data_dir and not Path(data_dir).is_dir():
        raise LmcError(f"--data-dir {data_dir} is not a folder", KJV_INSTALL_HINT)
    for c in cands + [cache]:
        if c.is_file():
            data = c.read_bytes()
            _check_kjv(data, str(c))
            return data, str(c)
    data = _kjv_from_package()
    _check_kjv(data, "the bible-kjv package")
    try:
        atomic_write_bytes(cache, data)
        where = str(cache)
    except (OSError, LmcError):  # a read-only home: use it from memory
        where = "the bible-kjv package"
    return data, where


def split_stream(tokens: torch.Tensor, block: int = SPLIT_BLOCK, every: int = 10) -> dict[str, torch.Tensor]:
    """Train / test token streams: blocks of ``block`` tokens, every ``every``-th block held out as test."""
    n_blocks = -(-tokens.numel() // block)
    test = [tokens[i * block : (i + 1) * block] for i in range(n_blocks) if i % every == every - 1]
    train = [tokens[i * block : (i + 1) * block] for i in range(n_blocks) if i % every != every - 1]
    if not test or not train:
        raise LmcError(f"a corpus of {tokens.numel()} tokens is too short to hold out every {every}th block of {block}")
    return {"train": torch.cat(train), "test": torch.cat(test)}


def load_text_dataset(
    name: str, data_dir: str | Path | None = None, context: int | None = None, val_size: int = 0, val_seed: int = 0
) -> TextDataset:
    """A text dataset by name (:data:`TEXT_DATASETS`): byte tokens, windows of ``context`` (default per corpus).

    Splits: every 10th block of 64 KiB is ``test`` (held out), the rest ``train``; ``val_size`` windows of
    train (a seeded random subset) become ``val``. Raises :class:`LmcError` for unknown names, missing or
    damaged corpora.
    """
    import hashlib

    if name not in TEXT_DATASETS:
        raise LmcError(f"unknown text dataset {name!r}", f"known text datasets: {', '.join(TEXT_DATASETS)}")
    ctx = int(context or TEXT_DATASETS[name][0])
    if name == "text-synthetic":
        data, where = _synthetic_cached(), "<generated>"
        streams = split_stream(byte_tokens(data), block=4096)
    else:
        data, where = kjv_bytes(data_dir)
        streams = split_stream(byte_tokens(data))
    wins = {s: windows(t, ctx) for s, t in streams.items()}
    if name == "kjv-mini":  # a seeded sample of each split (sorted: the windows keep the corpus order)
        g = torch.Generator().manual_seed(KJV_MINI[2])
        for s, n in (("train", KJV_MINI[0]), ("test", KJV_MINI[1])):
            wins[s] = wins[s][torch.randperm(wins[s].shape[0], generator=g)[:n].sort().values]
    if val_size < 0 or val_size >= wins["train"].shape[0]:
        raise LmcError(f"validation size {val_size} must be between 0 and {wins['train'].shape[0]} windows")
    if val_size:
        perm = torch.randperm(wins["train"].shape[0], generator=torch.Generator().manual_seed(val_seed))
        wins["val"] = wins["train"][perm[:val_size].sort().values]
        wins["train"] = wins["train"][perm[val_size:].sort().values]
    return TextDataset(
        name,
        wins,
        BYTE_VOCAB,
        source={s: where for s in wins},
        checksums={(name if name == "text-synthetic" else KJV_FILE): hashlib.sha256(data).hexdigest()},
    )


_SYNTH: list[bytes] = []


def _synthetic_cached() -> bytes:
    if not _SYNTH:
        _SYNTH.append(synthetic_text())
    return _SYNTH[0]
