"""Weight-matching speed: lmckit vs snimu's ``rebasin`` (PyPI ``rebasin``), same machine, same run.

What it does
------------
1. Creates ``benchmarks/.venvs/rebasin`` (``python3 -m venv``; ``pip install
   torch==2.13.0``, then ``rebasin`` and its small pure-python deps with
   ``--no-deps``) unless it exists.
2. Makes model pairs and saves them as plain safetensors state dicts:

   - ``mlp``: 784-512-512-512-10 on Fashion-MNIST, two seeds, trained here
     with a plain Adam loop (lr 1e-3, batch 500, ``--epochs`` epochs), or
     taken from ``--mlp-runs A B`` (run folders / .safetensors);
   - ``resnet20`` (x1), ``resnet20x4`` (width x4), ``vgg11`` (BatchNorm),
     CIFAR-shaped (3x32x32): **randomly initialised** with seeds 0 and 1.
     Matching time depends on shapes, not on training, but trained CNNs may
     need a different number of sweeps.

3. Times, in this one run, for each pair:

   - lmckit: ``spec_for(model)`` + ``weight_matching`` (max 100 sweeps), in process;
   - rebasin: ``PermutationCoordinateDescent`` (its torchview tracing = spec
     derivation, coordinate descent, applying the permutation), timed inside
     its own process (``rebasin_peer.py``);
   - lmckit's floor: every group's cost-matrix products + LAP for one sweep,
     nothing else (``matching_floor_seconds``), against lmckit's time per sweep.

   L2 distances after matching and objectives are computed here, for both
   tools, from the permuted weights (rebasin's written back by the peer).

Run ``python benchmarks/bench_match.py`` (``--help`` for options). Results go
to ``benchmarks/out/bench_match.json``. Targets: lmckit >= 2x faster on the
MLP and >= 5x on the CNNs, L2 after within 0.2% of rebasin's, lmckit time per
sweep within 1.5x of the floor. Timings on a shared machine are noisy; rerun
on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venvs" / "rebasin"
PEER_PY = VENV / "bin" / "python"

MODELS = {
    "mlp": ("mlp", {"in_channels": 1, "image_size": 28}, (2, 1, 28, 28)),
    "resnet20": ("resnet20", {"in_channels": 3, "image_size": 32, "norm": "batchnorm"}, (2, 3, 32, 32)),
    "resnet20x4": (
        "resnet20",
        {"in_channels": 3, "image_size": 32, "norm": "batchnorm", "width_mult": 4.0},
        (2, 3, 32, 32),
    ),
    "vgg11": ("vgg11", {"in_channels": 3, "image_size": 32, "norm": "batchnorm"}, (2, 3, 32, 32)),
}
CNN = {"resnet20", "resnet20x4", "vgg11"}


def ensure_peer_venv() -> None:
    """Create the rebasin venv (torch pinned to the main venv's version first, then rebasin without deps)."""
    if PEER_PY.exists():
        probe = subprocess.run([str(PEER_PY), "-c", "import rebasin, torchview, safetensors"], capture_output=True)
        if probe.returncode == 0:
            return
    print(f"creating {VENV} ...", file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    # rebasin pins nothing useful; its runtime deps are small: install them without dragging in more
    subprocess.run(pip + ["--no-deps", "rebasin", "torchview", "graphviz"], check=True)
    subprocess.run(pip + ["numpy", "scipy", "tqdm", "safetensors"], check=True)


def train_mlp(seed: int, epochs: int, threads: int):
    """Plain Adam loop on Fashion-MNIST (no lmckit training stage): returns the model."""
    import torch

    from lmckit.data import load_dataset
    from lmckit.evaluate import evaluate
    from lmckit.models import create_model

    torch.manual_seed(seed)
    ds = load_dataset("fashion-mnist")
    model = create_model("mlp", **MODELS["mlp"][1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for x, y in ds.batches("train", 500, shuffle=True, generator=gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    loss, acc = evaluate(model, ds, "test")
    print(f"  trained mlp seed {seed}: test acc {acc:.4f}", file=sys.stderr)
    return model


def make_pair(key: str, out: Path, args) -> tuple[Path, Path, str]:
    import torch
    from safetensors.torch import save_file

    from lmckit.models import create_model

    name, kw, _ = MODELS[key]
    pa, pb = out / f"{key}_a.safetensors", out / f"{key}_b.safetensors"
    if key == "mlp" and args.mlp_runs:
        from lmckit.checkpoint import load_checkpoint

        for src, dst in zip(args.mlp_runs, (pa, pb)):
            sd, _ = load_checkpoint(src)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(dst))
        return pa, pb, f"trained runs {args.mlp_runs[0]}, {args.mlp_runs[1]}"
    if key == "mlp":
        note = f"trained here, {args.epochs} epoch(s) Adam, seeds 0/1"
        if not (pa.exists() and pb.exists() and (out / f"mlp_{args.epochs}ep.done").exists()):
            for seed, dst in ((0, pa), (1, pb)):
                save_file(train_mlp(seed, args.epochs, args.threads).state_dict(), str(dst))
            (out / f"mlp_{args.epochs}ep.done").write_text("ok\n")
        return pa, pb, note
    for seed, dst in ((0, pa), (1, pb)):
        torch.manual_seed(seed)
        save_file(create_model(name, **kw).state_dict(), str(dst))
    return pa, pb, "random init, seeds 0/1"


def _warm_up_lmckit() -> None:
    """First-call costs (BLAS init, scipy import) outside the timings, as the peer does."""
    import torch

    from lmckit.match import weight_matching
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    torch.manual_seed(0)
    a, b = create_model("mlp_tiny"), create_model("mlp_tiny")
    weight_matching(spec_for(a), a.state_dict(), b.state_dict(), max_iter=5)


def run_lmckit(key: str, pa: Path, pb: Path, args) -> dict:
    from safetensors.torch import load_file

    from lmckit.match import l2_distance, weight_matching
    from lmckit.match.weight import matching_floor_seconds, objective_keys
    from lmckit.models import create_model
    from lmckit.perm import apply_permutation, spec_for

    name, kw, _ = MODELS[key]
    sd_a, sd_b = load_file(str(pa)), load_file(str(pb))
    runs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        spec = spec_for(create_model(name, **kw))
        res = weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=args.max_iter)
        dt = time.perf_counter() - t0
        aligned = apply_permutation(spec, res.perms, sd_b)
        runs.append(
            {
                "seed": seed,
                "seconds": dt,
                "sweeps": res.sweeps,
                "solves": res.extra["solves"],
                "skipped_solves": res.extra["skipped_solves"],
                "per_sweep_seconds": res.extra["sweep_seconds"] / res.sweeps,
                "objective": _inner(sd_a, aligned, objective_keys(spec, sd_a)),
                "l2_after": l2_distance(spec, sd_a, aligned),
            }
        )
    out = _summarise(runs)
    out.update(
        l2_before=l2_distance(spec, sd_a, sd_b),
        floor_seconds=matching_floor_seconds(spec, sd_a, sd_b),
        per_sweep_seconds=_median([r["per_sweep_seconds"] for r in runs]),
        runs=runs,
    )
    return out


def run_rebasin(key: str, pa: Path, pb: Path, out: Path, args) -> dict:
    from safetensors.torch import load_file

    from lmckit.match import l2_distance
    from lmckit.match.weight import objective_keys
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    name, kw, shape = MODELS[key]
    job = {
        "lmckit_src": str(ROOT / "src"),
        "model": name,
        "kwargs": kw,
        "a": str(pa),
        "b": str(pb),
        "input_shape": list(shape),
        "max_iter": args.max_iter,
        "out": str(out / f"{key}_rebasin.safetensors"),
        "threads": args.threads,
        "seeds": list(range(args.seeds)),
    }
    jf = out / f"{key}_rebasin_job.json"
    jf.write_text(json.dumps(job))
    proc = subprocess.run(
        [str(PEER_PY), str(HERE / "rebasin_peer.py"), str(jf)],
        capture_output=True,
        text=True,
        timeout=args.peer_timeout,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    spec = spec_for(create_model(name, **kw))
    sd_a, sd_b = load_file(str(pa)), load_file(str(pb))
    keys = objective_keys(spec, sd_a)
    for r in runs:
        got = load_file(r["out"])
        r.update(
            objective=_inner(sd_a, got, keys),
            l2_after=l2_distance(spec, sd_a, got),
            valid_permutation=all(_same_values(sd_b[k], got[k]) for k in sd_b),
        )
    res = _summarise(runs)
    res.update(valid_permutation=all(r["valid_permutation"] for r in runs), runs=runs)
    return res


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _summarise(runs: list[dict]) -> dict:
    """Median time and sweeps over the seeds (group orders); mean objective and L2 after."""
    return {
        "seconds": _median([r["seconds"] for r in runs]),
        "sweeps": _median([r["sweeps"] for r in runs]),
        "objective": sum(r["objective"] for r in runs) / len(runs),
        "l2_after": sum(r["l2_after"] for r in runs) / len(runs),
    }


def _same_values(x, y) -> bool:
    """A permuted tensor holds the same multiset of values."""
    import torch

    if x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return True
    return torch.equal(torch.sort(x.flatten()).values, torch.sort(y.flatten()).values)


def _inner(a, b, keys) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in keys))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,resnet20,resnet20x4,vgg11", help="comma list of " + ",".join(MODELS))
    p.add_argument("--mlp-runs", nargs=2, metavar=("A", "B"), help="trained MLP checkpoints to use instead of training")
    p.add_argument("--epochs", type=int, default=1, help="MLP training epochs when no runs are given (default 1)")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="group-order seeds per tool (default 3); times and sweeps are medians over them",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for both tools (default 2)")
    p.add_argument("--no-rebasin", action="store_true", help="time lmckit only (no peer venv)")
    p.add_argument("--peer-timeout", type=int, default=1800)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args(argv)
    os.environ.setdefault("LMCKIT_NO_PROGRESS", "1")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {list(MODELS)}")
    if not args.no_rebasin:
        ensure_peer_venv()
    _warm_up_lmckit()
    rows, results = [], {}
    for key in keys:
        print(f"[{key}] preparing pair ...", file=sys.stderr)
        pa, pb, note = make_pair(key, out, args)
        lm = run_lmckit(key, pa, pb, args)
        rb = None if args.no_rebasin else run_rebasin(key, pa, pb, out, args)
        results[key] = {"weights": note, "lmckit": lm, "rebasin": rb}
        rows.append(
            {
                "model": key,
                "tool": "lmckit",
                "seconds": lm["seconds"],
                "sweeps": lm["sweeps"],
                "objective": lm["objective"],
                "l2_after": lm["l2_after"],
                "ratio": 1.0,
            }
        )
        if rb is not None and "error" not in rb:
            ratio = rb["seconds"] / lm["seconds"]
            results[key]["speedup"] = ratio
            results[key]["l2_rel_diff"] = (lm["l2_after"] - rb["l2_after"]) / rb["l2_after"]
            rows.append(
                {
                    "model": key,
                    "tool": "rebasin",
                    "seconds": rb["seconds"],
                    "sweeps": rb["sweeps"],
                    "objective": rb["objective"],
                    "l2_after": rb["l2_after"],
                    "ratio": ratio,
                }
            )
        elif rb is not None:
            rows.append(
                {
                    "model": key,
                    "tool": "rebasin",
                    "seconds": float("nan"),
                    "sweeps": "-",
                    "objective": float("nan"),
                    "l2_after": float("nan"),
                    "ratio": float("nan"),
                }
            )
            print(f"  rebasin failed: {rb['error']}", file=sys.stderr)
        rows.append(
            {
                "model": key,
                "tool": "lmckit/sweep vs floor",
                "seconds": lm["per_sweep_seconds"],
                "sweeps": 1,
                "objective": float("nan"),
                "l2_after": float("nan"),
                "ratio": lm["per_sweep_seconds"] / lm["floor_seconds"],
            }
        )
    print(
        f"\nthreads={args.threads}  max_iter={args.max_iter}  seeds={args.seeds}  load={os.getloadavg()[0]:.1f}"
        "  (seconds, sweeps: median over seeds; objective, l2_after: mean)"
    )
    cols = ["model", "tool", "seconds", "sweeps", "objective", "l2_after", "ratio"]
    print("  ".join(f"{c:>22}" if i > 1 else f"{c:<22}" for i, c in enumerate(cols)))
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r[c]
            s = (
                f"{v:.4f}"
                if isinstance(v, float) and c in ("seconds", "ratio")
                else (f"{v:.6g}" if isinstance(v, float) else str(v))
            )
            cells.append(f"{s:>22}" if i > 1 else f"{s:<22}")
        print("  ".join(cells))
    print("\nratio: rebasin seconds / lmckit seconds (speed-up); for the floor row: lmckit seconds per sweep / floor")
    print("weights: " + "; ".join(f"{k}: {v['weights']}" for k, v in results.items()))
    checks = []
    for key, r in results.items():
        lm = r["lmckit"]
        checks.append(
            (
                f"{key}: per sweep <= 1.5x floor",
                lm["per_sweep_seconds"] <= 1.5 * lm["floor_seconds"],
                f"{lm['per_sweep_seconds'] / lm['floor_seconds']:.2f}x",
            )
        )
        if "speedup" in r:
            need = 5.0 if key in CNN else 2.0
            checks.append((f"{key}: >= {need:g}x faster than rebasin", r["speedup"] >= need, f"{r['speedup']:.1f}x"))
            checks.append(
                (
                    f"{key}: L2 after within 0.2% of rebasin (or lower)",
                    r["l2_rel_diff"] <= 0.002,
                    f"{100 * r['l2_rel_diff']:+.3f}%",
                )
            )
            if not r["rebasin"].get("valid_permutation", True):
                checks.append((f"{key}: rebasin output is a permutation of B", False, "no"))
    for name, ok, val in checks:
        print(f"  [{'ok' if ok else 'MISS'}] {name}: {val}")
    (out / "bench_match.json").write_text(
        json.dumps({"args": vars(args), "load_before": os.getloadavg(), "results": results}, indent=2, default=str)
    )
    print(f"wrote {out / 'bench_match.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
