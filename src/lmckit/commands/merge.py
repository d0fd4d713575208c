"""``lmckit merge``: align several checkpoints, average them into one loadable model, and measure."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..match.registry import list_methods
from .common import (
    MAX_POINTS,
    MAX_SEED,
    DeprecatedAlias,
    add_arch,
    add_data,
    add_device,
    add_hf,
    add_json,
    add_method_flags,
    add_quiet,
    check_folder_outputs,
    check_output_path,
    check_symmetry_flags,
    describe_model,
    draw_ste_drift,
    int_in,
    load_checkpoints,
    load_named_dataset,
    method_options,
    path_arg,
    print_json,
    print_table,
    refuse_outputs_in_inputs,
    staged_outputs,
    state_fingerprint,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge several models: align, average uniformly, report accuracies and barriers",
        description="Align every model to the first (anchor) with a matching method of `lmckit methods` (or "
        "all together by MergeMany), write the uniform average as DIR/merged.safetensors (BatchNorm "
        "statistics recomputed or REPAIR applied, as --bn-reset says), one perm JSON per model and DIR/merge.json "
        "(with the merged-accuracy curve: "
        "the average of the first n aligned models vs the naive average); --plot PATH also draws that "
        "curve as a PNG.",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", type=path_arg, help="run folders or .safetensors checkpoints: A B [C ...]"
    )
    p.add_argument(
        "--method",
        choices=list_methods(),
        default="weight",
        help="alignment method of `lmckit methods` (default weight); its options come from the flags below "
        "that it has, and --option KEY=VALUE",
    )
    add_method_flags(p, state_flag=False)
    p.add_argument(
        "--multi",
        choices=["anchor", "mergemany"],
        default="anchor",
        help="anchor: match each model to the first (default); mergemany: weight matching to the mean of the others",
    )
    p.add_argument(
        "--symmetry",
        choices=("permutation", "signed", "orthogonal"),
        default="permutation",
        help="class of maps to align with (default permutation). signed / orthogonal: every model's norms are "
        "folded, weight matching (anchor or mergemany) finds per group an element of the largest class up to "
        "this one the model admits, one transform file per model (DIR/transform_I.safetensors, for lmckit "
        "barrier --perm) replaces the perm files, and the merged model is the average of the folded aligned "
        "models (1000 sweeps per matching unless --max-iter)",
    )
    p.add_argument("--out", required=True, type=path_arg, help="output folder")
    p.add_argument("--split", default="test", help="split to evaluate on (default test)")
    p.add_argument(
        "--points",
        type=int_in(2, MAX_POINTS),
        default=25,
        help=f"lambdas per pairwise barrier (default 25, at most {MAX_POINTS})",
    )
    p.add_argument(
        "--bn-reset",
        choices=["auto", "on", "off", "repair"],
        default="auto",
        help="recompute BatchNorm statistics of averaged models (auto: when the model has BN), or REPAIR "
        "(rescale each hidden unit of the average to the mean of the models' activation statistics; "
        "needs a bias or affine norm after every permuted layer) (default auto)",
    )
    p.add_argument(
        "--seed", type=int_in(0, MAX_SEED), default=0, help="seed of matching, STE and BN-reset batches (default 0)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate on the first N items of the split only (default: all)"
    )
    p.add_argument("--eval-limit", type=int, dest="limit", action=DeprecatedAlias, new="--limit")
    p.add_argument("--no-curve", action="store_true", help="skip the merged-accuracy curve")
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="write the merged-accuracy curve as a PNG (default: none)"
    )
    p.add_argument("--dataset", default=None, help="dataset name (default: the one recorded in the first checkpoint)")
    add_data(p)
    add_device(p)
    add_arch(p)
    add_hf(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- run
def _drop_stale_alignment_files(out: Path, keep: set[str]) -> None:
    """Remove an earlier merge's ``perm_I.json`` / ``transform_I.safetensors`` that this run did not write.

    Run after the new merge.json is in place, so the folder never lists files of two runs (a transform file
    of an earlier, larger merge would still pass the hash checks for its pair). Only regular files with
    exactly these names are touched.
    """
    import re

    pattern = re.compile(r"(perm_\d+\.json|transform_\d+\.safetensors)")
    for p in out.iterdir():
        if pattern.fullmatch(p.name) and p.name not in keep and p.is_file() and not p.is_symlink():
            p.unlink()


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import save_model
    from ..device import resolve_device
    from ..errors import LmcError
    from ..lmc import check_model_fits
    from ..merge import check_merge_inputs, merge_models, plot_merged_accuracy
    from ..perm import save_perms
    from ..perm.symmetry import save_transform
    from ..store import atomic_write_json, file_lock, real_path

    if len(args.models) < 2:
        raise LmcError("lmckit merge needs at least two checkpoints", "lmckit merge A B C --out DIR")
    opts = method_options(args, args.method)
    sym = args.symmetry != "permutation"
    if sym:
        check_symmetry_flags(args)
        if args.method != "weight":
            raise LmcError(
                f"merge --symmetry {args.symmetry} aligns by weight matching, not {args.method}",
                "use --method weight (anchor or --multi mergemany)",
            )
        if args.max_iter is None:
            opts = dataclasses.replace(opts, max_iter=1000)
    if args.limit is not None and args.limit < 1:
        raise LmcError(f"--limit must be at least 1, got {args.limit}")
    if args.plot is not None:
        if args.no_curve:
            raise LmcError("--plot draws the merged-accuracy curve, which --no-curve skips", "drop one of them")
        if Path(args.plot).suffix.lower() != ".png":
            raise LmcError(f"--plot {args.plot} must be a .png file")
    out = Path(args.out)
    names = ["merged.safetensors", "merge.json", "ste", ".lock"] + (["merged-hf"] if args.hf else [])
    names += [f"transform_{i}.safetensors" if sym else f"perm_{i}.json" for i in range(len(args.models))]
    inputs = [(f"model {i}", m) for i, m in enumerate(args.models)]
    refuse_outputs_in_inputs([("--out", out)] + [("--out", out / n) for n in names] + [("--plot", args.plot)], inputs)
    check_output_path("--out", out, folder=True)
    check_folder_outputs(
        "--out",
        out,
        [n for n in names if n.endswith(".json") or n.endswith(".safetensors")],
        [n for n in ("ste", "merged-hf") if n in names],
    )
    check_output_path("--plot", args.plot)
    device = resolve_device(args.device)
    # every input is checked before anything is created (a failed command leaves no folder or lock behind)
    states, infos, model, _ = load_checkpoints(args.models, arch=args.arch, hf=args.hf)
    dataset = load_named_dataset(args.dataset, infos[0], args.data_dir, label="model 0")
    check_model_fits(model, dataset, "train", where=args.models[0])
    check_merge_inputs(model, states, dataset, args.method, args.multi, args.split, args.bn_reset, opts)
    resumable = any(f.name == "state_dir" for f in dataclasses.fields(opts))
    # a failed run keeps its resumable state (out/ste) for the next one
    with staged_outputs(out, keep=True, lock=out / ".lock") as tmp, file_lock(out / ".lock", wait=False):
        res = merge_models(
            model,
            states,
            dataset,
            method=args.method,
            multi=args.multi,
            split=args.split,
            points=args.points,
            bn_reset=args.bn_reset,
            seed=args.seed,
            device=device,
            curve=not args.no_curve,
            limit=args.limit,
            options=opts,
            state_dir=out / "ste" if resumable else None,
            progress=not args.json,
            passes=args.max_iter or 100,
            symmetry=args.symmetry,
        )
        draw_ste_drift(out / "ste" if resumable else None)
        paths = [str(real_path(p, "model")) for p in args.models]
        hashes = [state_fingerprint(sd) for sd in states]
        perm_files = []
        for i, (path, perms) in enumerate(zip(paths, res.perms)):
            if sym:
                save_transform(
                    tmp / f"transform_{i}.safetensors",
                    perms,
                    res.match.sym,
                    symmetry=args.symmetry,
                    method="weight",
                    multi=res.multi,
                    seed=args.seed,
                    folded=True,
                    model_a=paths[0],
                    model_b=path,
                    model_a_sha256=hashes[0],
                    model_b_sha256=hashes[i],
                    model=model.lmckit_config,
                    index=i,
                )
                perm_files.append(str(out / f"transform_{i}.safetensors"))
                continue
            save_perms(
                tmp / f"perm_{i}.json",
                perms,
                method=res.method,
                multi=res.multi,
                seed=args.seed,
                model=path,
                reference=paths[0],
                index=i,
                model_sha256=hashes[i],
                reference_sha256=hashes[0],
            )
            perm_files.append(str(out / f"perm_{i}.json"))
        save_model(
            tmp / "merged.safetensors",
            model,
            res.merged,
            dataset=dataset.name,
            lmckit_merge={
                "models": paths,
                "method": args.method,
                "multi": args.multi,
                "seed": args.seed,
                "bn_reset": args.bn_reset,
                "model_sha256": hashes,
            },
        )
        if args.hf:  # the merged model also as a Hugging Face folder (config + safetensors) for from_pretrained
            from ..hf import save_hf

            save_hf(model, res.merged, tmp / "merged-hf")
        merged_file = out / "merged.safetensors"
        summary = res.to_dict()
        files = {"transform_files": perm_files} if sym else {"perm_files": perm_files}
        if sym:
            summary["alignment"] = res.match.to_dict()
        summary.update(
            models=paths,
            **files,
            merged_checkpoint=str(merged_file),
            **({"merged_hf_folder": str(out / "merged-hf")} if args.hf else {}),
            dataset=dataset.name,
            model=model.lmckit_config,
            seed=args.seed,
            model_sha256=hashes,
        )
        summary["options"] = opts.to_dict()
        if res.curve and args.plot:
            plot_merged_accuracy(
                res.curve,
                args.plot,
                title=f"uniform average of n models ({args.split})",
                model_accuracies=summary["model_accuracies"],
                split=args.split,
            )
            summary["merged_accuracy_plot"] = str(args.plot)
        atomic_write_json(tmp / "merge.json", summary)
    _drop_stale_alignment_files(out, {Path(f).name for f in perm_files})
    if args.json:
        print_json(summary)
        return 0
    print(
        f"model:  {describe_model(model.lmckit_config)}; {len(states)} checkpoints; "
        f"dataset {dataset.name} ({args.split})"
    )
    print(f"method: {args.method} ({args.multi}), seed {args.seed}; {res.seconds:.1f}s")
    if sym:
        counts: dict[str, int] = {}
        for s in res.match.sym.values():
            counts[s.cls] = counts.get(s.cls, 0) + 1
        print(
            f"symmetry: {args.symmetry} ({', '.join(f'{n} {c}' for c, n in counts.items())} groups); norms folded, "
            f"barriers and the merged model on folded weights; {res.match.passes} pass(es), "
            + ("converged" if res.match.converged else "not converged")
        )
    print_table(
        [{"model": i, "loss": m["loss"], "accuracy": m["accuracy"]} for i, m in enumerate(res.model_metrics)]
        + [{"model": "merged", "loss": res.merged_loss, "accuracy": res.merged_accuracy}]
    )
    if res.pairwise_barriers or res.anchor_barriers:
        print("barriers between aligned models:")
        print_table(
            [
                {
                    "pair": f"{b['models'][0]}-{b['models'][1]}" + (" (anchor)" if b in res.anchor_barriers else ""),
                    "loss_barrier": b["loss_barrier"],
                    "accuracy_barrier": b["accuracy_barrier"],
                }
                for b in res.pairwise_barriers + res.anchor_barriers
            ]
        )
    for label, rows in res.curve.items():
        print(f"merged accuracy ({label}): " + ", ".join(f"n={r['n']}: {r['accuracy']:.4f}" for r in rows))
    kind = "transform" if sym else "perm"
    print(f"wrote {merged_file}, {len(perm_files)} {kind} files and merge.json to {out}")
    return 0
