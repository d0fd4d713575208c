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
    return dev
