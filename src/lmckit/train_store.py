"""A training run's files: resumable checkpoints (no pickles), the result record and where a run lives.

:func:`save_checkpoint` / :func:`load_checkpoint_into` write and restore the
model, optimiser and batch-order generator of an unfinished run (one
safetensors file with JSON metadata); :class:`TrainResult` and
:func:`load_result` are a finished run's record (``config.json``);
:func:`run_dir_for` is where a config's run lives in the run store
(``ROOT/train/<config hash>``, with a data fingerprint appended when the same
config was trained on other files). The loop that writes them is
:mod:`lmckit.train`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import LmcError
from .store import (
    check_output_path,
    check_replaceable,
    file_kind,
    is_complete,
    load_state,
    partial_dir,
    read_json,
    save_state,
    stage_dir,
)
from .train_config import TrainConfig

#: the unfinished run's checkpoint, in its ``.partial`` folder
CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"  # the best epoch's weights while a keep_epoch = best-* run trains
IN_FOLDER_RECORD = "train.json"  # the run record of train_in_folder (config.json is the stage's)


# --------------------------------------------------------------------------- checkpoints (no pickles)
def _json_scalar(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_scalar(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_json_scalar(x) for x in v]
    raise TypeError(f"optimizer state value {v!r} is neither a tensor nor a JSON scalar")


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    extra: Mapping[str, Any],
) -> Path:
    """Write model, optimiser and generator state to one safetensors file (atomically).

    Tensors: ``model/<key>``, ``optim/<param index>/<name>``, ``rng/state``.
    Metadata (JSON): ``epoch``, the optimiser's param groups and non-tensor
    state values, and ``extra``.
    """

    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = _json_scalar(v)
    groups = [{k: _json_scalar(v) for k, v in g.items()} for g in osd["param_groups"]]
    tensors["rng/state"] = generator.get_state()
    meta = {
        "epoch": epoch,
        "optimizer": {
            "param_groups": groups,
            "scalars": scalars,
            "tensor_states": sorted({k.split("/", 2)[1] for k in tensors if k.startswith("optim/")}),
        },
        **extra,
    }
    return save_state(path, tensors, meta)


def load_checkpoint_into(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Any]:
    """Restore a :func:`save_checkpoint` file; returns its metadata."""

    tensors, meta = load_state(path)
    dev = next(model.parameters()).device
    prefix = "model/"
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    ometa = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, d in ometa.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for g in ometa["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for st in optimizer.state.values():  # optimizer.load_state_dict keeps 'step' where it was loaded (CPU)
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and name != "step" and v.device != dev:
                st[name] = v.to(dev)
    generator.set_state(tensors["rng/state"])
    return meta


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`. ``cached`` is True when the run folder already existed."""

    run_dir: Path
    test_loss: float
    test_accuracy: float
    train_loss: float
    train_accuracy: float
    seconds: float
    cached: bool
    config: TrainConfig | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
            "cached": self.cached,
            "config": self.config.to_dict() if self.config else None,
        }


def run_dir_for(config: TrainConfig, out_root: str | os.PathLike = "runs") -> Path:
    """``out_root/train/<hash>``: where :func:`train` puts (or found) this config's run."""

    return stage_dir(out_root, "train", config.to_dict())


def load_result(run_dir: str | os.PathLike, cached: bool = True) -> TrainResult:
    """Read the :class:`TrainResult` of a finished run folder."""

    run_dir = Path(run_dir)
    info = read_json(run_dir / "config.json", "run config", expect=dict)
    try:
        r = info["result"]
        cfg = TrainConfig.from_dict(info["config"])
        return TrainResult(
            run_dir,
            float(r["test_loss"]),
            float(r["test_accuracy"]),
            float(r["train_loss"]),
            float(r["train_accuracy"]),
            float(info["provenance"]["wall_seconds"]),
            cached,
            cfg,
        )
    except LmcError as e:  # e.g. unknown settings: say it is the cached file, not the command line
        raise LmcError(
            f"the cached run record {run_dir}/config.json is not valid for this lmckit: {e.message}",
            "delete that run folder and train again",
        ) from None
    except (KeyError, TypeError, ValueError) as e:  # (LmcError is a ValueError: caught above)
        raise LmcError(
            f"{run_dir}/config.json is not an lmckit training record ({type(e).__name__}: {e})",
            "delete the folder and train again",
        ) from None


def data_fingerprint(ds) -> str:
    """sha256 over a dataset's file checksums (name and content hash of every file it was read from)."""

    return hashlib.sha256(json.dumps(sorted(dict(ds.checksums).items())).encode()).hexdigest()


def _recorded_checksums(run_dir: Path) -> dict | None:
    try:
        rec = read_json(run_dir / "config.json", "run config", expect=dict)
        return dict(rec["provenance"]["dataset"]["checksums"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cached_or_target(final: Path, ds) -> Path:
    """The run folder for this config *and this data*.

    A run is cached only for the data it was trained on: ``ROOT/train/<config hash>`` when that folder
    is free or holds a run on data with the same checksums; else ``<config hash>-d<data fingerprint>``
    (the same config trained on other files, e.g. another ``--data-dir``).
    """
    if not is_complete_run(final):
        return final
    recorded = _recorded_checksums(final)
    if recorded is None or recorded == dict(ds.checksums):
        return final
    return final.with_name(f"{final.name}-d{data_fingerprint(ds)[:12]}")


def is_complete_run(folder: Path) -> bool:

    return is_complete(folder)


#: the files a training run writes in its ``.partial`` folder (checked before training when it resumes)
RUN_FILES = (CHECKPOINT, BEST, "model.safetensors", "metrics.jsonl", "config.json")


def check_run_store(root: Path, config: TrainConfig | None = None) -> None:
    """Refuse, before any training (and before the first line of progress), a run store that cannot hold
    ``config``'s run: :class:`LmcError` naming the path.

    Checks the store ``root`` and its ``train/`` folder (folders, writable, no symbolic-link loop, nothing
    in the way), and with ``config`` its run: the run folder (absent or a finished run), its ``.partial``
    folder (absent or a folder), its lock file (absent or a regular file) and, when a killed run will be
    resumed, each file the run writes there (absent or a regular file: :func:`lmckit.store.check_replaceable`).
    """
    check_output_path("run store --out", root, folder=True)
    check_output_path("run store folder", Path(root) / "train", folder=True)
    if config is None:
        return
    final = run_dir_for(config, root)
    if os.path.lexists(final) and not is_complete(final):
        if final.is_dir():
            raise LmcError(
                f"{final} exists but is not a finished run (no config.json)", "delete that folder and run again"
            )
        raise LmcError(
            f"{final} is in the way of the run folder: it is a "
            + ("symbolic link to a missing path" if final.is_symlink() else file_kind(final) or "file"),
            f"delete {final} and run again",
        )
    partial = partial_dir(final)
    check_output_path("unfinished run folder", partial, folder=True)
    check_replaceable(final.with_name(final.name + ".lock"), "lock file")
    if (partial / CHECKPOINT).exists():  # a resume keeps the folder: what it writes there must be writable
        for name in RUN_FILES:
            check_replaceable(partial / name, "run file")
