"""Parsing untrusted JSON and TOML: one reader for every file lmckit did not write itself this run.

Refuses what would break the code after it, naming the file and the place: nesting deeper than
:data:`MAX_NESTING`, integers outside int64, duplicate keys, non-finite numbers where they are not
allowed, and a wrong top-level type (:func:`parse_json`, :func:`parse_toml`, :func:`check_parsed`);
:func:`check_format` checks a file's ``format``/``version`` fields. Pure parsing (no file I/O, no
torch): :func:`lmckit.store.read_json` reads a file through it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .errors import LmcError

#: deepest nesting of lists/objects (tables/arrays in TOML) a file read by lmckit may have; lmckit's own files
#: use at most 6 levels, and deeper ones would recurse in the checks, hashes and copies made of them
MAX_NESTING = 64
#: integers in files lmckit reads must fit in 64 bits (seeds, sizes and indices are int64 in torch)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Bad:
    """A value :func:`parse_json` refused (found again, with its place, by the walk after parsing)."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


class _DupKeys(dict):
    """An object with a key given twice (JSON allows it; Python would silently keep the last value)."""

    dup: str = ""


def _json_int(s: str) -> Any:
    if len(s.lstrip("-")) > 19:  # cheap: more digits than any int64 (and than Python's 4300-digit limit)
        return _Bad(f"the integer {s[:24]}{'...' if len(s) > 24 else ''} does not fit in 64 bits")
    v = int(s)
    return v if INT64_MIN <= v <= INT64_MAX else _Bad(f"the integer {s} does not fit in 64 bits")


def _json_float(s: str) -> Any:
    v = float(s)
    return v if v - v == 0.0 else _Bad(f"the number {s[:24]} overflows to infinity")


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    seen: set[str] = set()
    out = _DupKeys(d)
    out.dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return out


def _place(path: list) -> str:
    """``perms.fc1[3]`` for the key path ``["perms", "fc1", 3]`` (a long path keeps its ends)."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    if len(parts) > 8:
        parts = [*parts[:3], "...", *parts[-3:]]
    return "".join(parts).lstrip(".")


def check_parsed(
    obj: Any, where: str, *, allow_nan: bool = True, what: str = "file", nesting_only: bool = False
) -> Any:
    """Walk a parsed JSON/TOML document (iteratively) and refuse what lmckit never writes; return ``obj``.

    Refused, with :class:`LmcError` naming ``where`` and the key path (e.g. ``perms.fc1[3]``): nesting
    deeper than :data:`MAX_NESTING`, integers outside int64, numbers that overflowed to infinity
    (``1e400``), a key given twice in one object, and NaN/Infinity unless ``allow_nan`` (lmckit's result
    records may hold NaN; permutation files and configs may not). ``nesting_only``: check the nesting alone.
    """
    stack: list[tuple[Any, list]] = [(obj, [])]
    while stack:
        x, path = stack.pop()
        bad = None
        if nesting_only and not isinstance(x, (dict, list)):
            continue
        if isinstance(x, _Bad):
            bad = x.why
        elif isinstance(x, float) and x - x != 0.0 and not allow_nan:
            bad = f"must be finite, got {x}"
        elif isinstance(x, int) and not isinstance(x, bool) and not INT64_MIN <= x <= INT64_MAX:
            bad = f"the integer {str(x)[:24]} does not fit in 64 bits"
        elif isinstance(x, (dict, list)):
            if len(path) >= MAX_NESTING:
                bad = f"nested more than {MAX_NESTING} levels deep"
            elif isinstance(x, _DupKeys):
                bad = f"the key {x.dup!r} is given twice"
            elif isinstance(x, dict):
                for k, v in x.items():
                    if isinstance(v, (dict, list, _Bad, float, int)):
                        stack.append((v, [*path, k]))
            else:
                for i, v in enumerate(x):
                    if isinstance(v, (dict, list, _Bad, float, int)):
                        stack.append((v, [*path, i]))
        if bad is not None:
            at = f" at {_place(path)}" if path else ""
            raise LmcError(f"{where}{at}: {bad}", f"this is not a {what} lmckit wrote; regenerate it or fix it")
    return obj


def _type_name(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number"
    )


def parse_json(
    text: str | bytes, where: str, *, expect: type | None = None, allow_nan: bool = True, what: str = "file"
) -> Any:
    """Parse untrusted JSON: the one JSON reader of every outside file (checkpoint headers and metadata,
    run configs, permutation files, cache records, stage and timing records).

    ``where`` names the file (and key) in messages. Raises :class:`LmcError` for invalid JSON, nesting
    deeper than :data:`MAX_NESTING` (no ``RecursionError``), integers outside int64, floats that overflow
    to infinity, duplicate keys, NaN/Infinity unless ``allow_nan``, and a top-level value that is not an
    ``expect`` (``dict`` for every lmckit file). Returns the parsed value.
    """
    try:
        obj = json.loads(text, parse_int=_json_int, parse_float=_json_float, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as e:
        raise LmcError(
            f"{where} is not valid JSON ({e.msg} at line {e.lineno})", "regenerate it with lmckit or fix the file"
        ) from None
    except RecursionError:  # e.g. 100000 nested brackets: deeper than the parser can go
        raise LmcError(
            f"{where} is nested more than {MAX_NESTING} levels deep",
            f"this is not a {what} lmckit wrote; regenerate it or fix it",
        ) from None
    except UnicodeDecodeError as e:
        raise LmcError(f"{where} is not UTF-8 text (byte {e.start})", "regenerate it with lmckit") from None
    check_parsed(obj, where, allow_nan=allow_nan, what=what)
    if expect is not None and not isinstance(obj, expect):
        raise LmcError(
            f"{where} holds {_type_name(obj)}, expected {_type_name(expect())}",
            f"this is not a {what} lmckit wrote; regenerate it or fix it",
        )
    return obj


def parse_toml(text: str, where: str, what: str = "recipe") -> dict[str, Any]:
    """Parse untrusted TOML with the checks of :func:`parse_json` (tomllib already refuses duplicate keys).

    Raises :class:`LmcError` naming ``where`` (and the key) for invalid TOML, nesting deeper than
    :data:`MAX_NESTING`, integers outside int64 and ``inf``/``nan`` values (no lmckit setting takes them).
    """
    import tomllib

    try:
        obj = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LmcError(
            f"{where} is not valid TOML: {e}", "fix the file (see the shipped recipes for examples)"
        ) from None
    except RecursionError:
        raise LmcError(
            f"{where} is nested more than {MAX_NESTING} levels deep",
            "a recipe needs only a few levels of tables and lists (see the shipped recipes)",
        ) from None
    return check_parsed(obj, where, allow_nan=False, what=what)


def check_format(d: Mapping[str, Any], where: str, fmt: str, version: int) -> None:
    """Refuse a file whose ``format`` names another kind of file or whose ``version`` is not ``version``.

    Both keys are optional (files from older lmckit lack them); present, they must be exactly ``fmt`` (a
    string) and ``version`` (an integer, not a bool). Raises :class:`LmcError` naming ``where`` and the key.
    """
    if "format" in d and d["format"] != fmt:
        raise LmcError(
            f"{where}: format is {str(d['format'])[:60]!r}, expected {fmt!r}", "pass the kind of file lmckit asks for"
        )
    if "version" in d and (type(d["version"]) is not int or d["version"] != version):
        raise LmcError(
            f"{where}: version is {str(d['version'])[:60]!r}; this lmckit reads version {version}",
            "regenerate the file with this lmckit (a newer lmckit may have written it)",
        )
