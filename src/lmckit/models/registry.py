"""Model registry: ``@register_model`` factories, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from ..errors import LmcError
from ..model_index import FLOAT_LIMITS, SIZE_LIMITS  # the size options' bounds (light: --help shows them)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    tiny: bool = False


_REGISTRY: dict[str, ModelEntry] = {}

#: zoo models registered by a module of a higher layer (they need it to build or trace the model), by
#: module name: imported by name when the registry is first read, so that lmckit.models imports nothing
#: above it (``hf-gpt2`` builds a Hugging Face GPT2LMHeadModel and traces it with lmckit.perm.export_trace)
PROVIDERS: dict[str, str] = {"hf-gpt2": "lmckit.hf.zoo"}
_PROVIDED: set[str] = set()


def _load_providers() -> None:
    """Import each provider module once (its ``@register_model`` calls fill the registry)."""
    import importlib

    for module in sorted(set(PROVIDERS.values()) - _PROVIDED):
        _PROVIDED.add(module)
        importlib.import_module(module)


def register_model(name: str, description: str = "", tiny: bool = False):
    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise LmcError(f"model {name!r} registered twice", "choose another name for your model")
        from ..model_index import MODEL_INDEX  # the static table `lmckit models` lists (kept equal by a test)

        text = description or MODEL_INDEX.get(name, ("",))[0] or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = ModelEntry(name, fn, text, tiny)
        return fn

    return deco


def list_models(pattern: str = "*", include_tiny: bool = True) -> list[str]:
    """Names of the registered models matching the shell ``pattern`` (sorted)."""
    if not isinstance(pattern, str):
        raise LmcError(f"pattern must be a string (a shell pattern such as 'mlp*'), got {type(pattern).__name__}")
    _load_providers()
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (include_tiny or not e.tiny))


def model_entry(name: str) -> ModelEntry:
    """The registry entry of model ``name`` (:class:`LmcError` for another type or an unknown name)."""
    if not isinstance(name, str):
        raise LmcError(f"model name must be a string, got {type(name).__name__}", "run `lmckit models` to list them")
    if name not in _REGISTRY and name in PROVIDERS:
        _load_providers()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        raise LmcError(
            f"unknown model {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            "run `lmckit models` to list them",
        )
    return _REGISTRY[name]


def check_size_options(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`LmcError` for a size option out of range, before anything is built.

    Integer options (:data:`SIZE_LIMITS`): ``width`` 1..65536, ``depth`` 0..256, ``in_channels`` 1..4096,
    ``image_size`` 1..4096, ``num_classes`` 1..10^6, ``heads`` 1..1024, ``patch_size`` 1..``image_size``.
    Float options (:data:`FLOAT_LIMITS`): ``width_mult`` in (0, 256], ``mlp_ratio`` in (0, 64]. The
    message names the model and the option. (``width=-3`` would otherwise be clamped to 1, and
    ``depth=100000`` build a model that passes the parameter cap but trains for minutes.)
    """
    import math

    for key, hi in FLOAT_LIMITS.items():
        if key in kwargs:
            v = kwargs[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise LmcError(f"model {name!r}: {key} must be a positive number, got {v!r}", f"fix the {key} setting")
            if v > hi:
                raise LmcError(f"model {name!r}: {key} must be at most {hi:g}, got {v!r}", f"fix the {key} setting")
    for key, (lo, hi) in SIZE_LIMITS.items():
        if key in kwargs and not (key == "patch_size" and kwargs[key] is None):
            v = kwargs[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise LmcError(f"model {name!r}: {key} must be an integer >= {lo}, got {v!r}", f"fix the {key} setting")
            if v > hi:
                raise LmcError(
                    f"model {name!r}: {key} must be at most {hi:,} (lmckit's limit), got {v:,}",
                    f"fix the {key} setting",
                )
    if kwargs.get("patch_size") is not None and kwargs["patch_size"] > kwargs.get("image_size", kwargs["patch_size"]):
        raise LmcError(
            f"model {name!r}: patch_size {kwargs['patch_size']} is larger than image_size {kwargs['image_size']}",
            "use a patch size that divides the image size",
        )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``model.lmckit_config`` records how to rebuild it."""
    entry = model_entry(name)
    check_size_options(name, kwargs)
    try:
        model = entry.factory(**kwargs)
    except TypeError as e:
        raise LmcError(f"bad options for model {name!r}: {e}") from None
    model.lmckit_config = {"name": name, **kwargs}
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Build the model a config ``{"name": ..., **options}`` describes (:class:`LmcError` for a non-mapping)."""
    if not isinstance(config, Mapping):
        raise LmcError(f"model config must be a mapping with a 'name', got {type(config).__name__}")
    cfg = dict(config)
    name = cfg.pop("name", None)
    if not isinstance(name, str):
        raise LmcError("model config has no 'name'", "the checkpoint was not written by lmckit")
    return create_model(name, **cfg)


def model_config_with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with every option of its model's factory spelled out (the factory's defaults filled in).

    Two configs build the same architecture exactly when these are equal: ``{"name": "mlp_tiny"}`` and
    ``{"name": "mlp_tiny", "norm": "none"}`` are the same model. Nothing is built or called (only the
    factory's signature is read). A config whose name is unknown, or whose options the factory does not
    take, is returned unchanged (it then equals only an identical config).
    """
    out = dict(cfg)
    name = out.get("name")
    if not isinstance(name, str):
        return out
    try:
        bound = inspect.signature(model_entry(name).factory).bind(**{k: v for k, v in out.items() if k != "name"})
    except (LmcError, TypeError, ValueError):
        return out
    bound.apply_defaults()
    return {"name": name, **bound.arguments}
