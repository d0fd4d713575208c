"""Model registry: ``@register_model`` factories, ``create_model``, ``list_models``."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..errors import LmcError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    tiny: bool = False


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = "", tiny: bool = False):
    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], tiny)
        return fn

    return deco


def list_models(pattern: str = "*", include_tiny: bool = True) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (include_tiny or not e.tiny))


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        raise LmcError(f"unknown model {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                       "run `lmckit models` to list them")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``model.lmckit_config`` records how to rebuild it."""
    entry = model_entry(name)
    try:
        model = entry.factory(**kwargs)
    except TypeError as e:
        raise LmcError(f"bad options for model {name!r}: {e}") from None
    model.lmckit_config = {"name": name, **kwargs}
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    cfg = dict(config)
    name = cfg.pop("name", None)
    if not isinstance(name, str):
        raise LmcError("model config has no 'name'", "the checkpoint was not written by lmckit")
    return create_model(name, **cfg)
