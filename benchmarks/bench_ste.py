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
  - ``certified``: :class:`lmckit.match.projection.WarmProjector` (the same
    descent with solves skipped under an optimality certificate).

Both must return the same permutation at every step (checked; the script
exits 1 otherwise). Prints the ratio STE step / plain step for each, and the
projector's counters (solves, certified skips, moves). Timings on a shared
machine are noisy: rerun on a quiet one before quoting them.

    python benchmarks/bench_ste.py                 # 40 steps, 1 thread, also --every 4
    python benchmarks/bench_ste.py --steps 80 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def trained_pair(epochs: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file, save_file

    from lmckit.data import load_dataset
    from lmckit.models import create_model

    sds = []
    for seed in (0, 1):
        path = OUT / f"ste_mlp_e{epochs}_seed{seed}.safetensors"
        if not path.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            ds = load_dataset("fashion-mnist")
            m = create_model("mlp", in_channels=1, image_size=28)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                for x, y in ds.batches("train", 500, shuffle=True, generator=gen):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(m(x), y).backward()
                    opt.step()
            save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
        sds.append(load_file(str(path)))
    return sds[0], sds[1]


def plain_step_seconds(ds, batch: int, blocks: int = 5, per_block: int = 10) -> float:
    from lmckit.models import create_model

    torch.manual_seed(0)
    m = create_model("mlp", in_channels=1, image_size=28)
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
        t0 = time.perf_counter()
        for _ in range(per_block):
            step()
        best = min(best, (time.perf_counter() - t0) / per_block)
    return best


def ste_run(model, a, b, ds, steps: int, batch: int, mode: str, record: list, every: int = 1):
    import lmckit.match.ste as ste

    os.environ["LMCKIT_STE_PROJECTION"] = mode
    os.environ["LMCKIT_STE_PROJECT_EVERY"] = str(every)
    kw = dict(batch_size=batch, progress=False, track_alignment=False, heldout_size=1000, train_limit=steps * batch)
    t0 = time.perf_counter()
    ste.ste_matching(model, a, b, ds, epochs=0, **kw)
    t_setup = time.perf_counter() - t0
    orig = ste._project

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        record.append((out, kwargs.get("projector", args[7] if len(args) > 7 else None)))
        return out

    ste._project = spy
    try:
        t0 = time.perf_counter()
        res = ste.ste_matching(model, a, b, ds, epochs=1, **kw)
        t_run = time.perf_counter() - t0
    finally:
        ste._project = orig
        os.environ.pop("LMCKIT_STE_PROJECTION", None)
        os.environ.pop("LMCKIT_STE_PROJECT_EVERY", None)
    return (t_run - t_setup) / steps, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="STE steps timed per projection mode")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-epochs", type=int, default=1, help="training epochs of models A and B")
    ap.add_argument("--every", type=int, default=4, help="also time the project-every-k approximation (1: skip it)")
    ap.add_argument("--json", default=str(OUT / "bench_ste.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmckit.data import load_dataset
    from lmckit.models import create_model

    a, b = trained_pair(args.train_epochs)
    ds = load_dataset("fashion-mnist")
    model = create_model("mlp", in_channels=1, image_size=28)
    plain = plain_step_seconds(ds, args.batch)
    from lmckit.perm import perm_changed_units

    modes = [("reference", 1), ("exact", 1), ("certified", 1)] + ([("exact", args.every)] if args.every > 1 else [])
    rows, recs, results = {}, {}, {}
    for mode, every in modes:
        name = mode if every == 1 else f"every {every}"
        recs[name] = []
        rows[name], results[name] = ste_run(model, a, b, ds, args.steps, args.batch, mode, recs[name], every)

    def same_steps(x, y):
        return len(x) == len(y) and all(all(torch.equal(p[0][g], q[0][g]) for g in p[0]) for p, q in zip(x, y))

    same = {name: same_steps(recs["reference"], recs[name]) for name in rows if not name.startswith("every")}
    print(f"MLP 784-512-512-512-10, batch {args.batch}, {args.threads} thread(s), {args.steps} steps")
    print(f"{'':>24} {'ms/step':>9} {'x plain':>8}")
    print(f"{'plain training step':>24} {1e3 * plain:>9.1f} {1.0:>8.2f}")
    for name, sec in rows.items():
        print(f"{'STE step, ' + name:>24} {1e3 * sec:>9.1f} {sec / plain:>8.2f}")
    stats = {}
    for name, rec in recs.items():
        proj = next((p for _, p in reversed(rec) if p is not None), None)
        if proj is not None:
            stats[name] = dict(proj.stats)
            print(f"projector counters, {name}: {stats[name]}")
    print("exact modes give the reference permutation at every step:", same)
    effect = {}
    for name in rows:
        if name.startswith("every"):
            ex, ap_ = results["exact"], results[name]
            effect[name] = {
                "end_of_epoch_changed_vs_exact": perm_changed_units(recs[name][-1][0], recs["exact"][-1][0]),
                "returned_changed_vs_exact": perm_changed_units(ap_.perms, ex.perms),
                "heldout_loss_end_of_epoch": {
                    "exact": ex.extra["candidates"][-1]["heldout_loss"],
                    name: ap_.extra["candidates"][-1]["heldout_loss"],
                },
                "returned_heldout_loss": {"exact": ex.extra["best_heldout_loss"], name: ap_.extra["best_heldout_loss"]},
            }
            print(f"effect of '{name}': {json.dumps(effect[name])}")
    ok = all(same.values())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
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
