"""Loading and saving models as safetensors + JSON (never pickles).

A checkpoint is either a run folder (``model.safetensors`` + ``config.json``)
or a bare ``.safetensors`` file whose metadata holds ``lmckit_model`` (the
model config); :func:`save_model` writes both kinds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checks import check_device
from .errors import LmcError
from .models import model_from_config
from .store import check_no_link_loop, load_state, read_json, save_state


def checkpoint_file(path: str | Path) -> Path:
    p = Path(path)
    check_no_link_loop("checkpoint", p)
    if p.is_dir():
        f = p / "model.safetensors"
        check_no_link_loop("checkpoint", f)
        if f.is_symlink() and not f.exists():
            raise LmcError(
                f"{f} is a symbolic link to {os.readlink(f)}, which does not exist", "fix the link or pass another run"
            )
        if not f.exists():
            raise LmcError(
                f"{p} is not a finished lmckit run folder (no model.safetensors)",
                "pass the folder that `lmckit train` printed, or a .safetensors file",
            )
        return f
    return p


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, info)``: ``info`` has ``model`` (config), for run folders ``config``, and ``train``
    (the training config) where the file records it."""
    p = Path(path)
    f = checkpoint_file(p)
    state, meta = load_state(f)
    info: dict[str, Any] = {"path": str(p)}
    model_cfg = meta.get("lmckit_model")
    if p.is_dir() and (p / "config.json").exists():
        cfg = read_json(p / "config.json", "run config", expect=dict)
        info["config"] = cfg
        model_cfg = model_cfg or (cfg.get("model") if isinstance(cfg, dict) else None)
    if not isinstance(model_cfg, dict) or "name" not in model_cfg:
        raise LmcError(
            f"checkpoint {f} carries no lmckit model config (a foreign safetensors file?)",
            "lmckit reads checkpoints written by `lmckit train` or lmckit.checkpoint.save_model",
        )
    info["model"] = model_cfg
    if "dataset" in meta:
        info["dataset"] = meta["dataset"]
    if isinstance(meta.get("lmckit_train"), dict):  # the training config (lmckit.train.TrainConfig.to_dict)
        info["train"] = meta["lmckit_train"]
    return state, info


def build_model(
    model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None, where: str = "checkpoint"
) -> nn.Module:
    """The model a config describes, with ``state`` loaded (checked against the architecture first).

    With a ``state``, the config is first built on the ``meta`` device (no memory) and checked against the
    state's keys and shapes, so a file whose metadata claims a huge model fails with :class:`LmcError`
    instead of allocating it.
    """
    if state is not None:
        from .perm import spec_for

        try:
            with torch.device("meta"):
                skeleton = model_from_config(dict(model_cfg))
        except LmcError as e:  # the metadata's sizes out of bounds: say whose metadata
            raise LmcError(f"{where}: its model config cannot be built: {e.message}", e.hint) from None
        except (RuntimeError, ValueError, OverflowError, MemoryError) as e:  # e.g. absurd sizes in the metadata
            raise LmcError(
                f"{where}: its model config {dict(model_cfg)} cannot be built ({type(e).__name__}: {e})",
                "the checkpoint's metadata is damaged; re-create it",
            ) from None
        spec_for(skeleton).check_state(state, where)
    model = model_from_config(dict(model_cfg))
    if state is not None:
        model.load_state_dict(dict(state))
    return model


def load(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a model with its weights from a run folder or a .safetensors file (``device`` checked first).

    Raises :class:`LmcError` naming the file for a bad checkpoint, including a tensor whose dtype is not the
    model's own (an int8 or float64 file is refused, as every command refuses it, instead of cast).
    """
    dev = check_device(device)
    state, info = load_checkpoint(path)
    model = build_model(info["model"], state, str(path))
    own = model.state_dict()
    for k, v in state.items():  # the commands' rule (commands.common.check_dtypes): loading would cast silently
        if k in own and v.dtype != own[k].dtype:
            raise LmcError(
                f"{path}: tensor {k!r} is {v.dtype}, but the model holds {own[k].dtype} there",
                "save the checkpoint with the model's own dtypes "
                "(lmckit.checkpoint.save_model of the model after model.float())",
            )
    model.lmckit_info = info
    return model.to(dev)


def save_model(
    path: str | Path, model: nn.Module, state: Mapping[str, torch.Tensor] | None = None, **metadata: Any
) -> Path:
    """Save a model (or ``state`` for it) as a self-describing safetensors file."""
    cfg = getattr(model, "lmckit_config", None)
    if cfg is None:
        raise LmcError("model was not built by lmckit.models.create_model; cannot record its config")
    return save_state(path, state if state is not None else model.state_dict(), {"lmckit_model": cfg, **metadata})
