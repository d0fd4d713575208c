"""STE's optimiser presets and protocols: which settings a run uses and which permutation it returns.

:data:`PRESETS` are the named optimiser settings (:class:`StePreset`: Ito et
al.'s Adam recipe, Ainsworth et al.'s SGD runs), :func:`resolve_preset`
applies overrides and checks them, :data:`PROTOCOLS` (from the torch-free
:mod:`lmckit.match.ste_protocols`) says which permutation each protocol
returns and its default preset. The search itself is :mod:`lmckit.match.ste`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch

from ..errors import LmcError
from .ste_protocols import PROTOCOLS as _PROTOCOLS

__all__ = ["StePreset", "PRESETS", "PROTOCOLS", "check_protocol", "resolve_preset"]


@dataclass(frozen=True)
class StePreset:
    """Optimiser settings of an STE run.

    Attributes
    ----------
    optimizer: ``"adam"`` or ``"sgd"``.
    lr: learning rate (constant; no schedule).
    batch_size: training batch size.
    epochs: default number of passes over the training split.
    momentum: SGD momentum (ignored by Adam).
    """

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0


#: Named presets. ``adam`` is the recipe of Ito et al. (Adam 1e-3, batch 256,
#: about 10 epochs); ``git-re-basin`` follows Ainsworth et al.'s STE runs (SGD
#: 1e-2 with momentum 0.9, batch 1000, long runs: 50 epochs here).
PRESETS: dict[str, StePreset] = {
    "adam": StePreset("adam", 1e-3, 256, 10),
    "git-re-basin": StePreset("sgd", 1e-2, 1000, 50, 0.9),
}

#: STE protocols (which permutation a run returns) and the optimiser preset each uses by default
#: (defined without torch in :mod:`lmckit.match.ste_protocols`, which the CLI and recipes list).
PROTOCOLS = _PROTOCOLS


def check_protocol(protocol: str) -> str:
    """``protocol`` if it names an STE protocol (:data:`PROTOCOLS`), else :class:`LmcError`."""
    if protocol not in PROTOCOLS:
        close = difflib.get_close_matches(str(protocol), list(PROTOCOLS), n=1)
        raise LmcError(
            f"unknown STE protocol {protocol!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            f"choose one of {', '.join(PROTOCOLS)}",
        )
    return protocol


def resolve_preset(
    preset: str = "adam", epochs: int | None = None, lr: float | None = None, batch_size: int | None = None
) -> StePreset:
    """The preset ``preset`` with the given overrides; raises :class:`LmcError` on bad values."""
    if preset not in PRESETS:
        raise LmcError(f"unknown STE preset {preset!r}", f"choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    e = p.epochs if epochs is None else int(epochs)
    l_ = p.lr if lr is None else float(lr)
    b = p.batch_size if batch_size is None else int(batch_size)
    if e < 0:
        raise LmcError(f"STE epochs must be >= 0, got {e}")
    if not (l_ > 0 and math.isfinite(l_)):
        raise LmcError(f"STE learning rate must be a positive number, got {l_}")
    if b <= 0:
        raise LmcError(f"STE batch size must be positive, got {b}")
    return StePreset(p.optimizer, l_, b, e, p.momentum)


def _make_optimizer(cfg: StePreset, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
