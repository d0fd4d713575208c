"""``lmckit reproduce``: run a recipe's cached stages and write the report."""

from __future__ import annotations

import argparse

from ..limits import MAX_JOBS, usable_cpus
from .common import (
    add_data,
    add_device,
    add_json,
    add_quiet,
    int_in,
    path_arg,
    print_json,
    print_table,
    refuse_outputs_in_inputs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="reproduce the paper's experiments from a recipe (cached stages + report)",
        description="Train, match, measure barriers and run the analyses of a recipe, reusing every "
        "finished stage under --cache, then write report.md/.html, results.json and figures.",
    )
    p.add_argument(
        "--recipe", default="quick", help="shipped recipe name (see --list) or a .toml file (default: quick)"
    )
    p.add_argument("--out", type=path_arg, default=None, help="report folder (default: reports/<recipe>)")
    p.add_argument("--cache", type=path_arg, default="runs", help="stage output root (default: runs/)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set train.seeds=[0,1] --set match.ste.epochs=2 "
        "(repeatable; default: the recipe's values)",
    )
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        help="stages run in parallel, or 'auto' (one per CPU core, each with one torch thread; `make run` "
        "uses it) (local: process pool, default 1 = in process; ray: most in flight, default: as the "
        "cluster's resources allow; at most 256)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where stages run: this machine (default) or Ray tasks (needs lmckit[ray]; see docs/scaling.md)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="auto|HOST:PORT",
        help="Ray cluster to use (default: start a local Ray instance on 127.0.0.1 for this run)",
    )
    p.add_argument(
        "--ray-resources",
        action="append",
        default=[],
        metavar="KIND=cpu:N[,gpu:G]",
        help="resources a Ray task of one stage kind (model, match, ste, barrier, analysis, three) asks for "
        "(default 1 CPU; with GPUs, 1 GPU for model and ste, 0.5 for the rest); repeatable",
    )
    p.add_argument("--dry-run", action="store_true", help="list the stages and which are cached; run nothing")
    p.add_argument(
        "--list", action="store_true", help="list the shipped recipes (and the folder holding them) and exit"
    )
    p.add_argument(
        "--show",
        metavar="RECIPE",
        default=None,
        help="print RECIPE (a shipped name or a .toml file, with any --set applied) as commented TOML "
        "with every key and its default, and exit (schema: docs/recipes.md)",
    )
    add_device(p)
    add_data(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.recipe import load_recipe, recipe_names
    from ..pipeline.stages import stage_label
    from ..reproduce import reproduce

    if args.list:
        from importlib import resources

        folder = resources.files("lmckit") / "recipes"
        if args.json:
            print_json(
                {
                    "recipes": [{"name": n, "description": load_recipe(n).description} for n in recipe_names()],
                    "folder": str(folder),
                }
            )
            return 0
        for n in recipe_names():
            print(f"{n:20s} {load_recipe(n).description}")
        print(
            f"\nshipped recipe files: {resources.files('lmckit') / 'recipes'}/<name>.toml; "
            "`lmckit reproduce --show NAME` prints one as commented TOML, docs/recipes.md documents the keys"
        )
        return 0
    if args.show:
        from ..pipeline.recipe_toml import recipe_toml

        r = load_recipe(args.show, args.sets)
        sets = "".join(f" --set {s}" for s in args.sets)
        text = recipe_toml(
            r,
            f"lmckit recipe {r.name!r} (from `lmckit reproduce --show {args.show}{sets}`)\n"
            "Every key is written with its value; the comment above it gives its meaning and "
            "default.\nRun it with: lmckit reproduce --recipe THIS_FILE.toml",
        )
        if args.json:
            print_json({"recipe": r.name, "toml": text})
        else:
            print(text, end="")
        return 0
    from pathlib import Path

    from ..device import check_device_name, resolve_device

    if args.executor == "ray":
        check_device_name(args.device)  # Ray workers may have a GPU this driver lacks: check the name only
    else:
        resolve_device(args.device)  # before anything is read or created
    resources = None
    if args.executor == "ray" and args.ray_resources:
        from ..pipeline.ray_executor import parse_resources

        resources = parse_resources(args.ray_resources)
    elif args.address is not None or args.ray_resources:
        from ..errors import LmcError

        raise LmcError("--address and --ray-resources need --executor ray")
    recipe_file = Path(args.recipe) if (args.recipe.endswith(".toml") or "/" in args.recipe) else None
    out = args.out
    refuse_outputs_in_inputs([("--out", out), ("--cache", args.cache)], [("--recipe", recipe_file)])
    if out is not None:
        refuse_outputs_in_inputs([("--out", out)], [("the stage cache --cache", args.cache)])
        refuse_outputs_in_inputs([("--cache", args.cache)], [("the report folder --out", out)])
    res = reproduce(
        args.recipe,
        args.out,
        args.cache,
        args.sets,
        args.jobs,
        args.dry_run,
        args.device,
        args.data_dir,
        executor=args.executor,
        address=args.address,
        resources=resources,
    )
    if args.dry_run:
        if args.json:
            print_json(
                [
                    {"kind": e.spec.KIND, "path": str(e.path), "cached": e.cached, "label": e.spec.label()}
                    for e in res.entries
                ]
            )
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
        print_json(
            {
                "out": str(res.out),
                "files": {k: str(v) for k, v in res.files.items()},
                "ran": len(res.summary.ran),
                "cached": len(res.summary.cached),
                "claims": res.results["claims"],
            }
        )
        return 0
    print()
    print_table(summary_rows(res.results))
    print()
    several = len({x.get("model") for x in res.results["claims"]}) > 1
    for c in res.results["claims"]:
        who = f" ({c['model']})" if several and c.get("model") else ""
        print(f"[{'held' if c['held'] else 'NOT held'}] claim {c['id']}{who}: {c['text']}")
    print(
        f"\n{len(res.summary.ran)} stages run, {len(res.summary.cached)} reused; {res.seconds:.1f}s. "
        f"Report: {res.out / 'report.md'} (and report.html, results.json)"
    )
    return 0


def _jobs(text: str) -> int:
    """``--jobs``: an integer in [1, 256], or ``auto`` (the CPU cores this process may use, at most 256)."""
    if text.strip().lower() == "auto":
        return min(MAX_JOBS, usable_cpus())
    try:
        return int_in(1, MAX_JOBS)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto': one job per CPU core)") from None
