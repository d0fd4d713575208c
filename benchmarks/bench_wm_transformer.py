"""Weight matching on transformer pairs shaped like GPT-2 small, against depth (and rebasin where it runs).

The zoo ``vit`` with d_model 768, 12 heads, MLP 3072 (``mlp_ratio 4``) and
``depth`` blocks (GPT-2 small: 12), random weights (seeds 0 and 1; matching
time depends on the shapes, the sweep count on the weights). Per depth, in a
fresh process: ``weight_matching(max_iter=100, seed=0)`` wall time, sweeps,
time per sweep, solves, the final objective, and the peak RSS above the RSS
before the models were made against the budget ``3 x (two models' bytes +
the largest float64 cost matrix, 3072 x 3072)``. As in ``bench_wm_width.py``
the start is taken after one matching of a tiny pair of the same kind (so the
code torch, MKL and scipy page in on first use is not counted as matching
memory); the peak above the start before that warm-up is printed as ``cold``
(``benchmarks/_rss.py``).

With ``--base COMMIT`` each depth is also matched, in its own fresh process,
by the ``weight_matching`` of that commit's ``src/lmckit/match/weight.py``
(executed inside this package), and the time ratio and relative objective
difference are printed (a before/after of a change to weight matching).

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
    python benchmarks/bench_wm_transformer.py --depths 1 2 4 12 --base 0663a31
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

import _rss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPT2 = {"in_channels": 1, "image_size": 28, "width": 768, "heads": 12, "mlp_ratio": 4.0}


def _pair(depth: int, **shape):
    import torch

    from lmckit.models import create_model

    sds = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("vit", depth=depth, **(shape or GPT2))
        sds.append({k: v.detach() for k, v in m.state_dict().items()})
    return m, sds


def _weight_matching(base: str | None):
    """This tree's ``weight_matching``, or that of ``base``'s weight.py run inside this package."""
    if not base:
        from lmckit.match.weight import weight_matching

        return weight_matching
    import importlib.util

    src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{base}:src/lmckit/match/weight.py"])
    mspec = importlib.util.spec_from_loader("lmckit.match._weight_base", loader=None)
    mod = importlib.util.module_from_spec(mspec)
    mod.__package__ = "lmckit.match"
    exec(compile(src, f"{base}:weight.py", "exec"), mod.__dict__)
    return mod.weight_matching


def child(depth: int, threads: int, max_iter: int, base: str | None = None) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from lmckit.match import lap
    from lmckit.perm import spec_for

    weight_matching = _weight_matching(base)
    lap.solve(np.eye(3))  # load the solver modules before the clock starts
    if lap._lapx() is not None:
        lap.solve(np.eye(3), solver="lapx32")
    rss_cold = _rss.rss_mb()
    tiny, tiny_sds = _pair(1, in_channels=1, image_size=28, width=24, heads=2, mlp_ratio=4.0)
    _rss.warm_up(weight_matching, (spec_for(tiny), tiny_sds[0], tiny_sds[1]))
    del tiny, tiny_sds
    rss0 = _rss.rss_mb()
    exact_peak = _rss.reset_peak()
    m, sds = _pair(depth)
    spec = spec_for(m)
    del m
    rss_models, peak_create = _rss.rss_mb(), _rss.peak_mb()
    _rss.reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    res = weight_matching(spec, sds[0], sds[1], seed=0, max_iter=max_iter)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(peak_create, _rss.peak_mb()) if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bytes = sum(v.numel() * v.element_size() for sd in sds for v in sd.values())
    largest = max(spec.sizes.values())
    return {
        "depth": depth,
        "params_per_model": sum(v.numel() for v in sds[0].values()),
        "seconds": secs,
        "cpu_seconds": cpu,
        "sweeps": res.sweeps,
        "sweep_seconds": res.extra["sweep_seconds"],
        "solves": res.extra["solves"],
        "objective": res.objective[-1],
        "rss_peak_over_start_mb": peak - rss0,
        "rss_peak_over_cold_start_mb": peak - rss_cold,
        "rss_models_mb": rss_models - rss0,
        "rss_peak_while_creating_mb": peak_create - rss0,
        "rss_budget_mb": 3 * (model_bytes + 8 * largest * largest) / 2**20,
        "load_average": os.getloadavg()[0],
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
    ap.add_argument("--base", default=None, metavar="COMMIT", help="also run that commit's weight_matching")
    ap.add_argument("--json", default=str(HERE / "out" / "bench_wm_transformer.json"))
    ap.add_argument("--child", type=int, metavar="DEPTH", help=argparse.SUPPRESS)
    ap.add_argument("--child-base", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads, args.max_iter, args.child_base)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("GPT-2-small-shaped ViT pairs (d_model 768, 12 heads, MLP 3072), random weights, lmckit WM", flush=True)
    print(
        f"{'depth':>5} {'params':>7} {'total s':>8} {'sweeps':>6} {'s/sweep':>8} {'s/sweep/layer':>13} "
        f"{'RSS MB':>7} {'cold':>5} {'budget':>7} {'load':>5}  rebasin",
        flush=True,
    )
    rows = []
    for depth in args.depths:
        cmd = [sys.executable, __file__, "--child", str(depth), "--threads", str(args.threads)]
        cmd += ["--max-iter", str(args.max_iter)]
        if args.base:
            rb_ = json.loads(
                subprocess.check_output(cmd + ["--child-base", args.base], env=env).decode().strip().splitlines()[-1]
            )
        r = json.loads(subprocess.check_output(cmd, env=env).decode().strip().splitlines()[-1])
        if args.base:
            r["base"] = dict(rb_, commit=args.base)
            r["base_over_head"] = rb_["seconds"] / r["seconds"]
            r["objective_rel_diff"] = (r["objective"] - rb_["objective"]) / abs(rb_["objective"])
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
            f"{per / depth:>13.2f} {r['rss_peak_over_start_mb']:>7.0f} {r['rss_peak_over_cold_start_mb']:>5.0f} "
            f"{r['rss_budget_mb']:>7.0f} {r['load_average']:>5.1f}  {rb_txt}",
            flush=True,
        )
        if args.base:
            b = r["base"]
            print(
                f"{'':>5} {args.base}: {b['seconds']:.1f} s, {b['sweeps']} sweeps, "
                f"RSS {b['rss_peak_over_start_mb']:.0f} "
                f"(cold {b['rss_peak_over_cold_start_mb']:.0f}) MB; base/head time {r['base_over_head']:.2f}, "
                f"objective diff {r['objective_rel_diff']:+.1e}",
                flush=True,
            )
    if 12 not in args.depths:
        deep = max(rows, key=lambda r: r["depth"])
        est = deep["seconds_per_sweep_per_layer"] * 12
        print(
            f"extrapolated (not measured) to depth 12: {est:.1f} s per sweep "
            f"(per-layer time of depth {deep['depth']})"
            + ("; sweeps by depth " + " -> ".join(str(r["sweeps"]) for r in rows) if len(rows) > 1 else ""),
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
