"""A recipe written back as commented TOML (``lmckit reproduce --show RECIPE``).

Every key of the schema is written, defaults included, each with a comment
saying what it means, its default and its allowed values, all read from the
recipe dataclasses' field metadata (:mod:`lmckit.pipeline.recipe`): the
schema has one source. ``tomllib.loads(recipe_toml(r))`` parses back to the
same recipe (tested). ``docs/recipes.md`` documents the same schema in prose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from .recipe import Recipe, field_choices

__all__ = ["recipe_toml", "schema_rows"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"a recipe value must be finite, got {v!r}")
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are valid TOML escapes
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _mapping(v: tuple) -> dict[str, Any]:
    return {
        k: (
            _mapping(x)
            if isinstance(x, tuple) and x and all(isinstance(p, tuple) and len(p) == 2 for p in x)
            else list(x)
            if isinstance(x, tuple)
            else x
        )
        for k, x in v
    }


def _plain(v: Any, mapping: bool) -> Any:
    if mapping:
        return _mapping(v)
    if isinstance(v, tuple):
        return list(v)
    return v


#: what the recipe dataclasses leave without a help text (key -> meaning)
EXTRA_HELP = {
    "description": "one line shown under the report's title and by --list",
    "width_mult": "width multiplier of the model (1.0: the paper's width)",
    "epochs": "STE epochs over the training set",
    "lr": "STE learning rate (Adam)",
    "batch_size": "STE minibatch size",
    "splits": "data splits on which barriers are measured",
    "enabled": "run this part of the recipe",
    "gammas": "gamma values of R(gamma) (keep singular directions with sigma_i >= gamma * sigma_max)",
    "taylor_samples": "training images for the Hessian-vector products of the Taylor estimate",
    "projection_samples": "training images whose layer inputs are projected",
    "rank_gammas": "thresholds gamma of the rank-k truncation (sigma_i >= gamma * sigma_max kept)",
    "rank_fractions": "fractions of each hidden layer's rank kept in the rank-k truncation",
    "methods": "matching methods (naive: no permutation)",
    "landscape": "also evaluate the loss on the plane through the three aligned models",
    "widths": "width multipliers of the sweep",
    "seeds": "one model per seed",
}


def _comment(f: dataclasses.Field, default: Any) -> str:
    meta = f.metadata
    parts = [meta.get("help") or EXTRA_HELP.get(f.name, "")]
    choices = field_choices(meta)
    if choices:
        parts.append("one of " + ", ".join(choices))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        parts.append(f"in [{lo:g}, {hi:g}]")
    elif lo is not None:
        parts.append(f">= {lo:g}")
    parts.append(f"default {_toml_value(default)}")
    return "; ".join(p for p in parts if p)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _section(obj: Any) -> tuple[list[str], list[tuple[str, Any]]]:
    """The scalar lines of a dataclass table, and its sub-tables (name, value) to write after it."""
    lines: list[str] = []
    subs: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) or (isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0])):
            subs.append((f.name, v))
            continue
        mapping = bool(f.metadata.get("mapping"))
        default = _plain(_default(f), mapping)
        lines.append(f"# {_comment(f, default)}")
        lines.append(f"{f.name} = {_toml_value(_plain(v, mapping))}")
    return lines, subs


def recipe_toml(recipe: Recipe, header: str = "") -> str:
    """``recipe`` as commented TOML: every key, its value, and a comment with its meaning and default.

    Parameters
    ----------
    recipe : a validated :class:`~lmckit.pipeline.recipe.Recipe`.
    header : optional first comment lines (e.g. where the recipe came from).

    Returns
    -------
    TOML text that :func:`lmckit.pipeline.recipe.load_recipe` reads back to an equal recipe.
    """
    out: list[str] = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    top, subs = _section(recipe)
    out += top

    def write(name: str, value: Any) -> None:
        if isinstance(value, tuple):  # an array of tables ([[models]])
            for item in value:
                out.append("")
                out.append(f"[[{name}]]")
                lines, inner = _section(item)
                out.extend(lines)
                for n, v in inner:
                    write(f"{name}.{n}", v)
            return
        out.append("")
        out.append(f"[{name}]")
        lines, inner = _section(value)
        out.extend(lines)
        for n, v in inner:
            write(f"{name}.{n}", v)

    for name, value in subs:
        write(name, value)
    return "\n".join(out) + "\n"


def schema_rows(cls: type = Recipe, prefix: str = "") -> list[dict[str, str]]:
    """One row per key of the recipe schema: dotted key, type, default, constraint, help (for the docs test)."""
    rows: list[dict[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(tp, f"{key}.")
            continue
        if inner is not None and dataclasses.is_dataclass(inner):
            rows += schema_rows(inner, f"{key}[].")
            continue
        mapping = bool(f.metadata.get("mapping"))
        rows.append(
            {
                "key": key,
                "default": _toml_value(_plain(_default(f), mapping)),
                "help": _comment(f, _plain(_default(f), mapping)),
            }
        )
    return rows
