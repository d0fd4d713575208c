"""Seeded, resumable training of zoo models into hashed run folders.

A training run is a pure function of a :class:`TrainConfig` (model, dataset,
seed, optimiser, schedule, ...). Its output folder is
``ROOT/train/<config_hash>`` (:func:`lmckit.store.stage_dir` of the fully
resolved config, model defaults included) and holds

* ``model.safetensors``: the final weights, self-describing (model config in
  the metadata, so :func:`lmckit.load` rebuilds the model);
* ``config.json``: the resolved config, the model config, the final metrics and
  provenance (lmckit/torch versions, dataset checksums, device, wall time);
* ``metrics.jsonl``: one JSON line per epoch.

How to run (device, threads, progress, data folder, output root) never enters
the hash.

Determinism
-----------
The model is initialised under ``torch.manual_seed(seed)`` inside
:func:`torch.random.fork_rng` (the caller's global RNG state is untouched);
the batch order and augmentation draw from a private ``torch.Generator``
seeded with ``seed``. On CPU the same config therefore gives bit-identical
weights (for one torch thread count: threaded float sums may round
differently). Work happens in ``<hash>.partial/``; after every epoch a checkpoint
(model, optimiser state, generator state, epoch, metrics; safetensors + JSON
metadata, no pickles) is written atomically, so a killed run resumes from its
last finished epoch and ends with the same weights as an uninterrupted run.

Learning-rate schedules (per optimiser step ``t``, ``T`` steps in all, ``W``
warm-up steps, base rate ``eta``):

* warm-up, ``t < W``: ``eta * (t + 1) / W``;
* ``constant``: ``eta``;
* ``linear``: ``eta * (1 - (t - W) / (T - W))`` (reaches 0 at ``t = T``);
* ``cosine``: ``eta * (1 + cos(pi * (t - W) / (T - W))) / 2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .checkpoint import save_model
from .data import PREPROCESSING, load_dataset, random_crop_flip
from .device import PRECISIONS, autocast, channels_last_wanted, resolve_device, tf32_allowed, tf32_scope
from .errors import LmcError
from .evaluate import evaluate
from .limits import check_model_size
from .models import create_model
from .models.registry import check_size_options, model_entry
from .presets import OPTIMIZERS, PRESETS, SCHEDULES  # noqa: F401  (re-exported; plain data, see lmckit.presets)
from .progress import NullProgress, Progress
from .store import (
    SCHEMA_VERSION,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
    config_hash,
    file_lock,
    finalize_dir,
    is_complete,
    load_state,
    partial_dir,
    read_json,
    save_state,
    stage_dir,
)

# Model-factory options set from the dataset, never by the user.
DATASET_OPTIONS = ("in_channels", "image_size", "num_classes")
# Convenience keys of make_config / the CLI that are model options.
MODEL_OPTION_KEYS = ("width", "width_mult", "norm", "depth", "activation")
CHECKPOINT = "checkpoint.safetensors"
#: documented upper bounds of the training settings (checked before any work)
MAX_INT = 2**63 - 1
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
#: :attr:`TrainConfig.keep_epoch`: which epoch's weights a run keeps
KEEP_EPOCHS = ("last", "best-test", "best-val")
#: settings added after v0.1, left out of the hashed dict at these defaults (earlier runs keep their hashes)
HASH_DEFAULTS = {"precision": "fp32", "preprocess": "standardize", "keep_epoch": "last"}
BEST = "best.safetensors"  # the best epoch's weights while a keep_epoch = best-* run trains


# --------------------------------------------------------------------------- config
def _model_options(model: str, given: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Resolve a model's options: factory defaults overridden by ``given``.

    Options set from the dataset (:data:`DATASET_OPTIONS`) are excluded; an
    int given for a float option is stored as float so ``1`` and ``1.0``
    hash alike.
    """

    entry = model_entry(model)
    params = {
        n: p
        for n, p in inspect.signature(entry.factory).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in DATASET_OPTIONS
    }
    for k in given:
        if k in DATASET_OPTIONS:
            raise LmcError(
                f"model option {k!r} is set from the dataset, not by hand", f"remove {k} from the model options"
            )
        if k not in params:
            raise LmcError(f"model {model!r} has no option {k!r}", f"its options are: {', '.join(params) or '(none)'}")
    out: dict[str, Any] = {}
    for n, p in params.items():
        v = given.get(n, p.default)
        if v is inspect.Parameter.empty:
            raise LmcError(f"model {model!r} needs option {n!r}")
        if isinstance(p.default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        d = p.default
        ok = (
            v is None
            or d is None
            or d is inspect.Parameter.empty
            or (
                isinstance(v, bool)
                if isinstance(d, bool)
                else isinstance(v, float)
                if isinstance(d, float)
                else (isinstance(v, int) and not isinstance(v, bool))
                if isinstance(d, int)
                else isinstance(v, type(d))
            )
        )
        if not ok or not isinstance(v, (str, int, float, bool, type(None))):
            raise LmcError(f"model option {n}={v!r} should be {type(d).__name__}", f"fix the {n} setting")
        out[n] = v

    check_size_options(model, out)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class TrainConfig:
    """What to train: every field enters the run folder's hash.

    Parameters
    ----------
    model, model_kwargs:
        Registered model name and its options (``width_mult``, ``norm``, ...;
        a mapping, stored resolved with the factory's defaults as sorted
        pairs). ``in_channels``/``image_size``/``num_classes`` come from the
        dataset.
    dataset, val_size:
        Dataset name; ``val_size`` training images held out as ``val``.
    seed:
        Seeds the model initialisation and the batch order / augmentation.
    epochs, batch_size:
        Passes over the training split and images per step (the last batch of
        an epoch may be smaller).
    optimizer, lr, momentum, nesterov, weight_decay:
        ``sgd`` (with momentum/nesterov), ``adam`` or ``adamw`` (betas 0.9,
        0.999); ``momentum``/``nesterov`` are used by SGD only.
    schedule, warmup_epochs:
        Learning-rate schedule per step (see the module docstring); the
        warm-up may be fractional.
    augment:
        Random crop (pad 4) and horizontal flip of training batches.
    eval_batch_size:
        Batch size of the per-epoch evaluations.
    precision:
        ``fp32`` (default) or ``bf16``: the training forward and backward
        passes under ``torch.autocast(bfloat16)``; weights, optimiser state,
        evaluations and checkpoints stay float32. It changes what is computed,
        so it is part of the hash; to keep the hashes of every earlier run,
        it enters the hash only when it is not ``fp32``.
    preprocess:
        What the model sees of the pixels (:data:`lmckit.data.PREPROCESSING`):
        ``standardize`` (default: scaled to [0, 1], then standardised per
        channel with the training set's mean and std) or ``scale01`` (only
        scaled to [0, 1], as the STE-MM authors' ``ToTensor`` does: e5-a/STE-MM
        ``srcs/datasets/FMNIST.py``). Every later stage that evaluates the
        model (barriers, matching on data, analyses) loads the data with the
        model's own preprocessing (:func:`dataset_of`).
    keep_epoch:
        Which epoch's weights the run keeps (:data:`KEEP_EPOCHS`): ``last``
        (default), ``best-test`` (the epoch with the highest test accuracy,
        ties to the earlier epoch: what the STE-MM authors' training keeps, a
        ``ModelCheckpoint(monitor='val_acc_epoch', mode='max', save_top_k=1)``
        whose validation loader is the test set, e5-a/STE-MM ``srcs/train.py``
        and ``srcs/datasets/template.py``; it selects on the data the results
        are reported on) or ``best-val`` (the same on the held-out ``val``
        split, the proper choice; needs ``val_size > 0``).

    Notes
    -----
    ``preprocess`` and ``keep_epoch`` enter the hash only away from their
    defaults (as ``precision`` does), so every earlier run keeps its hash.
    """

    model: str = "mlp"
    model_kwargs: Any = ()
    dataset: str = "fashion-mnist"
    val_size: int = 0
    seed: int = 0
    epochs: int = 5
    batch_size: int = 500
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    augment: bool = False
    eval_batch_size: int = 2000
    precision: str = "fp32"
    preprocess: str = "standardize"
    keep_epoch: str = "last"

    def __post_init__(self) -> None:
        kw = self.model_kwargs
        if isinstance(kw, Mapping):
            kw = dict(kw)
        elif isinstance(kw, (tuple, list)):
            try:
                kw = dict(kw)
            except (TypeError, ValueError):
                raise LmcError(f"model_kwargs {self.model_kwargs!r} is not a mapping of option -> value") from None
        else:
            raise LmcError(f"model_kwargs {self.model_kwargs!r} is not a mapping of option -> value")
        set_ = object.__setattr__
        set_(self, "model_kwargs", _model_options(self.model, kw))
        for f in dataclasses.fields(self):
            if f.name == "model_kwargs":
                continue
            v = getattr(self, f.name)
            typ = (
                f.type
                if isinstance(f.type, type)
                else {"str": str, "int": int, "float": float, "bool": bool}.get(str(f.type))
            )
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                set_(self, f.name, float(v))
            elif typ is int and isinstance(v, float) and v.is_integer():
                set_(self, f.name, int(v))
            elif typ is not None and not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise LmcError(f"training setting {f.name}={v!r} should be {getattr(typ, '__name__', typ)}")

        if self.precision not in PRECISIONS:
            raise LmcError(f"unknown precision {self.precision!r}", f"choose one of {', '.join(PRECISIONS)}")
        for f in dataclasses.fields(self):  # NaN/inf and integers beyond int64 are refused before any work
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise LmcError(f"training setting {f.name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v <= MAX_INT:
                raise LmcError(f"training setting {f.name} = {v} is out of range (at most {MAX_INT})")
        if not 0 <= self.seed <= MAX_INT:
            raise LmcError(f"training setting seed must be between 0 and {MAX_INT}, got {self.seed}")
        for name, hi in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH), ("eval_batch_size", MAX_BATCH)):
            if getattr(self, name) > hi:
                raise LmcError(f"training setting {name} must be at most {hi}, got {getattr(self, name)}")
        if self.preprocess not in PREPROCESSING:
            raise LmcError(
                f"unknown preprocessing {self.preprocess!r} (training setting preprocess)",
                f"choose one of {', '.join(PREPROCESSING)}",
            )
        if self.keep_epoch not in KEEP_EPOCHS:
            raise LmcError(
                f"unknown keep_epoch {self.keep_epoch!r} (training setting keep_epoch)",
                f"choose one of {', '.join(KEEP_EPOCHS)}",
            )
        if self.keep_epoch == "best-val" and self.val_size <= 0:
            raise LmcError(
                "training setting keep_epoch = 'best-val' needs a validation split",
                "set val_size to the number of training images to hold out (e.g. 5000)",
            )
        if self.optimizer not in OPTIMIZERS:
            raise LmcError(f"unknown optimizer {self.optimizer!r}", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise LmcError(f"unknown schedule {self.schedule!r}", f"choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise LmcError(f"training setting {name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LmcError(f"learning rate must be a positive number, got {self.lr}")
        if self.val_size < 0 or self.weight_decay < 0 or self.momentum < 0 or self.warmup_epochs < 0:
            raise LmcError("val_size, weight_decay, momentum and warmup_epochs must not be negative")
        if self.warmup_epochs > self.epochs:
            raise LmcError(
                f"warm-up ({self.warmup_epochs} epochs) is longer than training ({self.epochs} epochs)",
                "shorten the warm-up or train longer",
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise LmcError("nesterov needs the sgd optimizer with momentum > 0")

    @property
    def model_options(self) -> dict[str, Any]:
        """The resolved model options as a dict."""
        return dict(self.model_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the hash input); :meth:`from_dict` inverts it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model_kwargs"] = self.model_options
        for name, default in HASH_DEFAULTS.items():  # added later: absent at their defaults, older hashes hold
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LmcError(
                f"unknown training settings: {', '.join(unknown)}", f"known settings: {', '.join(sorted(names))}"
            )
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "TrainConfig":
        return make_config(None, base=self, **changes)

    def hash(self) -> str:

        return config_hash(self.to_dict())


def dataset_of(config: TrainConfig, data_dir: str | os.PathLike | None = None):
    """The dataset a model of ``config`` was trained and is evaluated on: its name, validation split and
    preprocessing (:func:`lmckit.data.load_dataset`; cached per process). Raises :class:`LmcError` when it
    cannot be found."""

    return load_dataset(config.dataset, data_dir=data_dir, val_size=config.val_size, preprocess=config.preprocess)


def preset_for(model: str, dataset: str) -> str | None:
    """The preset whose model and dataset are these, if any."""
    for name, p in PRESETS.items():
        if p["model"] == model and p["dataset"] == dataset:
            return name
    return None


def make_config(preset: str | None = None, *, base: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A config from a preset (or ``base``, or the defaults) plus overrides.

    ``None`` overrides are ignored. The keys ``width``, ``width_mult``,
    ``norm``, ``depth`` and ``activation`` are model options and merge into
    ``model_kwargs`` (as does a ``model_kwargs`` mapping).
    """
    if preset is not None and base is not None:
        raise ValueError("give a preset or a base config, not both")
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise LmcError(
                f"unknown training preset {preset!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                f"presets: {', '.join(PRESETS)}",
            )
        d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    elif base is not None:
        d = base.to_dict()
    else:
        d = {}
    kw = dict(d.get("model_kwargs", {}))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    kw.update(overrides.pop("model_kwargs", {}) or {})
    for k in MODEL_OPTION_KEYS:
        if k in overrides:
            kw[k] = overrides.pop(k)
    if "model" in overrides and overrides["model"] != d.get("model", TrainConfig.model):
        # Another model: keep only the options it also has.

        accepted = set(inspect.signature(model_entry(overrides["model"]).factory).parameters)
        base_kw = dict(d.get("model_kwargs", {}))
        kw = {k: v for k, v in kw.items() if k in accepted or k not in base_kw}
    d.update(overrides)
    d["model_kwargs"] = kw
    try:
        return TrainConfig.from_dict(d)
    except TypeError as e:  # pragma: no cover - from_dict checks names first
        raise LmcError(f"bad training settings: {e}") from None


# --------------------------------------------------------------------------- schedule
def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate used at optimiser step ``step`` (0-based); see the module docstring."""
    total = config.epochs * steps_per_epoch
    warm = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    frac = (step - warm) / max(total - warm, 1)
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - frac)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_untrained(config: TrainConfig, dataset) -> nn.Module:
    """The model at initialisation: seeded by ``config.seed``, global RNG state untouched."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return create_model(
            config.model,
            in_channels=dataset.in_channels,
            image_size=dataset.image_size,
            num_classes=dataset.num_classes,
            **config.model_options,
        )


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


# --------------------------------------------------------------------------- training
def train(
    config: TrainConfig,
    out_root: str | os.PathLike = "runs",
    device: str | torch.device = "auto",
    progress: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train ``config`` into ``out_root/train/<hash>`` (or return the finished run).

    Parameters
    ----------
    config:
        What to train.
    out_root:
        Root of the run store.
    device:
        ``auto``, ``cpu``, ``cuda``, ... (not part of the hash; bit-identical
        results are guaranteed on CPU only).
    progress:
        Per-epoch progress lines / bar (see :mod:`lmckit.progress`).
    data_dir:
        Where to look for the dataset first.
    threads:
        ``torch.set_num_threads`` for the run (restored afterwards).
    callback:
        ``callback(epoch, metrics)`` after each epoch's checkpoint is written
        (epochs count from 1). An exception raised there stops training; the
        checkpoint stays and a rerun resumes after that epoch.
    channels_last, tf32:
        GPU settings (how to run: not hashed, recorded in the run's
        ``config.json`` under ``provenance``). ``None``: channels_last for
        convolutional models on CUDA, TF32 allowed on CUDA
        (:func:`lmckit.device.channels_last_wanted`, :func:`lmckit.device.tf32_allowed`);
        neither on CPU.

    Returns
    -------
    TrainResult
        Final test metrics (of the last epoch's evaluation), train metrics
        (a clean evaluation pass over the training split in eval mode), wall
        seconds spent training (summed over resumes), and ``cached``.

    Notes
    -----
    Determinism on CUDA: a rerun on the same GPU model, driver and torch
    gives the same weights up to cuDNN/cuBLAS kernel choices and atomics;
    lmckit does not force deterministic algorithms, so CUDA runs are not
    promised to be bit-identical (and never equal CPU runs bit for bit).
    """

    if Path(out_root).exists() and not Path(out_root).is_dir():
        raise LmcError(f"output folder {out_root} is a file", "pass a folder for the run store (--out)")

    # Everything is validated before anything is written under out_root (no lock or .partial is left
    # behind by a bad device, model option or dataset).
    if threads is not None and not 1 <= int(threads) <= 4096:
        raise LmcError(f"--threads must be between 1 and 4096, got {threads}")
    ds = _validated_dataset(config, device, data_dir)
    final = _cached_or_target(run_dir_for(config, out_root), ds)
    if is_complete(final):
        return load_result(final, cached=True)
    if final.exists():
        raise LmcError(f"{final} exists but is not a finished run (no config.json)", "delete that folder and run again")
    check_run_store(Path(out_root))
    lock = final.with_name(final.name + ".lock")
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock_created, partial = not lock.exists(), partial_dir(final)
    partial_created = not partial.exists()
    try:
        with file_lock(lock, what="training run"):
            if is_complete(final):  # another process finished it while we waited
                return load_result(final, cached=True)
            old_threads = torch.get_num_threads()
            if threads:
                torch.set_num_threads(int(threads))
            try:
                return _train_locked(config, final, partial, device, progress, data_dir, callback, channels_last, tf32)
            finally:
                if threads:
                    torch.set_num_threads(old_threads)
    except Exception:  # a failure before the first epoch's checkpoint removes what this call created
        # (an interrupted run keeps its .partial folder and resumes; a diverged run keeps its last checkpoint)
        if partial_created and not (partial / CHECKPOINT).exists() and not is_complete(final):
            shutil.rmtree(partial, ignore_errors=True)
            if lock_created:
                lock.unlink(missing_ok=True)
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty
        raise


def train_in_folder(
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "auto",
    progress: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    keep: frozenset[str] = frozenset({"log.txt"}),
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train ``config`` inside ``folder``, a work folder the caller has locked and will publish itself.

    This is how the pipeline's model stage trains: the stage's own folder is the model's only folder
    (no second run folder under ``ROOT/train/``). The training is the one :func:`train` runs, epoch
    for epoch (same weights for the same config, data, threads and device); the files differ in one
    name only: the run record is ``train.json`` (``config.json`` marks a finished stage folder).
    The folder receives ``model.safetensors``, ``metrics.jsonl`` and ``train.json``; while training,
    ``checkpoint.safetensors`` after each epoch, from which a call on the same folder resumes (a
    killed stage keeps its ``.partial`` folder). A fresh start removes what an earlier attempt left
    in ``folder`` except the names in ``keep`` (the caller's log). Nothing is locked or renamed here.

    Returns the :class:`TrainResult` with ``run_dir = folder``. Raises :class:`LmcError` as
    :func:`train` does (bad device, model option, dataset; a checkpoint of another config or data).
    """
    _validated_dataset(config, device, data_dir)
    folder = Path(folder)
    run = _setup(config, folder, folder, device, data_dir, channels_last, tf32)
    run.keep, run.record, run.publish = frozenset(keep), IN_FOLDER_RECORD, False
    _resume_or_clean(run)
    _run_epochs(run, progress, callback)
    return _finish(run)


IN_FOLDER_RECORD = "train.json"  # the run record of train_in_folder (config.json is the stage's)


def _validated_dataset(config: TrainConfig, device: str | torch.device, data_dir: str | os.PathLike | None):
    """Check the device, load the dataset (cached per process) and check the model's size: the dataset."""
    resolve_device(device)
    ds = dataset_of(config, data_dir)
    check_training_size(config, ds.in_channels, ds.image_size, ds.num_classes)
    return ds


def check_training_size(
    config: TrainConfig, in_channels: int, image_size: int, num_classes: int, where: str = "training setting"
) -> int:
    """The one size check of a training run's model (:func:`lmckit.limits.check_model_size`), on the
    dataset's shape: run before training, and by recipe validation (so ``reproduce --dry-run``) with the
    shape the dataset registry records. Returns the parameter count; raises :class:`LmcError`."""
    return check_model_size(
        config.model,
        {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes, **config.model_options},
        where,
    )


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


def check_run_store(root: Path) -> None:
    """The run store can be written (checked before the lock file is created)."""

    check_output_path("run store --out", root, folder=True)


@dataclass
class _Run:
    """A training run in progress: what it trains, where it writes, and what it has done so far."""

    config: TrainConfig
    final: Path  # the finished run's folder
    partial: Path  # where it is built (renamed to ``final`` when done)
    dev: torch.device
    ds: Any  # the loaded dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # batch order and augmentation
    gpu: dict[str, Any]  # precision, channels_last, tf32 (how it runs: recorded, not hashed)
    cfg_dict: dict[str, Any]
    h: str  # the config hash
    start_epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # training seconds, summed over resumes
    resumed: list[int] = field(default_factory=list)  # epochs after which earlier processes stopped
    resume_note: str | None = None
    keep: frozenset[str] = frozenset()  # names a fresh start leaves in ``partial`` (train_in_folder: the log)
    record: str = "config.json"  # the run record's file name
    publish: bool = True  # rename ``partial`` to ``final`` when done (train_in_folder: the caller does)
    best: dict[str, Any] | None = None  # keep_epoch = best-*: {"epoch", "metric", "value"} of the best epoch so far

    @property
    def ckpt(self) -> Path:
        return self.partial / CHECKPOINT

    def write_metrics(self) -> None:
        atomic_write_text(
            self.partial / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.metrics)
        )


def _train_locked(
    config: TrainConfig,
    final: Path,
    partial: Path,
    device: str | torch.device,
    progress: bool,
    data_dir: str | os.PathLike | None,
    callback,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train under the run's lock: set up, resume (or start clean), run the epochs, finish the folder."""
    run = _setup(config, final, partial, device, data_dir, channels_last, tf32)
    _resume_or_clean(run)
    _run_epochs(run, progress, callback)
    return _finish(run)


def _setup(
    config: TrainConfig,
    final: Path,
    partial: Path,
    device: str | torch.device,
    data_dir: str | os.PathLike | None,
    channels_last: bool | None,
    tf32: bool | None,
) -> _Run:
    """Load the data, build the untrained model and its optimizer on the device, seed the generator."""
    dev = resolve_device(device)
    cfg_dict = config.to_dict()
    h = config_hash(cfg_dict)
    ds = dataset_of(config, data_dir)
    model = build_untrained(config, ds).to(dev)
    use_cl = channels_last_wanted(model, dev, channels_last)
    use_tf32 = tf32_allowed(dev, tf32)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    gpu = {"precision": config.precision, "channels_last": use_cl, "tf32": use_tf32}
    optimizer = make_optimizer(config, model.parameters())
    gen = torch.Generator().manual_seed(config.seed)
    return _Run(config, final, partial, dev, ds, model, optimizer, gen, gpu, cfg_dict, h)


def _resume_or_clean(run: _Run) -> None:
    """Resume from the ``.partial`` folder's checkpoint (same config and data, else an error), or clear it.

    A fresh start removes leftovers of a run killed before its first checkpoint. Raises :class:`LmcError`
    for a checkpoint of another config, of other data files, or one that cannot be read.
    """
    run.partial.mkdir(parents=True, exist_ok=True)
    ckpt, partial, ds = run.ckpt, run.partial, run.ds
    if not ckpt.exists():
        for p in partial.iterdir():
            if p.name not in run.keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    try:
        meta = load_checkpoint_into(ckpt, run.model, run.optimizer, run.gen)
    except LmcError as e:
        raise LmcError(f"cannot resume from {ckpt}: {e.message}", f"delete {partial} to restart this run") from None
    if meta.get("config_hash") != run.h:
        raise LmcError(
            f"checkpoint {ckpt} belongs to another config ({meta.get('config_hash')})",
            f"delete {partial} to restart this run",
        )
    if meta.get("data_checksums", dict(ds.checksums)) != dict(ds.checksums):
        raise LmcError(
            f"the unfinished run {partial} was started on other {run.config.dataset} files than the "
            "ones found now (their checksums differ)",
            f"point --data-dir at the data it started on, or delete {partial} to restart on this data",
        )
    run.start_epoch, run.metrics, run.elapsed = int(meta["epoch"]), list(meta["metrics"]), float(meta["elapsed"])
    run.best = meta.get("best")
    if run.best is not None and not (partial / BEST).exists():
        raise LmcError(
            f"cannot resume from {ckpt}: the best epoch's weights ({BEST}) are missing",
            f"delete {partial} to restart this run",
        )
    run.resumed = list(meta.get("resumed", [])) + [run.start_epoch]
    where = _where(run.dev, run.gpu)
    if meta.get("where", where) != where:  # still correct, but float sums may round differently
        run.resume_note = (
            f"[train] note: resuming on {where} but epochs 1-{run.start_epoch} ran on {meta['where']}; "
            "the weights will not be bit-identical to an uninterrupted run"
        )


def _run_epochs(run: _Run, progress: bool, callback) -> None:
    """Train the remaining epochs; after each, evaluate, checkpoint, append its metrics and call ``callback``.

    Raises :class:`LmcError` when the training loss is not finite (the last good checkpoint stays).
    """
    config, ds, dev, model = run.config, run.ds, run.dev, run.model
    x_u8, y_all = ds.on_device("train", dev)  # the whole split on the device, copied once
    n = int(x_u8.shape[0])
    # Whole split normalised once (no per-batch conversion) unless batches are augmented.
    x_all = None if config.augment else ds.normalize(x_u8)
    if run.gpu["channels_last"] and x_all is not None:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(n / config.batch_size)
    bar = (
        Progress(config.epochs, f"train {config.model} seed={config.seed}", every=0.0, unit="epoch")
        if progress
        else NullProgress()
    )
    if run.start_epoch:
        bar.write(f"[train] resuming {run.final.name} after epoch {run.start_epoch}")
        if run.resume_note:
            bar.write(run.resume_note)
        bar.update(run.start_epoch)
    try:
        for epoch in range(run.start_epoch, config.epochs):
            t0 = time.perf_counter()
            model.train()
            with tf32_scope(run.gpu["tf32"]):
                train_loss, train_acc, lr = _train_epoch(
                    model, run.optimizer, config, run.gen, x_all, x_u8, y_all, ds, dev, epoch, steps_per_epoch
                )
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise LmcError(
                    f"training diverged in epoch {epoch + 1} (loss {train_loss})",
                    f"lower the learning rate (now {config.lr}); the last good checkpoint is in {run.partial}",
                )
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
            if "val" in ds.images:
                row["val_loss"], row["val_acc"] = evaluate(
                    model, ds, "val", batch_size=config.eval_batch_size, device=dev
                )
            row["test_loss"], row["test_acc"] = evaluate(
                model, ds, "test", batch_size=config.eval_batch_size, device=dev
            )
            row["seconds"] = train_seconds
            row["eval_seconds"] = time.perf_counter() - t0 - train_seconds
            run.metrics.append(row)
            _keep_if_best(run, row)
            run.elapsed += time.perf_counter() - t0
            _checkpoint(run, epoch + 1)
            bar.update(1, loss=train_loss, test_acc=row["test_acc"])
            if callback is not None:
                callback(epoch + 1, row)
    finally:
        bar.close()


def _keep_if_best(run: _Run, row: dict[str, Any]) -> None:
    """``keep_epoch = best-*``: save this epoch's weights (atomically) when its accuracy beats every earlier one.

    Strictly higher only, so ties keep the earlier epoch, as Lightning's ``ModelCheckpoint(mode='max')``
    does (its comparison is ``torch.gt``) in the STE-MM authors' ``srcs/train.py``. Written before the
    epoch's checkpoint, which records ``run.best``: a kill between the two resumes from the previous
    checkpoint and repeats the epoch.
    """
    keep = run.config.keep_epoch
    if keep == "last":
        return
    metric = "test_acc" if keep == "best-test" else "val_acc"
    value = float(row[metric])
    if run.best is None or value > run.best["value"]:
        save_state(
            run.partial / BEST,
            {k: v.detach().to("cpu").contiguous() for k, v in run.model.state_dict().items()},
            {"epoch": int(row["epoch"]), "metric": metric, "value": value},
        )
        run.best = {"epoch": int(row["epoch"]), "metric": metric, "value": value}


def _checkpoint(run: _Run, epoch: int) -> None:
    """Write the resumable checkpoint after ``epoch`` (1-based), then the metrics so far."""
    save_checkpoint(
        run.ckpt,
        run.model,
        run.optimizer,
        run.gen,
        epoch,
        {
            "metrics": run.metrics,
            "elapsed": run.elapsed,
            "config_hash": run.h,
            "resumed": run.resumed,
            "data_checksums": dict(run.ds.checksums),
            "where": _where(run.dev, run.gpu),
            **({"best": run.best} if run.best is not None else {}),
        },
    )
    run.write_metrics()


def _finish(run: _Run) -> TrainResult:
    """Evaluate on the training split, save the model and its record, and rename ``.partial`` to the run folder."""
    config, ds, dev, model, partial = run.config, run.ds, run.dev, run.model, run.partial
    t0 = time.perf_counter()
    last = run.metrics[-1]
    if config.keep_epoch != "last":  # the kept epoch's weights replace the last epoch's
        if run.best is None:
            raise LmcError(f"the run in {partial} has no best epoch recorded", f"delete {partial} to restart this run")
        tensors, _ = load_state(partial / BEST)
        model.load_state_dict({k: v.to(dev) for k, v in tensors.items()})
        last = run.metrics[run.best["epoch"] - 1]
    train_eval = evaluate(model, ds, "train", batch_size=config.eval_batch_size, device=dev)
    run.elapsed += time.perf_counter() - t0
    result = {
        "test_loss": last["test_loss"],
        "test_accuracy": last["test_acc"],
        "train_loss": train_eval[0],
        "train_accuracy": train_eval[1],
        "epochs": config.epochs,
    }
    if config.keep_epoch != "last":
        result["kept_epoch"] = int(last["epoch"])
    if "val_loss" in last:
        result["val_loss"], result["val_accuracy"] = last["val_loss"], last["val_acc"]
    save_model(
        partial / "model.safetensors", model, dataset=config.dataset, lmckit_train=run.cfg_dict, config_hash=run.h
    )
    # metrics.jsonl again: a kill between the last checkpoint and its metrics line must not lose that line
    run.write_metrics()
    run.ckpt.unlink(missing_ok=True)
    (partial / BEST).unlink(missing_ok=True)
    for p in partial.glob(".*.tmp"):  # temp files of writes interrupted by an earlier kill
        p.unlink(missing_ok=True)
    atomic_write_json(partial / run.record, _run_record(run, result))
    final = finalize_dir(partial, run.final) if run.publish else partial
    return TrainResult(
        final,
        float(result["test_loss"]),
        float(result["test_accuracy"]),
        float(result["train_loss"]),
        float(result["train_accuracy"]),
        run.elapsed,
        False,
        config,
    )


def _run_record(run: _Run, result: dict[str, Any]) -> dict[str, Any]:
    """The run folder's ``config.json``: config, model, result and provenance (versions, device, data)."""
    ds = run.ds
    return {
        "kind": "lmckit.train",
        "schema": SCHEMA_VERSION,
        "hash": run.h,
        "config": run.cfg_dict,
        "model": run.model.lmckit_config,
        "dataset": run.config.dataset,
        "seed": run.config.seed,
        "result": result,
        "provenance": {
            "lmckit_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "device": str(run.dev),
            "threads": torch.get_num_threads(),
            **run.gpu,
            "wall_seconds": run.elapsed,
            "resumed_after_epochs": run.resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset": {
                "name": ds.name,
                "checksums": dict(ds.checksums),
                "sources": dict(ds.source),
                "sizes": {s: ds.size(s) for s in ds.splits()},
            },
        },
    }


def _where(dev: torch.device, gpu: Mapping[str, Any]) -> dict[str, Any]:
    """Where a checkpoint was computed (a resume elsewhere is noted: float sums may round differently)."""
    w: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        w.update(channels_last=gpu["channels_last"], tf32=gpu["tf32"])
    return w


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    gen: torch.Generator,
    x_all: torch.Tensor | None,
    x_u8: torch.Tensor,
    y_all: torch.Tensor,
    ds,
    dev: torch.device,
    epoch: int,
    steps_per_epoch: int,
) -> tuple[float, float, float]:
    """One pass over the shuffled training split; returns (mean loss, accuracy, last lr).

    Loss and correct counts are accumulated on the device and read once at
    the end (no per-step host sync).
    """

    n, bs = int(x_u8.shape[0]), config.batch_size
    order = torch.randperm(n, generator=gen)
    order_dev = order.to(dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    groups = optimizer.param_groups
    lr = config.lr
    model_cl = x_all is None and any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    for i, start in enumerate(range(0, n, bs)):
        idx = order_dev[start : start + bs]
        if x_all is not None:
            xb = x_all.index_select(0, idx)
        else:
            xb = ds.normalize(random_crop_flip(x_u8.index_select(0, idx), gen))
            if model_cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y_all.index_select(0, idx)
        lr = lr_at(config, epoch * steps_per_epoch + i, steps_per_epoch)
        for g in groups:
            g["lr"] = lr
        with autocast(dev, config.precision):
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach() * yb.shape[0]
            correct += (out.argmax(1) == yb).sum()
    per = int(y_all[0].numel()) if n else 1  # targets per item: 1 (a label), or T (a language model's tokens)
    return float(loss_sum) / n, int(correct) / (n * per), lr
