"""Recipes: TOML files describing a whole reproduction, parsed into a validated dataclass tree.

A recipe is data, never code: it is read with :mod:`tomllib` and checked
field by field against the schema's dataclasses. Unknown keys raise
:class:`~lmckit.errors.LmcError` with a "did you mean" hint, wrong types and
out-of-range values raise it naming the dotted key.

Shipped recipes live in ``lmckit/recipes/<name>.toml``; any other file is
passed by path. ``--set key=value`` overrides are applied to the parsed TOML
before validation (dotted keys, list items by index: ``models.0.width_mult``);
values are TOML literals (``3``, ``0.5``, ``[0, 1]``, ``"mnist"``, ``true``),
and a value that is not a TOML literal is taken as a plain string.

This module reads recipes (shipped by name, or a file by path) and applies
the overrides; the schema lives in :mod:`lmckit.pipeline.recipe_schema`, the
validation in :mod:`lmckit.pipeline.recipe_check`, and their public names are
importable from here.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..errors import LmcError
from .recipe_check import MATCH_TABLE_METHODS, _too_deep, parse_recipe  # noqa: F401  (MATCH_TABLE_METHODS: re-exported)
from .recipe_schema import (  # noqa: F401  (re-exported: the schema's names are importable from here)
    MAX_MODELS,
    MAX_SEED,
    MAX_STAGES,
    METHODS,
    NAIVE,
    NAME_RE,
    RESERVED_MODEL_KWARGS,
    RESERVED_OVERRIDES,
    SEARCHED_METHOD,
    AnalysisSection,
    BarrierSection,
    DataSection,
    DirectionsStudy,
    DoseStudy,
    ManyModelsStudy,
    MatchSection,
    ModelEntry,
    PaperSection,
    Recipe,
    SteProtocolsStudy,
    SteSection,
    StudiesSection,
    ThreeModelSection,
    TrainSection,
    WeightDecayStudy,
    WidthSweepSection,
    anchor_method_choices,
    field_choices,
    joint_method_choices,
    method_choices,
    recipe_to_dict,
    ste_protocol_choices,
)

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
    if not raw:  # an empty (or comments-only) file is a mistake, not "every default": that would start a full run
        raise LmcError(
            f"recipe {source} sets no key at all (an empty file)",
            "write the recipe's keys (`lmckit reproduce --show quick` prints one with every key), or pass a name",
        )
    # [[models]] arrays need to exist before "models.0.x" overrides
    if "models" not in raw and any(s.startswith("models.") for s in sets):
        raw["models"] = [{}]
    try:  # deeply nested values (from the file or --set) would recurse in the copy, freeze and checks
        raw = apply_overrides(raw, sets)
        return parse_recipe(raw, source)
    except RecursionError:
        raise _too_deep(source) from None
