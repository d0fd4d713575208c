"""``lmckit train``: train one model into the run store and print its folder.

The run folder is the last line printed (``--json`` prints one JSON object
instead). A finished config returns at once; a killed one resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..model_index import FLOAT_LIMITS, SIZE_LIMITS
from .common import (
    MAX_BATCH,
    MAX_EPOCHS,
    LazyChoices,
    add_data,
    add_device,
    add_json,
    add_quiet,
    path_arg,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (seeded, resumable, cached by config hash)",
        description="Train a model into OUT/train/<config hash>. Settings come from --preset (else the preset "
        "matching --model and --dataset, e.g. mlp + fashion-mnist -> mlp-fmnist, else the defaults), "
        "then the options given. Prints the run folder as the last line.",
    )
    p.add_argument(
        "--preset",
        choices=LazyChoices("presets", "PRESETS"),
        metavar="PRESET",
        default=None,
        help="named training recipe (lmckit.train.PRESETS): %(choices)s "
        "(default: the preset matching --model and --dataset, else none)",
    )
    p.add_argument("--model", default=None, help="registered model (`lmckit models`); default mlp")
    p.add_argument("--dataset", default=None, help="dataset name; default fashion-mnist")
    p.add_argument("--seed", type=int, default=None, help="seeds the initialisation and batch order (default 0)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (1..{MAX_EPOCHS:,})")
    p.add_argument("--batch-size", type=int, default=None, help=f"training batch size (1..{MAX_BATCH:,})")
    p.add_argument(
        "--optimizer",
        choices=LazyChoices("presets", "OPTIMIZERS"),
        metavar="OPTIMIZER",
        default=None,
        help="one of %(choices)s",
    )
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument(
        "--schedule",
        choices=LazyChoices("presets", "SCHEDULES"),
        metavar="SCHEDULE",
        default=None,
        help="one of %(choices)s",
    )
    p.add_argument("--warmup-epochs", type=float, default=None, help="epochs of linear learning-rate warm-up")
    p.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=None, help="random crop (pad 4) and flip"
    )
    p.add_argument("--val-size", type=int, default=None, help="training images held out as a val split")
    p.add_argument("--eval-batch-size", type=int, default=None, help=f"evaluation batch size (1..{MAX_BATCH:,})")
    p.add_argument(
        "--width", type=int, default=None, help=f"hidden width (MLP, ViT, LSTM; 1..{SIZE_LIMITS['width'][1]})"
    )
    p.add_argument(
        "--depth", type=int, default=None, help=f"hidden layers (MLP, ViT, LSTM; 0..{SIZE_LIMITS['depth'][1]})"
    )
    p.add_argument(
        "--width-mult", type=float, default=None, help=f"width multiplier (in (0, {FLOAT_LIMITS['width_mult']:g}])"
    )
    p.add_argument("--norm", choices=("none", "batchnorm", "layernorm"), default=None, help="normalisation layers")
    p.add_argument("--activation", default=None, help="MLP activation (relu, gelu, tanh, silu, leaky_relu)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="bf16: autocast the training passes to bfloat16 (weights and checkpoints stay float32; hashed)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for conv models (default: on with CUDA, off on CPU; not hashed)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow TF32 matmuls/convolutions on CUDA (default: on; never used on CPU; not hashed)",
    )
    p.add_argument("--out", type=path_arg, default="runs", help="root of the run store (default ./runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for a in p._actions:  # the unset options take the preset's value: say so in --help
        if a.default is None and a.help != argparse.SUPPRESS and "default" not in (a.help or "").lower():
            a.help = f"{a.help or ''} (default: the preset's value)".lstrip()  # a format string, like argparse's
    add_quiet(p)
    add_device(p)
    add_data(p)
    add_json(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`~lmckit.train.TrainConfig` and the preset name the arguments select."""
    from ..train import make_config, preset_for

    preset = args.preset
    if preset is None:
        preset = preset_for(args.model or "mlp", args.dataset or "fashion-mnist")
    overrides = dict(
        model=args.model,
        dataset=args.dataset,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        val_size=args.val_size,
        eval_batch_size=args.eval_batch_size,
        width=args.width,
        depth=args.depth,
        width_mult=args.width_mult,
        norm=args.norm,
        activation=args.activation,
        precision=getattr(args, "precision", None),
    )
    return make_config(preset, **overrides), preset


def run(args: argparse.Namespace) -> int:
    from ..train import train

    config, preset = config_from_args(args)
    from ..train import check_run_store

    check_run_store(Path(args.out), config)  # the whole store before the first line of progress
    if not args.quiet and not args.json:
        print(
            f"training {config.model} on {config.dataset}, seed {config.seed}"
            + (f" (preset {preset})" if preset else ""),
            file=sys.stderr,
        )
    result = train(
        config,
        out_root=args.out,
        device=args.device,
        progress=not args.quiet,
        data_dir=args.data_dir,
        threads=args.threads,
        channels_last=getattr(args, "channels_last", None),
        tf32=getattr(args, "tf32", None),
    )
    if args.json:
        d = result.to_dict()
        d["preset"] = preset
        print_json(d)
        return 0
    state = "cached" if result.cached else f"{result.seconds:.1f}s"
    print(
        f"test accuracy {result.test_accuracy:.4f}  test loss {result.test_loss:.4f}  "
        f"train accuracy {result.train_accuracy:.4f}  ({state})"
    )
    print(result.run_dir)
    return 0
