"""Weight matching against width: this branch vs main (75b0cf8), same pairs, same run.

For each width w (default 512, 1024, 2048; add 4096 with ``--widths``), two
random-weight MLPs 784-w-w-w-10 (default initialisation, seeds 0 and 1;
matching time depends on shapes, the sweep count on the weights) are matched
by ``weight_matching(max_iter=100, seed=0)`` twice, each in a fresh process:

* ``main``: the ``weight_matching`` of commit ``75b0cf8`` (``git show`` of
  ``src/lmckit/match/weight.py``, executed inside this package), i.e. scipy's
  solver on every group;
* ``head``: this tree's ``weight_matching`` (solver per size from
  ``lmckit.match.lap``).

Per run: wall time, sweeps, final objective ``sum <A, pi(B)>``, and the
process's peak RSS above its RSS before the models were made, against the
budget ``3 x (two models' bytes + largest cost matrix's bytes)``. Prints a
table with the ratio main / head and the relative objective difference
(target: >= 2x at 2048 and above, objective within 0.1%).

    python benchmarks/bench_wm_width.py
    python benchmarks/bench_wm_width.py --widths 2048 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = "75b0cf8"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(width: int, variant: str, threads: int, max_iter: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    if variant == "main":
        import importlib.util

        src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{BASE}:src/lmckit/match/weight.py"])
        mspec = importlib.util.spec_from_loader("lmckit.match._weight_main", loader=None)
        mod = importlib.util.module_from_spec(mspec)
        mod.__package__ = "lmckit.match"
        exec(compile(src, f"{BASE}:weight.py", "exec"), mod.__dict__)
        wm = mod.weight_matching
    else:
        from lmckit.match.weight import weight_matching as wm
    import numpy as np

    from lmckit.match import lap

    lap.solve(np.eye(3))  # load the solver modules (scipy, lapx) before the clock starts, in both variants
    if lap._lapx() is not None:
        lap.solve(np.eye(3), solver="lapx32")
    rss0 = _rss_mb()
    sds = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("mlp", in_channels=1, image_size=28, width=width)
        sds.append({k: v.detach() for k, v in m.state_dict().items()})  # no copy: the models are what the budget counts
        spec = spec_for(m)
        del m
    t0 = time.perf_counter()
    res = wm(spec, sds[0], sds[1], seed=0, max_iter=max_iter)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bytes = sum(v.numel() * v.element_size() for sd in sds for v in sd.values())
    budget = 3 * (model_bytes + 8 * width * width) / 2**20
    return {
        "width": width,
        "variant": variant,
        "seconds": secs,
        "sweeps": res.sweeps,
        "objective": res.objective[-1],
        "rss_peak_over_start_mb": peak - rss0,
        "rss_budget_mb": budget,
        "solves": res.extra.get("solves"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--json", default=str(HERE / "out" / "bench_wm_width.json"))
    ap.add_argument("--child", nargs=2, metavar=("WIDTH", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.threads, args.max_iter)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    print(
        f"{'width':>6} {'main s':>8} {'head s':>8} {'main/head':>9} {'sweeps m/h':>10} {'obj diff':>9} "
        f"{'RSS MB h':>9} {'budget':>7}",
        flush=True,
    )
    for w in args.widths:
        out = {}
        for variant in ("main", "head"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(w),
                variant,
                "--threads",
                str(args.threads),
                "--max-iter",
                str(args.max_iter),
            ]
            out[variant] = json.loads(subprocess.check_output(cmd, env=env).decode().strip().splitlines()[-1])
        m, h = out["main"], out["head"]
        diff = (h["objective"] - m["objective"]) / abs(m["objective"])
        row = {"width": w, "main": m, "head": h, "speedup": m["seconds"] / h["seconds"], "objective_rel_diff": diff}
        rows.append(row)
        print(
            f"{w:>6} {m['seconds']:>8.2f} {h['seconds']:>8.2f} {row['speedup']:>9.2f} "
            f"{m['sweeps']:>4}/{h['sweeps']:<5} {diff:>+9.1e} {h['rss_peak_over_start_mb']:>9.0f} "
            f"{h['rss_budget_mb']:>7.0f}",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
