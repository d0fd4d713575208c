"""``lmckit analyze A B [--perm P.json]``: distance reduction, SVD alignment R, rank-k and Taylor analyses."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from .common import (
    MAX_SAMPLES,
    MAX_SEED,
    DeprecatedAlias,
    add_arch,
    add_data,
    add_device,
    add_force_perm,
    add_hf,
    add_json,
    add_quiet,
    check_output_path,
    int_in,
    is_transform_file,
    load_checkpoints,
    load_named_dataset,
    load_perm_file,
    load_transform_file,
    path_arg,
    print_json,
    print_table,
    recorded_dataset,
    refuse_outputs_in_inputs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="distances, SVD alignment R(gamma), input projections, rank-k, Taylor estimate",
        description="Analyse a pair of models before and after a permutation of model B "
        "(docs/definitions.md Definitions and Claims 1-4), or a transform of a larger symmetry class "
        "(a transform file from `lmckit match --symmetry`): then every analysis compares the folded models, "
        "before: folded A against folded B, after: folded A against the transformed folded B.",
    )
    p.add_argument("a", metavar="A", type=path_arg, help="model A: run folder or .safetensors")
    p.add_argument("b", metavar="B", type=path_arg, help="model B: run folder or .safetensors")
    p.add_argument(
        "--perm",
        default=None,
        help="permutation of B (JSON from `lmckit match`), or a transform file (*.safetensors, `lmckit match "
        "--symmetry`): then both models' norms are folded and every analysis (distances, R, projections, rank "
        "sweeps, Taylor) runs on folded A against folded B and the transformed folded B; default: identity",
    )
    p.add_argument(
        "--gamma",
        type=float,
        nargs="+",
        default=[0.0, 0.3],
        help="thresholds gamma for R and truncation (default 0 0.3)",
    )
    p.add_argument(
        "--rank-fractions",
        type=float,
        nargs="*",
        default=[0.02, 0.05, 0.1, 0.25, 0.5],
        help="fractions of each hidden layer's rank to keep in the rank-k sweep (none: only the gammas)",
    )
    p.add_argument("--taylor", action="store_true", help="also compute the Taylor estimate of the midpoint barrier")
    p.add_argument(
        "--taylor-samples",
        type=int_in(1, MAX_SAMPLES),
        default=10000,
        help="training images for the Taylor estimate (default 10000)",
    )
    p.add_argument(
        "--limit",
        type=int_in(1, MAX_SAMPLES),
        default=None,
        help="evaluate the rank sweep on the first N test images only (default: all)",
    )
    p.add_argument("--eval-limit", type=int_in(1, MAX_SAMPLES), dest="limit", action=DeprecatedAlias, new="--limit")
    p.add_argument(
        "--projection-batches",
        type=int_in(1, 10_000),
        default=4,
        help="batches of 500 training images for input projections (at most 10000)",
    )
    p.add_argument(
        "--dataset", default=None, help="dataset for the data-dependent analyses (default: A's recorded dataset)"
    )
    p.add_argument("--no-data", action="store_true", help="weights-only analyses (distances and SVD)")
    p.add_argument(
        "--plot",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="write the PNG figures (spectra, R bars, alignment, projections, rank sweep) into the folder "
        "DIR (default: none)",
    )
    p.add_argument("--plots", dest="plot", action=DeprecatedAlias, new="--plot DIR")
    p.add_argument(
        "--threads", type=int_in(1, 4096), default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed for data subsets and random baselines")
    add_force_perm(p)
    add_data(p)
    add_device(p)
    add_arch(p)
    add_hf(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze_pair
    from ..device import resolve_device
    from ..errors import LmcError

    t0 = time.perf_counter()
    if args.plot:
        from pathlib import Path

        if Path(args.plot).exists() and not Path(args.plot).is_dir():
            raise LmcError(f"--plot {args.plot} is a file", "pass a folder for the figures")
        names = [
            "spectra.png",
            "R_bars.png",
            "per_index_alignment.png",
            "cross_alignment.png",
            "input_projections.png",
            "rank_sweep.png",
        ]
        refuse_outputs_in_inputs(
            [("--plot", args.plot)] + [("--plot", Path(args.plot) / n) for n in names],
            [("model A", args.a), ("model B", args.b), ("--perm", args.perm)],
        )
        check_output_path("--plot", args.plot, folder=True)
    for g in args.gamma:
        if not 0.0 <= g <= 1.0:
            raise LmcError(
                f"--gamma {g} is outside [0, 1]", "gamma is a fraction of the largest singular value, e.g. 0 or 0.3"
            )
    for f in args.rank_fractions:
        if not 0.0 < f <= 1.0:
            raise LmcError(f"--rank-fractions {f} is outside (0, 1]", "pass fractions such as 0.05 0.1 0.5")
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise LmcError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    (sd_a, sd_b), (info_a, _), model, spec = load_checkpoints(
        [args.a, args.b],
        labels=["model A", "model B"],
        hint="analyse two models of the same architecture and width",
        arch=args.arch,
        hf=args.hf,
    )
    model = model.to(device)
    transformed = is_transform_file(args.perm)
    perms = sd_b_after = head = None
    if transformed:  # a transform file: analyse the folded models (the parameterisation the transform acts on)
        sd_a, sd_b, sd_b_after, head = load_transform_file(
            args.perm, spec, model, ("model B", sd_b), ("model A", sd_a), args.force_perm
        )
    elif args.perm:
        perms = load_perm_file(args.perm, spec, ("model B", sd_b), ("model A", sd_a), args.force_perm)

    if args.taylor and args.no_data:
        raise LmcError(
            "--taylor needs data, but --no-data was given", "drop --no-data (and pass --dataset if A records none)"
        )
    dataset = None
    if not args.no_data:
        name = args.dataset or recorded_dataset(info_a)
        if name is None:
            if args.taylor:
                raise LmcError(f"--taylor needs data, and {args.a} records no dataset", "pass --dataset NAME")
        else:
            from ..lmc import check_model_fits

            dataset = load_named_dataset(args.dataset, info_a, args.data_dir)
            check_model_fits(model, dataset, "train", device, where=str(args.a))
    res = analyze_pair(
        model,
        spec,
        sd_a,
        sd_b,
        perms,
        sd_b_after=sd_b_after,
        dataset=dataset,
        gammas=args.gamma,
        rank_fractions=args.rank_fractions,
        eval_limit=args.limit,
        projection_batches=args.projection_batches,
        taylor=args.taylor,
        taylor_samples=args.taylor_samples,
        device=device,
        seed=args.seed,
    )
    s = res.summary
    if dataset is None and not args.no_data:
        s["notes"].append("no dataset recorded in A and none given (--dataset): data-dependent analyses skipped")
    s["a"], s["b"], s["perm"] = str(args.a), str(args.b), args.perm
    s["dataset"] = dataset.name if dataset is not None else None
    if transformed:
        s["parameterisation"] = "folded"
        s["symmetry"] = head.get("symmetry")
        s["classes"] = {g: rec["class"] for g, rec in head["groups"].items()}
        s["folded"] = head.get("folded")
        s["notes"].append(
            f"transform file ({s['symmetry']}): every analysis is on the folded models (norm gains and biases "
            "folded into the next Linear); before = folded A vs folded B, after = folded A vs the transformed "
            "folded B; R under a map Q is U_A^T Q U_B (docs/definitions.md)"
        )
    if args.plot:
        from ..analysis.plots import write_plots

        t = time.perf_counter()
        paths = write_plots(args.plot, res.svd, res.projections, res.sweeps)
        s["plots"] = [str(p) for p in paths]
        s["timings"]["plots"] = time.perf_counter() - t
    s["timings"]["total"] = time.perf_counter() - t0
    if args.json:
        print_json(s)
    else:
        _print_readable(s)
    return 0


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def _print_readable(s: dict[str, Any]) -> None:
    gk = s["gammas"]
    if s.get("parameterisation") == "folded":
        print(f"A: {s['a']}\nB: {s['b']}\ntransform: {s['perm']} ({s['symmetry']}; parameterisation: folded)")
    else:
        print(f"A: {s['a']}\nB: {s['b']}\npermutation: {s['perm'] or 'identity'}")
    print(
        f"\nL2 distance {s['l2_before']:.4f} -> {s['l2_after']:.4f}  (reduction {s['reduction']:.4f}, "
        f"{s['entries_counted']} parameter entries)"
    )
    for g in gk:
        print(f"R(gamma={g}): before {s['R'][g]['before']:.4f}  after {s['R'][g]['after']:.4f}")
    rows = []
    for r in s["per_layer"]:
        row = {
            "layer": r["name"],
            "shape": "x".join(map(str, r["shape"])),
            "l2 before": _fmt(r["l2_before"]),
            "l2 after": _fmt(r["l2_after"]),
            "reduction": _fmt(r["reduction"]),
        }
        for g in gk:
            row[f"R({g}) before"] = _fmt(r["R"][g]["before"]) if r["R"] else "-"
            row[f"R({g}) after"] = _fmt(r["R"][g]["after"]) if r["R"] else "-"
            row[f"kept({g}) a/b"] = f"{r['kept'][g]['a']}/{r['kept'][g]['b']}" if r["kept"] else "-"
        rows.append(row)
    print()
    print_table(rows)
    if s.get("input_projections"):
        print("\nInput projections, mean |v_i . z| (top 10% of singular directions vs random directions):")
        print_table(
            [
                {
                    "layer": r["name"],
                    "rank": r["rank"],
                    "top 10%": r["top_mean"],
                    "bottom half": r["bottom_half_mean"],
                    "random": r["random_mean"],
                    "top/random": r["top_over_random"],
                }
                for r in s["input_projections"]
            ]
        )
    for label, recs in (s.get("rank_sweep") or {}).items():
        print(f"\nRank-k truncation ({label}; hidden layers, output layer whole):")
        print_table(
            [
                {
                    "threshold": "full" if r["kind"] == "full" else f"{r['kind']}={r['threshold']:g}",
                    "kept": f"{r['kept_total']}/{r['rank_total']}",
                    "per layer": "/".join(str(v) for v in r["kept"].values()) or "-",
                    "loss": r["loss"],
                    "acc": r["acc"],
                }
                for r in recs
            ]
        )
    if "taylor" in s:
        t = s["taylor"]
        print(
            f"\nMidpoint barrier on {t['num_samples']} {t['split']} images: measured {t['measured_midpoint']:.4f}, "
            f"Taylor -(1/8) d^T H d = {t['taylor_midpoint']:.4f}  (|d| = {t['delta_norm']:.3f}, {t['seconds']:.1f}s)"
        )
    if s.get("plots"):
        print(f"\nplots: {', '.join(s['plots'])}")
    for n in s["notes"]:
        print(f"note: {n}")
    print(f"({s['timings']['total']:.1f}s)")
