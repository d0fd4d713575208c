"""``lmckit barrier A B [--perm PERM.json]``: loss/accuracy along the linear path."""

from __future__ import annotations

import argparse

from .common import (
    MAX_BATCH,
    MAX_POINTS,
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
    refuse_outputs_in_inputs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "barrier",
        help="loss and accuracy barriers along the linear path between two models",
        description="Evaluate (1 - lambda) A + lambda pi(B) on a lambda grid and report loss/accuracy "
        "barriers. pi is the permutation in --perm (identity without it).",
    )
    p.add_argument(
        "a", metavar="A", type=path_arg, help="model A: a run folder or a .safetensors file written by lmckit"
    )
    p.add_argument(
        "b", metavar="B", type=path_arg, help="model B: a run folder or a .safetensors file (same architecture)"
    )
    p.add_argument(
        "--perm",
        default=None,
        help="permutation JSON (lmckit match) applied to B before interpolating (default: identity), or a "
        "transform file (*.safetensors, lmckit match --symmetry): then both models' norms are folded and the "
        "path runs between folded A and the transformed folded B",
    )
    p.add_argument(
        "--points",
        type=int_in(2, MAX_POINTS),
        default=25,
        help=f"lambdas on [0, 1], ends included; 0.5 is always added (default 25, at most {MAX_POINTS})",
    )
    p.add_argument(
        "--split", choices=("test", "train", "both"), default="test", help="data split(s) to evaluate (default test)"
    )
    p.add_argument(
        "--bn-reset",
        choices=("auto", "on", "off", "repair"),
        default="auto",
        help="recompute BatchNorm statistics at interior points (auto: when the model has BN), or REPAIR",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="write a figure of loss and accuracy against lambda (default: none)",
    )
    p.add_argument(
        "--compare-naive", action="store_true", help="also evaluate the unpermuted path A -> B (needs --perm)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate on the first N items of each split only (default: all)"
    )
    p.add_argument("--eval-limit", type=int, dest="limit", action=DeprecatedAlias, new="--limit")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=2000, help="evaluation batch size (default 2000)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the one recorded with model A)")
    add_force_perm(p)
    add_data(p)
    add_json(p)
    add_quiet(p)
    add_device(p)
    add_arch(p)
    add_hf(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..errors import LmcError
    from ..lmc import barrier_curve
    from ..perm import apply_permutation

    if args.compare_naive and not args.perm:
        raise LmcError(
            "--compare-naive needs --perm (without a permutation the path is already the naive one)",
            "pass --perm PERM.json from lmckit match, or drop --compare-naive",
        )
    if args.limit is not None and args.limit < 1:
        raise LmcError(f"--limit must be positive (got {args.limit})")
    if args.plot:
        refuse_outputs_in_inputs(
            [("--plot", args.plot)], [("model A", args.a), ("model B", args.b), ("--perm", args.perm)]
        )
        check_output_path("--plot", args.plot)
    device = resolve_device(args.device)
    # configs may differ in spelled-out defaults: load_checkpoints compares them with defaults filled in
    (sd_a, sd_b), (info_a, _), model, spec = load_checkpoints(
        [args.a, args.b],
        labels=["model A", "model B"],
        hint="interpolate two models of the same architecture and width",
        arch=args.arch,
        hf=args.hf,
    )
    transformed = is_transform_file(args.perm)
    perms = (
        load_perm_file(args.perm, spec, ("model B", sd_b), ("model A", sd_a), args.force_perm)
        if args.perm and not transformed
        else None
    )
    if transformed:  # a transform file (lmckit match --symmetry): the path runs between the folded models
        sd_fa, _, sd_ft, _head = load_transform_file(
            args.perm, spec, model, ("model B", sd_b), ("model A", sd_a), args.force_perm
        )
    dataset = load_named_dataset(args.dataset, info_a, args.data_dir)
    name = dataset.name
    lm = hasattr(dataset, "context")  # a token dataset: losses are per token (docs/definitions.md, LM rows)
    mask_id = getattr(model, "lmckit_mask_token_id", None)  # set by lmckit.hf.adapt for a masked LM (--hf)
    masked = lm and mask_id is not None
    if masked:  # a masked LM: loss on a fixed seeded 15% of each window's tokens, per masked token
        from ..evaluate import MaskedLMDataset

        dataset = MaskedLMDataset(dataset, mask_id, seed=0)
    splits = ["train", "test"] if args.split == "both" else [args.split]

    curves = {}
    common = dict(
        splits=splits,
        points=args.points,
        bn_reset=args.bn_reset,
        batch_size=args.batch_size,
        limit=args.limit,
        device=device,
    )
    names = (f"model A ({args.a})", f"model B ({args.b})")
    if args.compare_naive:
        curves["naive"] = barrier_curve(model, sd_a, sd_b, dataset, progress="barrier (naive)", names=names, **common)
    sd_bp = sd_b
    if args.perm and not transformed:
        sd_bp = apply_permutation(spec, perms, sd_b)
    label = "transformed (folded)" if transformed else "permuted" if args.perm else "naive"
    if args.perm:
        names = (names[0], f"model B ({args.b}) {'transformed' if transformed else 'permuted'} by {args.perm}")
    if transformed:
        curves[label] = barrier_curve(
            model, sd_fa, sd_ft, dataset, progress=f"barrier ({label})", names=names, **common
        )
    else:
        curves[label] = barrier_curve(model, sd_a, sd_bp, dataset, progress=f"barrier ({label})", names=names, **common)
    main = curves[label]

    out = main.to_dict(collapse=len(splits) == 1)
    out.update({"a": str(args.a), "b": str(args.b), "perm": args.perm, "dataset": name})
    if transformed:  # as analyze and landscape say it: the path runs between the folded models
        out.update(symmetry=_head.get("symmetry"), parameterisation="folded")
    if args.compare_naive:
        out["naive"] = curves["naive"].to_dict(collapse=len(splits) == 1)
        if transformed:
            out["naive"]["parameterisation"] = "raw"
    if lm:
        for d in [out] + ([out["naive"]] if args.compare_naive else []):
            _add_lm_units(d, masked)
        if masked:
            out["loss_kind"] = "masked-LM loss (nats per masked token)"
            out["masking"] = dataset.masking
    if args.plot:
        from ..lmc.plot import plot_curves

        plot_curves(curves, args.plot, split="all" if len(splits) > 1 else splits[0])
        out["plot"] = str(args.plot)
    if args.json:
        print_json(out)
        return 0
    rows = []
    for lab, res in curves.items():
        for s in splits:
            c = res.curves[s]
            rows.append(
                {
                    "path": lab,
                    "split": s,
                    "loss_barrier": c.loss_barrier,
                    "acc_barrier": c.accuracy_barrier,
                    "mid_loss": c.midpoint_loss,
                    "mid_acc": c.midpoint_accuracy,
                    "loss_A": c.endpoint_loss[0],
                    "loss_B": c.endpoint_loss[1],
                    "acc_A": c.endpoint_accuracy[0],
                    "acc_B": c.endpoint_accuracy[1],
                }
            )
    print(f"dataset {name}, {len(main.lambdas)} lambdas, BN reset: {main.bn_reset}")
    if lm:
        import math

        for r in rows:
            r["mid_ppl"] = math.exp(r["mid_loss"])
            r["ppl_A"], r["ppl_B"] = math.exp(r["loss_A"]), math.exp(r["loss_B"])
        if masked:
            m = dataset.masking
            print(
                f"masked language model: masked-LM loss (nats per masked token) on {m['rate']:.0%} of each window's "
                f"tokens set to [MASK] (id {m['mask_token_id']}, seed {m['seed']}), ppl = exp(loss), "
                "acc = masked-token accuracy"
            )
        else:
            print("language model: losses in nats per token, ppl = exp(loss) (perplexity), acc = next-token accuracy")
    print_table(rows)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _add_lm_units(d: dict, masked: bool = False) -> None:
    """Perplexities beside the per-token (``masked``: per masked token) losses of a curve's JSON (every split)."""
    import math

    if "loss" in d and isinstance(d["loss"], list):
        d["loss_unit"] = "nats/masked token" if masked else "nats/token"
        d["perplexity"] = [math.exp(x) for x in d["loss"]]
        d["midpoint_perplexity"] = math.exp(d["midpoint_loss"])
        d["endpoint_perplexity"] = [math.exp(x) for x in d["endpoint_loss"]]
        # exp(loss barrier): the factor by which the worst point's perplexity exceeds the endpoints' interpolation
        d["perplexity_barrier_factor"] = math.exp(d["loss_barrier"])
    for v in d.values():
        if isinstance(v, dict):
            _add_lm_units(v, masked)
