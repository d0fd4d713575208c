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
budget ``3 x (two models' bytes + largest cost matrix's bytes)``. The start is
taken after the imports and after one matching of a tiny pair (width 16) by
the same function, so that the code torch, MKL and scipy page in on first use
(about 12 MB of file-backed pages, the same at every width) is not counted as
matching memory; the peak above the start before that warm-up is printed too
(``cold``). See ``benchmarks/_rss.py``. Prints a table with the ratio
main / head and the relative objective difference (target: >= 2x at 2048 and
above, objective within 0.1%).

    python benchmarks/bench_wm_width.py
    python benchmarks/bench_wm_width.py --widths 2048 4096 --threads 2
    python benchmarks/bench_wm_width.py --variants head   # this tree only (no timing ratio)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _rss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = "75b0cf8"


def child(width: int, variant: str, threads: int, max_iter: int, base: str = BASE) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    if variant == "main":
        import importlib.util

        src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{base}:src/lmckit/match/weight.py"])
        mspec = importlib.util.spec_from_loader("lmckit.match._weight_main", loader=None)
        mod = importlib.util.module_from_spec(mspec)
        mod.__package__ = "lmckit.match"
        exec(compile(src, f"{base}:weight.py", "exec"), mod.__dict__)
        wm = mod.weight_matching
    else:
        from lmckit.match.weight import weight_matching as wm
    import numpy as np

    from lmckit.match import lap

    lap.solve(np.eye(3))  # load the solver modules (scipy, lapx) before the clock starts, in both variants
    if lap._lapx() is not None:
        lap.solve(np.eye(3), solver="lapx32")
    rss_cold = _rss.rss_mb()
    torch.manual_seed(123)
    tiny = create_model("mlp", in_channels=1, image_size=28, width=16)
    tiny_a = {k: v.detach() for k, v in tiny.state_dict().items()}
    _rss.warm_up(wm, (spec_for(tiny), tiny_a, {k: v + 0.1 * torch.randn_like(v) for k, v in tiny_a.items()}))
    del tiny, tiny_a
    rss0 = _rss.rss_mb()
    exact_peak = _rss.reset_peak()
    sds = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("mlp", in_channels=1, image_size=28, width=width)
        sds.append({k: v.detach() for k, v in m.state_dict().items()})  # no copy: the models are what the budget counts
        spec = spec_for(m)
        del m
    rss_models, peak_create = _rss.rss_mb(), _rss.peak_mb()
    _rss.reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    res = wm(spec, sds[0], sds[1], seed=0, max_iter=max_iter)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(peak_create, _rss.peak_mb()) if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bytes = sum(v.numel() * v.element_size() for sd in sds for v in sd.values())
    budget = 3 * (model_bytes + 8 * width * width) / 2**20
    return {
        "width": width,
        "variant": variant,
        "seconds": secs,
        "cpu_seconds": cpu,
        "sweeps": res.sweeps,
        "objective": res.objective[-1],
        "rss_peak_over_start_mb": peak - rss0,
        "rss_peak_over_cold_start_mb": peak - rss_cold,
        "rss_models_mb": rss_models - rss0,
        "rss_peak_while_creating_mb": peak_create - rss0,
        "rss_budget_mb": budget,
        "load_average": os.getloadavg()[0],
        "solves": res.extra.get("solves"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--variants", nargs="+", choices=["main", "head"], default=["main", "head"], help="which to run (default both)"
    )
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--base", default=BASE, help=f"commit whose weight.py is the 'main' variant (default {BASE})")
    ap.add_argument("--json", default=str(HERE / "out" / "bench_wm_width.json"))
    ap.add_argument("--child", nargs=2, metavar=("WIDTH", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.threads, args.max_iter, args.base)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    print(
        f"{'width':>6} {'main s':>8} {'head s':>8} {'main/head':>9} {'sweeps m/h':>10} {'obj diff':>9} "
        f"{'RSS MB':>7} {'cold':>5} {'budget':>7} {'load':>5}",
        flush=True,
    )
    for w in args.widths:
        out = {}
        for variant in args.variants:
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
                "--base",
                args.base,
            ]
            out[variant] = json.loads(subprocess.check_output(cmd, env=env).decode().strip().splitlines()[-1])
        m, h = out.get("main"), out.get("head")
        row = {"width": w, "main": m, "head": h}
        if m and h:
            row["speedup"] = m["seconds"] / h["seconds"]
            row["objective_rel_diff"] = (h["objective"] - m["objective"]) / abs(m["objective"])
        rows.append(row)
        x = h or m  # the memory columns: head's when it ran
        print(
            f"{w:>6} {m['seconds'] if m else float('nan'):>8.2f} {h['seconds'] if h else float('nan'):>8.2f} "
            f"{row.get('speedup', float('nan')):>9.2f} {m['sweeps'] if m else '-':>4}/{h['sweeps'] if h else '-':<5} "
            f"{row.get('objective_rel_diff', float('nan')):>+9.1e} {x['rss_peak_over_start_mb']:>7.0f} "
            f"{x['rss_peak_over_cold_start_mb']:>5.0f} {x['rss_budget_mb']:>7.0f} {x['load_average']:>5.1f}",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
