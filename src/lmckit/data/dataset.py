"""In-memory datasets: uint8 images on disk and in memory, normalised on use.

Batches are drawn by index with a seeded generator; no DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..checks import check_int
from ..errors import LmcError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """A whole dataset held as tensors.

    ``images[split]`` is uint8 ``(N, C, H, W)``, ``labels[split]`` int64 ``(N,)``.
    ``mean``/``std`` are per-channel statistics of the training images (in
    [0, 1] units) used by :meth:`normalize`.
    """

    name: str
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict[str, str] = field(default_factory=dict)  # split -> file it came from
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of decompressed bytes
    _norm_cache: dict = field(default_factory=dict, repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def in_channels(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[2])

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.images]

    def size(self, split: str) -> int:
        return int(self._check_split(split).shape[0])

    def _check_split(self, split: str) -> torch.Tensor:
        if split not in self.images:
            raise LmcError(
                f"dataset {self.name} has no {split!r} split (it has {', '.join(self.splits())})",
                "pick another split, or set a validation size to create 'val'",
            )
        return self.images[split]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        key = (x.device, x.dtype)
        if key not in self._norm_cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            self._norm_cache[key] = (m, s)
        m, s = self._norm_cache[key]
        return (x.to(torch.float32) / 255.0 - m) / s

    def on_device(self, split: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` of ``split`` held on ``device``.

        Copied once per (split, device) and kept, so batches are gathered on
        the device without per-batch host copies. On CPU these are the
        dataset's own tensors.
        """
        x = self._check_split(split)
        dev = torch.device(device)
        if dev.type == "cpu":
            return x, self.labels[split]
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = (split, str(dev))
        if key not in self._device_cache:
            self._device_cache[key] = (x.to(dev), self.labels[split].to(dev))
        return self._device_cache[key]

    def tensors(
        self, split: str, device: torch.device | str = "cpu", limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split (or its first ``limit`` items), normalised, on ``device``."""
        x = self._check_split(split)
        y = self.labels[split]
        if limit is not None:
            limit = check_int(limit, "limit", 0)
            x, y = x[:limit], y[:limit]
        return self.normalize(x.to(device)), y.to(device)

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
        """Yield normalised ``(x, y)`` batches by index.

        ``shuffle`` draws a permutation from ``generator`` (seeded by the
        caller). ``augment`` applies CIFAR-style random crop (pad 4) and
        horizontal flip using the same generator.
        """
        batch_size = check_int(batch_size, "batch_size")
        if batch_size <= 0:
            raise LmcError(f"batch size must be positive, got {batch_size}")
        if limit is not None:
            limit = check_int(limit, "limit", 0)
        x_all, y_all = self.on_device(split, device)  # whole split on the device: no per-batch host copy
        n = x_all.shape[0] if limit is None else min(limit, x_all.shape[0])
        for idx in index_batches(n, batch_size, shuffle, generator, x_all.device, drop_last):
            xb = x_all[idx]
            if augment:
                xb = random_crop_flip(xb, generator)
            yield self.normalize(xb), y_all[idx]


def index_batches(
    n: int,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive batches of ``n`` items: in order, or in a permutation drawn from
    ``generator`` on the CPU (the same stream on every device) and moved once to ``device``; ``drop_last``
    leaves out a short last batch. The batch order of every dataset class (images, text, masked text)."""
    order = (torch.randperm(n, generator=generator) if shuffle else torch.arange(n)).to(device)
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, on a uint8 batch.

    The offsets and flips are drawn from ``generator`` on the CPU (the same
    stream whatever the batch's device); the gather runs on the batch's device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise LmcError(f"x must be a 4-D image batch (N, C, H, W), got {type(x).__name__}")
    pad = check_int(pad, "pad", 0)
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)  # (n, h)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    bidx = torch.arange(n).view(n, 1, 1)
    if x.device.type != "cpu":
        rows, cols, bidx = rows.to(x.device), cols.to(x.device), bidx.to(x.device)
    out = padded.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def synthetic_images(
    n: int, channels: int, size: int, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic images for tests and smoke recipes.

    Each class has a random smooth prototype; an image is its class prototype
    plus noise, quantised to uint8. A small MLP reaches well above chance in a
    few epochs, yet the task is not trivial.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.interpolate(
        torch.rand(num_classes, channels, 7, 7, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 * protos[y] + 0.5 * torch.rand(n, channels, size, size, generator=g)
    return (x * 255).round().clamp(0, 255).to(torch.uint8), y
