"""Permutation vs orthogonal weight matching on the `vit-fmnist` ViTs, without norm and with LayerNorm (issue 29).

Trains (or reuses, from the run store) the `vit-fmnist` recipe's model -- ViT width 32, depth 1, 4 heads,
MLP ratio 2, Adam 1e-3, batch 256, 2 epochs on Fashion-MNIST -- for seeds 0, 1, 2, once with ``norm="none"``
(what the recipe trains) and once with ``norm="layernorm"``, and on every pair (0,1), (0,2), (1,2) measures
the test loss and accuracy barriers (``max_l [f(l) - ((1-l) f(0) + l f(1))]`` on the first ``--limit`` test
images, ``--points`` evenly spaced lambdas), the L2 distance reduction and the alignment scores R(0) and
R(0.3) of:

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
- ``signed`` (``--signed``): generalised WM under the signed class on the folded weights (signed
  permutations where the model admits them: the residual stream without norm; with LayerNorm the stream
  stays permuted, see docs/symmetry.md).

Every barrier says which parameterisation it interpolates (``raw`` or ``folded``).

R(gamma) (docs/definitions.md, "Alignment score R(gamma)" and "R(gamma) under a transform") comes from
:func:`lmckit.analysis.svd.svd_alignment`, the function ``lmckit analyze`` uses, applied to model A and the
aligned model B (``T(B)``: permuted or transformed, as a state dict), so an orthogonal map ``Q`` of B's
rows enters as ``U_A^T Q U_B``. Per method: ``R_before`` (A against the unaligned B, on the method's
parameterisation) and ``R_after``; each is the mean over the weight matrices of the per-matrix
``R_l(gamma) / min(|I_a|, |I_b|)`` (``mean``) and the pooled total of ``lmckit analyze``
(``sum_l R_l / sum_l min(|I_a|, |I_b|)``, ``pooled``).

Width sweep (``--widths 32,64,128``): the same measurements at each width (depth, heads, MLP ratio, epochs
as the recipe); the first width uses ``--seeds``, the others ``--sweep-seeds`` (default ``0,1``: one pair).
Each model's training time (wall seconds, from its run record) and, when this run trained it, the 1-minute
load average after each epoch are recorded under ``models``.

Prints one JSON line per pair and method and summary tables; ``--out`` writes all of it as JSON.

The committed results (``docs/results/symmetry-vit-fmnist*.txt`` hold the printed output)::

    PYTHONPATH=src python benchmarks/symmetry_barriers.py --runs /tmp/symruns --am \
        --out docs/results/symmetry-vit-fmnist.json
    PYTHONPATH=src python benchmarks/symmetry_barriers.py --runs /tmp/symruns --am \
        --widths 64,128 --seeds 0,1,2 --sweep-seeds 0,1,2 --out docs/results/symmetry-vit-fmnist-widths.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

GAMMAS = (0.0, 0.3)
METHODS = ("naive", "perm", "perm_folded", "signed", "orth", "orth_am")


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def r_scores(spec, sd_a, sd_b) -> dict:
    """``{"0": {"mean": ..., "pooled": ...}, "0.3": {...}}``: R(gamma) of A against B as given (see the module doc)."""
    from lmckit.analysis.svd import gamma_key, svd_alignment

    res = svd_alignment(spec, sd_a, sd_b, None, GAMMAS)
    out = {}
    for g in GAMMAS:
        k = gamma_key(g)
        per = [la.R[k]["before"] for la in res.layers]
        out[k] = {"mean": statistics.mean(per), "pooled": res.R[k]["before"], "matrices": len(per)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="run store for the trained models (reused when present)")
    p.add_argument("--norms", default="none,layernorm")
    p.add_argument("--seeds", default="0,1,2", help="seeds at the first width of --widths")
    p.add_argument("--widths", default="32", help="comma-separated ViT widths; the first is the main one")
    p.add_argument("--sweep-seeds", default="0,1", help="seeds at the other widths of --widths")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=2500, help="test images per evaluation point")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--am", action="store_true", help="also the activation-based orthogonal variant")
    p.add_argument("--signed", action="store_true", help="also weight matching under the signed class")
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
    widths = _ints(args.widths)
    norms = args.norms.split(",")
    rows: list[dict] = []
    models: list[dict] = []

    def barrier(model, sd_a, sd_b):
        r = barrier_curve(model, sd_a, sd_b, ds, splits=("test",), points=args.points, limit=args.limit, progress=False)
        c = r["test"]
        return {"loss_barrier": c.loss_barrier, "acc_barrier": c.accuracy_barrier}

    for wi, width in enumerate(widths):
        seeds = _ints(args.seeds if wi == 0 else args.sweep_seeds)
        for norm in norms:
            states, infos = {}, {}
            for s in seeds:
                cfg = make_config(
                    "vit-fmnist",
                    model_kwargs={"width": width, "depth": 1, "heads": 4, "norm": norm},
                    epochs=args.epochs,
                    seed=s,
                )
                loads: list[float] = []
                res = train(
                    cfg,
                    out_root=args.runs,
                    device="cpu",
                    progress=False,
                    threads=1,
                    callback=lambda _e, _m, loads=loads: loads.append(os.getloadavg()[0]),
                )
                states[s], infos[s] = load_checkpoint(res.run_dir)
                rec = {
                    "width": width,
                    "norm": norm,
                    "seed": s,
                    "run": Path(res.run_dir).name,
                    "train_seconds": res.seconds,
                    "trained_now": not res.cached,
                    "load_avg_per_epoch": loads or None,
                    "test_loss": res.test_loss,
                    "test_acc": res.test_accuracy,
                }
                models.append(rec)
                print(f"# {json.dumps(rec)}", file=sys.stderr, flush=True)
            for i, sa in enumerate(seeds):
                for sb in seeds[i + 1 :]:
                    raw_a, raw_b = states[sa], states[sb]
                    model = build_model(infos[sa]["model"], raw_a)
                    spec = spec_for(model)
                    fa_model = fold_norms(model)[0]
                    fb_model = fold_norms(build_model(infos[sb]["model"], raw_b))[0]
                    fa, fb = fa_model.state_dict(), fb_model.state_dict()
                    r_raw = r_scores(spec, raw_a, raw_b)
                    r_fold = r_scores(spec, fa, fb) if norm != "none" else r_raw
                    out = {"width": width, "norm": norm, "pair": [sa, sb]}
                    d_raw = relative_distance(spec, raw_a, raw_b)
                    out["naive"] = {
                        "param": "raw",
                        "l2_before": d_raw,
                        "l2_after": d_raw,
                        "R_before": r_raw,
                        "R_after": r_raw,
                        **barrier(model, raw_a, raw_b),
                    }
                    t = time.perf_counter()
                    wm = weight_matching(spec, raw_a, raw_b, seed=0, max_iter=args.max_iter)
                    al = apply_permutation(spec, wm.perms, raw_b)
                    out["perm"] = {
                        "param": "raw",
                        "l2_before": d_raw,
                        "l2_after": relative_distance(spec, raw_a, al),
                        "sweeps": wm.sweeps,
                        "seconds": time.perf_counter() - t,
                        "R_before": r_raw,
                        "R_after": r_scores(spec, raw_a, al),
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
                            "R_before": r_fold,
                            "R_after": r_scores(spec, fa, alf),
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
                        "R_before": r_fold,
                        "R_after": r_scores(spec, fa, alo),
                        **barrier(fa_model, fa, alo),
                    }
                    if args.signed:
                        t = time.perf_counter()
                        sg = weight_matching_sym(spec, fa, fb, "signed", model=fa_model, max_iter=args.max_iter)
                        als = apply_transform(spec, sg.sym, sg.transform, fb)
                        out["signed"] = {
                            "param": "folded",
                            "l2_before": sg.extra["distance_before"],
                            "l2_after": sg.extra["distance_after"],
                            "sweeps": sg.sweeps,
                            "converged": sg.converged,
                            "seconds": time.perf_counter() - t,
                            "classes": sorted({s.cls for s in sg.sym.values()}),
                            "R_before": r_fold,
                            "R_after": r_scores(spec, fa, als),
                            **barrier(fa_model, fa, als),
                        }
                    if args.am:
                        am = activation_matching(
                            fa_model, fb_model, ds, num_batches=4, batch_size=500, symmetry="orthogonal"
                        )
                        ala = apply_transform(spec, am.sym, am.transform, fb)
                        out["orth_am"] = {
                            "param": "folded",
                            "l2_after": relative_distance(spec, fa, ala),
                            "R_before": r_fold,
                            "R_after": r_scores(spec, fa, ala),
                            **barrier(fa_model, fa, ala),
                        }
                    print(json.dumps(out), flush=True)
                    rows.append(out)

    summary = summarize(rows, widths, norms)
    sweep = width_sweep(rows, widths, norms, models)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"rows": rows, "models": models, "summary": summary, "width_sweep": sweep, "args": vars(args)}, indent=1
            )
        )
    return 0


def summarize(rows: list[dict], widths: list[int], norms: list[str]) -> dict:
    """Per (width, norm, method): barriers, L2 and R(0)/R(0.3) before -> after, mean +- sd over pairs; printed."""
    summary: dict = {}
    for width in widths:
        print(f"\n## width {width}")
        print(
            "norm        method       param  pairs  test loss barrier   acc barrier      L2 before -> after"
            "   R(0) before -> after (sd)     R(0.3) before -> after (sd)"
        )
        for norm in norms:
            sub = [r for r in rows if r["norm"] == norm and r["width"] == width]
            for m in METHODS:
                vals = [r[m] for r in sub if m in r]
                if not vals:
                    continue
                lb, lb_sd = _mean_sd([v["loss_barrier"] for v in vals])
                ab, ab_sd = _mean_sd([v["acc_barrier"] for v in vals])
                rec = {
                    "param": vals[0]["param"],
                    "pairs": len(vals),
                    "loss_barrier_mean": lb,
                    "loss_barrier_sd": lb_sd,
                    "acc_barrier_mean": ab,
                    "acc_barrier_sd": ab_sd,
                }
                for k in ("l2_before", "l2_after"):
                    if all(k in v for v in vals):
                        rec[k] = statistics.mean(v[k] for v in vals)
                for g in ("0", "0.3"):
                    for when in ("before", "after"):
                        mean, sd = _mean_sd([v[f"R_{when}"][g]["mean"] for v in vals])
                        rec[f"R{g}_{when}_mean"], rec[f"R{g}_{when}_sd"] = mean, sd
                summary[f"w{width}/{norm}/{m}"] = rec
                l2 = f"{rec.get('l2_before', float('nan')):.3f} -> {rec.get('l2_after', float('nan')):.3f}"
                rs = "   ".join(
                    f"{rec[f'R{g}_before_mean']:.3f} -> {rec[f'R{g}_after_mean']:.3f} ({rec[f'R{g}_after_sd']:.3f})"
                    for g in ("0", "0.3")
                )
                print(
                    f"{norm:11s} {m:12s} {rec['param']:7s} {len(vals):3d}  {lb:7.3f} +- {lb_sd:.3f}"
                    f"    {ab:6.3f} +- {ab_sd:.3f}   {l2}      {rs}"
                )
            base = "perm_folded" if norm != "none" else "perm"
            o, b = summary.get(f"w{width}/{norm}/orth"), summary.get(f"w{width}/{norm}/{base}")
            if o and b:
                ratio = o["loss_barrier_mean"] / max(b["loss_barrier_mean"], 1e-12)
                summary[f"w{width}/{norm}/ratio_orth_to_{base}"] = ratio
                print(f"{norm}: orthogonal / {base} mean test loss barrier = {ratio:.3f} (target <= 0.5)")
    return summary


def width_sweep(rows: list[dict], widths: list[int], norms: list[str], models: list[dict]) -> list[dict]:
    """Per (width, norm): permutation WM vs orthogonal WM loss barrier and their ratio, all pairs and pair (0, 1)."""
    print("\n## width sweep: test loss barrier, permutation WM (baseline) vs orthogonal WM")
    print(
        "width  norm        baseline      pairs  perm WM           orth WM           ratio   ratio pair 0-1"
        "   train s/model (mean)"
    )
    out = []
    for width in widths:
        for norm in norms:
            sub = [r for r in rows if r["norm"] == norm and r["width"] == width]
            if not sub:
                continue
            base = "perm_folded" if norm != "none" else "perm"
            pm, psd = _mean_sd([r[base]["loss_barrier"] for r in sub])
            om, osd = _mean_sd([r["orth"]["loss_barrier"] for r in sub])
            p01 = [r for r in sub if r["pair"] == [0, 1]]
            r01 = p01[0]["orth"]["loss_barrier"] / p01[0][base]["loss_barrier"] if p01 else None
            secs = [m["train_seconds"] for m in models if m["width"] == width and m["norm"] == norm]
            rec = {
                "width": width,
                "norm": norm,
                "baseline": base,
                "pairs": len(sub),
                "perm_mean": pm,
                "perm_sd": psd,
                "orth_mean": om,
                "orth_sd": osd,
                "ratio": om / max(pm, 1e-12),
                "ratio_pair01": r01,
                "perm_raw_mean": statistics.mean(r["perm"]["loss_barrier"] for r in sub),
                "train_seconds_mean": statistics.mean(secs) if secs else None,
            }
            out.append(rec)
            r01s = f"{r01:.3f}" if r01 is not None else "  -  "
            print(
                f"{width:5d}  {norm:11s} {base:12s} {len(sub):5d}  {pm:.3f} +- {psd:.3f}   {om:.3f} +- {osd:.3f}"
                f"   {rec['ratio']:.3f}   {r01s}          {rec['train_seconds_mean'] or float('nan'):.0f}"
            )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
