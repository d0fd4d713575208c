"""``lmckit check-spec``: does a random permutation leave the model's function unchanged?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..model_index import FLOAT_LIMITS, SIZE_LIMITS
from .common import (
    MAX_SEED,
    add_arch,
    add_device,
    add_hf,
    add_json,
    add_quiet,
    float_in,
    int_in,
    load_arch,
    path_arg,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-spec",
        help="check a model's permutation spec (coverage, and outputs unchanged under a random permutation)",
        description="Permute a model's hidden units at random with its permutation spec and compare outputs "
        "(train and eval mode) and BatchNorm running statistics with the original. Exit 0 when the "
        "function is preserved, 1 when it changes, 2 when the spec permutes no units (the pinned "
        "ops are named).",
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_CHECKPOINT",
        type=path_arg,
        help="a registered model name (see `lmckit models`), a run folder or a .safetensors checkpoint "
        "(with --arch: a state dict of that model, or - for its initial weights)",
    )
    p.add_argument(
        "--in-channels",
        type=int_in(*SIZE_LIMITS["in_channels"]),
        default=None,
        help=f"input channels (model names only; at most {SIZE_LIMITS['in_channels'][1]}; default: the model's)",
    )
    p.add_argument(
        "--image-size",
        type=int_in(*SIZE_LIMITS["image_size"]),
        default=None,
        help=f"input height = width (model names only; at most {SIZE_LIMITS['image_size'][1]}; default: the model's)",
    )
    p.add_argument(
        "--num-classes",
        type=int_in(*SIZE_LIMITS["num_classes"]),
        default=None,
        help=f"output classes (model names only; at most {SIZE_LIMITS['num_classes'][1]:,}; default: the model's)",
    )
    p.add_argument(
        "--norm",
        default=None,
        choices=("none", "batchnorm", "layernorm"),
        help="norm layers (model names only; default: the model's)",
    )
    p.add_argument(
        "--width-mult",
        type=float_in(0.0, 1024.0, lo_open=True),  # the models' own bound (FLOAT_LIMITS) is checked after parsing
        default=None,
        help=f"width multiplier (model names only; at most {FLOAT_LIMITS['width_mult']:g}; default: the model's)",
    )
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the random permutation and input batch")
    p.add_argument(
        "--batch",
        type=int_in(1, 4096),
        default=8,
        help="size of the random input batch (>= 2 for BatchNorm; at most 4096)",
    )
    p.add_argument(
        "--tol",
        type=float_in(0.0, 1.0, lo_open=True),
        default=1e-5,
        help="tolerance on the relative output difference (in (0, 1])",
    )
    p.add_argument(
        "--traced", action="store_true", help="check the torch.fx-traced spec instead of the model's own rules"
    )
    p.add_argument(
        "--symmetry",
        choices=("permutation", "signed", "orthogonal", "invertible"),
        default="permutation",
        help="class of maps to check (default permutation): signed permutations, orthogonal or invertible maps "
        "where the model's ops admit them (LayerNorm/RMSNorm gains folded first; each group's class and the op "
        "limiting it are listed; exit 1 when no group admits the class)",
    )
    add_device(p)
    add_arch(p)
    add_hf(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=run)


def _load_model(args: argparse.Namespace):
    from ..errors import LmcError
    from ..models import create_model, list_models

    if getattr(args, "hf", False):  # a local Hugging Face folder (traced with torch.export)
        if getattr(args, "arch", None):
            raise LmcError("--arch and --hf both say what the model is", "pass one of them")
        from ..hf import load_hf

        return load_hf(args.model)[0], "hf"
    if getattr(args, "arch", None):  # the user's own architecture; MODEL is then an optional state dict of it
        model = load_arch(args.arch)
        if args.model not in ("-", "") and Path(args.model).exists():
            from ..checkpoint import checkpoint_file
            from ..store import load_state

            model.load_state_dict(dict(load_state(checkpoint_file(args.model))[0]))
            return model, "checkpoint"
        return model, "arch"
    opts = {
        k: getattr(args, a)
        for k, a in (
            ("in_channels", "in_channels"),
            ("image_size", "image_size"),
            ("num_classes", "num_classes"),
            ("norm", "norm"),
            ("width_mult", "width_mult"),
        )
        if getattr(args, a) is not None
    }
    if args.model in list_models():
        from ..limits import MAX_INPUT_ELEMENTS, check_model_size
        from ..models.registry import model_config_with_defaults

        check_model_size(args.model, opts, "check-spec")
        cfg = model_config_with_defaults({"name": args.model, **opts})
        elems = args.batch * int(cfg.get("in_channels", 1) or 1) * int(cfg.get("image_size", 1) or 1) ** 2
        if elems > MAX_INPUT_ELEMENTS:
            raise LmcError(
                f"the random input batch ({args.batch} images of {cfg.get('in_channels')} x "
                f"{cfg.get('image_size')}^2) has {elems:,} values, more than {MAX_INPUT_ELEMENTS:,}",
                "lower --batch, --in-channels or --image-size",
            )
        return create_model(args.model, **opts), "model"
    path = Path(args.model)
    from ..store import check_no_link_loop

    check_no_link_loop("checkpoint", path)
    if path.exists():
        if opts:
            raise LmcError(
                f"options {', '.join('--' + k.replace('_', '-') for k in opts)} apply to model names, "
                f"not to the checkpoint {path}",
                "drop them: a checkpoint records its own architecture",
            )
        from ..checkpoint import build_model, load_checkpoint
        from .common import check_dtypes

        state, info = load_checkpoint(path)
        model = build_model(info["model"], state, str(path))
        check_dtypes(model, state, str(path))
        return model, "checkpoint"
    import difflib

    close = difflib.get_close_matches(args.model, list_models(), n=1)
    raise LmcError(
        f"{args.model!r} is neither a registered model"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + " nor an existing checkpoint",
        "run `lmckit models` for model names, or pass a run folder / .safetensors file",
    )


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..device import resolve_device
    from ..errors import LmcError
    from ..perm.check import check_spec
    from ..perm.trace import SpecWarning, example_input_for

    if args.batch < 1:
        raise LmcError(f"--batch must be at least 1, got {args.batch}")
    device = resolve_device(args.device)
    model, kind = _load_model(args)
    model = model.to(device)
    x = example_input_for(model, batch=args.batch, seed=args.seed).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # reported in the summary instead
        report = check_spec(
            model,
            x,
            seed=args.seed,
            tol=args.tol,
            traced=args.traced,
            symmetry=None if args.symmetry == "permutation" else args.symmetry,
        )
    if args.json:
        print_json({"model": args.model, "kind": kind, **report.to_dict()})
    else:
        print(f"{args.model} ({kind}, {type(model).__name__})")
        print(report.summary())
    return 0 if report.ok else 2 if getattr(report, "vacuous", False) else 1
