"""CIFAR-10 from its standard on-disk formats, without trusting pickle.

Two layouts are read:

* the python version, ``cifar-10-batches-py/{data_batch_1..5,test_batch}``:
  each file is a pickled dict ``{b'data': uint8 ndarray (N, 3072),
  b'labels': list of N ints, b'batch_label': bytes, b'filenames': [bytes]}``
  written by Python 2's cPickle (protocol 2);
* the binary version, ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``:
  ``N`` records of 3073 bytes, one label byte then 3072 pixel bytes, no pickle.

In both, the 3072 pixel bytes of an image are the 1024 red, then 1024 green,
then 1024 blue values of a 32x32 image in row-major order, so a reshape to
``(N, 3, 32, 32)`` gives channel-first images.

Why the restricted unpickler is safe
------------------------------------
``pickle.load`` executes whatever callables a file names (``os.system`` is
one ``GLOBAL`` opcode away), so it must never see a downloaded file.
:class:`_CifarUnpickler` resolves *every* global through
:meth:`~_CifarUnpickler.find_class` (this covers the ``GLOBAL``,
``STACK_GLOBAL`` and ``EXT*`` opcodes) and answers only the three globals a
pickled numeric ndarray names:

* ``numpy.core.multiarray._reconstruct`` (numpy 2 writes the module as
  ``numpy._core.multiarray``; same function),
* ``numpy.ndarray`` and
* ``numpy.dtype``.

Even these are not the real numpy objects: each is an inert stand-in.
``_reconstruct(ndarray, (0,), b'b')`` returns an :class:`_ArrayStub` and
``dtype('u1', 0, 1)`` a :class:`_DtypeStub` (numeric type codes only, see
:data:`_DTYPE_CODES`); the ``BUILD`` opcode then calls the stub's
``__setstate__``, which checks the state tuple field by field (numeric dtype,
non-negative shape, raw bytes of exactly ``prod(shape) * itemsize``) and makes
the array with ``np.frombuffer``. No numpy ``__setstate__`` ever sees file
data, no object dtype can appear (so no Python objects are rebuilt from the
array payload), and nothing allocates from a size the file claims without
the bytes being present. Every other global (``builtins.eval``,
``_codecs.encode``, ``copyreg._reconstructor`` ...) raises
:class:`~lmckit.errors.LmcError`; persistent ids are refused; the remaining
opcodes can only build dicts, lists, tuples, bytes, strings and numbers.
Any exception while parsing becomes an :class:`LmcError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and torch are imported by the parsers: the registry imports this module for its layout
    import numpy as np
    import torch

from ..errors import LmcError
from .idx import read_bytes

PY_DIR, BIN_DIR = "cifar-10-batches-py", "cifar-10-batches-bin"
PY_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
BIN_FILES = {split: tuple(f"{f}.bin" for f in files) for split, files in PY_FILES.items()}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD = 1 + 3 * 32 * 32
NUM_CLASSES = 10

_DTYPE_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1"})
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
}


class _NdarrayMarker:
    """Stands in for ``numpy.ndarray`` inside the pickle; only ``_reconstruct`` accepts it, nothing calls it."""


_NDARRAY = _NdarrayMarker()


class _DtypeStub:
    """Stand-in for ``numpy.dtype(code)``; ``__setstate__`` accepts only a plain byte-order state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if isinstance(code, bytes):
            code = code.decode("ascii", "replace")
        if not isinstance(code, str) or code not in _DTYPE_CODES:
            raise ValueError(f"dtype {code!r} is not allowed in a CIFAR batch")
        self.code, self.order = code, "|"

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise ValueError("unexpected dtype state")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise ValueError("only plain numeric dtypes are allowed")
        self.order = order

    def numpy(self) -> np.dtype:
        import numpy as np

        return np.dtype(self.code).newbyteorder({"|": "=", "=": "="}.get(self.order, self.order))


