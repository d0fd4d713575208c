"""Known checksums of the dataset files, and checking files against them.

Where a checksum of the *decompressed* file content is known it is the one
used: the Debian package ``dataset-fashion-mnist`` recompresses the upstream
``.gz`` files (different archive bytes, same content), so content checksums
are the ones that identify the data.

Sources
-------
* Fashion-MNIST: sha256 of the decompressed IDX files, computed from the
  Debian package's files (``/usr/share/datasets/fashion-mnist``).
* MNIST: only md5 of the published ``.gz`` archives is widely published (the
  values torchvision and many others use); a decompressed-only copy is
  reported as ``unknown`` but still validated by the IDX parser on load.
* CIFAR-10: md5 of each extracted python batch file (torchvision's list) and
  md5 of the two archives as published on the CIFAR page
  (https://www.cs.toronto.edu/~kriz/cifar.html). The ``.bin`` batches have no
  published per-file checksum.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Checksum:
    """A known digest: ``algo`` (``sha256``/``md5``) of ``of``.

    ``of`` is ``content`` (the decompressed bytes) or ``archive`` (the file as published).
    """

    algo: str
    digest: str
    of: str = "content"


KNOWN_CHECKSUMS: dict[str, dict[str, Checksum]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": Checksum(
            "sha256", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": Checksum(
            "sha256", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": Checksum(
            "sha256", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": Checksum(
            "sha256", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
    "mnist": {
        "train-images-idx3-ubyte": Checksum("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "archive"),
        "train-labels-idx1-ubyte": Checksum("md5", "d53e105ee54ea40749a09fcbcd1e9432", "archive"),
        "t10k-images-idx3-ubyte": Checksum("md5", "9fb629c4189551a2d022fa330f9573f3", "archive"),
        "t10k-labels-idx1-ubyte": Checksum("md5", "ec29112dd5afa0611ce80d1b7f02629c", "archive"),
    },
    "cifar10": {
        "data_batch_1": Checksum("md5", "c99cafc152244af753f735de768cd75f"),
        "data_batch_2": Checksum("md5", "d4bba439e000b95fd0a9bffe97cbabec"),
        "data_batch_3": Checksum("md5", "54ebc095f3ab1f0389bbae665268c751"),
        "data_batch_4": Checksum("md5", "634d18415352ddfa80567beed471001a"),
        "data_batch_5": Checksum("md5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        "test_batch": Checksum("md5", "40351d587109b95175f43aff81a1287e"),
    },
}

ARCHIVE_CHECKSUMS: dict[str, Checksum] = {
    "cifar-10-python.tar.gz": Checksum("md5", "c58f30108f718f92721af3b95e74349a", "archive"),
    "cifar-10-binary.tar.gz": Checksum("md5", "c32a1d4ab5d03f1284b67883e8d87530", "archive"),
}


def digest(data: bytes, algo: str) -> str:
    """Hex digest of ``data`` with ``algo`` (md5 is used only to compare with published values)."""
    return hashlib.new(algo, data, usedforsecurity=False).hexdigest()


def logical_name(path: Path) -> str:
    """A dataset file's name without a ``.gz`` suffix (the key of :data:`KNOWN_CHECKSUMS`)."""
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def check_file(path: Path, known: Checksum | None) -> dict[str, Any]:
    """Checksum status of one file.

    Returns a dict with ``file``, ``path``, ``bytes`` (on disk), ``sha256``
    (of the decompressed content, None if unreadable), ``algo``/``expected``
    (the known checksum or None), and ``status``: ``match``, ``mismatch``,
    ``unknown`` (no known checksum applies to this form of the file) or
    ``unreadable`` (missing, or a corrupt gzip).
    """
    row: dict[str, Any] = {
        "file": logical_name(path),
        "path": str(path),
        "bytes": None,
        "sha256": None,
        "algo": known.algo if known else None,
        "expected": known.digest if known else None,
        "checksum_of": known.of if known else None,
        "status": "unknown",
    }
    from ..errors import LmcError
    from ..store import check_input_file
    from .idx import MAX_IDX_BYTES, _gunzip_bounded

    try:  # a device, FIFO or a file above the dataset bound is not read (/dev/zero would never end)
        check_input_file(path, "dataset file", MAX_IDX_BYTES)
        raw = path.read_bytes()
    except LmcError as e:
        row.update(status="unreadable", error=e.message)
        return row
    except OSError as e:
        row.update(status="unreadable", error=str(e))
        return row
    row["bytes"] = len(raw)
    content = raw
    if raw[:2] == b"\x1f\x8b":
        try:  # bounded: a gzip bomb is reported, not decompressed until memory runs out
            content = _gunzip_bounded(raw, path)
        except LmcError as e:
            row.update(status="unreadable", error=e.message)
            return row
        except (OSError, EOFError, zlib.error) as e:
            row.update(status="unreadable", error=f"corrupt gzip: {e}")
            return row
    row["sha256"] = hashlib.sha256(content).hexdigest()
    if known is None:
        return row
    if known.of == "content":
        target = content
    elif raw is not content:  # an archive checksum applies only to the compressed file as published
        target = raw
    else:
        row["status"] = "unknown"
        row["note"] = "only the checksum of the .gz archive is known; this copy is decompressed"
        return row
    row["status"] = "match" if digest(target, known.algo) == known.digest.lower() else "mismatch"
    return row
