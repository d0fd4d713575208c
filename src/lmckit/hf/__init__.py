"""Hugging Face ``transformers`` models in and out: local folders only, safetensors only.

The one module of lmckit that imports ``transformers`` (the optional extra
``pip install 'lmckit[hf]'``); the algorithms never do. It converts at the
edge: a model folder becomes a ``PreTrainedModel`` plus its state dict, and a
state dict goes back to a folder that ``from_pretrained`` loads.

- :func:`load_hf` reads a local folder with ``config.json`` and
  ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (read
  shard by shard). Never a network call (``local_files_only``, and a name that
  looks like a Hub id is refused); never unpickles (``pytorch_model.bin`` is
  refused); custom code (``auto_map``) is not run.
- :func:`adapt` prepares a loaded model for lmckit: an ``example_input``
  (token ids ``(2, T)`` or images ``(2, C, S, S)``) for tracing, and a forward
  hook that returns the logits as a tensor: ``(B, C)`` for classifiers,
  ``(B, V, T)`` for language models (so ``F.cross_entropy(out, y)`` with
  targets ``(B, T)`` is the mean loss in nats per token and ``argmax(1)`` the
  next-token prediction, as :func:`lmckit.evaluate.evaluate` expects).
- :func:`save_hf` writes a folder (config + ``model.safetensors``) atomically.
- :func:`load_checkpoints` is the CLI's ``--hf`` loader (the same contract as
  :func:`lmckit.commands.common.load_checkpoints`).

Permutation specs of these models come from :mod:`lmckit.perm.export_trace`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import LmcError

__all__ = [
    "adapt",
    "masked_lm_mask_id",
    "example_input",
    "load_hf",
    "save_hf",
    "load_checkpoints",
    "is_hf_folder",
    "require_transformers",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
#: config entries that say where or how a folder was written, not what model it holds
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache"}


def require_transformers():
    """``import transformers``, or :class:`LmcError` saying how to install the extra."""
    try:
        import transformers
    except ImportError:
        raise LmcError(
            "Hugging Face models need the optional `transformers` package, which is not installed",
            "pip install 'lmckit[hf]' (it installs beside the pinned torch)",
        ) from None
    return transformers


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a Hugging Face model folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _check_folder(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        if _HUB_ID.match(str(path)) and not str(path).startswith("."):
            raise LmcError(
                f"{what} {path!r} is not a local folder; it looks like a Hugging Face Hub id, and lmckit reads "
                "local folders only (it never downloads)",
                f"download it yourself, e.g. `hf download {path} --local-dir DIR`, then pass DIR",
            )
        raise LmcError(f"{what} {path} does not exist", "pass a local Hugging Face model folder (with config.json)")
    if not p.is_dir():
        raise LmcError(
            f"{what} {path} is not a folder", "pass a Hugging Face model folder (config.json + model.safetensors)"
        )
    if not os.path.lexists(p / "config.json"):
        raise LmcError(f"{what} {path} has no config.json", "pass the folder that save_pretrained wrote")
    if not (p / "config.json").is_file():  # a folder, pipe, device, link loop: say which (store.check_input_file)
        from ..store import MAX_JSON_BYTES, check_input_file

        check_input_file(p / "config.json", f"{what}: config.json", MAX_JSON_BYTES)
    return p


def _weight_files(folder: Path, what: str) -> list[Path]:
    """The safetensors files of a model folder, in shard order (a single file or an index's shards)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        from ..store import MAX_JSON_BYTES, check_input_file, read_json

        check_input_file(index, f"{what}: shard index", MAX_JSON_BYTES)
        data = read_json(index, f"{what}: shard index")
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise LmcError(
                f"{what}: {index} has no weight_map of tensor name -> shard file", "re-save the model (save_pretrained)"
            )
        shards = list(dict.fromkeys(wm.values()))
        out = []
        for s in shards:
            sp = folder / s
            if Path(s).name != s or not sp.is_file():
                raise LmcError(
                    f"{what}: shard {s!r} named in {index.name} is missing or outside the folder",
                    "copy every shard of the checkpoint into the folder",
                )
            out.append(sp)
        return out
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5") if (folder / n).exists()]
    if pickled:
        raise LmcError(
            f"{what} {folder} holds {pickled[0]} (a pickle, which lmckit never loads: it can run arbitrary code) "
            "and no model.safetensors",
            "convert it to safetensors in a trusted session: "
            "AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
        )
    raise LmcError(
        f"{what} {folder} has no model.safetensors or model.safetensors.index.json",
        "pass the folder that save_pretrained wrote",
    )


def _load_config(folder: Path, what: str):
    T = require_transformers()
    from ..store import MAX_JSON_BYTES, check_input_file, read_json

    check_input_file(folder / "config.json", f"{what}: config.json", MAX_JSON_BYTES)
    raw = read_json(folder / "config.json", f"{what}: config.json")
    if not isinstance(raw, dict):
        raise LmcError(f"{what}: {folder / 'config.json'} is not a JSON object", "re-save the model")
    if raw.get("auto_map"):
        raise LmcError(
            f"{what}: {folder} needs custom model code (auto_map), which lmckit does not run",
            "use a model class that ships with transformers",
        )
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise LmcError(
            f"{what}: {folder / 'config.json'} names no single model class in 'architectures' (got {archs!r})",
            "save the model with save_pretrained, which records its class",
        )
    cls = getattr(T, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, T.PreTrainedModel)):
        raise LmcError(
            f"{what}: model class {archs[0]!r} is not a transformers model class",
            f"this transformers ({T.__version__}) has no {archs[0]}; upgrade it or re-save the model",
        )
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: a local folder never needs the network
    try:
        config = T.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for bad configs)
        raise LmcError(
            f"{what}: {folder / 'config.json'} is not a valid {archs[0]} config ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
            "re-save the model with save_pretrained",
        ) from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    if hasattr(config, "use_cache"):
        config.use_cache = False  # torch.export and the barrier need no KV cache
    return cls, config


