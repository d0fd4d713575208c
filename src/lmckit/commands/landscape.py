"""``lmckit landscape``: loss and accuracy on the plane through three (aligned) models."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    MAX_GRID,
    MAX_SEED,
    DeprecatedAlias,
    add_data,
    add_device,
    add_force_perm,
    add_hf,
    add_json,
    add_quiet,
    check_output_path,
    describe_model,
    float_in,
    int_in,
    is_transform_file,
    load_checkpoints,
    load_named_dataset,
    load_perm_file,
    load_transform_file,
    path_arg,
    print_json,
    refuse_outputs_in_inputs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "landscape",
        help="loss/accuracy landscape on the plane of three models",
        description="Evaluate loss and accuracy on a grid over the plane through models A, B, C (B and C permuted "
        "by --perm first, e.g. the perm files of `lmckit match --multi anchor` or `lmckit merge`), and "
        "plot it. The loss plot goes to --plot, the accuracy plot next to it (NAME-accuracy.png). With transform "
        "files (`lmckit match --symmetry`) or --symmetry signed/orthogonal, all three models' norms are folded "
        "and the plane runs through folded A and the transformed folded B and C.",
    )
    p.add_argument(
        "models", nargs=3, metavar="MODEL", type=path_arg, help="three run folders or .safetensors checkpoints: A B C"
    )
    p.add_argument(
        "--perm",
        action="append",
        default=None,
        metavar="PERM.json",
        help="permutation file aligning B to A, then (given again) the one aligning C to A: "
        "--perm PB --perm PC (default: no permutation). Either may be a transform file (*.safetensors, "
        "`lmckit match A B --symmetry S` and `lmckit match A C --symmetry S`): then both must be, with one "
        "symmetry (a perm JSON mixed with a transform file is refused: align both with --symmetry), and the "
        "plane runs through the folded models",
    )
    p.add_argument(
        "--symmetry",
        choices=("permutation", "signed", "orthogonal"),
        default=None,
        help="class of maps aligning B and C to A (default: none, as --perm says). signed / orthogonal without "
        "--perm: fold the three models' norms and align B and C to folded A by weight matching under the "
        "class (lmckit match --symmetry S, seed --seed, at most 1000 sweeps, as merge --symmetry) before "
        "drawing the plane. With --perm it must be the symmetry the files record (permutation for perm JSONs), "
        "else refused",
    )
    p.add_argument("--perms", nargs=2, dest="perm", action=DeprecatedAlias, new="--perm PB --perm PC", extend=True)
    p.add_argument(
        "--grid",
        type=int_in(2, MAX_GRID),
        default=11,
        help=f"grid points per axis (default 11, at most {MAX_GRID}: grid x grid evaluations)",
    )
    p.add_argument(
        "--margin",
        type=float_in(0.0, 10.0),
        default=0.2,
        help="how far the grid reaches beyond the three models (default 0.2, at most 10)",
    )
    p.add_argument("--split", default="test", help="split to evaluate on (default test)")
    p.add_argument(
        "--bn-reset",
        choices=["auto", "on", "off", "repair"],
        default="auto",
        help="BatchNorm statistics at grid points (default auto: reset when the model has BN)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate on the first N items of the split only (default: all)"
    )
    p.add_argument("--eval-limit", type=int, dest="limit", action=DeprecatedAlias, new="--limit")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the BN-reset batches (default 0)")
    p.add_argument(
        "--plot",
        required=True,
        metavar="FILE.png",
        help="PNG file for the loss landscape; the accuracy landscape goes next to it (FILE-accuracy.png)",
    )
    p.add_argument("--dataset", default=None, help="dataset name (default: the one recorded in model A)")
    add_force_perm(p)
    add_hf(p)
    add_data(p)
    add_device(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..errors import LmcError
    from ..lmc import check_model_fits
    from ..lmc.landscape import plane_landscape
    from ..lmc.plot import plot_landscape
    from ..perm import apply_permutation
    from ..store import real_path

    if args.limit is not None and args.limit < 1:
        raise LmcError(f"--limit must be at least 1, got {args.limit}")
    if args.perm is not None and len(args.perm) != 2:
        raise LmcError(
            f"--perm given {len(args.perm)} time(s); the plane needs two permutation files, for B and for C",
            "pass --perm PB --perm PC (e.g. merged/perm_1.json and merged/perm_2.json from `lmckit merge`), or none",
        )
    args.perms = args.perm
    plot = Path(args.plot)
    if plot.suffix.lower() != ".png":
        raise LmcError(f"--plot {plot} must be a .png file")
    acc_path = plot.with_name(plot.stem + "-accuracy.png")
    inputs = [(f"model {'ABC'[i]}", m) for i, m in enumerate(args.models)]
    inputs += [(f"--perm {p}", p) for p in (args.perms or [])]
    refuse_outputs_in_inputs([("--plot", plot), ("--plot", acc_path)], inputs)
    check_output_path("--plot", plot)
    check_output_path("--plot", acc_path)
    device = resolve_device(args.device)
    states, infos, model, spec = load_checkpoints(args.models, hf=args.hf)
    sd_a, sd_b, sd_c = states
    perm_b = perm_c = None
    folded = _folded_plane(args, spec, model, states)  # None: the raw parameterisation (perm JSONs or none)
    if folded is not None:
        sd_a, sd_b, sd_c = folded["states"]
    elif args.perms:
        perm_b = load_perm_file(args.perms[0], spec, ("model B", sd_b), ("model A", sd_a), args.force_perm)
        perm_c = load_perm_file(args.perms[1], spec, ("model C", sd_c), ("model A", sd_a), args.force_perm)
    dataset = load_named_dataset(args.dataset, infos[0], args.data_dir)
    check_model_fits(model, dataset, "train", where=args.models[0])
    if args.perms and folded is None:
        sd_b = apply_permutation(spec, perm_b, sd_b)
        sd_c = apply_permutation(spec, perm_c, sd_c)
    res = plane_landscape(
        model,
        sd_a,
        sd_b,
        sd_c,
        dataset,
        grid=args.grid,
        margin=args.margin,
        split=args.split,
        bn_reset=args.bn_reset,
        limit=args.limit,
        device=device,
        seed=args.seed,
        progress=False if args.json else "landscape",
    )
    aligned = "aligned" if args.perms else "unaligned"
    if folded is not None:
        aligned = f"{folded['symmetry']}-aligned folded"
    loss_plot = plot_landscape(res, plot, "loss", title=f"{args.split} loss on the plane of three {aligned} models")
    acc_plot = plot_landscape(
        res, acc_path, "accuracy", title=f"{args.split} accuracy on the plane of three {aligned} models"
    )
    d = res.to_dict()
    summary = {
        **d,
        "models_files": [str(real_path(p, "model")) for p in args.models],
        "perm_files": [str(real_path(p, "--perm")) for p in args.perms] if args.perms else None,
        "loss_plot": str(loss_plot),
        "accuracy_plot": str(acc_plot),
        "model": model.lmckit_config,
    }
    if folded is not None:
        summary.update({k: v for k, v in folded.items() if k != "states"})
    if args.json:
        print_json(summary)
        return 0
    flat_l = [v for row in res.loss for v in row]
    flat_a = [v for row in res.accuracy for v in row]
    print(f"model:  {describe_model(model.lmckit_config)}; {aligned}; {args.grid}x{args.grid} grid on {args.split}")
    if folded is not None:
        how = "transform files" if folded["alignment"] == "files" else "weight matching"
        print(
            f"parameterisation: folded ({len(folded['folded'])} norms folded into the next Linear); "
            f"B and C aligned to A under {folded['symmetry']} by {how}"
        )
    print(f"loss:     min {min(flat_l):.4f}, max {max(flat_l):.4f}")
    print(f"accuracy: min {min(flat_a):.4f}, max {max(flat_a):.4f}")
    print(f"wrote {loss_plot} and {acc_plot}")
    return 0


def _folded_plane(args: argparse.Namespace, spec, model, states) -> dict | None:
    """The folded plane's states and what to report, or ``None`` for the raw one (perm JSONs or no alignment).

    Transform files for B and C (both, one symmetry, hashes checked as by ``barrier``), or with
    ``--symmetry signed|orthogonal`` and no ``--perm``: weight matching of folded B and C to folded A. Refuses
    a perm JSON mixed with a transform file, and ``--symmetry`` other than the files' own.
    """
    from ..errors import LmcError

    sd_a, sd_b, sd_c = states
    perms = args.perms or []
    kinds = [is_transform_file(p) for p in perms]
    if any(kinds) and not all(kinds):
        raise LmcError(
            f"--perm mixes a permutation JSON with a transform file ({', '.join(perms)}); the plane needs one "
            "parameterisation (transform files run through the folded models)",
            "align both with `lmckit match A B --symmetry S --out PB.safetensors` and `lmckit match A C "
            "--symmetry S --out PC.safetensors` (a transform keeps permutation groups where the model admits "
            "no more), or pass two perm JSONs",
        )
    if perms and not any(kinds):
        if args.symmetry not in (None, "permutation"):
            raise LmcError(
                f"--symmetry {args.symmetry} does not match the --perm files: permutation JSONs align under "
                "permutation",
                f"pass transform files from `lmckit match --symmetry {args.symmetry}`, or drop --symmetry",
            )
        return None
    if not perms:
        if args.symmetry is None:
            return None
        if args.symmetry == "permutation":
            raise LmcError(
                "--symmetry permutation without --perm computes nothing",
                "pass --perm PB --perm PC from `lmckit match` / `lmckit merge`, or --symmetry signed|orthogonal",
            )
        return _match_folded(args, spec, model, states)
    fa, _, tb, head_b = load_transform_file(
        perms[0], spec, model, ("model B", sd_b), ("model A", sd_a), args.force_perm
    )
    _, _, tc, head_c = load_transform_file(perms[1], spec, model, ("model C", sd_c), ("model A", sd_a), args.force_perm)
    sym_b, sym_c = head_b.get("symmetry"), head_c.get("symmetry")
    if sym_b != sym_c:
        raise LmcError(
            f"the transform files align under different symmetries: {perms[0]} {sym_b}, {perms[1]} {sym_c}",
            "compute both with the same `lmckit match --symmetry`",
        )
    if args.symmetry is not None and args.symmetry != sym_b:
        raise LmcError(
            f"--symmetry {args.symmetry} does not match the transform files, which align under {sym_b}",
            f"pass --symmetry {sym_b}, drop --symmetry, or recompute the files with --symmetry {args.symmetry}",
        )
    return {
        "states": (fa, tb, tc),
        "parameterisation": "folded",
        "symmetry": sym_b,
        "alignment": "files",
        "folded": head_b.get("folded") or [],
        "classes": {g: rec["class"] for g, rec in head_b["groups"].items()},
    }


def _match_folded(args: argparse.Namespace, spec, model, states) -> dict:
    """``--symmetry S`` without ``--perm``: weight matching of folded B and C to folded A under ``S``."""
    from ..match.symmetric import relative_distance, weight_matching_sym
    from ..perm.symmetry import apply_transform, fold_states

    fa, (fsa, fsb, fsc), folded = fold_states(model, states)
    out, report = [fsa], {}
    for label, fs in (("B", fsb), ("C", fsc)):
        res = weight_matching_sym(spec, fsa, fs, args.symmetry, model=fa, seed=args.seed, max_iter=1000)
        aligned = apply_transform(spec, res.sym, res.transform, fs)
        out.append(aligned)
        report[label] = {
            "relative_l2_before": relative_distance(spec, fsa, fs),
            "relative_l2_after": relative_distance(spec, fsa, aligned),
            "sweeps": res.sweeps,
            "converged": res.converged,
        }
        classes = {g: s.cls for g, s in res.sym.items()}
    return {
        "states": tuple(out),
        "parameterisation": "folded",
        "symmetry": args.symmetry,
        "alignment": "weight matching",
        "folded": folded,
        "classes": classes,
        "matching": report,
    }
