"""Device selection and GPU settings: how to run, never what to compute (not part of any hash).

``--device auto`` picks CUDA when present. On CUDA, training may use TF32
tensor cores (:func:`tf32_allowed`) and the channels_last memory format for
convolutional models (:func:`channels_last_wanted`); both are recorded in the
run's ``config.json`` (provenance) and neither is used on CPU, whose results
stay bit-identical from run to run. Mixed precision (``precision = "bf16"``,
:func:`autocast`) changes what is computed, so it is a training setting
(:class:`lmckit.train.TrainConfig`) and enters the run's hash.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .errors import LmcError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Return a torch device; ``"auto"`` picks CUDA when present, else CPU."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LmcError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmcError(f"device {name!r} requested but CUDA is not available here", "use --device auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LmcError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist",
            "use cuda:0 .. cuda:N-1, or auto",
        )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LmcError(
                f"device {name!r} requested but MPS (Apple GPU) is not available here", "use --device auto or cpu"
            )
    elif dev.type not in ("cpu", "cuda"):  # meta, xla, ...: torch parses them, lmckit cannot compute on them
        raise LmcError(f"device {name!r} cannot run lmckit's computations", "use --device auto, cpu, cuda or cuda:N")
    return dev


def check_device_name(name: str | torch.device | None) -> None:
    """Raise :class:`LmcError` unless ``name`` is ``auto`` or parses as a torch device (availability not checked).

    For drivers that hand the device to workers elsewhere (Ray), which may
    have a GPU this process lacks.
    """
    if name is None or isinstance(name, torch.device) or name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError as e:
        raise LmcError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from e


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return default
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise LmcError(f"{name}={os.environ[name]!r} is not a yes/no value", f"set {name} to 1 or 0 (or unset it)")


def tf32_allowed(dev: torch.device, requested: bool | None = None) -> bool:
    """Whether training on ``dev`` may use TF32 matmuls/convolutions.

    Default: yes on CUDA (set ``LMCKIT_TF32=0`` to forbid), never on CPU
    (TF32 is a CUDA tensor-core format; CPU results stay bit-identical).
    """
    if dev.type != "cuda":
        return False
    return _env_flag("LMCKIT_TF32", True) if requested is None else bool(requested)


def channels_last_wanted(model: torch.nn.Module, dev: torch.device, requested: bool | None = None) -> bool:
    """Whether to train ``model`` in the channels_last memory format.

    Only models with 2-D convolutions; default: yes on CUDA (set
    ``LMCKIT_CHANNELS_LAST=0`` to turn it off), no on CPU (the CPU path stays
    as it was, bit-identical run to run). ``requested`` overrides the default.
    """
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    if requested is not None:
        return bool(requested)
    return dev.type == "cuda" and _env_flag("LMCKIT_CHANNELS_LAST", True)


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions inside the block; restore afterwards.

    Scoped rather than global so that matching and analyses running later in
    the same process keep full float32 products.
    """
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


PRECISIONS = ("fp32", "bf16")


def autocast(dev: torch.device, precision: str):
    """``torch.autocast`` to bfloat16 on ``dev`` for ``precision == "bf16"``, a no-op context for ``fp32``.

    Weights, gradients and optimiser state stay float32 (autocast only runs
    eligible ops, such as matmuls and convolutions, in bfloat16).
    """
    if precision not in PRECISIONS:
        raise LmcError(f"unknown precision {precision!r}", f"choose one of {', '.join(PRECISIONS)}")
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
