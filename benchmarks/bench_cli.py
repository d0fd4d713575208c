"""Fixed cost of the ``lmckit`` command line: process wall time and whether torch was loaded.

Runs each command (default: ``--help``, ``match --help``, ``models``,
``data list``, and a bad option) as a fresh process ``--repeats`` times
(best time kept), next to ``python -c pass`` (the interpreter alone) and
``python -c "import torch"`` in the same run. A probe in the child reports
which heavy modules (torch, scipy, matplotlib) the command imported.

    python benchmarks/bench_cli.py
    python benchmarks/bench_cli.py --repeats 5

Target: under 1 s for the commands that need no model or data (no heavy imports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import sys, runpy, io, contextlib\n"
    "sys.argv = ['lmckit'] + sys.argv[1:]\n"
    "code = 0\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
    "    try:\n"
    "        from lmckit.cli import main\n"
    "        code = main(sys.argv[1:])\n"
    "    except SystemExit as e:\n"
    "        code = e.code\n"
    "print('HEAVY', ','.join(m for m in ('torch', 'scipy', 'matplotlib') if m in sys.modules))\n"
)


def timed(cmd: list[str], env: dict, repeats: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        out = p.stdout
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = sys.executable
    rows = []
    t, _ = timed([py, "-c", "pass"], env, args.repeats)
    rows.append(("python -c pass", t, "-"))
    t, _ = timed([py, "-c", "import torch"], env, args.repeats)
    rows.append(("python -c 'import torch'", t, "torch"))
    for c in (["--help"], ["match", "--help"], ["train", "--help"], ["models"], ["data", "list"], ["match", "--bogus"]):
        t, _ = timed([py, "-m", "lmckit.cli", *c], env, args.repeats)
        _, probe = timed([py, "-c", PROBE, *c], env, 1)
        heavy = next(
            (ln.split(" ", 1)[1] if " " in ln else "" for ln in probe.splitlines() if ln.startswith("HEAVY")), "?"
        )
        rows.append(("lmckit " + " ".join(c), t, heavy or "none"))
    w = max(len(r[0]) for r in rows)
    print(f"{'command'.ljust(w)}  {'best s':>7}  heavy modules imported")
    for name, t, heavy in rows:
        print(f"{name.ljust(w)}  {t:>7.2f}  {heavy}")
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "out" / "bench_cli.json").write_text(
        json.dumps([{"command": n, "seconds": t, "heavy": h} for n, t, h in rows], indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
