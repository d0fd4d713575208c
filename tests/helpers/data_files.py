"""Writers for tiny dataset files in the standard formats (IDX, CIFAR python/binary batches), for the data tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def planted_images(n: int, size: int = 8, channels: int = 1, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image i holds (i + offset + row * size + col + 17 * channel) % 256; label (i + offset) % 10."""
    i = np.arange(n).reshape(n, 1, 1, 1) + offset
    c = np.arange(channels).reshape(1, channels, 1, 1)
    r = np.arange(size).reshape(1, 1, size, 1)
    k = np.arange(size).reshape(1, 1, 1, size)
    x = ((i + r * size + k + 17 * c) % 256).astype(np.uint8)
    return x, ((np.arange(n) + offset) % 10).astype(np.uint8)


def write_idx_dataset(folder: Path, n_train: int = 20, n_test: int = 10, size: int = 8, gz: bool = False) -> dict:
    """Write the four IDX files of a tiny MNIST-like dataset; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, off in (("train", n_train, 0), ("test", n_test, 1000)):
        x, y = planted_images(n, size, 1, off)
        for name, arr in zip(IDX_NAMES[split], (x[:, 0], y)):
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (x, y.astype(np.int64))
    return out


def _sbs(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def py2_cifar_pickle(x: np.ndarray, labels, batch_label: bytes = b"training batch 1 of 5") -> bytes:
    """A CIFAR batch pickled the way Python 2's cPickle wrote the official files (protocol 2, str as
    SHORT_BINSTRING)."""
    x = np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.uint8)
    n = x.shape[0]
    out = b"\x80\x02}q\x00("
    out += _sbs(b"batch_label") + _sbs(batch_label)
    out += (
        _sbs(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02"
        + _int(0)
        + b"\x85"
        + _sbs(b"b")
        + b"\x87R"
    )
    out += b"(" + _int(1) + _int(n) + _int(x.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + _sbs(b"u1") + _int(0) + _int(1) + b"\x87R"
    out += b"(" + _int(3) + _sbs(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _int(0) + b"tb"
    out += b"\x89" + _sbs(x.tobytes()) + b"tb"
    out += _sbs(b"labels") + b"](" + b"".join(_int(int(v)) for v in labels) + b"e"
    out += b"u."
    return out


def py3_cifar_pickle(x: np.ndarray, labels, protocol: int = 4) -> bytes:
    x = np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.uint8)
    return pickle.dumps({b"data": x, b"labels": [int(v) for v in labels], b"batch_label": b"test"}, protocol=protocol)


def write_cifar_dataset(root: Path, per_batch: int = 4, layout: str = "python", py2: bool = True) -> dict:
    """Write a tiny CIFAR-10 layout (``cifar-10-batches-py`` or ``-bin``) under ``root``; returns the arrays."""
    folder = root / ("cifar-10-batches-py" if layout == "python" else "cifar-10-batches-bin")
    folder.mkdir(parents=True, exist_ok=True)
    xs = {"train": [], "test": []}
    for j, name in enumerate(CIFAR_TRAIN + ("test_batch",)):
        split = "test" if name == "test_batch" else "train"
        x, y = planted_images(per_batch, 32, 3, 100 * j)
        xs[split].append((x, y))
        flat = x.reshape(per_batch, -1)
        if layout == "python":
            data = py2_cifar_pickle(flat, y) if py2 else py3_cifar_pickle(flat, y)
            (folder / name).write_bytes(data)
        else:
            rec = np.concatenate([y.reshape(-1, 1), flat], axis=1).astype(np.uint8)
            (folder / f"{name}.bin").write_bytes(rec.tobytes())
    return {
        s: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v]).astype(np.int64))
        for s, v in xs.items()
    }
