"""Weight matching on transformer pairs shaped like GPT-2 small, against depth (and rebasin where it runs).

The zoo ``vit`` with d_model 768, 12 heads, MLP 3072 (``mlp_ratio 4``) and
``depth`` blocks (GPT-2 small: 12), random weights (seeds 0 and 1; matching
time depends on the shapes, the sweep count on the weights). Per depth, in a
fresh process: ``weight_matching(max_iter=100, seed=0)`` wall time, sweeps,
time per sweep, solves, the final objective, and the peak RSS above the RSS
before the models were made against the budget ``3 x (two models' bytes +
the largest float64 cost matrix, 3072 x 3072)``.

With ``--rebasin PYTHON`` (a venv with snimu's ``rebasin``; see
``benchmarks/bench_match.py``) the same pair is also matched by rebasin's
``PermutationCoordinateDescent`` (``benchmarks/rebasin_peer.py``) and its time
and sweeps are printed next to lmckit's (or the reason it did not run).

The previous main's weight matching (commit 75b0cf8, ``bench_wm_width.py``'s
baseline) predates attention-head structures, so it has no comparison here.

Full GPT-2 depth (12) takes several minutes on a loaded 2-core machine;
``--depths 1 2 4`` (the default) and the per-layer time per sweep give the
extrapolation, printed and labelled as such.

    python benchmarks/bench_wm_transformer.py
    python benchmarks/bench_wm_transformer.py --depths 12 --rebasin /work/venv-rebasin/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPT2 = {"in_channels": 1, "image_size": 28, "width": 768, "heads": 12, "mlp_ratio": 4.0}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pair(depth: int):
    import torch

    from lmckit.models import create_model

    sds = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("vit", depth=depth, **GPT2)
        sds.append({k: v.detach() for k, v in m.state_dict().items()})
    return m, sds


def child(depth: int, threads: int, max_iter: int) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from lmckit.match import lap
    from lmckit.match.weight import weight_matching
    from lmckit.perm import spec_for

    lap.solve(np.eye(3))  # load the solver modules before the clock starts
    if lap._lapx() is not None:
        lap.solve(np.eye(3), solver="lapx32")
    rss0 = _rss_mb()
    m, sds = _pair(depth)
    spec = spec_for(m)
    del m
    t0 = time.perf_counter()
    res = weight_matching(spec, sds[0], sds[1], seed=0, max_iter=max_iter)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bytes = sum(v.numel() * v.element_size() for sd in sds for v in sd.values())
    largest = max(spec.sizes.values())
    return {
        "depth": depth,
        "params_per_model": sum(v.numel() for v in sds[0].values()),
        "seconds": secs,
        "sweeps": res.sweeps,
        "sweep_seconds": res.extra["sweep_seconds"],
        "solves": res.extra["solves"],
        "objective": res.objective[-1],
        "rss_peak_over_start_mb": peak - rss0,
        "rss_budget_mb": 3 * (model_bytes + 8 * largest * largest) / 2**20,
    }


def run_rebasin(python: str, depth: int, threads: int, max_iter: int) -> dict:
    """rebasin on the same pair (its own process); ``{"error": ...}`` when it cannot."""
    from safetensors.torch import save_file

    _, sds = _pair(depth)
    with tempfile.TemporaryDirectory() as d:
        pa, pb = Path(d) / "a.safetensors", Path(d) / "b.safetensors"
        save_file({k: v.contiguous() for k, v in sds[0].items()}, str(pa))
        save_file({k: v.contiguous() for k, v in sds[1].items()}, str(pb))
        job = {
            "lmckit_src": str(ROOT / "src"),
            "model": "vit",
            "kwargs": {"depth": depth, **GPT2},
            "a": str(pa),
            "b": str(pb),
            "input_shape": [2, 1, 28, 28],
            "max_iter": max_iter,
            "seeds": [0],
            "threads": threads,
            "out": str(Path(d) / "b_perm.safetensors"),
        }
        (Path(d) / "job.json").write_text(json.dumps(job))
        p = subprocess.run(
            [python, str(HERE / "rebasin_peer.py"), str(Path(d) / "job.json")], capture_output=True, text=True
        )
        if p.returncode != 0:
            last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no message)"]
            return {"error": last[0][:160]}
        return json.loads(p.stdout.strip().splitlines()[-1])[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--rebasin", default=None, metavar="PYTHON", help="python of a venv with snimu's rebasin")
    ap.add_argument("--json", default=str(HERE / "out" / "bench_wm_transformer.json"))
    ap.add_argument("--child", type=int, metavar="DEPTH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads, args.max_iter)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("GPT-2-small-shaped ViT pairs (d_model 768, 12 heads, MLP 3072), random weights, lmckit WM", flush=True)
    print(
        f"{'depth':>5} {'params':>7} {'total s':>8} {'sweeps':>6} {'s/sweep':>8} {'s/sweep/layer':>13} "
        f"{'RSS MB':>7} {'budget':>7}  rebasin",
        flush=True,
    )
    rows = []
    for depth in args.depths:
        cmd = [sys.executable, __file__, "--child", str(depth), "--threads", str(args.threads)]
        cmd += ["--max-iter", str(args.max_iter)]
        r = json.loads(subprocess.check_output(cmd, env=env).decode().strip().splitlines()[-1])
        per = r["sweep_seconds"] / max(r["sweeps"], 1)
        r["seconds_per_sweep"] = per
        r["seconds_per_sweep_per_layer"] = per / depth
        if args.rebasin:
            sys.path.insert(0, str(ROOT / "src"))
            r["rebasin"] = run_rebasin(args.rebasin, depth, args.threads, args.max_iter)
        rb = r.get("rebasin")
        rb_txt = (
            "-"
            if rb is None
            else f"failed: {rb['error']}"
            if "error" in rb
            else f"{rb['seconds']:.1f} s ({rb['sweeps']} sweeps), lmckit {rb['seconds'] / r['seconds']:.1f}x faster"
        )
        rows.append(r)
        print(
            f"{depth:>5} {r['params_per_model'] / 1e6:>6.1f}M {r['seconds']:>8.1f} {r['sweeps']:>6} {per:>8.2f} "
            f"{per / depth:>13.2f} {r['rss_peak_over_start_mb']:>7.0f} {r['rss_budget_mb']:>7.0f}  {rb_txt}",
            flush=True,
        )
    if 12 not in args.depths:
        deep = max(rows, key=lambda r: r["depth"])
        est = deep["seconds_per_sweep_per_layer"] * 12
        print(
            f"extrapolated (not measured) to depth 12: {est:.1f} s per sweep "
            f"(per-layer time of depth {deep['depth']}); sweeps grew "
            + " -> ".join(str(r["sweeps"]) for r in rows)
            + " with depth",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
