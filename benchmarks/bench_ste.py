"""Cost of one STE step against one plain training step, same model, batch and run.

Model: 784-512-512-512-10 MLP on Fashion-MNIST; models A and B are trained
here (plain Adam loop, lr 1e-3, batch 500, ``--train-epochs`` epochs, seeds 0
and 1; cached under ``benchmarks/out/``). Then, in this one process:

* **plain step**: forward, backward and Adam step of the MLP at batch
  ``--batch`` (256, the STE preset's), best of several timed blocks;
* **STE step**: :func:`lmckit.match.ste.ste_matching` for one epoch of
  ``--steps`` batches minus the same call with 0 epochs (set-up, the initial
  WM and the candidate scoring), divided by the number of steps; run once
  with each projection:

  - ``reference``: today's ``weight_matching`` call at every step
    (``LMCKIT_STE_PROJECTION=reference``);
  - ``exact``: :class:`lmckit.match.projection.WarmProjector` (the default:
    each assignment warm-started from its previous solution,
    :mod:`lmckit.match.lap_warm`);
  - ``exact-cold``: the same descent with every assignment solved from
    scratch (scipy), as before the warm-started solver;
  - approximations (STE options ``project_sweeps=s``: at most ``s`` sweeps per
    step; ``project_every=k``: project every ``k``-th step), each
    compared with the exact run: units of the returned and of the last
    end-of-epoch permutation assigned differently, and held-out midpoint
    losses, next to the same numbers for the exact run with another seed
    (the seed-to-seed spread).

The exact modes must return the reference permutation at every step
(checked; the script exits 1 otherwise). Prints the ratio STE step / plain
step for each, and the projector's counters (solves, rows freed by warm solves, moves).
``--model vit`` times the zoo ViT (its head-structured spec goes through
``weight_matching`` at every step; trained for one epoch on 10k images).
Times are process CPU times (the plain step and
the STE runs on one thread each), which other processes' load stretches
far less than wall time; still rerun on a quiet machine before quoting them.

    python benchmarks/bench_ste.py                 # MLP, 40 steps, 1 thread
    python benchmarks/bench_ste.py --model vit --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: CPU time of the process (all its threads): on a shared machine other processes' load does not
#: stretch it as it stretches wall time; the ratios below are of CPU times.
CLOCK = time.process_time
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def trained_pair(epochs: int, name: str = "mlp") -> tuple[dict, dict]:
    from safetensors.torch import load_file, save_file

    from lmckit.data import load_dataset
    from lmckit.models import create_model

    sds = []
    limit = None if name == "mlp" else 10000
    for seed in (0, 1):
        path = OUT / (
            f"ste_mlp_e{epochs}_seed{seed}.safetensors" if name == "mlp" else f"ste_{name}_seed{seed}.safetensors"
        )
        if not path.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            ds = load_dataset("fashion-mnist")
            m = create_model(name, in_channels=1, image_size=28)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs if name == "mlp" else 1):
                for x, y in ds.batches("train", 500, shuffle=True, generator=gen, limit=limit):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(m(x), y).backward()
                    opt.step()
            save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
        sds.append(load_file(str(path)))
    return sds[0], sds[1]


def plain_step_seconds(ds, batch: int, blocks: int = 5, per_block: int = 10, name: str = "mlp") -> float:
    from lmckit.models import create_model

    torch.manual_seed(0)
    m = create_model(name, in_channels=1, image_size=28)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = ds.tensors("train", limit=batch)
    m.train()

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    step()
    best = float("inf")
    for _ in range(blocks):
        t0 = CLOCK()
        for _ in range(per_block):
            step()
        best = min(best, (CLOCK() - t0) / per_block)
    return best


def ste_run(model, a, b, ds, steps: int, batch: int, mode: str, record: list, every: int = 1, sweeps=0, seed=0):
    import lmckit.match.ste as ste

    os.environ["LMCKIT_STE_PROJECTION"] = mode
    kw = dict(
        project_every=every,
        project_sweeps=sweeps,
        batch_size=batch,
        progress=False,
        track_alignment=False,
        heldout_size=1000,
        train_limit=steps * batch,
        seed=seed,
    )
    t0 = CLOCK()
    ste.ste_matching(model, a, b, ds, epochs=0, **kw)
    t_setup = CLOCK() - t0
    orig = ste._project

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        record.append((out, kwargs.get("projector", args[7] if len(args) > 7 else None)))
        return out

    ste._project = spy
    try:
        t0 = CLOCK()
        res = ste.ste_matching(model, a, b, ds, epochs=1, **kw)
        t_run = CLOCK() - t0
    finally:
        ste._project = orig
        os.environ.pop("LMCKIT_STE_PROJECTION", None)
    return (t_run - t_setup) / steps, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mlp", "vit"], default="mlp")
    ap.add_argument("--steps", type=int, default=40, help="STE steps timed per projection mode")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-epochs", type=int, default=1, help="training epochs of the MLPs A and B")
    ap.add_argument("--every", type=int, default=2, help="also time the project-every-k approximation (1: skip it)")
    ap.add_argument("--sweeps", type=int, default=1, help="also time the s-sweeps-per-step approximation (0: skip)")
    ap.add_argument("--no-exact-checks", action="store_true", help="skip the exact-cold and other-seed runs")
    ap.add_argument("--json", default=None, help="default benchmarks/out/bench_ste[_vit].json")
    args = ap.parse_args(argv)
    for name, low in (("steps", 1), ("batch", 1), ("threads", 1), ("train_epochs", 1), ("every", 1), ("sweeps", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}")
    torch.set_num_threads(args.threads)

    from lmckit.data import load_dataset
    from lmckit.models import create_model
    from lmckit.perm import perm_changed_units

    a, b = trained_pair(args.train_epochs, args.model)
    ds = load_dataset("fashion-mnist")
    model = create_model(args.model, in_channels=1, image_size=28)
    plain = plain_step_seconds(ds, args.batch, name=args.model)
    from lmckit.match import lap_warm

    if lap_warm.available():  # compile (or load from numba's disk cache) before any clock runs
        lap_warm.solve_warm(np.eye(3))

    # (name, mode, every, sweeps, seed)
    modes = [("reference", "reference", 1, 0, 0)]
    if args.model == "mlp":
        modes.append(("exact", "exact", 1, 0, 0))
        if not args.no_exact_checks:
            modes.append(("exact-cold", "exact-cold", 1, 0, 0))
    base = "exact" if args.model == "mlp" else "reference"
    if args.sweeps > 0:
        modes.append((f"sweeps {args.sweeps}", base, 1, args.sweeps, 0))
    if args.every > 1:
        modes.append((f"every {args.every}", base, args.every, 0, 0))
    if args.every > 1 and args.sweeps > 0:
        modes.append((f"every {args.every}, sweeps {args.sweeps}", base, args.every, args.sweeps, 0))
    if not args.no_exact_checks:
        modes.append((f"{base}, seed 1", base, 1, 0, 1))
    rows, recs, results = {}, {}, {}
    for name, mode, every, sweeps, seed in modes:
        recs[name] = []
        rows[name], results[name] = ste_run(
            model, a, b, ds, args.steps, args.batch, mode, recs[name], every, sweeps, seed
        )

    def same_steps(x, y):
        return len(x) == len(y) and all(all(torch.equal(p[0][g], q[0][g]) for g in p[0]) for p, q in zip(x, y))

    exact_names = [m[0] for m in modes if m[2] == 1 and m[3] == 0 and m[4] == 0]
    same = {name: same_steps(recs["reference"], recs[name]) for name in exact_names}
    title = "MLP 784-512-512-512-10" if args.model == "mlp" else "ViT (zoo vit: width 64, depth 4, 4 heads)"
    print(f"{title}, batch {args.batch}, {args.threads} thread(s), {args.steps} steps")
    print(f"{'':>34} {'ms/step':>9} {'x plain':>8}")
    print(f"{'plain training step':>34} {1e3 * plain:>9.1f} {1.0:>8.2f}")
    for name, sec in rows.items():
        print(f"{'STE step, ' + name:>34} {1e3 * sec:>9.1f} {sec / plain:>8.2f}")
    stats = {}
    for name, rec in recs.items():
        proj = next((p for _, p in reversed(rec) if p is not None), None)
        if proj is not None:
            stats[name] = dict(proj.stats)
            print(f"projector counters, {name}: {stats[name]}")
    print("exact modes give the reference permutation at every step:", same)
    effect = {}
    ex = results[base]
    for name, *_ in modes:
        if name == base or name in same:
            continue
        ap_ = results[name]
        effect[name] = {
            "returned_changed_vs_exact": perm_changed_units(ap_.perms, ex.perms),
            "end_of_epoch_changed_vs_exact": perm_changed_units(recs[name][-1][0], recs[base][-1][0]),
            "heldout_loss_end_of_epoch": ap_.extra["candidates"][-1]["heldout_loss"],
            "returned_heldout_loss": ap_.extra["best_heldout_loss"],
        }
    effect[base] = {
        "heldout_loss_end_of_epoch": ex.extra["candidates"][-1]["heldout_loss"],
        "returned_heldout_loss": ex.extra["best_heldout_loss"],
        "plain_wm_heldout_loss": ex.extra["candidates"][1]["heldout_loss"],
    }
    print(f"effect on the result (vs '{base}'; '{base}, seed 1' is the seed-to-seed spread):")
    for name, e in effect.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items()))
    ok = all(same.values())
    out = Path(args.json or OUT / ("bench_ste.json" if args.model == "mlp" else f"bench_ste_{args.model}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "plain_s": plain,
                "ste_s": rows,
                "ratio": {m: s / plain for m, s in rows.items()},
                "same_every_step": same,
                "projector_stats": stats,
                "approximation": effect,
                "steps": args.steps,
                "threads": args.threads,
                "batch": args.batch,
            },
            indent=1,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
