"""``lmckit reproduce``: run a recipe's cached stages and write the report."""
from __future__ import annotations

import argparse

from .common import add_data, add_device, add_json, int_in, print_json, print_table, refuse_outputs_in_inputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the paper's experiments from a recipe (cached stages + report)",
                       description="Train, match, measure barriers and run the analyses of a recipe, reusing every "
                                   "finished stage under --cache, then write report.md/.html, results.json and figures.")
    p.add_argument("--recipe", default="quick", help="shipped recipe name (see --list) or a .toml file (default: quick)")
    p.add_argument("--out", default=None, help="report folder (default: reports/<recipe>)")
    p.add_argument("--cache", default="runs", help="stage output root (default: runs/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. --set train.seeds=[0,1] --set match.ste.epochs=2 (repeatable)")
    p.add_argument("--jobs", type=int_in(1, 256), default=1,
                   help="stages run in parallel (process pool; default 1 = in process; at most 256)")
    p.add_argument("--dry-run", action="store_true", help="list the stages and which are cached; run nothing")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    add_device(p)
    add_data(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.recipe import load_recipe, recipe_names
    from ..pipeline.reproduce import reproduce
    from ..pipeline.stages import stage_label

    if args.list:
        for n in recipe_names():
            print(f"{n:20s} {load_recipe(n).description}")
        return 0
    from pathlib import Path

    from ..device import resolve_device

    resolve_device(args.device)  # before anything is read or created
    recipe_file = Path(args.recipe) if (args.recipe.endswith(".toml") or "/" in args.recipe) else None
    out = args.out
    refuse_outputs_in_inputs([("--out", out), ("--cache", args.cache)], [("--recipe", recipe_file)])
    if out is not None:
        refuse_outputs_in_inputs([("--out", out)], [("the stage cache --cache", args.cache)])
        refuse_outputs_in_inputs([("--cache", args.cache)], [("the report folder --out", out)])
    res = reproduce(args.recipe, args.out, args.cache, args.sets, args.jobs, args.dry_run, args.device, args.data_dir)
    if args.dry_run:
        if args.json:
            print_json([{"kind": e.spec.KIND, "path": str(e.path), "cached": e.cached, "label": e.spec.label()}
                        for e in res.entries])
            return 0
        todo = sum(not e.cached for e in res.entries)
        for e in res.entries:
            print(f"{'cached' if e.cached else 'to run':7s} {stage_label(e.spec)}")
        for n in res.plan.notes:
            print(f"note: {n}")
        print(f"{len(res.entries)} stages, {len(res.entries) - todo} cached, {todo} to run (cache {res.cache})")
        return 0
    from ..report import summary_rows

    if args.json:
        print_json({"out": str(res.out), "files": {k: str(v) for k, v in res.files.items()},
                    "ran": len(res.summary.ran), "cached": len(res.summary.cached), "claims": res.results["claims"]})
        return 0
    print()
    print_table(summary_rows(res.results))
    print()
    for c in res.results["claims"]:
        print(f"[{'held' if c['held'] else 'NOT held'}] claim {c['id']}: {c['text']}")
    print(f"\n{len(res.summary.ran)} stages run, {len(res.summary.cached)} reused; {res.seconds:.1f}s. "
          f"Report: {res.out / 'report.md'} (and report.html, results.json)")
    return 0
