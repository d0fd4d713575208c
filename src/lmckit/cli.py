"""The ``lmckit`` command line.

Each subcommand lives in ``lmckit/commands/<name>.py`` and defines
``register(subparsers)``, which adds a parser whose ``func`` default takes
the parsed arguments and returns an exit status. One convention for every
command and sub-command: user errors (:class:`~lmckit.errors.LmcError`, bad
options, operating-system errors on the user's paths such as a read-only or
full disk) print ``lmckit COMMAND: error: ...`` on stderr and exit 2; anything
else is a bug and keeps its traceback. SIGTERM, SIGHUP and SIGINT end the
command cleanly (worker processes included; finished work is kept and a rerun
resumes) with status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn

from . import __version__
from .commands.common import DefaultsHelpFormatter
from .errors import LmcError

COMMANDS = (
    "models",
    "data",
    "train",
    "check_spec",
    "match",
    "methods",
    "barrier",
    "analyze",
    "merge",
    "landscape",
    "reproduce",
)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives (SIGINT raises KeyboardInterrupt itself).

    A ``KeyboardInterrupt`` subclass, so no ``except Exception`` swallows it and everything that cleans
    up on Ctrl-C (locks, worker pools) cleans up on these signals too.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: the commands that compute (and so take --json, --device and --quiet)
COMPUTING = ("train", "match", "barrier", "analyze", "merge", "landscape", "check-spec", "reproduce")


class LmckitParser(argparse.ArgumentParser):
    """argparse with lmckit's error convention: ``lmckit CMD: error: MSG`` on stderr, then CMD's usage, exit 2.

    Every parser shows its options' defaults in ``--help`` (:class:`~lmckit.commands.common.DefaultsHelpFormatter`).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # the error line first (one convention for every error), then this (sub)command's usage, not the top level's
        self.exit(2, f"{self.prog}: error: {message}\n  fix: see `{self.prog} --help`\n{self.short_usage()}\n")

    def short_usage(self) -> str:
        """This command's usage on one line, options abbreviated: ``usage: lmckit barrier [-h] [options] A B``."""
        positionals = [a for a in self._actions if not a.option_strings]
        fmt = self.formatter_class(prog=self.prog, width=100_000)
        fmt.add_usage(None, positionals, [], prefix="")
        tail = fmt.format_help().strip()[len(self.prog) :].strip()
        return f"usage: {self.prog} [-h] [options]" + (f" {tail}" if tail else "")


class LmckitSubParser(LmckitParser):
    """A subcommand's parser: arguments it does not know are its error (its usage, its prog), not the top level's."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            msg = f"unrecognized arguments: {' '.join(extras)}"
            if "--device" in extras or "--quiet" in extras:
                msg += (
                    f"; `{self.prog}` computes nothing, so --device and --quiet do not apply "
                    f"(they are options of {', '.join(COMPUTING)})"
                )
            self.error(msg)
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = LmckitParser(prog="lmckit", description="Linear mode connectivity and permutation alignment toolkit.")
    parser.add_argument("--version", action="version", version=f"lmckit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=LmckitSubParser)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


@contextlib.contextmanager
def ending_signals() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread.

    Python's default for them is to die at once, leaving worker processes and their resource tracker
    behind (holding the caller's stdout/stderr). Raising instead unwinds through every ``with`` block,
    so locks are released and process pools terminate their workers. Restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, message already on stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        print("lmckit: error: no command given\n  fix: `lmckit --help` lists the commands", file=sys.stderr)
        return 2
    # lmckit.store imports torch: read only once a command runs, so `lmckit --help` and parse errors stay fast
    from .store import USER_ERRNOS, os_error

    quiet = bool(getattr(args, "quiet", False))
    saved_quiet = os.environ.get("LMCKIT_NO_PROGRESS")
    if quiet:  # progress lines off, in this process and in any worker it starts
        os.environ["LMCKIT_NO_PROGRESS"] = "1"
    try:
        with ending_signals():
            return int(args.func(args) or 0)
    except LmcError as e:
        print(f"lmckit {args.command}: error: {e.render()}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # a write to a read-only or full disk, a name too long, ...: the user's path, not a bug
        if e.errno not in USER_ERRNOS or not e.filename:
            raise
        print(f"lmckit {args.command}: error: {os_error(e, e.filename, 'use').render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name
        print(
            f"lmckit {args.command}: stopped by {name}; finished work is kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + signum
    finally:
        if quiet:
            if saved_quiet is None:
                os.environ.pop("LMCKIT_NO_PROGRESS", None)
            else:
                os.environ["LMCKIT_NO_PROGRESS"] = saved_quiet


if __name__ == "__main__":
    sys.exit(main())
