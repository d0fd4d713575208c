"""``lmckit match``: permutations that align model B (or several models) to model A."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..match.registry import get_method, list_methods
from .common import (
    MAX_SEED,
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
    refuse_outputs_in_inputs,
    staged_outputs,
    state_fingerprint,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "match",
        help="find permutations aligning model B (or B, C, ...) to model A",
        description="A matching method of `lmckit methods` (weight, activation, STE, Sinkhorn, ...) between two "
        "checkpoints; with --multi, "
        "three or more checkpoints matched to an anchor or by MergeMany. A perm file applies to the "
        "second model: apply_permutation(spec, perms, B) is aligned to A.",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", type=path_arg, help="run folders or .safetensors checkpoints: A B [C ...]"
    )
    p.add_argument(
        "--method",
        choices=list_methods(),
        default="weight",
        help="a method of `lmckit methods`: weight (default), activation, ste (straight-through estimator), "
        "sinkhorn, ...; its options come from the flags below that it has, and --option KEY=VALUE",
    )
    p.add_argument(
        "--multi",
        choices=["anchor", "mergemany"],
        default=None,
        help="several models: match each to the first (anchor) or run MergeMany (weight matching only) "
        "(default: two models, no scheme)",
    )
    p.add_argument(
        "--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the group / model / batch order (default 0)"
    )
    p.add_argument("--dataset", default=None, help="AM/STE: dataset name (default: the one recorded in checkpoint A)")
    add_method_flags(p)
    add_data(p)
    p.add_argument(
        "--symmetry",
        choices=("permutation", "signed", "orthogonal", "invertible"),
        default="permutation",
        help="class of maps to align with (default permutation). signed / orthogonal: per group the largest "
        "class up to this one that the model admits (LayerNorm/RMSNorm folded into the next Linear first; "
        "`lmckit check-spec --symmetry` lists them); methods weight and activation, two models; --out is then "
        "a transform file (.safetensors); weight matching runs at most 1000 sweeps unless --max-iter. "
        "invertible has no exact matching step and is refused",
    )
    p.add_argument("--out", required=True, help="perm JSON file to write (with --multi: a folder)")
    add_device(p)
    add_arch(p)
    add_hf(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def _abs(path: str) -> str:
    from ..store import real_path

    return str(real_path(path, "model"))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import build_model
    from ..device import resolve_device
    from ..errors import LmcError
    from ..match.registry import check_scheme

    if len(args.models) < 2:
        raise LmcError("lmckit match needs at least two checkpoints", "lmckit match A B --out perm.json")
    if len(args.models) > 2 and args.multi is None:
        raise LmcError(
            f"{len(args.models)} checkpoints given without --multi",
            "add --multi anchor (match all to the first) or --multi mergemany, with --out FOLDER",
        )
    if args.symmetry != "permutation":
        check_symmetry_flags(args)
        if args.multi:
            raise LmcError(
                f"--symmetry {args.symmetry} aligns two models; --multi supports permutations only",
                f"for several models use lmckit merge A B C --symmetry {args.symmetry} [--multi mergemany] "
                "(one transform file per model), or drop --multi",
            )
        if args.method not in ("weight", "activation"):
            raise LmcError(
                f"method {args.method!r} supports the permutation class only (--symmetry {args.symmetry})",
                "use --method weight or activation (`lmckit methods` lists each method's classes)",
            )
        if not str(args.out).endswith(".safetensors"):
            raise LmcError(
                f"--out {args.out}: a transform file is safetensors (matrices), its name must end in .safetensors",
                "e.g. --out transform.safetensors",
            )
    method = check_scheme(args.method, args.multi) if args.multi else get_method(args.method)
    args.method_options = method_options(args, args.method)
    out = Path(args.out)
    outputs = [("--out", out)] + (
        [("--out", out / f"perm_{i}.json") for i in range(len(args.models))] + [("--out", out / "summary.json")]
        if args.multi
        else []
    )
    refuse_outputs_in_inputs(
        outputs + [("--ste-state", args.ste_state)],
        [(f"model {chr(65 + i) if i < 26 else i}", m) for i, m in enumerate(args.models)],
    )
    check_output_path("--out", args.out, folder=bool(args.multi))  # the raw text: a trailing "/" names a folder
    if args.multi:
        check_folder_outputs("--out", out, [p.name for _, p in outputs[1:]])
    check_output_path("--ste-state", args.ste_state, folder=True)
    device = resolve_device(args.device)
    states, infos, model, spec = load_checkpoints(
        args.models, hint="match checkpoints of the same architecture and width", arch=args.arch, hf=args.hf
    )
    models = [model] + [
        build_model(model.lmckit_config, sd, str(path)) for path, sd in zip(args.models[1:], states[1:])
    ]
    dataset = None
    if method.requires_data(args.method_options):
        dataset = load_named_dataset(args.dataset, infos[0], args.data_dir)
    if args.symmetry != "permutation":
        return _run_pair_symmetry(args, spec, states, models, dataset)
    if args.multi is None:
        return _run_pair(args, spec, states, models, dataset, device)
    return _run_multi(args, spec, states, models, dataset, device)


def _run_pair(args, spec, states, models, dataset, device) -> int:
    from ..analysis import alignment_tracker
    from ..match import l2_distance
    from ..perm import apply_permutation, save_perms

    sd_a, sd_b = states
    method, opts = get_method(args.method), args.method_options
    res = method.match(
        spec,
        sd_a,
        sd_b,
        model=models[0],
        dataset=dataset,
        options=opts,
        seed=args.seed,
        device=device,
        progress=not args.json,
        alignment=alignment_tracker(spec, sd_a, sd_b),
    )
    draw_ste_drift(getattr(opts, "state_dir", None))
    aligned = apply_permutation(spec, res.perms, sd_b)
    l2_before, l2_after = l2_distance(spec, sd_a, sd_b), l2_distance(spec, sd_a, aligned)
    cov = spec.coverage()
    extra = {
        "method": res.method,
        "seed": args.seed,
        "model_a": _abs(args.models[0]),
        "model_b": _abs(args.models[1]),
        "model_a_sha256": state_fingerprint(sd_a),
        "model_b_sha256": state_fingerprint(sd_b),
        "model": models[0].lmckit_config,
        "objective_before": res.initial_objective,
        "objective_after": res.final_objective,
        "l2_before": l2_before,
        "l2_after": l2_after,
        "sweeps": res.sweeps,
    }
    extra.update(method.run_record(res, opts))
    extra["dataset"] = None if dataset is None else dataset.name
    out = save_perms(args.out, res.perms, **extra)
    summary = {
        "method": res.method,
        "objective": res.final_objective,
        "objective_before": res.initial_objective,
        "objective_history": res.objective,
        "l2_before": l2_before,
        "l2_after": l2_after,
        "l2_reduction": (1 - l2_after / l2_before) if l2_before > 0 else 0.0,
        "sweeps": res.sweeps,
        "converged": res.converged,
        "seconds": res.seconds,
        "coverage": cov,
        "out": str(out),
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"model:       {describe_model(models[0].lmckit_config)}")
    print(
        f"spec:        {cov['groups']} groups, {cov['units']} units; "
        f"permutes {cov['entries_permuted']}/{cov['entries']} entries, "
        f"{cov['elements_permuted']}/{cov['elements']} elements"
    )
    print(f"method:      {res.method} matching (seed {args.seed})")
    print(f"objective:   {res.initial_objective:.6g} -> {res.final_objective:.6g}  ({method.objective})")
    print(f"L2 distance: {l2_before:.6g} -> {l2_after:.6g}  (reduction {100 * summary['l2_reduction']:.2f}%)")
    print(method.iterations_line(res, opts))
    print(f"seconds:     {res.seconds:.3f}")
    print(f"wrote {out}")
    return 0


def _run_pair_symmetry(args, spec, states, models, dataset) -> int:
    """``--symmetry signed|orthogonal``: fold both models' norms, match under the class, write a transform file."""
    from ..match.symmetric import relative_distance, weight_matching_sym
    from ..perm.symmetry import apply_transform, fold_norms, save_transform

    sd_a, sd_b = states
    (fa, folded, skipped), (fb, _, _) = fold_norms(models[0]), fold_norms(models[1])
    fsa, fsb = fa.state_dict(), fb.state_dict()
    if args.method == "weight":
        res = weight_matching_sym(
            spec, fsa, fsb, args.symmetry, model=fa, seed=args.seed, max_iter=args.max_iter or 1000
        )
    else:
        from ..match import activation_matching

        res = activation_matching(
            fa,
            fb,
            dataset,
            spec,
            num_batches=args.num_batches or 10,
            batch_size=args.batch_size or 500,
            seed=args.seed,
            symmetry=args.symmetry,
        )
    aligned = apply_transform(spec, res.sym, res.transform, fsb)
    before, after = relative_distance(spec, fsa, fsb), relative_distance(spec, fsa, aligned)
    classes = {g: s.cls for g, s in res.sym.items()}
    out = save_transform(
        args.out,
        res.transform,
        res.sym,
        symmetry=args.symmetry,
        method=res.method,
        seed=args.seed,
        folded=folded,
        model_a=_abs(args.models[0]),
        model_b=_abs(args.models[1]),
        model_a_sha256=state_fingerprint(sd_a),
        model_b_sha256=state_fingerprint(sd_b),
        model=models[0].lmckit_config,
        relative_l2_before=before,
        relative_l2_after=after,
        sweeps=res.sweeps,
        converged=res.converged,
    )
    summary = {
        "method": res.method,
        "symmetry": args.symmetry,
        "classes": classes,
        "limits": {g: s.limit for g, s in res.sym.items() if s.limit},
        "folded": folded,
        "not_folded": skipped,
        "objective_before": float(res.objective[0]),
        "objective": float(res.objective[-1]),
        "relative_l2_before": before,
        "relative_l2_after": after,
        "l2_reduction": (1 - after / before) if before > 0 else 0.0,
        "sweeps": res.sweeps,
        "converged": res.converged,
        "seconds": res.seconds,
        "out": str(out),
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"model:       {describe_model(models[0].lmckit_config)}")
    if folded:
        print(f"folded:      {len(folded)} norms' gain/bias into the next Linear (the path is between folded models)")
    for g, s in res.sym.items():
        print(f"  {g}: {s.cls}" + (f" (limited by {s.limit})" if s.limit else ""))
    print(res.summary())
    print(f"L2 / ||A||:  {before:.6g} -> {after:.6g}  (reduction {100 * summary['l2_reduction']:.2f}%)")
    print(f"wrote {out}")
    return 0


