"""The command-line flags that set a matching method's options (``lmckit match``, ``lmckit merge``).

:data:`METHOD_FLAGS` maps flags such as ``--restarts``, ``--similarity`` and
``--ste-protocol`` to the option of the same name of whichever registry
method has one (:mod:`lmckit.match.registry`); :func:`add_method_flags`
declares them once for every command that runs a method, and
:func:`method_options` turns the parsed flags and ``--option KEY=VALUE``
into the method's options, refusing a flag the method has no option for.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..limits import (
    MAX_BATCH,
    MAX_BATCHES,
    MAX_EPOCHS,
    MAX_ITER,
    MAX_RESTARTS,
)
from ..match.ste_protocols import PROTOCOLS as STE_PROTOCOLS
from .argtypes import int_in

__all__ = ["METHOD_FLAGS", "add_method_flags", "add_option_flag", "method_options"]


# --------------------------------------------------------------------------- matching-method options
#: CLI flags that set an option of a registry matching method: argparse dest -> option name. A flag
#: applies to every method whose options have that name; its argparse default must be None ("not given").
METHOD_FLAGS = {
    "max_iter": "max_iter",
    "restarts": "restarts",
    "similarity": "similarity",
    "num_batches": "num_batches",
    "batch_size": "batch_size",
    "ste_preset": "preset",
    "ste_protocol": "protocol",
    "epochs": "epochs",
    "ste_state": "state_dir",
}


def add_method_flags(p: argparse.ArgumentParser, *, state_flag: bool = True) -> None:
    """The flags of :data:`METHOD_FLAGS` (``--restarts``, ``--max-iter``, ``--similarity``, ...), declared
    once for every command that runs a registry method (``match``, ``merge``), plus ``--option``.

    Each flag's default is None (the method's own default); :func:`method_options` refuses a flag the
    chosen method has no option for. ``state_flag=False`` leaves out ``--ste-state`` (``merge`` keeps
    the STE state in its output folder).
    """
    p.add_argument(
        "--restarts",
        type=int_in(1, MAX_RESTARTS),
        default=None,
        help=f"WM: independent descents, best kept (default 1, at most {MAX_RESTARTS})",
    )
    p.add_argument(
        "--max-iter",
        type=int_in(1, MAX_ITER),
        default=None,
        help=f"WM: maximum sweeps (MergeMany: also its passes) (default 100, at most {MAX_ITER})",
    )
    p.add_argument(
        "--similarity", choices=["pearson", "cross_moment"], default=None, help="AM: unit similarity (default pearson)"
    )
    p.add_argument(
        "--num-batches",
        type=int_in(1, MAX_BATCHES),
        default=None,
        help=f"AM: training batches used (default 10, at most {MAX_BATCHES})",
    )
    p.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH),
        default=None,
        help=f"AM, STE, sinkhorn: batch size (AM default 500, at most {MAX_BATCH})",
    )
    p.add_argument(
        "--ste-preset",
        choices=["adam", "git-re-basin"],
        default=None,
        help="STE: optimiser preset (adam: Adam 1e-3, batch 256, 10 epochs; git-re-basin: SGD 1e-2 m0.9, "
        "batch 1000; default: the protocol's)",
    )
    p.add_argument(
        "--ste-protocol",
        choices=list(STE_PROTOCOLS),
        default=None,
        help="STE: which permutation is kept (heldout-best: best on a held-out set with identity and WM as "
        "candidates; git-re-basin: lowest minibatch midpoint loss, SGD preset; random-mixing: loss at "
        "lambda ~ U(0,1), the final permutation; ste-mm-random / ste-mm-midpoint: Ito et al.'s code, loss "
        "at weights rand(2)/sum or at the midpoint, the last step's projection) (default heldout-best)",
    )
    p.add_argument(
        "--epochs", type=int_in(1, MAX_EPOCHS), default=None, help="STE: epochs, at least 1 (default: the preset's)"
    )
    if state_flag:
        p.add_argument(
            "--ste-state",
            default=None,
            help="STE: folder for the resumable state, drift.json and drift.png (default: none, not resumable)",
        )
    add_option_flag(p)


def add_option_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --method (see `lmckit methods NAME`), e.g. --option steps=200; repeatable; "
        "overrides the flag of the same option (default: the method's own)",
    )


def method_options(args: argparse.Namespace, method: str):
    """The validated registry options of ``method`` from its CLI flags and ``--option KEY=VALUE``.

    Raises :class:`LmcError` for a flag the method has no option for, a malformed ``--option``, an
    unknown option or a bad value.
    """
    import dataclasses

    from ..errors import LmcError
    from ..match.registry import get_method, list_methods

    def names(m: str) -> set[str]:
        return {f.name for f in dataclasses.fields(get_method(m).options_type)}

    mine = names(method)
    values: dict[str, Any] = {}
    for dest, opt in METHOD_FLAGS.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if opt not in mine:
            users = [m for m in list_methods() if opt in names(m)]
            raise LmcError(
                f"{flag} applies to --method {' or '.join(users)} only (got --method {method})", f"drop {flag}"
            )
        values[opt] = v
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            hint = f"e.g. --option steps=200; see lmckit methods {method}"
            raise LmcError(f"--option {item!r} is not KEY=VALUE", hint)
        values[key.strip().replace("-", "_")] = value.strip()
    return get_method(method).options(values)
