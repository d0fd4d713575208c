"""argparse building blocks the subcommands share: lazy choices, help with defaults, bounded numbers.

:class:`LazyChoices` reads a flag's allowed values from lmckit when first
checked (building a parser imports nothing heavy); :class:`DefaultsHelpFormatter`
shows each option's default; :class:`DeprecatedAlias` keeps an old flag
name working with a warning; :func:`int_in` and :func:`float_in` are argparse
types that refuse an out-of-range number at parse time (exit 2, one line,
before any work).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["LazyChoices", "DefaultsHelpFormatter", "DeprecatedAlias", "int_in", "float_in", "path_arg"]


class LazyChoices:
    """argparse ``choices`` read from ``lmckit.<module>.<name>`` when first checked or shown.

    Building the parser then imports nothing heavy; pass a ``metavar`` with it
    (argparse would otherwise list the choices, i.e. import them, at once).
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _load(self) -> list:
        import importlib

        return list(getattr(importlib.import_module(f"lmckit.{self.module}"), self.name))

    def __contains__(self, value: object) -> bool:
        return value in self._load()

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already states one.

    Like :class:`argparse.ArgumentDefaultsHelpFormatter`, but skips texts that already say "default" (many
    give it with its bounds, e.g. "(default 25, at most 1001)"), flags (``store_true``) and ``None`` defaults
    (whose meaning the text states in words, e.g. "default: the preset's").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        if (
            "default" in text.lower()
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
            or action.default == []
        ):
            return text
        if isinstance(
            action,
            (
                argparse._StoreTrueAction,
                argparse._StoreFalseAction,
                argparse._HelpAction,
                argparse._VersionAction,
                argparse._SubParsersAction,
            ),
        ):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest`` and notes the change on stderr.

    ``extend=True`` appends the values (for options given several times, e.g. ``--perms A B`` -> ``--perm``).
    """

    def __init__(self, option_strings, dest, new: str, extend: bool = False, **kw):
        kw.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kw)
        self.new, self.extend = new, extend

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        if self.extend:
            cur = list(getattr(namespace, self.dest, None) or [])
            setattr(namespace, self.dest, cur + list(values if isinstance(values, list) else [values]))
        else:
            setattr(namespace, self.dest, values)


def int_in(lo: int, hi: int):
    """argparse type: an integer in ``[lo, hi]``; anything else is a usage error (exit 2) before any work."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            if not (f == f and abs(f) != float("inf") and f.is_integer()):
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            v = int(f)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {text}")
        return v

    parse.__name__ = f"integer in [{lo}, {hi}]"
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False):
    """argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); NaN and inf are refused."""
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text}")
        return v

    parse.__name__ = f"number in [{lo:g}, {hi:g}]"
    return parse


def path_arg(text: str) -> str:
    """argparse type of a path that may name a folder (a run folder, an output or data folder): trailing
    ``/`` dropped, so ``runs/a/`` and ``runs/a`` are one argument everywhere (messages, JSON, perm files,
    provenance, report). ``/`` and ``""`` are kept as given (an empty path is refused where it is used).

    Not used for file outputs (``match --out``, ``--plot FILE.png``): there a trailing ``/`` names a folder
    and is refused by :func:`lmckit.store.check_output_path`.
    """
    stripped = text.rstrip("/" + os.sep)
    return stripped if stripped else text[:1]
