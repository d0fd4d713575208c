"""``lmckit methods``: list the registered matching methods, with their references and options."""

from __future__ import annotations

import argparse

from ..match.registry import get_method, list_methods
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods",
        help="list matching methods (lmckit match --method NAME)",
        description="The matching methods of the registry (lmckit.match.registry): what each does, "
        "its paper, whether it needs data, which multi-model schemes it supports, and "
        "its options (set them with lmckit match --option KEY=VALUE).",
    )
    p.add_argument("name", nargs="?", default=None, help="show one method only (default: all)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = [get_method(args.name).name] if args.name else list_methods()
    entries = [get_method(n).to_dict() for n in names]
    if args.json:
        print_json(entries)
        return 0
    for i, e in enumerate(entries):
        if i:
            print()
        multi = ", ".join(e["multi"]) or "two models only"
        print(f"{e['name']}: {e['description']}")
        print(f"  reference:  {e['reference']}")
        print(f"  needs data: {'yes' if e['needs_data'] else 'no'};  3+ models: {multi}")
        print(f"  objective:  {e['objective']}")
        print(f"  symmetry:   {', '.join(e['symmetries'])} (lmckit match --symmetry)")
        opts = ", ".join(f"{o['name']}={o['default']!r}" for o in e["options"])
        print(f"  options:    {opts or '(none)'}")
    return 0
