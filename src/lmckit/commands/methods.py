"""``lmckit methods``: list the registered matching methods (two-model and many-model), with references and options."""

from __future__ import annotations

import argparse

from ..errors import LmcError
from ..match.registry import get_many_method, get_method, list_many_methods, list_methods
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods",
        help="list matching methods (lmckit match --method NAME) and many-model methods",
        description="The matching methods of the registry (lmckit.match.registry): what each does, "
        "its paper, whether it needs data, which multi-model schemes it supports, and "
        "its options (set them with lmckit match --option KEY=VALUE); then the many-model methods "
        "(MergeMany, STE-MM, C2M3), which bring N models into one unit order, with the N each supports.",
    )
    p.add_argument("name", nargs="?", default=None, help="show one method only (default: all)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        if args.name in list_many_methods():
            entries, many = [], [get_many_method(args.name).to_dict()]
        else:
            try:
                entries, many = [get_method(args.name).to_dict()], []
            except LmcError as err:
                if "unknown matching method" not in str(err):
                    raise
                raise LmcError(
                    f"unknown method {args.name!r}",
                    f"two-model methods: {', '.join(list_methods())}; many-model methods: "
                    f"{', '.join(list_many_methods())}",
                ) from None
    else:
        entries = [get_method(n).to_dict() for n in list_methods()]
        many = [get_many_method(n).to_dict() for n in list_many_methods()]
    if args.json:
        print_json(entries + many)
        return 0
    for i, e in enumerate(entries):
        if i:
            print()
        multi = ", ".join(e["multi"]) or "two models only"
        print(f"{e['name']}: {e['description']}")
        print(f"  reference:  {e['reference']}")
        print(f"  needs data: {'yes' if e['needs_data'] else 'no'};  3+ models: {multi}")
        print(f"  objective:  {e['objective']}")
        where = "lmckit match/merge --symmetry" if e["name"] == "weight" else "lmckit match --symmetry, two models"
        print(
            f"  symmetry:   {', '.join(e['symmetries'])} ({where})"
            if len(e["symmetries"]) > 1
            else f"  symmetry:   {', '.join(e['symmetries'])}"
        )
        opts = ", ".join(f"{o['name']}={o['default']!r}" for o in e["options"])
        print(f"  options:    {opts or '(none)'}")
    if many:
        if entries:
            print()
        print("Many-model methods (N models into one unit order; lmckit.match.registry.get_many_method):")
    for e in many:
        print()
        print(f"{e['name']}: {e['description']}")
        print(f"  reference:  {e['reference']}")
        print(f"  models:     N >= {e['min_models']};  needs data: {'yes' if e['needs_data'] else 'no'}")
        print(f"  objective:  {e['objective']}")
        opts = ", ".join(f"{o['name']}={o['default']!r}" for o in e["options"])
        print(f"  options:    {opts or '(none)'}")
    return 0
