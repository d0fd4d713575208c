"""WM vs STE on Fashion-MNIST MLPs (PAPER.md claims 5 and 6), measured, never tuned.

Models: the training preset ``mlp-fmnist`` (784-512-512-512-10, Adam 1e-3,
batch 500, 5 epochs) with seeds 0..3, trained (or found) under ``--runs``.

For each triple ``t`` (anchor ``a = t``, ``b = t+1``, ``c = t+2``, seeds mod 4):

* two models (a, b): test-loss barrier (25-point grid) and R(0.3) after the
  permutation, for weight matching and STE (``adam`` preset, ``--epochs``
  epochs: fewer than the preset's 10 so it runs on a CPU; said in the output);
* three models: b and c matched to the anchor a by each method; the barrier
  between ``pi_b(theta_b)`` and ``pi_c(theta_c)``; plus the accuracy of the
  uniform average of the three aligned models and of the naive average.

Prints a table of mean and std over the triples and writes JSON to
``--out/results.json``. STE runs keep their resumable state under
``--out/ste/`` so a rerun (or one with more epochs) reuses them.

Usage::

    python benchmarks/ste_vs_wm.py --epochs 2 --triples 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs", help="run store root (training runs are shared)")
    ap.add_argument("--out", default="runs/benchmarks/ste_vs_wm", help="folder for STE states and results.json")
    ap.add_argument("--epochs", type=int, default=2, help="STE epochs (adam preset default is 10)")
    ap.add_argument("--triples", type=int, default=3, help="number of (a, b, c) triples / seeds")
    ap.add_argument("--seed", type=int, default=0, help="seed of WM and STE")
    ap.add_argument("--points", type=int, default=25, help="lambdas per barrier")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmckit.analysis.svd import gamma_key, svd_alignment
    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.data import load_dataset
    from lmckit.lmc import barrier_curve
    from lmckit.match import weight_matching
    from lmckit.match.ste import ste_matching
    from lmckit.merge import evaluate_state, merged_state
    from lmckit.perm import apply_permutation, perm_changed_units, spec_for
    from lmckit.train import make_config, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("fashion-mnist")
    runs, states = [], []
    for s in range(4):
        r = train(make_config("mlp-fmnist", seed=s), out_root=args.runs, device=args.device, progress=False)
        runs.append(r.run_dir)
        states.append(load_checkpoint(r.run_dir)[0])
        print(
            f"model seed {s}: {r.run_dir} test acc {r.test_accuracy:.4f}{' (cached)' if r.cached else ''}", flush=True
        )
    model = build_model(load_checkpoint(runs[0])[1]["model"], states[0])
    spec = spec_for(model)
    cache: dict[tuple[int, int, str], dict] = {}

    def match(i: int, j: int, method: str) -> dict:
        key = (i, j, method)
        if key in cache:
            return cache[key]
        t0 = time.time()
        if method == "wm":
            res = weight_matching(spec, states[i], states[j], seed=args.seed)
        else:
            sdir = out / "ste" / f"{runs[i].name}-{runs[j].name}-adam-s{args.seed}"
            res = ste_matching(
                model,
                states[i],
                states[j],
                ds,
                spec=spec,
                preset="adam",
                epochs=args.epochs,
                seed=args.seed,
                device=args.device,
                state_dir=sdir,
                progress=True,
            )
        perms = res.perms
        aligned = apply_permutation(spec, perms, states[j])
        bar = barrier_curve(model, states[i], aligned, ds, splits=("test",), points=args.points, progress=False)["test"]
        r = svd_alignment(spec, states[i], states[j], perms, gammas=(0.0, 0.3)).R
        rec = {
            "perms": perms,
            "aligned": aligned,
            "loss_barrier": bar.loss_barrier,
            "acc_barrier": bar.accuracy_barrier,
            "R0.3": r[gamma_key(0.3)]["after"],
            "R0": r[gamma_key(0.0)]["after"],
            "R0.3_before": r[gamma_key(0.3)]["before"],
            "seconds": time.time() - t0,
        }
        if method == "ste":
            rec["changed_vs_wm"] = perm_changed_units(perms, match(i, j, "wm")["perms"])
            rec["drift_changed_vs_wm"] = res.extra["drift"]["changed_vs_wm"]
            rec["heldout_loss"] = res.extra["best_heldout_loss"]
            rec["candidates"] = res.extra["candidates"]
        cache[key] = rec
        print(
            f"  {method} {i}->{j}: loss barrier {rec['loss_barrier']:.4f}, R(0.3) {rec['R0.3']:.3f} "
            f"({rec['seconds']:.0f}s)",
            flush=True,
        )
        return rec

    rows = []
    for t in range(args.triples):
        a, b, c = t % 4, (t + 1) % 4, (t + 2) % 4
        print(f"triple {t}: anchor {a}, models {b}, {c}", flush=True)
        row = {"triple": [a, b, c]}
        naive = merged_state(model, [states[a], states[b], states[c]], ds)
        row["naive_merged3_acc"] = evaluate_state(model, naive, ds, "test")[1]
        for m in ("wm", "ste"):
            rb, rc = match(a, b, m), match(a, c, m)
            row[f"{m}_pair_loss_barrier"] = rb["loss_barrier"]
            row[f"{m}_pair_acc_barrier"] = rb["acc_barrier"]
            row[f"{m}_R0.3"] = rb["R0.3"]
            row[f"{m}_R0"] = rb["R0"]
            bc = barrier_curve(
                model, rb["aligned"], rc["aligned"], ds, splits=("test",), points=args.points, progress=False
            )["test"]
            row[f"{m}_bc_loss_barrier"] = bc.loss_barrier
            row[f"{m}_bc_acc_barrier"] = bc.accuracy_barrier
            merged = merged_state(model, [states[a], rb["aligned"], rc["aligned"]], ds)
            row[f"{m}_merged3_acc"] = evaluate_state(model, merged, ds, "test")[1]
            if m == "ste":
                row["ste_changed_vs_wm"] = rb["changed_vs_wm"]
                row["ste_drift_changed_vs_wm"] = rb["drift_changed_vs_wm"]
        row["R0.3_before"] = match(a, b, "wm")["R0.3_before"]
        # baseline for the drift numbers: WM itself is a local search; two WM seeds differ too
        other = weight_matching(spec, states[a], states[b], seed=args.seed + 1).perms
        row["wm_seed_changed"] = perm_changed_units(match(a, b, "wm")["perms"], other)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def ms(key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return m, sd

    table = [
        ("two-model test loss barrier (a, b)", "pair_loss_barrier"),
        ("two-model test acc barrier (a, b)", "pair_acc_barrier"),
        ("R(0.3) after permutation", "R0.3"),
        ("R(0) after permutation", "R0"),
        ("three-model barrier pi_b(b)-pi_c(c), loss", "bc_loss_barrier"),
        ("three-model barrier pi_b(b)-pi_c(c), acc", "bc_acc_barrier"),
        ("accuracy of the average of 3 aligned", "merged3_acc"),
    ]
    print()
    print(
        f"Fashion-MNIST MLP 784-512x3-10, {len(rows)} triples (seeds mod 4); STE: adam preset, "
        f"{args.epochs} epochs (preset default 10), seed {args.seed}; WM: seed {args.seed}, max_iter 100"
    )
    print(f"{'quantity':44s} {'WM':>18s} {'STE':>18s}")
    summary = {}
    for label, key in table:
        (mw, sw), (mst, sst) = ms(f"wm_{key}"), ms(f"ste_{key}")
        summary[key] = {"wm": [mw, sw], "ste": [mst, sst]}
        print(f"{label:44s} {mw:9.4f} ± {sw:6.4f} {mst:9.4f} ± {sst:6.4f}")
    for label, key in (
        ("R(0.3) before permutation", "R0.3_before"),
        ("accuracy of the naive average of 3", "naive_merged3_acc"),
        ("STE units reassigned vs WM (a, b)", "ste_changed_vs_wm"),
        ("WM seed s vs seed s+1 units reassigned (a, b)", "wm_seed_changed"),
    ):
        m, s = ms(key)
        summary[key] = [m, s]
        print(f"{label:44s} {m:9.4f} ± {s:6.4f}")
    res = {
        "epochs": args.epochs,
        "seed": args.seed,
        "points": args.points,
        "rows": rows,
        "summary": summary,
        "runs": [str(r) for r in runs],
    }
    from lmckit.store import atomic_write_json

    atomic_write_json(out / "results.json", res)
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LMCKIT_NO_PROGRESS", "0")
    sys.exit(main())