def _run_multi(args, spec, states, models, dataset, device) -> int:
    from ..match import l2_distance
    from ..merge import align_models
    from ..perm import apply_permutation, save_perms
    from ..store import atomic_write_json

    res = align_models(
        models[0],
        states,
        args.method,
        args.multi,
        dataset,
        spec,
        seed=args.seed,
        device=device,
        options=args.method_options,
        progress=not args.json,
        passes=args.max_iter or 100,
    )
    draw_ste_drift(getattr(args.method_options, "state_dir", None))
    out = Path(args.out)
    rows = []
    ref_hash = state_fingerprint(states[0])
    with staged_outputs(out) as tmp:  # all files appear together, or none
        for i, (path, sd, perms) in enumerate(zip(args.models, states, res.perms)):
            aligned = apply_permutation(spec, perms, sd)
            before, after = l2_distance(spec, states[0], sd), l2_distance(spec, states[0], aligned)
            save_perms(
                tmp / f"perm_{i}.json",
                perms,
                method=res.method,
                seed=args.seed,
                model=_abs(path),
                reference=_abs(args.models[0]),
                index=i,
                l2_to_reference_before=before,
                l2_to_reference_after=after,
                model_sha256=state_fingerprint(sd),
                reference_sha256=ref_hash,
            )
            rows.append(
                {
                    "index": i,
                    "model": str(path),
                    "perm_file": str(out / f"perm_{i}.json"),
                    "l2_to_reference_before": before,
                    "l2_to_reference_after": after,
                }
            )
        summary = {
            "method": res.method,
            "models": rows,
            "objective": res.objective,
            "passes": res.passes,
            "converged": res.converged,
            "seconds": res.seconds,
            "seed": args.seed,
            "coverage": spec.coverage(),
            "model": models[0].lmckit_config,
        }
        atomic_write_json(tmp / "summary.json", summary)
    if args.json:
        print_json(summary)
        return 0
    print(f"model:   {describe_model(models[0].lmckit_config)}; {len(states)} checkpoints, reference {args.models[0]}")
    print(
        f"method:  {res.method} (seed {args.seed}); {res.passes} passes, {res.seconds:.3f}s"
        + ("" if res.converged else " (max-iter reached, not converged)")
    )
    print(f"objective: {res.objective[0]:.6g} -> {res.objective[-1]:.6g}")
    for r in rows:
        print(
            f"  [{r['index']}] {r['model']}: L2 to reference "
            f"{r['l2_to_reference_before']:.6g} -> {r['l2_to_reference_after']:.6g}"
        )
    print(f"wrote {len(rows)} perm files and summary.json to {out}")
    return 0
