"""Recipe validation: a parsed TOML mapping checked field by field into a :class:`~lmckit.pipeline.recipe.Recipe`.

Unknown keys raise :class:`~lmckit.errors.LmcError` with a "did you mean"
hint, wrong types and out-of-range values raise it naming the dotted key;
then the cross-field checks (methods and their options, the stage budget,
every model's training settings, the studies' seeds) run on the whole
recipe, so a bad recipe fails before any stage starts. The schema is
:mod:`lmckit.pipeline.recipe_schema`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from types import SimpleNamespace
from typing import Any, Mapping

from ..errors import LmcError
from ..match.registry import get_method
from .recipe_schema import (
    MAX_MODELS,
    MAX_SEED,
    MAX_STAGES,
    NAIVE,
    NAME_RE,
    RESERVED_MODEL_KWARGS,
    RESERVED_OVERRIDES,
    SEARCHED_METHOD,
    SYMMETRY_CLASSES,
    SYMMETRY_METHODS,
    Recipe,
    field_choices,
    method_choices,
)
from .recipe_settings import _train_overrides


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


def _check_symmetry(v: Any, key: str, source: str) -> None:
    """``match.symmetry``: a non-empty list of distinct classes with an exact matching step, ``permutation`` in it."""
    if not isinstance(v, list):
        raise _bad(
            f"{key} must be a list of classes, got {v!r}", 'e.g. symmetry = ["permutation", "orthogonal"]', source
        )
    if not v:
        raise _bad(f"{key} is empty", 'list "permutation" (the default) and the classes to compare with it', source)
    for x in v:
        if x == "invertible":
            raise _bad(
                f"{key}: class 'invertible' has no exact matching step (the weight-matching objective is "
                "unbounded over invertible maps), so it cannot be aligned under",
                f"choose from {', '.join(SYMMETRY_CLASSES)}; `lmckit check-spec --symmetry invertible` lists "
                "what it admits",
                source,
            )
    dup = sorted({x for x in v if isinstance(x, str) and v.count(x) > 1})
    if dup:
        raise _bad(f"{key} lists {', '.join(map(repr, dup))} more than once: {v!r}", "name each class once", source)
    if "permutation" not in v:
        raise _bad(
            f"{key} = {v!r} leaves out 'permutation'",
            "the recipe's own matches are its permutation rows and always run; list "
            '"permutation" first and the classes to compare with it, e.g. ["permutation", "orthogonal"]',
            source,
        )


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
    if meta.get("check") == "symmetry":
        _check_symmetry(v, key, source)
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
    extra = [c for c in r.match.symmetry if c != "permutation"]
    if extra and not any(m in SYMMETRY_METHODS for m in r.match.methods):
        raise _bad(
            f"match.symmetry = {list(r.match.symmetry)} needs weight or activation in match.methods "
            f"(the methods that align under {', '.join(extra)}), which has {list(r.match.methods)}",
            'add weight (or activation) to match.methods, or set match.symmetry = ["permutation"]',
            source,
        )


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
    classes = len(r.match.symmetry) - 1  # beyond permutation: one stage per class, plus a folded baseline
    sym_methods = sum(m in SYMMETRY_METHODS for m in r.match.methods)
    total += len(r.models) * n_pairs * sym_methods * (classes + 1 if classes else 0)
    if total > MAX_STAGES:
        raise _bad(
            f"the recipe would run about {total} stages, more than the {MAX_STAGES} allowed "
            f"({len(r.models)} models, {n_seeds} seeds, {n_pairs} pairs, {r.match.searches} searches)",
            'use fewer seeds, pairs = "disjoint" or fewer match.searches',
            source,
        )


def _have(module: str) -> bool:
    """Whether an optional package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _train_settings(r: Recipe, source: str) -> None:
    """Every model's training settings resolve (checked now, naming the recipe key, not after other models trained)."""
    from ..data.registry import dataset_info  # (torch: imported when a recipe is checked, not when it is listed)
    from ..data.text import BYTE_VOCAB, TEXT_DATASETS
    from ..train import check_training_size, make_config

    try:
        if isinstance(r.data.dataset, str) and r.data.dataset in TEXT_DATASETS and not _have("transformers"):
            info = None  # language models need the hf extra: training says so; listing and checking must not fail
        elif isinstance(r.data.dataset, str) and r.data.dataset in TEXT_DATASETS:
            # a token dataset's shape for the model factories: one channel, the context as image_size, byte vocab
            info = SimpleNamespace(
                in_channels=1, image_size=TEXT_DATASETS[r.data.dataset][0], num_classes=BYTE_VOCAB, train_size=None
            )
        else:
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


def _too_deep(source: str) -> LmcError:
    return LmcError(
        f"recipe {source} is nested too deeply to read",
        "a recipe needs only a few levels of tables and lists (see the shipped recipes)",
    )
