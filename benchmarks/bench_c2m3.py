"""Cost of one C2M3 Frank-Wolfe iteration per pair against one pairwise weight-matching sweep, same run.

Model: the quick recipe's MLP 784-512-512-512-10 (``--width``, ``--depth``). Weights: random
initialisations (seeds 0..N-1) by default, since the cost of an iteration depends on the shapes
only; ``--train-epochs E`` trains the N models on Fashion-MNIST (plain Adam loop, lr 1e-3, batch
500; cached under ``benchmarks/out/``) and is what the printed *result* (objective, cycle error)
should be read on. In this one process, on ``--threads`` threads (default 1), CPU time:

* **WM sweep** (the baseline): :func:`lmckit.match.weight.weight_matching` of models 0 and 1
  with ``max_iter=1`` (one sweep: every group's cost matrix built and one assignment solved),
  best of ``--repeat``; and, for reference, a full run's time divided by its sweeps (later
  sweeps skip groups whose neighbours did not move and use rank-s updates, so they are cheaper);
* **C2M3 iteration**: :func:`lmckit.match.c2m3.c2m3` (identity start) with ``--iters`` iterations
  minus the same call with 0 iterations (set-up and rounding), divided by the iterations it ran
  (each computes every model's gradient, one assignment per model and group, and the exact line
  search), then by the N(N-1)/2 pairs whose objectives it sums.

Prints the ratio (C2M3 iteration per pair) / (WM sweep) for each N in ``--models`` (issue 30's
target: at most 2), then C2M3's result at its defaults on the first N: objective at the start
and the end, iterations, why it stopped, and the cycle error of independent pairwise WM against
C2M3's 0. CPU times are stretched less than wall time by other processes, but rerun on a quiet
machine before quoting them.

    python benchmarks/bench_c2m3.py                       # N = 3, 4, 6, random weights
    python benchmarks/bench_c2m3.py --train-epochs 1 --models 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

CLOCK = time.process_time
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def models(n: int, depth: int, width: int, train_epochs: int) -> list[dict]:
    from safetensors.torch import load_file, save_file

    from lmckit.models import create_model

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = create_model("mlp", in_channels=1, image_size=28, depth=depth, width=width)
        if train_epochs > 0:
            path = OUT / f"c2m3_mlp{depth}x{width}_e{train_epochs}_seed{seed}.safetensors"
            if not path.exists():
                from lmckit.data import load_dataset

                OUT.mkdir(parents=True, exist_ok=True)
                ds = load_dataset("fashion-mnist")
                opt = torch.optim.Adam(m.parameters(), lr=1e-3)
                gen = torch.Generator().manual_seed(seed)
                for _ in range(train_epochs):
                    for x, y in ds.batches("train", 500, shuffle=True, generator=gen):
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(m(x), y).backward()
                        opt.step()
                save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
            out.append(load_file(str(path)))
        else:
            out.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return out


def timed(fn, repeat: int) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = CLOCK()
        res = fn()
        best = min(best, CLOCK() - t0)
    return best, res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, nargs="+", default=[3, 4, 6], help="numbers of models N (each >= 3)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--iters", type=int, default=5, help="C2M3 iterations timed (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many timings (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-epochs", type=int, default=0, help="train the models this many epochs (0: random)")
    p.add_argument("--no-result", action="store_true", help="skip the run of C2M3 at its defaults")
    a = p.parse_args(argv)
    if min(a.models) < 3 or a.iters < 1 or a.repeat < 1 or a.threads < 1 or a.depth < 1 or a.width < 2:
        p.error("--models >= 3, --iters, --repeat, --threads, --depth >= 1 and --width >= 2")
    torch.set_num_threads(a.threads)

    from lmckit.match.c2m3 import c2m3
    from lmckit.match.cycle import cycle_error, pairwise_from_common, pairwise_weight_matching
    from lmckit.match.weight import weight_matching
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    spec = spec_for(create_model("mlp", in_channels=1, image_size=28, depth=a.depth, width=a.width))
    states = models(max(a.models), a.depth, a.width, a.train_epochs)
    what = f"MLP 784-{'-'.join([str(a.width)] * a.depth)}-10, " + (
        f"trained {a.train_epochs} epoch(s)" if a.train_epochs else "random weights"
    )
    print(f"{what}; {a.threads} thread(s); CPU times (best of {a.repeat})")

    sweep, _ = timed(lambda: weight_matching(spec, states[0], states[1], max_iter=1, seed=0), a.repeat)
    t_full, full = timed(lambda: weight_matching(spec, states[0], states[1], seed=0), 1)
    mean_sweep = t_full / max(full.sweeps, 1)
    print(f"WM, one sweep (every cost matrix and assignment): {sweep * 1e3:8.1f} ms")
    print(f"WM, full run: {t_full:.2f} s over {full.sweeps} sweeps = {mean_sweep * 1e3:.1f} ms a sweep")
    rows = []
    for n in a.models:
        sts = states[:n]
        pairs = n * (n - 1) // 2
        t0, _ = timed(lambda sts=sts: c2m3(spec, sts, max_iter=0, init="identity"), a.repeat)
        tk, res = timed(lambda sts=sts: c2m3(spec, sts, max_iter=a.iters, init="identity"), a.repeat)
        iters = max(len(res.extra["gaps"]), 1)
        per_iter = max(tk - t0, 0.0) / iters
        per_pair = per_iter / pairs
        ratio = per_pair / sweep
        rows.append(
            {
                "n": n,
                "pairs": pairs,
                "iter_s": per_iter,
                "iter_per_pair_s": per_pair,
                "wm_sweep_s": sweep,
                "ratio": ratio,
                "ratio_vs_mean_sweep": per_pair / mean_sweep,
                "iterations_timed": iters,
            }
        )
        print(
            f"N={n}: C2M3 iteration {per_iter * 1e3:8.1f} ms = {per_pair * 1e3:7.1f} ms per pair ({pairs} pairs) "
            f"-> {ratio:.2f}x one WM sweep (target <= 2; {per_pair / mean_sweep:.2f}x a full run's mean sweep)"
        )
    result = None
    if not a.no_result:
        n = min(a.models)
        sts = states[:n]
        t_run0 = CLOCK()
        res = c2m3(spec, sts)
        t_run = CLOCK() - t_run0
        pw = pairwise_weight_matching(spec, sts)
        result = {
            "n": n,
            "init": res.extra["init"],
            "objective_start": res.objective[0],
            "objective_end": res.objective[-1],
            "iterations": res.passes,
            "stop": res.extra["stop"],
            "seconds_cpu": t_run,
            "cycle_error_c2m3": cycle_error(pairwise_from_common(res.perms)),
            "cycle_error_pairwise_wm": cycle_error(pw),
        }
        print(
            f"C2M3 at its defaults on N={n} ({res.extra['init']} start): S {res.objective[0]:.1f} -> "
            f"{res.objective[-1]:.1f} in {res.passes} iterations ({res.extra['stop']}), {t_run:.1f} s CPU; cycle "
            f"error {result['cycle_error_c2m3']:.3f} (pairwise WM of the same models: "
            f"{result['cycle_error_pairwise_wm']:.3f})"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_c2m3.json").write_text(json.dumps({"setting": what, "rows": rows, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
