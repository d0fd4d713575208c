"""``lmckit match``: permutations that align model B (or several models) to model A."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..match.registry import get_method, list_methods
from .common import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_ITER,
    MAX_RESTARTS,
    MAX_SEED,
    add_arch,
    add_data,
    add_device,
    add_json,
    add_quiet,
    check_output_path,
    describe_model,
    int_in,
    load_checkpoints,
    load_named_dataset,
    print_json,
    refuse_outputs_in_inputs,
    staged_outputs,
    state_fingerprint,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "match",
        help="find permutations aligning model B (or B, C, ...) to model A",
        description="Weight matching (WM) or activation matching (AM) between two checkpoints; with --multi, "
        "three or more checkpoints matched to an anchor or by MergeMany. A perm file applies to the "
        "second model: apply_permutation(spec, perms, B) is aligned to A.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="run folders or .safetensors checkpoints: A B [C ...]")
    p.add_argument(
        "--method",
        choices=list_methods(),
        default="weight",
        help="weight (default), activation matching, ste (straight-through estimator), or any method "
        "of `lmckit methods` (e.g. sinkhorn)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of a registry method other than weight/activation/ste (see `lmckit methods NAME`), "
        "e.g. --option steps=200; repeatable (default: the method's own)",
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
    p.add_argument(
        "--restarts",
        type=int_in(1, MAX_RESTARTS),
        default=1,
        help=f"WM: independent descents, best kept (default 1, at most {MAX_RESTARTS})",
    )
    p.add_argument(
        "--max-iter",
        type=int_in(1, MAX_ITER),
        default=100,
        help=f"WM: maximum sweeps (MergeMany: passes) (default 100, at most {MAX_ITER})",
    )
    p.add_argument(
        "--similarity",
        choices=["pearson", "cross_moment"],
        default="pearson",
        help="AM: unit similarity (default pearson)",
    )
    p.add_argument(
        "--num-batches",
        type=int_in(1, 100_000),
        default=10,
        help="AM: training batches used (default 10, at most 100000)",
    )
    p.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH),
        default=500,
        help=f"AM: batch size (default 500, at most {MAX_BATCH})",
    )
    p.add_argument("--dataset", default=None, help="AM/STE: dataset name (default: the one recorded in checkpoint A)")
    p.add_argument(
        "--ste-preset",
        choices=["adam", "git-re-basin"],
        default=None,
        help="STE: optimiser preset (adam: Adam 1e-3, batch 256, 10 epochs; git-re-basin: SGD 1e-2 m0.9, "
        "batch 1000; default: the protocol's)",
    )
    p.add_argument(
        "--ste-protocol",
        choices=["heldout-best", "git-re-basin", "random-mixing"],
        default="heldout-best",
        help="STE: which permutation is kept (heldout-best: best on a held-out set with identity and WM as "
        "candidates; git-re-basin: lowest minibatch midpoint loss, SGD preset; random-mixing: loss at "
        "lambda ~ U(0,1), the final permutation) (default heldout-best)",
    )
    p.add_argument(
        "--epochs", type=int_in(1, MAX_EPOCHS), default=None, help="STE: epochs, at least 1 (default: the preset's)"
    )
    p.add_argument(
        "--ste-state",
        default=None,
        help="STE: folder for the resumable state and drift.json/png (default: none, not resumable)",
    )
    add_data(p)
    p.add_argument("--out", required=True, help="perm JSON file to write (with --multi: a folder)")
    add_device(p)
    add_arch(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def _abs(path: str) -> str:
    return str(Path(path).resolve())


def _check_numbers(args: argparse.Namespace) -> None:
    from ..errors import LmcError

    for name in ("restarts", "max_iter", "num_batches", "batch_size"):
        if getattr(args, name) < 1:
            raise LmcError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import build_model
    from ..device import resolve_device
    from ..errors import LmcError

    _check_numbers(args)
    if len(args.models) < 2:
        raise LmcError("lmckit match needs at least two checkpoints", "lmckit match A B --out perm.json")
    if len(args.models) > 2 and args.multi is None:
        raise LmcError(
            f"{len(args.models)} checkpoints given without --multi",
            "add --multi anchor (match all to the first) or --multi mergemany, with --out FOLDER",
        )
    method, args.method_options = get_method(args.method), _method_options(args)
    if args.multi is not None and not method.supports(args.multi):
        raise LmcError(
            f"--multi {args.multi} is not defined for {args.method} matching "
            f"(it supports: {', '.join(method.multi) or 'two models only'})",
            "use --method weight, or --multi anchor",
        )
    if args.epochs is not None and args.method != "ste":
        raise LmcError(f"--epochs applies to --method ste only (got --method {args.method})", "drop --epochs")
    if args.ste_state is not None and args.method != "ste":
        raise LmcError(f"--ste-state applies to --method ste only (got --method {args.method})", "drop --ste-state")
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
    check_output_path("--out", out, folder=bool(args.multi))
    check_output_path("--ste-state", args.ste_state, folder=True)
    device = resolve_device(args.device)
    states, infos, model, spec = load_checkpoints(
        args.models, hint="match checkpoints of the same architecture and width", arch=args.arch
    )
    models = [model] + [
        build_model(model.lmckit_config, sd, str(path)) for path, sd in zip(args.models[1:], states[1:])
    ]
    dataset = None
    if method.requires_data(args.method_options):
        dataset = load_named_dataset(args.dataset, infos[0], args.data_dir)
    if args.multi is None:
        return _run_pair(args, spec, states, models, dataset, device)
    return _run_multi(args, spec, states, models, dataset, device)


_FLAG_METHODS = ("weight", "activation", "ste")  # set by their own flags above; others by --option


def _method_options(args: argparse.Namespace):
    """The registry options of ``--method`` from ``--option KEY=VALUE`` (None for the flag-driven methods)."""
    from ..errors import LmcError

    if args.method in _FLAG_METHODS:
        if args.option:
            raise LmcError(
                f"--option is for registry methods other than {', '.join(_FLAG_METHODS)}",
                f"set {args.method} matching with its own flags (lmckit match --help)",
            )
        return None
    pairs = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmcError(
                f"--option {item!r} is not KEY=VALUE", f"e.g. --option steps=200; see lmckit methods {args.method}"
            )
        pairs[key.strip().replace("-", "_")] = value.strip()
    return get_method(args.method).options(pairs)


def _match_pair(args, spec, sd_a, sd_b, model_a, model_b, dataset, device):
    if args.method not in _FLAG_METHODS:
        return get_method(args.method).match(
            spec,
            sd_a,
            sd_b,
            model=model_a,
            dataset=dataset,
            options=args.method_options,
            seed=args.seed,
            device=device,
            progress=not args.json,
        )
    if args.method == "weight":
        from ..match import weight_matching

        return weight_matching(
            spec,
            sd_a,
            sd_b,
            seed=args.seed,
            max_iter=args.max_iter,
            restarts=args.restarts,
            device=device,
            progress=not args.json,
        )
    if args.method == "ste":
        from ..match.ste import ste_matching

        return ste_matching(
            model_a,
            sd_a,
            sd_b,
            dataset,
            spec=spec,
            preset=args.ste_preset,
            epochs=args.epochs,
            seed=args.seed,
            device=device,
            state_dir=args.ste_state,
            progress=not args.json,
            protocol=args.ste_protocol,
        )
    from ..match import activation_matching

    return activation_matching(
        model_a,
        model_b,
        dataset,
        spec=spec,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        method=args.similarity,
        seed=args.seed,
        device=device,
    )


def _run_pair(args, spec, states, models, dataset, device) -> int:
    from ..match import l2_distance
    from ..perm import apply_permutation, save_perms

    sd_a, sd_b = states
    res = _match_pair(args, spec, sd_a, sd_b, models[0], models[1], dataset, device)
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
    if res.method == "weight":
        extra.update(restarts=args.restarts, max_iter=args.max_iter)
    elif res.method == "ste":
        extra.update(
            dataset=dataset.name,
            ste_preset=res.extra["preset"],
            ste_protocol=res.extra["protocol"],
            ste_settings=res.extra["settings"],
            heldout_loss=res.extra["best_heldout_loss"],
            changed_vs_wm=res.extra["changed_vs_wm"],
        )
    elif res.method == "activation":
        extra.update(
            similarity=args.similarity,
            dataset=dataset.name,
            num_batches=res.extra["batches"],
            batch_size=args.batch_size,
        )
    else:
        extra.update(options=args.method_options.to_dict(), dataset=None if dataset is None else dataset.name)
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
        f"spec:        {cov['groups']} groups, {cov['units']} units; permutes {cov['entries_permuted']}/{cov['entries']} "
        f"entries, {cov['elements_permuted']}/{cov['elements']} elements"
    )
    what = (
        "sum <A, pi(B)>"
        if res.method == "weight"
        else {
            "heldout-best": "held-out midpoint loss, best so far",
            "git-re-basin": "lowest minibatch midpoint loss seen",
            "random-mixing": "held-out midpoint loss of the final permutation",
        }[args.ste_protocol]
        if res.method == "ste"
        else f"summed {args.similarity} similarity"
        if res.method == "activation"
        else get_method(res.method).objective
    )
    print(f"method:      {res.method} matching (seed {args.seed})")
    print(f"objective:   {res.initial_objective:.6g} -> {res.final_objective:.6g}  ({what})")
    print(f"L2 distance: {l2_before:.6g} -> {l2_after:.6g}  (reduction {100 * summary['l2_reduction']:.2f}%)")
    print(_iterations_line(args, res))
    print(f"seconds:     {res.seconds:.3f}")
    print(f"wrote {out}")
    return 0


def _iterations_line(args, res) -> str:
    """What the method iterated, in its own terms (weight matching's sweeps mean nothing for AM)."""
    if res.method == "weight":
        runs = f" (best of {args.restarts} restarts)" if args.restarts > 1 else ""
        return f"sweeps:      {res.sweeps}{runs}" + (
            " (converged)" if res.converged else f" (max-iter {args.max_iter} reached, not converged)"
        )
    if res.method == "activation":
        return (
            f"assignment:  one linear assignment per group on {res.extra.get('batches', args.num_batches)} "
            f"batches of {args.batch_size} training images (not iterative)"
        )
    if res.method == "ste":
        return f"epochs:      {res.sweeps} (protocol {args.ste_protocol})"
    return f"steps:       {res.sweeps}" + ("" if res.converged else " (not converged)")


def _run_multi(args, spec, states, models, dataset, device) -> int:
    from ..match import anchor_matching, l2_distance, merge_many
    from ..perm import apply_permutation, save_perms
    from ..store import atomic_write_json

    if args.multi == "anchor":
        matcher = None
        if args.method == "ste":
            from ..match.ste import ste_matching

            def matcher(i, sd_ref, sd_i):
                state = None if args.ste_state is None else Path(args.ste_state) / f"model_{i}"
                return ste_matching(
                    models[0],
                    sd_ref,
                    sd_i,
                    dataset,
                    spec=spec,
                    preset=args.ste_preset,
                    epochs=args.epochs,
                    seed=args.seed,
                    device=device,
                    state_dir=state,
                    progress=not args.json,
                    protocol=args.ste_protocol,
                )

        if args.method == "activation":
            from ..match import activation_matching

            def matcher(i, _sd_ref, _sd_i):
                return activation_matching(
                    models[0],
                    models[i],
                    dataset,
                    spec=spec,
                    num_batches=args.num_batches,
                    batch_size=args.batch_size,
                    method=args.similarity,
                    seed=args.seed,
                    device=device,
                )

        if args.method not in _FLAG_METHODS:

            def matcher(i, sd_ref, sd_i):
                return get_method(args.method).match(
                    spec,
                    sd_ref,
                    sd_i,
                    model=models[0],
                    dataset=dataset,
                    options=args.method_options,
                    seed=args.seed,
                    device=device,
                    progress=not args.json,
                )

        res = anchor_matching(
            spec,
            states,
            anchor=0,
            method=args.method,
            matcher=matcher,
            seed=args.seed,
            max_iter=args.max_iter,
            restarts=args.restarts,
            device=device,
        )
    else:
        res = merge_many(spec, states, seed=args.seed, max_iter=args.max_iter, device=device)
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
            f"  [{r['index']}] {r['model']}: L2 to reference {r['l2_to_reference_before']:.6g} -> {r['l2_to_reference_after']:.6g}"
        )
    print(f"wrote {len(rows)} perm files and summary.json to {out}")
    return 0
