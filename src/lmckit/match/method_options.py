"""The base of every matching method's options: a frozen dataclass validated on creation, built from user input.

A method's options (:class:`MethodOptions` subclasses, e.g.
:class:`lmckit.match.sinkhorn_options.SinkhornOptions`) declare typed fields
with defaults and check them in ``validate``; :meth:`MethodOptions.from_mapping`
converts CLI ``--option key=value`` strings and recipe tables to the field
types and rejects unknown keys. The small checks ``_positive``, ``_at_most``
and ``_one_of`` raise :class:`~lmckit.errors.LmcError` naming the option.
The registry (:mod:`lmckit.match.registry`) and every registering module
import this module; it imports no torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import LmcError

__all__ = ["MethodOptions"]


@dataclass(frozen=True)
class MethodOptions:
    """Base class of a method's options: a frozen dataclass validated on creation.

    Subclasses declare typed fields with defaults and override :meth:`validate`
    (raise :class:`LmcError` naming the option). :meth:`from_mapping` builds
    one from user input (CLI ``--option key=value``, a recipe table), rejecting
    unknown keys and converting strings to the declared types.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`LmcError` for a bad value (subclasses add their checks)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, method: str = "") -> "MethodOptions":
        """Options from a mapping of names to values (strings are converted to the field types)."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        where = f"method {method!r}" if method else cls.__name__
        if unknown:
            raise LmcError(
                f"{where} has no option {', '.join(map(repr, unknown))}",
                f"its options are: {', '.join(known) or '(none)'}",
            )
        hints = typing.get_type_hints(cls)
        conv = {k: _convert(v, hints[k], f"{where} option {k!r}") for k, v in values.items()}
        return cls(**conv)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """``[{name, type, default}]`` for listings."""
        hints = typing.get_type_hints(cls)
        return [{"name": f.name, "type": _type_name(hints[f.name]), "default": f.default} for f in fields(cls)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (``int``, ``float``, ``bool``, ``str`` or ``X | None``)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp in (int, float, bool, str) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise LmcError(f"{where} must be {tp.__name__}, got {value!r}")
        return value
    try:
        if tp is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
    except ValueError:
        raise LmcError(f"{where} must be {tp.__name__}, got {value!r}") from None
    return value


def _positive(opts: MethodOptions, *names: str) -> None:
    for n in names:
        v = getattr(opts, n)
        if v is not None and not v > 0:
            raise LmcError(f"option {n} must be positive, got {v}")


def _at_most(opts: MethodOptions, bound: int, *names: str) -> None:
    """The documented upper bounds (:mod:`lmckit.limits`) hold for options as for the CLI flags."""
    for n in names:
        v = getattr(opts, n)
        if v is not None and v > bound:
            raise LmcError(f"option {n} must be at most {bound:,}, got {v:,}", "lower it (a documented upper bound)")


def _one_of(opts: MethodOptions, name: str, allowed: tuple[str, ...]) -> None:
    v = getattr(opts, name)
    if v not in allowed:
        raise LmcError(f"option {name} must be one of {', '.join(allowed)}, got {v!r}")
