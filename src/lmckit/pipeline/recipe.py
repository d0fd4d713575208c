"""Recipes: TOML files describing a whole reproduction, parsed into a validated dataclass tree.

A recipe is data, never code: it is read with :mod:`tomllib` and checked
field by field against the dataclasses below. Unknown keys raise
:class:`~lmckit.errors.LmcError` with a "did you mean" hint, wrong types and
out-of-range values raise it naming the dotted key.

Shipped recipes live in ``lmckit/recipes/<name>.toml``; any other file is
passed by path. ``--set key=value`` overrides are applied to the parsed TOML
before validation (dotted keys, list items by index: ``models.0.width_mult``);
values are TOML literals (``3``, ``0.5``, ``[0, 1]``, ``"mnist"``, ``true``),
and a value that is not a TOML literal is taken as a plain string.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import LmcError
from ..match.registry import get_method, list_methods, methods_supporting
from ..match.ste_protocols import PROTOCOLS as STE_PROTOCOLS

__all__ = [
    "Recipe",
    "DataSection",
    "ModelEntry",
    "TrainSection",
    "MatchSection",
    "SteSection",
    "BarrierSection",
    "AnalysisSection",
    "ThreeModelSection",
    "WidthSweepSection",
    "StudiesSection",
    "load_recipe",
    "parse_recipe",
    "recipe_names",
    "apply_overrides",
    "recipe_to_dict",
]

#: The "no permutation" baseline of match.methods (not a matching method: no match stage runs).
NAIVE = "naive"
#: The default match.methods; any method of the matching registry may be named (:func:`method_choices`).
METHODS = (NAIVE, "weight", "activation", "ste")
#: The method ``match.searches`` repeats with seeds 0..searches-1 (every other method runs one search)
#: and whose first search carries the data-dependent analyses: weight matching, the method the claims are about.
SEARCHED_METHOD = "weight"


def method_choices() -> tuple[str, ...]:
    """``naive`` and every method of the matching registry (``lmckit methods``)."""
    return (NAIVE, *list_methods())


def ste_protocol_choices() -> tuple[str, ...]:
    """The STE protocols (:data:`lmckit.match.ste_protocols.PROTOCOLS`)."""
    return tuple(STE_PROTOCOLS)


def joint_method_choices() -> tuple[str, ...]:
    """``pairwise`` and the registry's many-model methods except MergeMany (``merge_many`` in ``methods``)."""
    from ..match.registry import list_many_methods

    return ("pairwise", *(m for m in list_many_methods() if m != "mergemany"))


def anchor_method_choices() -> tuple[str, ...]:
    """The registry methods that support anchor matching (the three-model experiment)."""
    return tuple(methods_supporting("anchor"))


