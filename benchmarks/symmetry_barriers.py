"""Permutation vs orthogonal weight matching on the `vit-fmnist` ViTs, without norm and with LayerNorm (issue 29).

Trains (or reuses, from the run store) the `vit-fmnist` recipe's model -- ViT width 32, depth 1, 4 heads,
Adam 1e-3, batch 256, 2 epochs on Fashion-MNIST -- for seeds 0, 1, 2, once with ``norm="none"`` (what the
recipe trains) and once with ``norm="layernorm"``, and on every pair (0,1), (0,2), (1,2) measures the test
loss and accuracy barriers (``max_l [f(l) - ((1-l) f(0) + l f(1))]`` on the first ``--limit`` test images,
``--points`` evenly spaced lambdas) and the L2 distance reduction of:

- ``naive``: no alignment;
- ``perm``: permutation weight matching (:func:`lmckit.match.weight_matching`) on the raw weights;
- ``perm_folded`` (LayerNorm only): permutation WM on the folded weights (norm gains and biases folded
  into the next Linear layer): folding changes the interpolation path itself, so this is the baseline the
  orthogonal class is compared with on the same parameterisation;
- ``orth``: generalised WM (:func:`lmckit.match.symmetric.weight_matching_sym`, ``"orthogonal"``) on the
  folded weights (for ``norm="none"`` folding is a no-op): orthogonal residual-stream map (fixing the
  all-ones direction under LayerNorm), per-head orthogonal Q/K and V/O maps with a head permutation,
  MLP hidden units permuted.
- ``orth_am`` (``--am``): the activation-based variant (Procrustes on activations), on folded weights.

Every barrier says which parameterisation it interpolates (``raw`` or ``folded``). Prints one JSON line per
pair and method and a summary table; ``--out`` writes all of it as JSON.

    PYTHONPATH=src nice -n 10 python benchmarks/symmetry_barriers.py --runs /tmp/symruns --out docs/results/...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="run store for the trained models (reused when present)")
    p.add_argument("--norms", default="none,layernorm")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=2500, help="test images per evaluation point")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--am", action="store_true", help="also the activation-based orthogonal variant")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.data import load_dataset
    from lmckit.lmc.barrier import barrier_curve
    from lmckit.match import activation_matching, weight_matching
    from lmckit.match.symmetric import relative_distance, weight_matching_sym
    from lmckit.perm import apply_permutation, spec_for
    from lmckit.perm.symmetry import apply_transform, fold_norms
    from lmckit.train import make_config, train

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []

    def barrier(model, sd_a, sd_b):
        r = barrier_curve(model, sd_a, sd_b, ds, splits=("test",), points=args.points, limit=args.limit, progress=False)
        c = r["test"]
        return {"loss_barrier": c.loss_barrier, "acc_barrier": c.accuracy_barrier}

    for norm in args.norms.split(","):
        states, infos = {}, {}
        for s in seeds:
            cfg = make_config(
                "vit-fmnist",
                model_kwargs={"width": args.width, "depth": 1, "heads": 4, "norm": norm},
                epochs=args.epochs,
                seed=s,
            )
            res = train(cfg, out_root=args.runs, device="cpu", progress=False, threads=1)
            states[s], infos[s] = load_checkpoint(res.run_dir)
            print(f"# {norm} seed {s}: test loss {res.test_loss:.4f} acc {res.test_accuracy:.4f}", file=sys.stderr)
        for i, sa in enumerate(seeds):
            for sb in seeds[i + 1 :]:
                raw_a, raw_b = states[sa], states[sb]
                model = build_model(infos[sa]["model"], raw_a)
                spec = spec_for(model)
                fa_model = fold_norms(model)[0]
                fb_model = fold_norms(build_model(infos[sb]["model"], raw_b))[0]
                fa, fb = fa_model.state_dict(), fb_model.state_dict()
                out = {"norm": norm, "pair": [sa, sb]}
                out["naive"] = {"param": "raw", **barrier(model, raw_a, raw_b)}
                t = time.perf_counter()
                wm = weight_matching(spec, raw_a, raw_b, seed=0, max_iter=args.max_iter)
                al = apply_permutation(spec, wm.perms, raw_b)
                out["perm"] = {
                    "param": "raw",
                    "l2_before": relative_distance(spec, raw_a, raw_b),
                    "l2_after": relative_distance(spec, raw_a, al),
                    "sweeps": wm.sweeps,
                    "seconds": time.perf_counter() - t,
                    **barrier(model, raw_a, al),
                }
                if norm != "none":
                    wmf = weight_matching(spec, fa, fb, seed=0, max_iter=args.max_iter)
                    alf = apply_permutation(spec, wmf.perms, fb)
                    out["perm_folded"] = {
                        "param": "folded",
                        "l2_before": relative_distance(spec, fa, fb),
                        "l2_after": relative_distance(spec, fa, alf),
                        "sweeps": wmf.sweeps,
                        **barrier(fa_model, fa, alf),
                    }
                t = time.perf_counter()
                orth = weight_matching_sym(spec, fa, fb, "orthogonal", model=fa_model, max_iter=args.max_iter)
                alo = apply_transform(spec, orth.sym, orth.transform, fb)
                out["orth"] = {
                    "param": "folded",
                    "l2_before": orth.extra["distance_before"],
                    "l2_after": orth.extra["distance_after"],
                    "sweeps": orth.sweeps,
                    "converged": orth.converged,
                    "seconds": time.perf_counter() - t,
                    **barrier(fa_model, fa, alo),
                }
                if args.am:
                    am = activation_matching(
                        fa_model, fb_model, ds, num_batches=4, batch_size=500, symmetry="orthogonal"
                    )
                    ala = apply_transform(spec, am.sym, am.transform, fb)
                    out["orth_am"] = {
                        "param": "folded",
                        "l2_after": relative_distance(spec, fa, ala),
                        **barrier(fa_model, fa, ala),
                    }
                print(json.dumps(out), flush=True)
                rows.append(out)

    print("\nnorm        method       param   test loss barrier (mean +- sd)   acc barrier    L2 before -> after")
    summary = {}
    for norm in args.norms.split(","):
        sub = [r for r in rows if r["norm"] == norm]
        for m in ("naive", "perm", "perm_folded", "orth", "orth_am"):
            vals = [r[m] for r in sub if m in r]
            if not vals:
                continue
            lb = [v["loss_barrier"] for v in vals]
            ab = [v["acc_barrier"] for v in vals]
            l2 = [(v.get("l2_before", float("nan")), v.get("l2_after", float("nan"))) for v in vals]
            sd = statistics.stdev(lb) if len(lb) > 1 else 0.0
            summary[f"{norm}/{m}"] = {
                "loss_barrier_mean": statistics.mean(lb),
                "loss_barrier_sd": sd,
                "acc_barrier_mean": statistics.mean(ab),
                "pairs": len(vals),
            }
            l2s = f"{statistics.mean(a for a, _ in l2):.3f} -> {statistics.mean(b for _, b in l2):.3f}"
            print(
                f"{norm:11s} {m:12s} {vals[0]['param']:7s} {statistics.mean(lb):8.3f} +- {sd:.3f}"
                f"              {statistics.mean(ab):8.3f}     {l2s}"
            )
        base = "perm_folded" if norm != "none" else "perm"
        if f"{norm}/orth" in summary and f"{norm}/{base}" in summary:
            ratio = summary[f"{norm}/orth"]["loss_barrier_mean"] / max(
                summary[f"{norm}/{base}"]["loss_barrier_mean"], 1e-12
            )
            summary[f"{norm}/ratio_orth_to_{base}"] = ratio
            print(f"{norm}: orthogonal / {base} mean test loss barrier = {ratio:.3f} (target <= 0.5)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
