"""The ``lmckit`` command line.

Each subcommand lives in ``lmckit/commands/<name>.py`` and defines
``register(subparsers)``, which adds a parser whose ``func`` default takes
the parsed arguments and returns an exit status. User errors
(:class:`~lmckit.errors.LmcError`) print one paragraph and exit 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import LmcError

COMMANDS = ("models", "data", "train", "check_spec", "match", "methods", "barrier", "analyze", "merge", "landscape",
            "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmckit", description="Linear mode connectivity and permutation alignment toolkit.")
    parser.add_argument("--version", action="version", version=f"lmckit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except LmcError as e:
        print(f"lmckit {args.command}: error: {e.render()}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"lmckit {args.command}: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
