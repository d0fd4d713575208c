"""``lmckit models``: list the model registry."""

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
    from ..models import list_models, model_entry

    names = list_models(args.pattern, include_tiny=not args.no_tiny)
    if args.json:
        print_json([{"name": n, "description": model_entry(n).description, "tiny": model_entry(n).tiny} for n in names])
        return 0
    w = max((len(n) for n in names), default=4)
    for n in names:
        print(f"{n.ljust(w)}  {model_entry(n).description}")
    return 0