class _ArrayStub:
    """Stand-in for the empty array ``_reconstruct`` makes; ``__setstate__`` builds the real one from raw bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("unexpected ndarray state")
        if len(state) == 5:
            state = state[1:]
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray)):
            raise ValueError("ndarray state needs a numeric dtype and raw bytes")
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 8:
            raise ValueError(f"bad ndarray shape {shape!r}")
        import numpy as np

        dt = dtype.numpy()
        n = 1
        for d in shape:
            n *= d
        if n * dt.itemsize != len(raw):
            raise ValueError(f"ndarray of shape {shape} needs {n * dt.itemsize} bytes, got {len(raw)}")
        arr = np.frombuffer(bytes(raw), dtype=dt)
        self.array = arr.reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,) or typecode not in (b"b", "b"):
        raise ValueError(f"unexpected numpy _reconstruct arguments {shape!r} {typecode!r}")
    return _ArrayStub()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only stand-ins for the numpy globals a pickled numeric ndarray names."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        kind = _ALLOWED.get((module, name))
        if kind == "reconstruct":
            return _reconstruct
        if kind == "ndarray":
            return _NDARRAY
        if kind == "dtype":
            return _DtypeStub
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace array stubs by their arrays (in dicts and lists, a few levels deep)."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise ValueError("an ndarray in the pickle has no data")
        return obj.array
    if depth > 3:
        return obj
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, depth + 1) for v in obj]
    return obj


def restricted_unpickle(data: bytes, where: str = "pickle data") -> Any:
    """Unpickle ``data`` allowing only the numpy array globals (see module doc).

    Python 2 ``str`` objects come back as ``bytes`` (``encoding='bytes'``).
    Any failure, including a refused global, raises :class:`LmcError`.
    """
    try:
        return _materialize(_CifarUnpickler(io.BytesIO(data), encoding="bytes").load())
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("refusing"):
            raise LmcError(
                f"{where} is not a plain CIFAR batch: {msg} (lmckit never runs code from data files)",
                "use the official cifar-10-python.tar.gz or the binary version cifar-10-batches-bin",
            ) from None
        raise LmcError(
            f"{where} is a corrupt or truncated pickle ({msg})", "delete it and install or download CIFAR-10 again"
        ) from None
    except Exception as e:  # any failure of a parser fed untrusted bytes is a bad file
        raise LmcError(
            f"{where} is a corrupt or truncated pickle ({type(e).__name__}: {e})",
            "delete it and install or download CIFAR-10 again",
        ) from None


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def parse_cifar_batch(data: bytes, where: str = "CIFAR batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one python-version batch.

    The file must unpickle (restricted) to a dict with ``data`` (uint8 array
    ``(N, 3072)``) and ``labels`` (N ints in ``[0, 10)``); keys may be bytes
    (Python 2 files) or str.
    """
    import numpy as np
    import torch

    obj = restricted_unpickle(data, where)
    if not isinstance(obj, dict):
        raise LmcError(
            f"{where} holds a {type(obj).__name__}, not the dict of a CIFAR batch", "check the dataset folder"
        )
    x, y = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(x, np.ndarray) or y is None:
        raise LmcError(
            f"{where} lacks a 'data' array or a 'labels' list",
            "this is not a CIFAR-10 batch (CIFAR-100 uses 'fine_labels')",
        )
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != RECORD - 1:
        raise LmcError(
            f"{where} has data {x.dtype} {tuple(x.shape)}; expected uint8 (N, 3072)", "check the dataset folder"
        )
    try:
        labels = np.asarray(y)
    except Exception:  # noqa: BLE001 - ragged or odd contents
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise LmcError(f"{where} has labels that are not a list of integers", "check the dataset folder")
    if labels.shape[0] != x.shape[0]:
        raise LmcError(
            f"{where} holds {x.shape[0]} images but {labels.shape[0]} labels", "the file is corrupt; get it again"
        )
    _check_labels(labels, where)
    images = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def parse_cifar_bin(data: bytes, where: str = "CIFAR binary batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from one binary-version batch: records of 1 label byte + 3072 pixel bytes."""
    import numpy as np
    import torch

    if len(data) == 0 or len(data) % RECORD:
        raise LmcError(
            f"{where} has {len(data)} bytes, not a whole number of {RECORD}-byte CIFAR records",
            "the file is truncated or not a CIFAR-10 .bin batch; get it again",
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = rec[:, 0]
    _check_labels(labels, where)
    images = torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise LmcError(
            f"{where} has labels outside 0..{NUM_CLASSES - 1} (min {int(labels.min())}, max {int(labels.max())})",
            "this is not a CIFAR-10 batch (CIFAR-100 has 100 classes), or it is corrupt",
        )


def cifar_layout(folder: Path) -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """``("python", files)`` or ``("binary", files)`` for the layout present in ``folder``, else None."""
    for kind, files in (("python", PY_FILES), ("binary", BIN_FILES)):
        if all((folder / f).is_file() for fs in files.values() for f in fs):
            return kind, files
    return None


def load_cifar_folder(folder: Path) -> tuple[dict, dict, dict, dict]:
    """Load every batch of the layout present in ``folder``; returns ``(images, labels, source, sha256s)``."""
    import torch

    layout = cifar_layout(folder)
    if layout is None:
        raise LmcError(
            f"no complete CIFAR-10 batch set in {folder}",
            f"it needs {', '.join(PY_FILES['train'] + PY_FILES['test'])} (python version) or the same names with .bin",
        )
    kind, files = layout
    parse = parse_cifar_batch if kind == "python" else parse_cifar_bin
    images, labels, source, sums = {}, {}, {}, {}
    for split, names in files.items():
        xs, ys = [], []
        for n in names:
            path = folder / n
            raw = read_bytes(path)
            x, y = parse(raw, f"CIFAR-10 file {path}")
            xs.append(x)
            ys.append(y)
            sums[n] = hashlib.sha256(raw).hexdigest()
        images[split], labels[split], source[split] = torch.cat(xs), torch.cat(ys), str(folder / names[0])
    return images, labels, source, sums
