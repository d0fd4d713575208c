"""WM time per sweep against its floor, MLP beside ViT (and the LSTM).

The floor (:func:`lmckit.match.weight.matching_floor_seconds`) is one sweep's
unavoidable work timed alone: every coordinate's cost-matrix products plus its
assignment solves (for a head structure: the H^2 within-head solves per member
and the head solve). lmckit's time per sweep is ``extra["sweep_seconds"] /
sweeps`` of :func:`~lmckit.match.weight_matching` (set-up excluded), best of
``--repeats`` runs. Target: ratio <= 1.5.

    python benchmarks/bench_wm_floor.py [--mlp A B] [--vit A B] [--lstm A B]

Without run folders a pair is two random initialisations (seeds 0 and 1) of the
zoo model; matching time depends on shapes, the sweep count on the weights.
Writes ``benchmarks/out/bench_wm_floor.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pair(name: str, runs: list[str] | None):
    import torch

    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.models import create_model

    if runs:
        (sd_a, info), (sd_b, _) = load_checkpoint(runs[0]), load_checkpoint(runs[1])
        return build_model(info["model"], sd_a), sd_a, sd_b, "trained"
    torch.manual_seed(0)
    m = create_model(name)
    sd_a = m.state_dict()
    torch.manual_seed(1)
    sd_b = create_model(name).state_dict()
    return m, sd_a, sd_b, "random init"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for n in ("mlp", "vit", "lstm"):
        ap.add_argument(f"--{n}", nargs=2, metavar="RUN", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "out" / "bench_wm_floor.json"))
    args = ap.parse_args()
    import torch

    from lmckit.match import weight_matching
    from lmckit.match.weight import matching_floor_seconds
    from lmckit.perm import spec_for

    torch.set_num_threads(args.threads)
    rows = []
    for name in ("mlp", "vit", "lstm"):
        model, sd_a, sd_b, kind = pair(name, getattr(args, name))
        spec = spec_for(model)
        per_sweep, sweeps = float("inf"), 0
        for r in range(args.repeats):
            res = weight_matching(spec, sd_a, sd_b, seed=r)
            per_sweep = min(per_sweep, res.extra["sweep_seconds"] / res.sweeps)
            sweeps = res.sweeps
        floor = matching_floor_seconds(spec, sd_a, sd_b, repeats=args.repeats)
        rows.append(
            {
                "model": name,
                "weights": kind,
                "groups": len(spec.sizes),
                "head_structures": len(spec.heads),
                "sweeps": sweeps,
                "per_sweep_s": per_sweep,
                "floor_s": floor,
                "ratio": per_sweep / floor,
            }
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("| model | weights | groups (head structures) | sweeps | WM per sweep | floor | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['weights']} | {r['groups']} ({r['head_structures']}) | {r['sweeps']} "
            f"| {r['per_sweep_s'] * 1e3:.1f} ms | {r['floor_s'] * 1e3:.1f} ms | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
