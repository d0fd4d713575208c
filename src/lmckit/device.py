"""Device selection: how to run, never what to compute (not part of any hash)."""
from __future__ import annotations

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
        raise LmcError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist",
                       "use cuda:0 .. cuda:N-1, or auto")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LmcError(f"device {name!r} requested but MPS (Apple GPU) is not available here", "use --device auto or cpu")
    elif dev.type not in ("cpu", "cuda"):  # meta, xla, ...: torch parses them, lmckit cannot compute on them
        raise LmcError(f"device {name!r} cannot run lmckit's computations", "use --device auto, cpu, cuda or cuda:N")
    return dev
