"""IDX files (MNIST, Fashion-MNIST), gzipped or not."""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LmcError

if TYPE_CHECKING:  # numpy and torch are imported by the parsers (the data registry imports this module)
    import numpy as np
    import torch

#: IDX type codes and their numpy dtypes
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


#: the largest IDX file lmckit reads (the largest real one, MNIST's training images, is 47 MB)
MAX_IDX_BYTES = 2 * 2**30


def read_bytes(path: Path) -> bytes:
    """Read a regular file of at most :data:`MAX_IDX_BYTES`, decompressing ``.gz``; errors name the file."""
    from ..store import check_input_file

    check_input_file(path, "dataset file", MAX_IDX_BYTES)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LmcError(f"dataset file {path} does not exist") from None
    except OSError as e:
        raise LmcError(f"cannot read dataset file {path}: {e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return _gunzip_bounded(raw, path)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise LmcError(
                f"dataset file {path} is a corrupt or truncated gzip file ({e})",
                "delete it and install or download the dataset again",
            ) from None
    return raw


def _gunzip_bounded(raw: bytes, path: Path) -> bytes:
    """Decompress at most :data:`MAX_IDX_BYTES` (a gzip bomb fails with a message, not by exhausting memory)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(raw, MAX_IDX_BYTES + 1)
    if len(out) > MAX_IDX_BYTES:
        raise LmcError(f"dataset file {path} decompresses to more than {MAX_IDX_BYTES} bytes; not a dataset file")
    if not d.eof:
        raise OSError("truncated gzip stream (end of stream not reached)")
    if d.unused_data[:2] == b"\x1f\x8b":  # several gzip members: rare; the whole file is bounded above
        out = gzip.decompress(raw)
        if len(out) > MAX_IDX_BYTES:
            raise LmcError(f"dataset file {path} decompresses to more than {MAX_IDX_BYTES} bytes; not a dataset file")
    return out


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes into a numpy array, validating magic, dims and length."""
    import numpy as np

    if len(data) < 4:
        raise LmcError(
            f"{where} is too short to be an IDX file ({len(data)} bytes)", "the file is truncated; get it again"
        )
    if data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise LmcError(
            f"{where} has a wrong magic number {data[:4].hex()} (expected 0000 08 0N for an IDX file)",
            "this is not an IDX file; check the dataset folder",
        )
    ndim = data[3]
    if ndim == 0 or ndim > 4:
        raise LmcError(f"{where} declares {ndim} dimensions; IDX image/label files have 1 to 4")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LmcError(f"{where} is truncated inside its header", "get the file again")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise LmcError(
            f"{where} is {what}: header {dims} needs {expected} bytes, file has {len(data)}",
            "delete it and install or download the dataset again",
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from a pair of IDX files."""
    import numpy as np
    import torch

    ib, lb = read_bytes(images_path), read_bytes(labels_path)
    images = parse_idx(ib, f"IDX file {images_path}")
    labels = parse_idx(lb, f"IDX file {labels_path}")
    if images.dtype != np.uint8:
        raise LmcError(
            f"IDX file {images_path} holds {images.dtype} values; image files hold unsigned bytes (type 0x08)",
            "images and labels files may be swapped, or the file is not an image file",
        )
    if labels.dtype.kind not in "iu":
        raise LmcError(
            f"IDX file {labels_path} holds {labels.dtype} values; label files hold integers", "check the dataset folder"
        )
    if images.ndim != 3:
        raise LmcError(
            f"IDX file {images_path} has shape {images.shape}; expected (N, H, W) images",
            "images and labels files may be swapped",
        )
    if images.shape[1] != images.shape[2] or images.shape[1] < 1:
        raise LmcError(
            f"IDX file {images_path} holds {images.shape[1]} x {images.shape[2]} images; lmckit needs "
            "square images of at least 1 x 1 pixel",
            "check the dataset folder (the file may be damaged)",
        )
    if labels.ndim != 1:
        raise LmcError(f"IDX file {labels_path} has shape {labels.shape}; expected (N,) labels")
    if images.shape[0] != labels.shape[0]:
        raise LmcError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels",
            "the files come from different datasets or splits",
        )
    sums = {images_path.name: hashlib.sha256(ib).hexdigest(), labels_path.name: hashlib.sha256(lb).hexdigest()}
    x = torch.from_numpy(images.astype(np.uint8, copy=True)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, sums
