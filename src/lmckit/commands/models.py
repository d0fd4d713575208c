"""``lmckit models``: list the model zoo (from :mod:`lmckit.model_index`: no torch import)."""

from __future__ import annotations

import argparse

from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'resnet*'")
    p.add_argument("--no-tiny", action="store_true", help="hide the tiny test models")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..model_index import MODEL_INDEX, list_index

    names = list_index(args.pattern, include_tiny=not args.no_tiny)
    if args.json:
        print_json([{"name": n, "description": MODEL_INDEX[n][0], "tiny": MODEL_INDEX[n][1]} for n in names])
        return 0
    w = max((len(n) for n in names), default=4)
    for n in names:
        print(f"{n.ljust(w)}  {MODEL_INDEX[n][0]}")
    return 0
