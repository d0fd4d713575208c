"""Assignment-solver choice for weight matching, measured on real WM cost matrices.

For each size n (default 256, 512, 1024, 2048, 4096) two random-weight MLPs
784-n-n-n-10 (seeds 0 and 1, the default initialisation) are built and the
cost matrix of the middle hidden group is taken at the start of weight
matching (``C = sum_k A_k^{(a)} B_k^{(a)T}`` over the weights and biases of
that group; the matrix the first sweep solves). With ``--trained A B``
(safetensors of two trained 784-512-512-512-10 MLPs) the 512 row also uses
trained weights. Every installed solver is timed on the same matrices (best
of ``--repeats``) and the objectives are compared (all solvers are exact, so
they must agree to float precision; ``lapx32``, lapx's float32 kernel, is
optimal only for the float32-rounded costs: its relative objective gap is
printed).

    python benchmarks/bench_lap.py                   # table on stdout
    python benchmarks/bench_lap.py --sizes 256 512 --repeats 5

The table is the source of ``lmckit.match.lap.LAPX_MAX_UNITS``; the ratio
column is scipy's time over the fastest solver's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def wm_cost(width: int, trained: tuple[str, str] | None = None) -> np.ndarray:
    """Cost matrix of the middle hidden group of an MLP pair (identity start)."""
    from lmckit.match.weight import _Problem, objective_keys
    from lmckit.models import create_model
    from lmckit.perm import identity_permutation, spec_for

    model = create_model("mlp", in_channels=1, image_size=28, width=width)
    spec = spec_for(model)
    if trained is not None:
        from safetensors.torch import load_file

        sd_a, sd_b = load_file(trained[0]), load_file(trained[1])
    else:
        sds = []
        for s in (0, 1):
            torch.manual_seed(s)
            sds.append(
                {
                    k: v.detach().clone()
                    for k, v in create_model("mlp", in_channels=1, image_size=28, width=width).state_dict().items()
                }
            )
        sd_a, sd_b = sds
    prob = _Problem(spec, sd_a, sd_b, objective_keys(spec, sd_a), torch.device("cpu"))
    g = sorted(prob.groups, key=lambda h: (spec.sizes[h], h))[len(prob.groups) // 2]
    bp = prob.permuted_b(identity_permutation(spec))
    c, _ = prob.cost_full(g, bp)
    return c.numpy()


def best_of(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trained", nargs=2, metavar=("A", "B"), help="trained 512-wide MLP pair (safetensors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmckit.match import lap

    solvers = lap.available()
    if "lapx" not in solvers:
        print("lapx is not installed: only scipy is timed (pip install lapx)", file=sys.stderr)
    rows = []
    print(
        f"{'n':>5} {'weights':>8} "
        + " ".join(f"{s + ' ms':>10}" for s in solvers)
        + f" {'auto':>6} {'scipy/best':>10} {'lapx32 gap':>10}"
    )
    for n in args.sizes:
        kinds = [("random", None)]
        if args.trained and n == 512:
            kinds.append(("trained", tuple(args.trained)))
        for kind, tr in kinds:
            c = wm_cost(n, tr)
            rep = args.repeats if n < 4096 else max(1, args.repeats // 2)
            times, objs = {}, {}
            for s in solvers:
                col = lap.solve(c, solver=s)
                objs[s] = float(c[np.arange(n), col].sum())
                times[s] = best_of(lambda c=c, s=s: lap.solve(c, solver=s), rep)
            ref = objs["scipy"]
            gaps = {s: (ref - o) / max(1.0, abs(ref)) for s, o in objs.items()}
            for s, gap in gaps.items():
                if s != "lapx32" and gap > 1e-9:
                    raise SystemExit(f"solver {s} is not optimal at n={n}: {objs[s]} vs scipy {ref}")
            fastest = min(times, key=times.get)
            row = {
                "n": n,
                "weights": kind,
                "ms": {s: 1e3 * t for s, t in times.items()},
                "fastest": fastest,
                "auto": lap.choose(n),
                "scipy_over_best": times["scipy"] / times[fastest],
                "relative_gap": gaps,
            }
            rows.append(row)
            print(
                f"{n:>5} {kind:>8} "
                + " ".join(f"{1e3 * times[s]:>10.1f}" for s in solvers)
                + f" {row['auto']:>6} {row['scipy_over_best']:>10.2f} {gaps.get('lapx32', 0.0):>10.1e}",
                flush=True,
            )
    bad = [r for r in rows if r["auto"] != r["fastest"] and r["ms"][r["auto"]] > 1.2 * r["ms"][r["fastest"]]]
    print(
        "automatic choice: "
        + (
            "fastest (within 20%) at every size"
            if not bad
            else "NOT the fastest at n = " + ", ".join(str(r["n"]) for r in bad)
        )
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