def field_choices(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    """A field's allowed values (``choices`` may be a function, read when the recipe is checked)."""
    c = meta.get("choices")
    return tuple(c()) if callable(c) else c


MAX_SEED = 2**63 - 1
#: most [[models]] entries, and most stages a recipe may plan (checked before the plan is built or listed)
MAX_MODELS = 32
MAX_STAGES = 20_000

#: a recipe name is one safe path component: it names the default report folder ``reports/<name>``
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")

#: training settings the recipe sets elsewhere: an override may not contradict them (key -> where to set it)
RESERVED_OVERRIDES = {"seed": "train.seeds (one model per seed)", "dataset": "data.dataset", "model": "models.N.name"}
#: create_model options the recipe sets elsewhere (in model_kwargs overrides and models.N.options)
RESERVED_MODEL_KWARGS = {
    "width_mult": "models.N.width_mult (or width_sweep.widths)",
    "norm": "models.N.norm",
    "in_channels": "data.dataset (it follows the dataset)",
    "image_size": "data.dataset (it follows the dataset)",
    "num_classes": "data.dataset (it follows the dataset)",
}


def _f(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    mapping: bool = False,
    help: str = "",
    check: str = "",
    max_len: int | None = None,
    above_min: bool = False,
    omit_default: bool = False,
) -> Any:
    """A recipe field with its checks and help. ``omit_default``: left out of :func:`recipe_to_dict` (and so
    of every report's ``results.json``) while at its default, for keys added after reports were pinned."""
    meta = {
        "min": min,
        "max": max,
        "choices": choices if callable(choices) else (tuple(choices) if choices else None),
        "mapping": mapping,
        "help": help,
        "check": check,
        "max_len": max_len,
        "above_min": above_min,
        "omit_default": omit_default,
    }
    if isinstance(default, (list, dict, tuple)) or (
        dataclasses.is_dataclass(default) and not isinstance(default, type)
    ):
        d = default
        return field(default_factory=lambda: d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataSection:
    dataset: str = _f("fashion-mnist", help="dataset name (lmckit data list)")


@dataclass(frozen=True)
class ModelEntry:
    name: str = _f("mlp", help="registered model (lmckit models)")
    label: str = _f("", help="name shown in the report (default: the model name and width)")
    width_mult: float = _f(1.0, min=1e-6, max=1024.0)
    norm: str = _f("none", choices=("none", "batchnorm", "layernorm"))
    options: tuple = _f(
        (),
        mapping=True,
        check="model_kwargs",
        help="extra create_model keyword arguments, e.g. {depth = 3, width = 512}",
    )
    preset: str = _f("", help="lmckit.train preset for this model (default: train.preset)")
    overrides: tuple = _f(
        (), mapping=True, check="overrides", help="training overrides for this model, on top of train.overrides"
    )
    seeds: tuple[int, ...] = _f(
        (),
        min=0,
        max=MAX_SEED,
        max_len=64,
        omit_default=True,
        help="this entry's seeds, paired as match.pairs says (empty: train.seeds; not for the first entry, "
        "whose seeds the three-model experiment, width sweep and studies use)",
    )

    def display(self) -> str:
        """``label``, else e.g. ``mlp depth=3 width=512`` / ``vgg11 batchnorm x4``, built from the settings."""
        if self.label:
            return self.label
        parts = [self.name] + [f"{k}={v}" for k, v in self.options]
        if self.norm != "none":
            parts.append(self.norm)
        if self.width_mult != 1.0:
            parts.append(f"x{self.width_mult:g}")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainSection:
    preset: str = _f("mlp-fmnist", help="lmckit.train preset name")
    seeds: tuple[int, ...] = _f((0, 1, 2, 3), min=0, max=MAX_SEED, max_len=64, help="one model per seed (at most 64)")
    overrides: tuple = _f((), mapping=True, check="overrides", help="TrainConfig fields to override, e.g. {epochs = 5}")


@dataclass(frozen=True)
class SteSection:
    epochs: int = _f(1, min=1, max=100_000)
    lr: float = _f(1e-3, min=1e-12, max=1e3)
    batch_size: int = _f(256, min=1, max=1_000_000)
    max_iter: int = _f(30, min=1, max=100_000, help="weight-matching sweeps per projection")
    train_limit: int = _f(0, min=0, max=100_000_000, help="train STE on the first N training images only (0: all)")
    project_sweeps: int = _f(
        0,
        min=0,
        max=100_000,
        help="approximation: at most N sweeps of each step's warm-started projection, continued at the next "
        "step (0: off, every projection to convergence; the end-of-epoch projection always converges)",
    )
    project_every: int = _f(
        1, min=1, max=100_000, help="approximation: project at every k-th step only (1: off, every step)"
    )
    protocol: str = _f(
        "heldout-best",
        choices=tuple(STE_PROTOCOLS),
        help="which permutation STE keeps: best on a held-out set (identity and WM as candidates), "
        "git-re-basin's lowest minibatch midpoint loss (SGD momentum 0.9), random mixing's final "
        "one (loss at lambda ~ U(0,1)), or Ito et al.'s code's last-step projection (ste-mm-random: "
        "loss at weights rand(2)/sum; ste-mm-midpoint: at the midpoint); lr and batch_size above apply "
        "to every protocol (the ste_protocols study uses each protocol's literature values)",
    )


@dataclass(frozen=True)
class MatchSection:
    methods: tuple[str, ...] = _f(METHODS, choices=method_choices, max_len=32)
    pairs: str = _f(
        "disjoint",
        choices=("disjoint", "all"),
        help="model pairs from train.seeds: (s0,s1), (s2,s3), ... or every pair",
    )
    searches: int = _f(
        3, min=1, max=100, help="weight-matching seeds per pair (mean/std of R over searches; at most 100)"
    )
    max_iter: int = _f(100, min=1, max=100_000, help="weight-matching sweeps")
    am_samples: int = _f(5000, min=1, max=10_000_000, help="training images for activation statistics")
    ste: SteSection = _f(SteSection())
    options: tuple = _f(
        (),
        mapping=True,
        check="method_options",
        help="registry options of every method other than weight, activation and ste (those are set by the keys "
        "above), e.g. {sinkhorn = {steps = 100}}; `lmckit methods` lists each method's options",
    )


@dataclass(frozen=True)
class BarrierSection:
    lambdas: int = _f(25, min=2, max=1001, help="evenly spaced interpolation points including both ends (at most 1001)")
    splits: tuple[str, ...] = _f(("train", "test"), choices=("train", "test", "val"), max_len=3)
    limit: int = _f(10000, min=0, max=100_000_000, help="images per split and evaluation point (0: all)")
    bn_batches: int = _f(10, min=1, max=10_000, help="training batches for the BatchNorm reset at each point")


@dataclass(frozen=True)
class AnalysisSection:
    enabled: bool = _f(True)
    gammas: tuple[float, ...] = _f((0.0, 0.3), min=0.0, max=1.0, max_len=32)
    spectra: bool = _f(True, help="singular-value spectra and per-index alignment")
    alignment: bool = _f(True, help="alignment score R(gamma) per method")
    taylor: bool = _f(True, help="second-order Taylor estimate of the midpoint barrier")
    taylor_samples: int = _f(2000, min=1, max=10_000_000)
    projections: bool = _f(True, help="input projections onto right-singular vectors")
    projection_samples: int = _f(2000, min=1, max=10_000_000)
    rank: bool = _f(True, help="accuracy against kept rank")
    rank_gammas: tuple[float, ...] = _f((0.0, 0.05, 0.1, 0.2, 0.3, 0.5), min=0.0, max=1.0, max_len=32)
    rank_fractions: tuple[float, ...] = _f(
        (0.05, 0.1, 0.25, 0.5, 1.0),
        min=0.0,
        max=1.0,
        max_len=32,
        above_min=True,
        help="fractions of the rank kept, in (0, 1]",
    )
    eval_limit: int = _f(0, min=0, max=100_000_000, help="test images for rank-k accuracy (0: all)")


@dataclass(frozen=True)
class ThreeModelSection:
    enabled: bool = _f(True)
    models: int = _f(3, min=3, max=64, help="models matched to the anchor (the first seed)")
    methods: tuple[str, ...] = _f(("weight", "ste"), choices=anchor_method_choices, max_len=32)
    landscape: bool = _f(True)
    grid: int = _f(9, min=3, max=201, help="points per side of the loss-landscape grid (at most 201)")
    merge_many: bool = _f(True, help="also run MergeMany")


@dataclass(frozen=True)
class WidthSweepSection:
    enabled: bool = _f(False)
    widths: tuple[float, ...] = _f((0.25, 0.5, 1.0, 2.0), min=1e-6, max=1024.0, max_len=32)
    methods: tuple[str, ...] = _f((NAIVE, "weight"), choices=method_choices, max_len=32)
    pairs: int = _f(1, min=1, max=32, help="model pairs per width")


@dataclass(frozen=True)
class DirectionsStudy:
    enabled: bool = _f(False)
    gammas: tuple[float, ...] = _f(
        (0.3, 0.1),
        min=0.0,
        max=1.0,
        max_len=16,
        help="WM-top keeps sigma_i >= gamma sigma_max of every weight matrix, WM-tail the rest",
    )
    pairs: int = _f(1, min=1, max=32, help="model pairs (the first of match.pairs)")


@dataclass(frozen=True)
class DoseStudy:
    enabled: bool = _f(False)
    fractions: tuple[float, ...] = _f(
        (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
        min=0.0,
        max=1.0,
        max_len=32,
        help="fraction of the units of every group re-assigned at random after WM",
    )
    draws: int = _f(3, min=1, max=64, help="random draws per fraction")
    pairs: int = _f(1, min=1, max=32)


@dataclass(frozen=True)
class WeightDecayStudy:
    enabled: bool = _f(False)
    values: tuple[float, ...] = _f((0.0, 1e-4, 1e-3, 1e-2), min=0.0, max=10.0, max_len=16)
    optimizer: str = _f("adamw", choices=("adamw", "adam", "sgd"), help="training optimizer of the study's models")
    pairs: int = _f(1, min=1, max=32)
    gamma: float = _f(0.3, min=0.0, max=1.0, help="spectrum concentration: fraction of sigma_i >= gamma sigma_max")


@dataclass(frozen=True)
class ManyModelsStudy:
    enabled: bool = _f(False)
    counts: tuple[int, ...] = _f(
        (2, 3, 4, 5), min=2, max=64, max_len=16, help="numbers of models N (the first N seeds; seed 0 the anchor)"
    )
    methods: tuple[str, ...] = _f(
        ("weight", "activation", "ste", "merge_many"), choices=("weight", "activation", "ste", "merge_many"), max_len=4
    )
    joint: tuple[str, ...] = _f(
        (),
        choices=lambda: joint_method_choices(),
        max_len=8,
        omit_default=True,
        help="many-model methods also run (STE-MM, C2M3: options from match.options.<method>) on the first N "
        "models for every N, and 'pairwise' (WM of every pair: its cycle error)",
    )
    ste_protocols: tuple[str, ...] = _f(
        (),
        choices=lambda: ste_protocol_choices(),
        max_len=8,
        omit_default=True,
        help="STE protocols also run here, each matching models 1..N-1 to the anchor with the ste_protocols "
        "study's settings for it (epochs, train_limit; every one must be listed there)",
    )


@dataclass(frozen=True)
class SteProtocolsStudy:
    enabled: bool = _f(False)
    protocols: tuple[str, ...] = _f(
        ("heldout-best", "git-re-basin", "random-mixing"),
        choices=tuple(STE_PROTOCOLS),
        max_len=len(STE_PROTOCOLS),
    )
    epochs: tuple[int, ...] = _f(
        (3, 20, 3),
        min=1,
        max=100_000,
        max_len=len(STE_PROTOCOLS),
        help="STE epochs per protocol (same order as protocols)",
    )
    train_limit: int = _f(0, min=0, max=100_000_000, help="STE trains on the first N training images (0: all)")
    pairs: int = _f(
        3, min=1, max=32, help="disjoint model pairs (plus the three-model matches of the first three seeds)"
    )


@dataclass(frozen=True)
class PaperSection:
    enabled: bool = _f(
        False,
        omit_default=True,
        help="the report's 'paper' section: claims 1-6 per model entry and per STE protocol side by side, with "
        "mean, std and 95% intervals over pairs and the paper's values (docs/definitions.md, 'The paper recipe')",
    )


@dataclass(frozen=True)
class StudiesSection:
    directions: DirectionsStudy = _f(DirectionsStudy())
    alignment_dose: DoseStudy = _f(DoseStudy())
    weight_decay: WeightDecayStudy = _f(WeightDecayStudy())
    many_models: ManyModelsStudy = _f(ManyModelsStudy())
    ste_protocols: SteProtocolsStudy = _f(SteProtocolsStudy())


@dataclass(frozen=True)
class Recipe:
    name: str = _f("custom", check="name", help="letters, digits, '-', '_', '.'; the report goes to reports/<name>")
    description: str = _f("")
    data: DataSection = _f(DataSection())
    models: tuple[ModelEntry, ...] = _f((ModelEntry(),))
    train: TrainSection = _f(TrainSection())
    match: MatchSection = _f(MatchSection())
    barrier: BarrierSection = _f(BarrierSection())
    analysis: AnalysisSection = _f(AnalysisSection())
    three_models: ThreeModelSection = _f(ThreeModelSection())
    width_sweep: WidthSweepSection = _f(WidthSweepSection())
    studies: StudiesSection = _f(StudiesSection())
    paper: PaperSection = _f(PaperSection(), omit_default=True)

    def pairs(self, seeds: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Model pairs of ``seeds`` (default: ``train.seeds``) as ``match.pairs`` says."""
        s = tuple(self.train.seeds if seeds is None else seeds)
        if self.match.pairs == "all":
            return [(s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))]
        return [(s[i], s[i + 1]) for i in range(0, len(s) - 1, 2)]


# --------------------------------------------------------------------------- validation
def _bad(msg: str, hint: str | None = None, source: str = "") -> LmcError:
    return LmcError(f"recipe {source}: {msg}" if source else f"recipe: {msg}", hint)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _check_scalar(tp: Any, value: Any, key: str, meta: Mapping[str, Any], source: str) -> Any:
    name = getattr(tp, "__name__", str(tp))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(f"{key} must be a number, got {value!r}", source=source)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise _bad(f"{key} must be finite, got {value!r}", source=source)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"{key} must be an integer, got {value!r}", source=source)
        if not -MAX_SEED - 1 <= value <= MAX_SEED:
            raise _bad(f"{key} = {value} does not fit in 64 bits", source=source)
    elif tp is bool:
        if not isinstance(value, bool):
            raise _bad(f"{key} must be true or false, got {value!r}", source=source)
    elif tp is str:
        if not isinstance(value, str):
            raise _bad(f"{key} must be a string, got {value!r}", source=source)
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported recipe field type {name}")
    if meta.get("min") is not None and value < meta["min"]:
        raise _bad(f"{key} must be at least {meta['min']:g}, got {value!r}", source=source)
    if meta.get("above_min") and value <= meta["min"]:
        raise _bad(f"{key} must be more than {meta['min']:g}, got {value!r}", source=source)
    if meta.get("max") is not None and value > meta["max"]:
        raise _bad(f"{key} must be at most {meta['max']:g}, got {value!r}", source=source)
    choices = field_choices(meta)
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        raise _bad(
            f"{key} = {value!r} is not one of {', '.join(choices)}",
            f"did you mean {close[0]!r}?" if close else None,
            source,
        )
    return value


def _check_name(v: Any, key: str, source: str) -> None:
    """A recipe name must be one safe path component (it names the report folder ``reports/<name>``)."""
    if not isinstance(v, str) or not NAME_RE.fullmatch(v) or v in (".", ".."):
        raise _bad(
            f"{key} = {v!r} is not a safe report name",
            "use 1-100 letters, digits, '-', '_' or '.' (not '.' or '..'); the report goes to "
            "reports/<name>; pass --out to write it elsewhere",
            source,
        )


def _check_model_kwargs(v: dict[str, Any], key: str, source: str) -> None:
    for k in v:
        if k in RESERVED_MODEL_KWARGS:
            raise _bad(
                f"{key}.{k} cannot be set here: the recipe sets it in {RESERVED_MODEL_KWARGS[k]}",
                f"remove {k} from {key} and set {RESERVED_MODEL_KWARGS[k].split(' ')[0]} instead",
                source,
            )


#: Methods whose options the ``[match]`` table sets with its own keys (max_iter, am_samples, [match.ste]).
MATCH_TABLE_METHODS = ("weight", "activation", "ste")


def _check_method_options(v: dict[str, Any], key: str, source: str) -> None:
    """``match.options``: a table per registry method, each validated by the method's options dataclass."""
    from ..match.registry import get_many_method, list_many_methods

    for name, opts in v.items():
        if name in list_many_methods():  # a many-model method (studies.many_models.joint)
            if not isinstance(opts, dict):
                raise _bad(f"{key}.{name} must be a table like {{epochs = 1}}, got {opts!r}", source=source)
            try:
                get_many_method(name).options(opts)
            except LmcError as e:
                raise _bad(f"{key}.{name}: {e.message}", e.hint or "", source) from None
            continue
        if name == NAIVE or name not in method_choices():
            raise _bad(
                f"{key}.{name}: no matching method {name!r}",
                f"choose from {', '.join(m for m in method_choices() if m != NAIVE)} (lmckit methods)",
                source,
            )
        if name in MATCH_TABLE_METHODS:
            raise _bad(
                f"{key}.{name}: {name}'s options are set by the [match] table's own keys",
                "use match.max_iter (weight), match.am_samples (activation) or [match.ste] (ste)",
                source,
            )
        if not isinstance(opts, dict):
            raise _bad(f"{key}.{name} must be a table like {{steps = 100}}, got {opts!r}", source=source)
        try:
            get_method(name).options(opts)
        except LmcError as e:
            raise _bad(f"{key}.{name}: {e.message}", e.hint or "", source) from None


def _check_overrides(v: dict[str, Any], key: str, source: str) -> None:
    """Training overrides may not contradict what the recipe sets elsewhere (seeds, dataset, model)."""
    for k, x in v.items():
        if k in RESERVED_OVERRIDES:
            where = RESERVED_OVERRIDES[k]
            raise _bad(
                f"{key}.{k} cannot be overridden: the recipe sets it in {where}",
                f"remove {k} from {key} and set {where.split(' ')[0]} instead",
                source,
            )
        if k == "model_kwargs":
            if not isinstance(x, dict):
                raise _bad(
                    f"{key}.model_kwargs must be a table like {{depth = 3}}, got {x!r}",
                    "e.g. model_kwargs = {depth = 3}, or set create_model options in models.N.options",
                    source,
                )
            _check_model_kwargs(x, f"{key}.model_kwargs", source)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise _bad(f"{prefix or 'the recipe'} must be a table, got {raw!r}", source=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1, cutoff=0.5)
            raise _bad(
                f"unknown key {key!r}",
                (f"did you mean {prefix}{close[0]!r}? " if close else "") + f"known keys here: {', '.join(fields)}",
                source,
            )
        f = fields[k]
        kwargs[k] = _value(hints[k], v, key, f.metadata, source)
    return cls(**kwargs)


def _value(tp: Any, v: Any, key: str, meta: Mapping[str, Any], source: str) -> Any:
    if meta.get("mapping"):
        if not isinstance(v, dict):
            raise _bad(f"{key} must be a table like {{epochs = 5}}, got {v!r}", source=source)
        if meta.get("check") == "overrides":
            _check_overrides(v, key, source)
        elif meta.get("check") == "model_kwargs":
            _check_model_kwargs(v, key, source)
        elif meta.get("check") == "method_options":
            _check_method_options(v, key, source)
        return _freeze(v)
    if meta.get("check") == "name":
        _check_name(v, key, source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, f"{key}.", source)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(v, list):
            raise _bad(f"{key} must be a list, got {v!r}", source=source)
        limit = meta.get("max_len") or (MAX_MODELS if dataclasses.is_dataclass(inner) else None)
        if limit is not None and len(v) > limit:
            raise _bad(f"{key} has {len(v)} entries, more than the {limit} allowed", source=source)
        if dataclasses.is_dataclass(inner):
            return tuple(_build(inner, x, f"{key}.{i}.", source) for i, x in enumerate(v))
        return tuple(_check_scalar(inner, x, f"{key}[{i}]", meta, source) for i, x in enumerate(v))
    return _check_scalar(tp, v, key, meta, source)


def _cross_checks(r: Recipe, source: str) -> None:
    from ..data import dataset_info
    from ..data.text import TEXT_DATASETS
    from ..models.registry import model_entry

    try:
        # token datasets (lmckit.data.text) are not in the image registry
        if not (isinstance(r.data.dataset, str) and r.data.dataset in TEXT_DATASETS):
            dataset_info(r.data.dataset)
    except LmcError as e:
        raise _bad(f"data.dataset: {e.message}", e.hint, source) from None
    if not r.models:
        raise _bad("models is empty", "add at least one [[models]] table", source)
    for i, m in enumerate(r.models):
        try:
            model_entry(m.name)
        except LmcError as e:
            raise _bad(f"models.{i}.name: {e.message}", e.hint, source) from None
    seeds = r.train.seeds
    if len(seeds) < 2:
        raise _bad(f"train.seeds needs at least two seeds, got {list(seeds)}", source=source)
    if len(set(seeds)) != len(seeds):
        raise _bad(f"train.seeds has duplicates: {list(seeds)}", source=source)
    for i, m in enumerate(r.models):
        if m.seeds and i == 0:
            raise _bad(
                "models.0.seeds is set: the first model entry uses train.seeds",
                "set train.seeds instead, or give the seeds to a later entry",
                source,
            )
        if m.seeds and (len(m.seeds) < 2 or len(set(m.seeds)) != len(m.seeds)):
            raise _bad(f"models.{i}.seeds needs at least two distinct seeds, got {list(m.seeds)}", source=source)
    if not r.match.methods:
        raise _bad("match.methods is empty", f"choose from {', '.join(method_choices())}", source)
    if r.three_models.enabled and r.three_models.models > len(seeds):
        raise _bad(
            f"three_models.models = {r.three_models.models} needs as many train.seeds (have {len(seeds)})",
            "add seeds or lower three_models.models",
            source,
        )
    if r.width_sweep.enabled and not r.width_sweep.widths:
        raise _bad("width_sweep.widths is empty", source=source)
    if r.width_sweep.enabled and 2 * r.width_sweep.pairs > len(seeds):
        raise _bad(
            f"width_sweep.pairs = {r.width_sweep.pairs} needs {2 * r.width_sweep.pairs} train.seeds", source=source
        )
    _study_checks(r, source)
    _report_checks(r, source)
    _method_options_used(r, source)
    _stage_budget(r, source)
    _train_settings(r, source)


def _method_options_used(r: Recipe, source: str) -> None:
    """``match.options.<method>`` for a method no part of the recipe runs would be silently ignored: refuse it."""
    used = set(r.match.methods)
    if r.three_models.enabled:
        used |= set(r.three_models.methods)
    if r.width_sweep.enabled:
        used |= set(r.width_sweep.methods)
    if r.studies.many_models.enabled:
        used |= set(r.studies.many_models.joint)
    for name, _ in r.match.options:
        if name not in used:
            raise _bad(
                f"match.options.{name} is set, but no part of the recipe runs {name}",
                f"add {name} to match.methods (or three_models.methods / width_sweep.methods), "
                f"or remove match.options.{name}",
                source,
            )


def _report_checks(r: Recipe, source: str) -> None:
    """Combinations that would run for a long time and then fail in a stage or in the report."""
    if not any(m != NAIVE for m in r.match.methods):
        raise _bad(
            f"match.methods = {list(r.match.methods)} has no matching method; the report compares matched "
            "against naive paths",
            "add weight, activation or ste to match.methods",
            source,
        )
    if not r.barrier.splits:
        raise _bad("barrier.splits is empty", 'e.g. splits = ["train", "test"]', source)
    if "val" in r.barrier.splits:
        sizes = [dict(r.train.overrides).get("val_size", 0)] + [dict(m.overrides).get("val_size") for m in r.models]
        if not any(isinstance(v, int) and v > 0 for v in sizes):
            raise _bad(
                "barrier.splits includes 'val', but no model holds out a validation split",
                "set train.overrides.val_size = N, or drop 'val' from barrier.splits",
                source,
            )
    if r.analysis.enabled and not r.analysis.gammas:
        raise _bad("analysis.gammas is empty", "e.g. gammas = [0.0, 0.3]", source)
    if r.three_models.enabled and not r.three_models.methods and not r.three_models.merge_many:
        raise _bad(
            "three_models has no methods and merge_many = false",
            "add a method, or set three_models.enabled = false",
            source,
        )
    if r.width_sweep.enabled and not r.width_sweep.methods:
        raise _bad("width_sweep.methods is empty", 'e.g. methods = ["naive", "weight"]', source)


def _stage_budget(r: Recipe, source: str) -> None:
    """Refuse recipes that would plan more than :data:`MAX_STAGES` stages (before anything is built or listed)."""
    n_seeds = len(r.train.seeds)
    n_pairs = n_seeds * (n_seeds - 1) // 2 if r.match.pairs == "all" else n_seeds // 2
    per_pair = sum((r.match.searches if m == SEARCHED_METHOD else 1) * 2 + 1 for m in r.match.methods)
    total = len(r.models) * (n_seeds + n_pairs * per_pair)
    if r.width_sweep.enabled:
        total += len(r.width_sweep.widths) * (2 * r.width_sweep.pairs * (1 + 3 * len(r.width_sweep.methods)))
    if r.three_models.enabled:
        total += r.three_models.models * len(r.three_models.methods) + 3
    if total > MAX_STAGES:
        raise _bad(
            f"the recipe would run about {total} stages, more than the {MAX_STAGES} allowed "
            f"({len(r.models)} models, {n_seeds} seeds, {n_pairs} pairs, {r.match.searches} searches)",
            'use fewer seeds, pairs = "disjoint" or fewer match.searches',
            source,
        )


def _train_settings(r: Recipe, source: str) -> None:
    """Every model's training settings resolve (checked now, naming the recipe key, not after other models trained)."""
    from ..data.registry import dataset_info
    from ..train import check_training_size, make_config
    from .build import _train_overrides

    try:
        info = dataset_info(r.data.dataset)
    except LmcError:
        info = None  # an unknown dataset name is reported by the data checks, naming data.dataset
    for i, m in enumerate(r.models):
        preset = m.preset or r.train.preset
        widths = [m.width_mult] + (
            [w * m.width_mult for w in r.width_sweep.widths] if i == 0 and r.width_sweep.enabled else []
        )
        for w in widths:
            for k, seed in enumerate(r.train.seeds):
                try:
                    cfg = make_config(preset, **_train_overrides(r, m, w, seed))
                    if k == 0 and info is not None:  # the size is the seed's alone: check it once per width
                        check_training_size(cfg, info.in_channels, info.image_size, info.num_classes)
                        if info.train_size is not None and cfg.val_size >= info.train_size:
                            raise LmcError(  # load_dataset refuses it too, but only once a stage runs
                                f"val_size {cfg.val_size} must be between 0 and the training set size "
                                f"{info.train_size} of {info.name}"
                            )
                except LmcError as e:
                    keys = [k for k, _ in list(r.train.overrides) + list(m.overrides) if k in e.message]
                    where = ", ".join(
                        f"{'models.%d' % i if k in dict(m.overrides) else 'train'}.overrides.{k}" for k in keys
                    ) or (f"models.{i} (preset {preset!r}, options {dict(m.options)}, width_mult {w:g})")
                    raise _bad(f"{where}: {e.message}", e.hint, source) from None


def _study_checks(r: Recipe, source: str) -> None:
    """The studies (issue 12) need enough seeds, and one epoch count per STE protocol."""
    st, n = r.studies, len(r.train.seeds)
    for name, sec, need in (
        ("directions", st.directions, 2 * st.directions.pairs),
        ("alignment_dose", st.alignment_dose, 2 * st.alignment_dose.pairs),
        ("weight_decay", st.weight_decay, 2 * st.weight_decay.pairs),
        ("many_models", st.many_models, max(st.many_models.counts, default=2)),
        ("ste_protocols", st.ste_protocols, max(2 * st.ste_protocols.pairs, 3)),
    ):
        if sec.enabled and need > n:
            raise _bad(
                f"studies.{name} needs {need} train.seeds, the recipe has {n}",
                f"add seeds or lower studies.{name}'s pairs/counts",
                source,
            )
    p = st.ste_protocols
    if p.enabled and len(p.epochs) != len(p.protocols):
        raise _bad(
            f"studies.ste_protocols.epochs has {len(p.epochs)} entries for {len(p.protocols)} protocols",
            "give one epoch count per protocol, in the same order",
            source,
        )
    if st.many_models.enabled and (not st.many_models.counts or not st.many_models.methods):
        raise _bad("studies.many_models.counts and .methods must not be empty", source=source)
    missing = [x for x in st.many_models.ste_protocols if not (p.enabled and x in p.protocols)]
    if st.many_models.enabled and missing:
        raise _bad(
            f"studies.many_models.ste_protocols names {', '.join(missing)}, which studies.ste_protocols does not run",
            "enable studies.ste_protocols and list the protocol there (its epochs and train_limit are used)",
            source,
        )


def parse_recipe(raw: Mapping[str, Any], source: str = "") -> Recipe:
    """Validate a parsed TOML mapping into a :class:`Recipe` (raises :class:`LmcError`)."""
    try:
        r = _build(Recipe, dict(raw), "", source)
    except RecursionError:
        raise _too_deep(source) from None
    _cross_checks(r, source)
    return r


# --------------------------------------------------------------------------- files and overrides
def recipe_names() -> list[str]:
    """Names of the recipes shipped in the package."""
    folder = resources.files("lmckit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str) -> tuple[dict[str, Any], str]:
    p = Path(name_or_path)
    if name_or_path.endswith(".toml") or p.exists() or "/" in name_or_path:
        from ..store import MAX_TEXT_BYTES, check_input_file

        if not p.exists() and not p.is_symlink():
            raise LmcError(f"recipe file {p} does not exist", f"shipped recipes: {', '.join(recipe_names())}")
        check_input_file(p, "recipe", MAX_TEXT_BYTES)  # a folder, /dev/zero or a huge file fails here, unread
        try:
            text = p.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise LmcError(f"recipe file {p} does not exist", f"shipped recipes: {', '.join(recipe_names())}") from None
        except UnicodeDecodeError as e:
            raise LmcError(f"recipe {p} is not valid UTF-8 text (byte {e.start})", "save the recipe as UTF-8") from None
        except OSError as e:
            raise LmcError(f"cannot read recipe {p}: {e.strerror}") from None
        source = str(p)
    else:
        f = resources.files("lmckit") / "recipes" / f"{name_or_path}.toml"
        if not f.is_file():
            names = recipe_names()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            raise LmcError(
                f"unknown recipe {name_or_path!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                f"shipped recipes: {', '.join(names)}; or pass a .toml file",
            )
        text = f.read_text()
        source = name_or_path
    from ..store import parse_toml

    return parse_toml(text, f"recipe {source}"), source


def _too_deep(source: str) -> LmcError:
    return LmcError(
        f"recipe {source} is nested too deeply to read",
        "a recipe needs only a few levels of tables and lists (see the shipped recipes)",
    )


def _parse_literal(text: str, key: str = "") -> Any:
    """A ``--set`` value: TOML if it parses, else the text. Numbers are checked by the recipe's schema
    after the override (naming the recipe and the key); only the nesting is bounded here."""
    from ..store import check_parsed

    try:
        v = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        v = None
    try:
        return check_parsed(v, "", nesting_only=True) if v is not None else _deep(text)
    except LmcError:
        return _deep(text)


def _deep(text: str):
    from ..store import MAX_NESTING

    raise LmcError(
        f"--set value {text[:40]!r}... is nested more than {MAX_NESTING} levels deep",
        "pass a plain value, list or table",
    )


def apply_overrides(raw: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key=value`` overrides applied (dotted keys, list indices)."""
    import copy

    out = copy.deepcopy(raw)
    for item in sets:
        if "=" not in item:
            raise LmcError(f"--set {item!r} is not key=value", "e.g. --set train.seeds=[0,1] or --set match.searches=5")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise LmcError(f"--set {item!r}: bad key {key!r}")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LmcError(f"--set {key}: {where} is not an index of a list of {len(node)} items")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise LmcError(f"--set {key}: {where} is a value, not a table")
        last = parts[-1]
        value = _parse_literal(text.strip(), key)
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise LmcError(f"--set {key}: {last!r} is not an index of a list of {len(node)} items")
            node[int(last)] = value
        else:
            node[last] = value
    return out


def load_recipe(name_or_path: str = "quick", sets: Sequence[str] = ()) -> Recipe:
    """Read a shipped recipe by name or a TOML file by path, apply ``--set`` overrides, validate."""
    raw, source = _read_toml(name_or_path)
    # [[models]] arrays need to exist before "models.0.x" overrides
    if "models" not in raw and any(s.startswith("models.") for s in sets):
        raw["models"] = [{}]
    try:  # deeply nested values (from the file or --set) would recurse in the copy, freeze and checks
        raw = apply_overrides(raw, sets)
        return parse_recipe(raw, source)
    except RecursionError:
        raise _too_deep(source) from None


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def recipe_to_dict(r: Any) -> Any:
    """A JSON-able view of a recipe (mappings back as dicts)."""
    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        out = {}
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            if f.metadata.get("omit_default") and v == _default_of(f):
                continue
            if f.metadata.get("check") == "method_options":  # a table of tables: {method: {option: value}}
                out[f.name] = {k: {o: recipe_to_dict(y) for o, y in x} for k, x in v}
            elif f.metadata.get("mapping"):
                out[f.name] = dict((k, recipe_to_dict(x)) for k, x in v)
            else:
                out[f.name] = recipe_to_dict(v)
        return out
    if isinstance(r, tuple):
        return [recipe_to_dict(x) for x in r]
    return r