def _build(cls, config, where: str = "") -> nn.Module:
    """``cls(config)`` in eval mode; first built on the meta device (no memory) so that a config the class
    cannot build (a negative width, heads not dividing it) or one above :data:`lmckit.limits.MAX_PARAMS`
    parameters raises :class:`LmcError` naming ``where`` (the config file) instead of a traceback."""
    import warnings

    from ..limits import MAX_PARAMS

    label = where or f"{cls.__name__} config"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in cls(config).parameters())
        except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise LmcError(
                f"{label}: a {cls.__name__} cannot be built from it ({type(e).__name__}: {msg})",
                "re-save the model with save_pretrained (its config.json sizes are not valid)",
            ) from None
        if n > MAX_PARAMS:
            raise LmcError(
                f"{label}: its {cls.__name__} would have {n:,} parameters, more than the {MAX_PARAMS:,} lmckit allows",
                "pass a smaller model",
            )
        model = cls(config)
    return model.eval()


def load_hf(path: str | os.PathLike, what: str = "model") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Load a local Hugging Face model folder: ``(model, state)`` (the model holds ``state``, adapted by :func:`adapt`).

    The weights are read shard by shard (peak memory: the model plus one shard) with lmckit's safetensors
    reader (pickles refused, non-finite tensors refused). Every tensor of the model must be in the files
    except tied copies (GPT-2's ``lm_head.weight``); extra tensors are an error.

    Raises :class:`LmcError` naming the folder for: a missing folder, a Hub id, no ``config.json``, custom code,
    an unknown class, a pickle-only folder, missing shards, missing / unexpected / misshapen tensors.
    """
    from ..store import load_state

    folder = _check_folder(path, what)
    cls, config = _load_config(folder, what)
    files = _weight_files(folder, what)
    model = _build(cls, config, f"{what}: {folder / 'config.json'}")
    own = model.state_dict()
    loaded: set[str] = set()
    for f in files:
        shard, _ = load_state(f)
        unexpected = [k for k in shard if k not in own]
        if unexpected:
            raise LmcError(
                f"{what}: {f} holds tensors the {cls.__name__} of its config.json does not have: {unexpected[:3]}",
                "the weights and config.json come from different models",
            )
        for k, v in shard.items():
            if own[k].is_floating_point() and not v.is_floating_point():
                raise LmcError(
                    f"{what}: tensor {k!r} in {f} is {str(v.dtype).replace('torch.', '')}, not floating point "
                    "(a quantized or damaged checkpoint)",
                    "pass the model's floating-point weights",
                )
            if tuple(v.shape) != tuple(own[k].shape):
                raise LmcError(
                    f"{what}: tensor {k!r} in {f} has shape {tuple(v.shape)}; the config says {tuple(own[k].shape)}",
                    "the weights and config.json come from different models",
                )
        with torch.no_grad():
            model.load_state_dict(shard, strict=False)
        loaded.update(shard)
        del shard
    missing = [k for k in own if k not in loaded and not _is_tied_copy(own, k, loaded)]
    if missing:
        raise LmcError(
            f"{what}: {folder} lacks tensors {missing[:3]}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""),
            "the checkpoint is incomplete; copy every shard",
        )
    adapt(model)
    return model, model.state_dict()


def _is_tied_copy(own: Mapping[str, torch.Tensor], key: str, loaded: set[str]) -> bool:
    v = own[key]
    return any(k in loaded and w.data_ptr() == v.data_ptr() and w.shape == v.shape for k, w in own.items() if k != key)


def example_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch the model accepts: images ``(batch, C, S, S)`` for vision models, else token ids ``(batch, T)``.

    ``T`` is ``min(16, max positions)``; ids are drawn in ``[0, vocab_size)`` from a seeded generator.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        c, s = int(getattr(cfg, "num_channels", 3)), int(getattr(cfg, "image_size", 224))
        return torch.randn(batch, c, s, s, generator=g)
    vocab = int(getattr(cfg, "vocab_size", 2))
    npos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 16
    return torch.randint(0, vocab, (batch, min(16, int(npos))), generator=g)


def _logits_hook(_module: nn.Module, _args: Any, output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        return logits.transpose(1, 2)  # (B, T, V) -> (B, V, T): cross_entropy / argmax over axis 1
    return logits


def masked_lm_mask_id(model: nn.Module) -> int | None:
    """The ``[MASK]`` token id of a masked language model, or ``None`` when ``model`` is not one.

    Parameters
    ----------
    model:
        A ``PreTrainedModel``.

    Returns
    -------
    int or None
        ``None`` unless the model's class is a masked-LM class of ``transformers``' own registry
        (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``, e.g. ``BertForMaskedLM``); else ``config.mask_token_id``
        when the config sets one, otherwise ``vocab_size - 1``.

    Notes
    -----
    The last id as the default mask token suits lmckit's byte-level text datasets (vocabulary 256): byte
    255 never occurs in UTF-8 text, so masking with it hides the token without colliding with a real one.
    A model with a reserved ``[MASK]`` id should record it as ``mask_token_id`` in its ``config.json``.
    """
    if not hasattr(model, "config"):
        return None
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return None
    if type(model).__name__ not in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return None
    mask_id = getattr(model.config, "mask_token_id", None)
    if isinstance(mask_id, int) and not isinstance(mask_id, bool):
        return mask_id
    return int(model.config.vocab_size) - 1


def adapt(model: nn.Module) -> nn.Module:
    """Prepare a loaded ``PreTrainedModel`` for lmckit (in place; idempotent); returns it.

    Sets ``model.example_input`` (:func:`example_input`), ``use_cache=False``, ``model.lmckit_mask_token_id``
    (:func:`masked_lm_mask_id`: an int for a masked language model, else ``None``) and a forward hook making
    ``model(x)`` return the logits tensor: ``(B, C)`` for sequence/image classifiers, ``(B, V, T)`` for
    causal and masked language models (vocabulary on axis 1, tokens on axis 2).
    """
    if getattr(model, "_lmckit_adapted", False):
        return model
    if not hasattr(model, "config"):
        raise LmcError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel (it has no config)")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.example_input = example_input(model)
    model.lmckit_mask_token_id = masked_lm_mask_id(model)
    model.register_forward_hook(_logits_hook)
    model._lmckit_adapted = True
    return model


def _config_dict(config) -> dict[str, Any]:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in _VOLATILE}


def save_hf(model: nn.Module, state: Mapping[str, torch.Tensor] | None, out: str | os.PathLike) -> Path:
    """Write ``model`` (with ``state`` loaded into a copy, if given) as a Hugging Face folder ``out``.

    ``config.json`` + ``model.safetensors`` by ``save_pretrained`` (tied tensors stored once), written in a
    temporary folder beside ``out`` and renamed into place, so ``out`` is complete or absent. ``out`` must not
    exist. ``from_pretrained(out)`` loads it. Returns ``out``.
    """
    import copy

    out = Path(out)
    if out.exists():
        raise LmcError(f"{out} already exists", "pass a new folder for the Hugging Face model")
    m = copy.deepcopy(model)
    if state is not None:
        m.load_state_dict(dict(state))
    m._forward_hooks.clear()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        m.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except OSError as e:
        from ..store import os_error

        raise os_error(e, out) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_checkpoints(paths: Sequence[str | os.PathLike], names: Sequence[str]):
    """``--hf``: model folders of one architecture -> ``(states, infos, model, spec)``.

    The spec is traced once (torch.export) on the first model and attached to it (``permutation_spec()``);
    ``model.lmckit_config`` names a factory registered for this process that rebuilds the architecture
    (with the same spec), so every command's ``build_model(model.lmckit_config, state)`` works unchanged.
    Every folder must hold the same config (up to where/how it was saved) and tensors fitting the spec.
    """
    import warnings

    from ..perm.export_trace import export_trace_streams

    models, states, infos = [], [], []
    for p, name in zip(paths, names):
        m, sd = load_hf(p, name)
        models.append(m)
        states.append(sd)
    ref = _config_dict(models[0].config)
    for name, m in zip(names[1:], models[1:]):
        cfg = _config_dict(m.config)
        if type(m) is not type(models[0]) or cfg != ref:
            diff = sorted(k for k in set(cfg) | set(ref) if cfg.get(k) != ref.get(k))[:5]
            raise LmcError(
                f"{names[0]} and {name} are different models: "
                + (f"{type(models[0]).__name__} vs {type(m).__name__}" if type(m) is not type(models[0]) else "")
                + (f"config entries differ: {diff}" if diff else ""),
                "pass Hugging Face folders of one architecture and size",
            )
    model = models[0]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = export_trace_streams(model, model.example_input)
    spec = res.spec
    _ = rec
    for name, sd in zip(names, states):
        spec.check_state(sd, name)
    folder = str(Path(paths[0]).resolve())
    cls, config = type(model), model.config
    reg_name = f"hf:{cls.__name__}:{_fingerprint(ref)}"
    from ..models.registry import _REGISTRY, register_model

    def factory() -> nn.Module:
        m = adapt(_build(cls, config))
        m.permutation_spec = lambda: spec
        return m

    if reg_name not in _REGISTRY:
        register_model(reg_name, f"Hugging Face {cls.__name__} from {folder} (--hf)")(factory)
    for m in models:
        m.permutation_spec = lambda: spec
    model.lmckit_config = {"name": reg_name}
    model.lmckit_trace_warnings = list(res.warnings)
    for p in paths:
        infos.append({"path": str(p), "model": {"name": reg_name}, "hf": {"class": cls.__name__}})
    return states, infos, model, spec


def _fingerprint(cfg: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
