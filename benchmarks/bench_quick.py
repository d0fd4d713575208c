"""Wall time of a recipe from an empty cache: the earlier defaults against today's, in one run.

Runs ``lmckit reproduce`` twice, each from its own empty cache and report folder:

* **baseline**: the settings ``quick`` ran with before the speed work of issue 15 was switched on,
  i.e. stages one at a time in process (``--jobs 1``, torch's default threads) and STE's exact
  per-step projection (``match.ste.project_sweeps=0``, ``project_every=1``) with every assignment
  solved from scratch (``LMCKIT_STE_PROJECTION=exact-cold``);
* **now**: what ``make run`` runs: ``--jobs auto`` (one stage per core, one torch thread each,
  longest remaining chain first) and the recipe's own STE settings.

Prints one table (wall seconds, stage seconds by kind from each report's ``timings.json``, the
ratio baseline / now) and writes it as JSON. Both runs compute the same stages; the numbers agree
up to the last digits (thread counts differ); if a recipe approximates STE's projection
(``match.ste.project_sweeps``/``project_every``), its STE numbers differ within their seed-to-seed
spread.

    python benchmarks/bench_quick.py                       # quick, about 20 min on 2 cores
    python benchmarks/bench_quick.py --without sinkhorn    # like for like with a recipe run before Sinkhorn
    python benchmarks/bench_quick.py --recipe tiny         # seconds: a smoke test of the script

Target (issue 15): ``quick`` at least 1.5x faster than before.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, args: list[str], work: Path, env_extra: dict[str, str] | None = None) -> dict:
    """One ``lmckit reproduce`` from an empty cache; its wall time and stage seconds by kind."""
    out, cache = work / label / "report", work / label / "cache"
    cmd = [sys.executable, "-m", "lmckit.cli", "reproduce", "--out", str(out), "--cache", str(cache), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:])
        raise SystemExit(f"{label} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    timings = json.loads((out / "timings.json").read_text())
    return {
        "label": label,
        "command": "".join(f"{k}={v} " for k, v in (env_extra or {}).items()) + "lmckit reproduce " + " ".join(args),
        "wall_seconds": wall,
        "stage_seconds": timings["stage_seconds_total"],
        "by_kind": {k: round(v, 1) for k, v in sorted(timings["stage_seconds_by_kind"].items())},
        "stages": sum(v["count"] for v in timings["stages_by_kind"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="quick")
    ap.add_argument("--without", action="append", default=[], metavar="METHOD", help="drop a matching method")
    ap.add_argument("--json", default="benchmarks/out/bench_quick.json", help="where to write the table")
    ap.add_argument("--keep", action="store_true", help="keep the two caches and reports (default: delete)")
    a = ap.parse_args(argv)

    sets: list[str] = []
    if a.without:
        sys.path.insert(0, str(ROOT / "src"))
        from lmckit.pipeline.recipe import load_recipe

        methods = [m for m in load_recipe(a.recipe).match.methods if m not in a.without]
        sets = ["--set", "match.methods=" + json.dumps(methods)]
    base = ["--recipe", a.recipe, *sets]
    work = Path(tempfile.mkdtemp(prefix="bench_quick_"))
    try:
        rows = [
            run(
                "baseline",
                [*base, "--jobs", "1", "--set", "match.ste.project_sweeps=0", "--set", "match.ste.project_every=1"],
                work,
                {"LMCKIT_STE_PROJECTION": "exact-cold"},  # every assignment solved from scratch, as before
            ),
            run("now", [*base, "--jobs", "auto"], work),
        ]
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = rows[0]["wall_seconds"] / rows[1]["wall_seconds"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"recipe {a.recipe}" + (f" without {', '.join(a.without)}" if a.without else "") + f"; load now {load}")
    print("| run | command | stages | wall s | stage s | by kind (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kinds = ", ".join(f"{k} {v:g}" for k, v in r["by_kind"].items())
        print(
            f"| {r['label']} | `{r['command']}` | {r['stages']} | {r['wall_seconds']:.1f} | "
            f"{r['stage_seconds']:.1f} | {kinds} |"
        )
    print(f"speed-up (baseline wall / now wall): {ratio:.2f}x")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps({"recipe": a.recipe, "without": a.without, "rows": rows, "ratio": ratio}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
