"""LMC on the issue-11 architectures: a ViT pair and an LSTM pair trained on Fashion-MNIST.

For each pair of run folders (``lmckit train --model vit|lstm --dataset fashion-mnist --seed 0/1``):
naive and WM test-loss (and accuracy) barriers along ``(1 - l) theta_a + l pi(theta_b)`` (25 points,
``--limit`` test images), R(0) and R(0.3) before/after WM, the L2 distance reduction and the WM time.
Prints a Markdown table and writes ``benchmarks/out/arch_pairs.json``.

    python benchmarks/arch_pairs.py --vit RUN_A RUN_B --lstm RUN_A RUN_B [--limit 5000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(paths: list[str], limit: int | None, points: int, threads: int) -> dict:
    import torch

    from lmckit.analysis import svd_alignment
    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.data import load_dataset
    from lmckit.lmc import barrier_curve
    from lmckit.match import weight_matching
    from lmckit.match.weight import l2_distance
    from lmckit.perm import apply_permutation, spec_for

    torch.set_num_threads(threads)
    (sd_a, info_a), (sd_b, _) = load_checkpoint(paths[0]), load_checkpoint(paths[1])
    model = build_model(info_a["model"], sd_a)
    spec = spec_for(model)
    t = time.perf_counter()
    res = weight_matching(spec, sd_a, sd_b, seed=0)
    wm_seconds = time.perf_counter() - t
    sd_bp = apply_permutation(spec, res.perms, sd_b)
    ds = load_dataset("fashion-mnist")
    out = {
        "model": info_a["model"],
        "runs": paths,
        "wm_seconds": wm_seconds,
        "wm_sweeps": res.sweeps,
        "test_images": limit or 10000,
        "points": points,
        "groups": len(spec.sizes),
        "heads": len(spec.heads),
    }
    for tag, sd in (("naive", sd_b), ("wm", sd_bp)):
        cur = barrier_curve(model, sd_a, sd, ds, splits=("test",), points=points, limit=limit, progress=False)
        c = cur["test"]
        out[tag] = {
            "loss_barrier": c.loss_barrier,
            "acc_barrier": c.accuracy_barrier,
            "endpoint_acc": list(c.endpoint_accuracy),
            "endpoint_loss": list(c.endpoint_loss),
        }
    al = svd_alignment(spec, sd_a, sd_b, res.perms)
    out["R"] = al.R
    d0, d1 = l2_distance(spec, sd_a, sd_b), l2_distance(spec, sd_a, sd_bp)
    out["l2"] = {"before": d0, "after": d1, "reduction": 1 - d1 / d0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit", nargs=2, metavar="RUN")
    ap.add_argument("--lstm", nargs=2, metavar="RUN")
    ap.add_argument("--limit", type=int, default=5000, help="test images per evaluation (default 5000)")
    ap.add_argument("--points", type=int, default=25, help="lambdas on the path (default 25)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "out" / "arch_pairs.json"))
    args = ap.parse_args()
    results = {}
    for name in ("vit", "lstm"):
        runs = getattr(args, name)
        if runs:
            results[name] = measure(list(runs), args.limit, args.points, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        "| model | test acc A / B | naive loss barrier (acc) | WM loss barrier (acc) | R(0) before -> after "
        "| R(0.3) before -> after | L2 reduction | WM time (sweeps) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        a, b = r["naive"]["endpoint_acc"]
        print(
            f"| {name} | {a:.3f} / {b:.3f} | {r['naive']['loss_barrier']:.3f} ({r['naive']['acc_barrier']:.3f}) "
            f"| {r['wm']['loss_barrier']:.3f} ({r['wm']['acc_barrier']:.3f}) "
            f"| {r['R']['0']['before']:.3f} -> {r['R']['0']['after']:.3f} "
            f"| {r['R']['0.3']['before']:.3f} -> {r['R']['0.3']['after']:.3f} | {r['l2']['reduction']:.1%} "
            f"| {r['wm_seconds']:.2f} s ({r['wm_sweeps']}) |"
        )
    print(f"(test-loss barriers on {args.limit} test images, {args.points} points; accuracy barriers as fractions)")


if __name__ == "__main__":
    main()
