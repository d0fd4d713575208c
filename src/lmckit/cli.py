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
import io
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


#: the last usage error argparse reported (for --json's error object)
_USAGE_ERROR: list[str] = []


class LmckitParser(argparse.ArgumentParser):
    """argparse with lmckit's error convention: ``lmckit CMD: error: MSG`` on stderr, then CMD's usage, exit 2.

    Every parser shows its options' defaults in ``--help`` (:class:`~lmckit.commands.common.DefaultsHelpFormatter`).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _USAGE_ERROR.append(f"{self.prog}: {message}")
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


class StdoutError(LmcError):
    """Standard output cannot be written (a full device such as ``/dev/full``, a closed pipe, an I/O error)."""


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a failing write or flush raises :class:`StdoutError`.

    Without it a full or closed stdout ends in a traceback, or in Python's "Exception ignored" note when
    the interpreter flushes at exit.
    """

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, name, *a):
        if self._stream is None:  # file descriptor 1 was closed when Python started
            raise StdoutError("cannot write to standard output: it is closed", "run the command with an open stdout")
        try:
            return getattr(self._stream, name)(*a)
        except OSError as e:
            raise StdoutError(
                f"cannot write to standard output: {e.strerror or e} (errno {e.errno})",
                "write to a file or a pipe that is read to its end",
            ) from None
        except ValueError as e:  # "I/O operation on closed file"
            raise StdoutError(f"cannot write to standard output: {e}") from None

    def write(self, text):
        return self._guard("write", text)

    def writelines(self, lines):
        return self._guard("writelines", lines)

    def flush(self):
        return self._guard("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the exit-time flush of what could not be written stays quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _cwd_error() -> str | None:
    """A message when the working folder is gone (deleted under the shell): checked before torch is imported,
    whose libraries would otherwise fail to load with an unrelated message."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the current working folder no longer exists (it was deleted or moved away)"
    except OSError as e:
        return f"the current working folder cannot be read: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    cmd_guess = next((a for a in argv if isinstance(a, str) and not a.startswith("-")), None)

    def fail(command: str | None, message: str, code: int, hint: str | None = None) -> int:
        """The error line on stderr; with --json also one JSON error object on stdout (unless one was printed)."""
        prefix = f"lmckit {command}" if command else "lmckit"
        print(f"{prefix}: error: {message}" + (f"\n  fix: {hint}" if hint else ""), file=sys.stderr)
        if want_json:
            _json_error(command, message, code, hint)
        return code

    from .commands import common

    common.JSON_PRINTED[0] = 0  # per call: main may run several times in one process
    bad_cwd = _cwd_error()
    if bad_cwd:
        return fail(cmd_guess, bad_cwd, 2, "cd to an existing folder and run the command again")
    parser = build_parser()
    _USAGE_ERROR.clear()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, message already on stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if code and want_json:
            _json_error(cmd_guess, _USAGE_ERROR[-1] if _USAGE_ERROR else "bad command line", code)
        return code
    if not getattr(args, "func", None):
        return fail(None, "no command given", 2, "`lmckit --help` lists the commands")
    # lmckit.store imports torch: read only once a command runs, so `lmckit --help` and parse errors stay fast
    from .store import USER_ERRNOS, os_error

    want_json = bool(getattr(args, "json", False))
    if getattr(args, "data_command", None):  # errors name the command as its usage errors do: `lmckit data info`
        args.command = f"{args.command} {args.data_command}"
    quiet = bool(getattr(args, "quiet", False))
    saved_quiet = os.environ.get("LMCKIT_NO_PROGRESS")
    if quiet:  # progress lines off, in this process and in any worker it starts
        os.environ["LMCKIT_NO_PROGRESS"] = "1"
    real_stdout = sys.stdout
    sys.stdout = _GuardedStdout(real_stdout)
    try:
        with ending_signals():
            rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a full stdout fails here, inside the command, not at the interpreter's exit
        if rc and want_json and not common.JSON_PRINTED[0]:
            _json_error(
                args.command, f"lmckit {args.command} failed (exit status {rc}); see the messages on stderr", rc
            )
        return rc
    except StdoutError as e:
        sys.stdout = real_stdout
        print(f"lmckit {args.command}: error: {e.message}", file=sys.stderr)
        _silence_stdout()
        return 2
    except LmcError as e:
        return fail(args.command, e.message, 2, e.hint)
    except OSError as e:  # a write to a read-only or full disk, a name too long, ...: the user's path, not a bug
        if e.errno not in USER_ERRNOS or not e.filename:
            if want_json:
                _json_error(args.command, f"{type(e).__name__}: {e}", 1)
            raise
        err = os_error(e, e.filename, "use")
        return fail(args.command, err.message, 2, err.hint)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name
        print(
            f"lmckit {args.command}: stopped by {name}; finished work is kept, rerun the same command to resume",
            file=sys.stderr,
        )
        if want_json:
            _json_error(args.command, f"stopped by {name}", 128 + signum)
        return 128 + signum
    except Exception as e:  # a bug: its traceback follows on stderr; --json still gets its one document
        if want_json:
            _json_error(args.command, f"{type(e).__name__}: {e}", 1)
        raise
    finally:
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = real_stdout
        if quiet:
            if saved_quiet is None:
                os.environ.pop("LMCKIT_NO_PROGRESS", None)
            else:
                os.environ["LMCKIT_NO_PROGRESS"] = saved_quiet


def _json_error(command: str | None, message: str, code: int, hint: str | None = None) -> None:
    """``--json``'s document on failure: ``{"error": ..., "hint": ..., "exit_code": N, "command": ...}``.

    Printed only when the command has not printed its own document; a stdout that cannot be written is
    left alone (the error line on stderr already says why).
    """
    from .commands import common

    if common.JSON_PRINTED[0]:
        return
    with contextlib.suppress(OSError, ValueError, LmcError):
        common.print_json({"error": message, "hint": hint, "exit_code": code, "command": command})
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
