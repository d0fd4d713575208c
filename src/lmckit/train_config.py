"""What a training run trains: :class:`TrainConfig`, presets and overrides, the schedule and the optimiser.

A :class:`TrainConfig` is plain, validated, hashable data (every field enters
the run folder's hash, :meth:`TrainConfig.hash`); :func:`make_config` builds
one from a preset of :mod:`lmckit.presets` (or a base config) plus overrides;
:func:`lr_at` and :func:`make_optimizer` turn it into the learning rate of a
step and the ``torch.optim`` optimiser; :func:`build_untrained` into the
seeded model at initialisation. The training loop that uses them is
:mod:`lmckit.train`, the run folders it writes :mod:`lmckit.train_store`.

Learning-rate schedules (per optimiser step ``t``, ``T`` steps in all, ``W``
warm-up steps, base rate ``eta``):

* warm-up, ``t < W``: ``eta * (t + 1) / W``;
* ``constant``: ``eta``;
* ``linear``: ``eta * (1 - (t - W) / (T - W))`` (reaches 0 at ``t = T``);
* ``cosine``: ``eta * (1 + cos(pi * (t - W) / (T - W))) / 2``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from .data import PREPROCESSING, load_dataset
from .device import PRECISIONS
from .errors import LmcError
from .limits import check_model_size
from .models import create_model
from .models.registry import check_size_options, model_entry
from .presets import OPTIMIZERS, PRESETS, SCHEDULES
from .store import config_hash

# Model-factory options set from the dataset, never by the user.
DATASET_OPTIONS = ("in_channels", "image_size", "num_classes")
# Convenience keys of make_config / the CLI that are model options.
MODEL_OPTION_KEYS = ("width", "width_mult", "norm", "depth", "activation")
#: documented upper bounds of the training settings (checked before any work)
MAX_INT = 2**63 - 1
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
#: :attr:`TrainConfig.keep_epoch`: which epoch's weights a run keeps
KEEP_EPOCHS = ("last", "best-test", "best-val")
#: settings added after v0.1, left out of the hashed dict at these defaults (earlier runs keep their hashes)
HASH_DEFAULTS = {"precision": "fp32", "preprocess": "standardize", "keep_epoch": "last"}


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
        Learning-rate schedule per step (see this module's docstring); the
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
        for name in ("val_size", "weight_decay", "momentum", "warmup_epochs"):  # name the one that is negative
            if getattr(self, name) < 0:
                raise LmcError(f"training setting {name} must not be negative, got {getattr(self, name)}")
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
