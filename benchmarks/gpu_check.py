"""Device check: the CUDA tests, training throughput, WM and STE speed, the quick recipe's wall time; one table.

Run it through ``benchmarks/gpu_check.sh`` on a machine with one GPU (at most
8 minutes). ``--smoke`` runs every step on tiny models and sizes (any device,
seconds) to check the script itself.

Rows
----
* CUDA tests: ``pytest tests/test_gpu_path.py`` (the tests that skip without a GPU).
* train <model> <precision>: images/s of lmckit's own training step
  (``lmckit.train._train_epoch``: SGD momentum, augmentation, batch 500) on
  random 32 x 32 RGB images held on the device, after warm-up steps;
  channels_last and TF32 as lmckit sets them on CUDA.
* WM <model>: weight matching of two independently initialised models
  (matching time depends on shapes, not on training), cost matrices on the
  device, assignment solves on the CPU; seconds and sweeps (at most 30 here,
  to fit the time budget).
* STE: steps/s of ``ste_matching`` on the paper's 784-512-512-512-10 MLP with
  random Fashion-MNIST-shaped data (each step = a warm-started WM projection +
  a midpoint forward/backward).
* quick: ``lmckit reproduce --recipe quick --device cuda`` from an empty cache
  (needs Fashion-MNIST; skipped without it), ``--jobs`` up to 4 (a quarter of
  the CPU cores: WM's assignment solves run on the CPU), under the time left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from lmckit.data import Dataset  # noqa: E402


def random_dataset(n: int, channels: int, size: int, device: torch.device, classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    ds = Dataset(
        "random",
        {"train": x, "test": x[: n // 5]},
        {"train": y, "test": y[: n // 5]},
        classes,
        tuple([0.5] * channels),
        tuple([0.25] * channels),
    )
    ds.on_device("train", device)  # resident on the device before timing
    return ds


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_throughput(
    model: str, width: float, precision: str, dev: torch.device, n: int, steps: int, batch: int
) -> dict:
    from lmckit.device import channels_last_wanted, tf32_allowed, tf32_scope
    from lmckit.train import _train_epoch, build_untrained, make_config, make_optimizer

    ds = random_dataset(n, 3, 32, dev)
    cfg = make_config(
        None,
        model=model,
        width_mult=width,
        norm="batchnorm",
        dataset="synthetic-rgb",
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=batch,
        epochs=2,
        augment=True,
        precision=precision,
    )
    net = build_untrained(cfg, ds).to(dev)
    cl, tf32 = channels_last_wanted(net, dev), tf32_allowed(dev)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, net.parameters())
    gen = torch.Generator().manual_seed(0)
    x_u8, y = ds.on_device("train", dev)
    spe = math.ceil(n / batch)
    with tf32_scope(tf32):
        _train_epoch(net, opt, cfg, gen, None, x_u8, y, ds, dev, 0, spe)  # warm-up (cuDNN autotune, allocator)
        sync(dev)
        t0 = time.perf_counter()
        epochs = max(1, steps // spe)
        for e in range(epochs):
            _train_epoch(net, opt, cfg, gen, None, x_u8, y, ds, dev, 1 + e, spe)
        sync(dev)
        dt = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    return {
        "value": epochs * n / dt,
        "unit": "images/s",
        "note": f"{params / 1e6:.1f}M params, batch {batch}, channels_last={cl}, tf32={tf32}",
    }


def wm_time(model: str, width: float, dev: torch.device, max_iter: int) -> dict:
    from lmckit.match import weight_matching
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    torch.manual_seed(0)
    a = create_model(model, in_channels=3, image_size=32, num_classes=10, width_mult=width, norm="batchnorm")
    torch.manual_seed(1)
    b = create_model(model, in_channels=3, image_size=32, num_classes=10, width_mult=width, norm="batchnorm")
    spec = spec_for(a)
    sd_a = {k: v.to(dev) for k, v in a.state_dict().items()}
    sd_b = {k: v.to(dev) for k, v in b.state_dict().items()}
    sync(dev)
    t0 = time.perf_counter()
    res = weight_matching(spec, sd_a, sd_b, seed=0, max_iter=max_iter, device=dev)
    sync(dev)
    dt = time.perf_counter() - t0
    return {
        "value": dt,
        "unit": "s",
        "note": f"{res.sweeps} sweeps (max {max_iter}), largest group {max(spec.sizes.values())} units",
    }


def ste_speed(dev: torch.device, width: int, n: int, steps: int) -> dict:
    from lmckit.match.ste import ste_matching
    from lmckit.models import create_model

    ds = random_dataset(n, 1, 28, dev)
    torch.manual_seed(0)
    a = create_model("mlp", in_channels=1, image_size=28, num_classes=10, width=width)
    torch.manual_seed(1)
    b = create_model("mlp", in_channels=1, image_size=28, num_classes=10, width=width)
    sd_a = {k: v.to(dev) for k, v in a.state_dict().items()}
    sd_b = {k: v.to(dev) for k, v in b.state_dict().items()}
    batch = 256
    limit = steps * batch
    sync(dev)
    t0 = time.perf_counter()
    ste_matching(
        a.to(dev),
        sd_a,
        sd_b,
        ds,
        epochs=1,
        batch_size=batch,
        seed=0,
        device=dev,
        progress=False,
        heldout_size=min(1000, n // 5),
        track_alignment=False,
        train_limit=limit,
    )
    sync(dev)
    dt = time.perf_counter() - t0
    return {
        "value": steps / dt,
        "unit": "steps/s",
        "note": f"MLP 784-{width}x3-10, batch {batch}, {steps} steps incl. setup and 2 held-out scorings",
    }


def run_tests(timeout: float) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "tests/test_gpu_path.py",
            "tests/test_ray_executor.py",
            "-m",
            "not slow",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    last = [ln for ln in p.stdout.splitlines() if " passed" in ln or " failed" in ln or " error" in ln][-1:] or [
        "(no summary line)"
    ]
    return {
        "value": time.perf_counter() - t0,
        "unit": "s",
        "note": ("PASS " if p.returncode == 0 else "FAIL ") + last[0],
        "ok": p.returncode == 0,
        "output": p.stdout[-4000:],
    }


def run_quick(dev: str, timeout: float, smoke: bool) -> dict:
    from lmckit.data import find_dataset

    recipe = "tiny" if smoke else "quick"
    jobs = 1 if smoke else max(1, min(4, (os.cpu_count() or 1) // 4))  # independent stages share the GPU
    if not smoke:
        try:
            find_dataset("fashion-mnist")
        except Exception as e:  # noqa: BLE001
            return {
                "value": float("nan"),
                "unit": "s",
                "note": f"skipped: Fashion-MNIST not found ({e}); set LMCKIT_DATA",
            }
    tmp = tempfile.mkdtemp(prefix="gpucheck")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LMCKIT_NO_PROGRESS="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmckit.cli",
                "reproduce",
                "--recipe",
                recipe,
                "--device",
                dev,
                "--jobs",
                str(jobs),
                "--out",
                f"{tmp}/report",
                "--cache",
                f"{tmp}/runs",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"value": float("nan"), "unit": "s", "note": f"not finished within {timeout:.0f}s"}
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        return {"value": dt, "unit": "s", "note": f"FAILED (exit {p.returncode}): {p.stderr.strip()[-300:]}"}
    return {"value": dt, "unit": "s", "note": f"{recipe} recipe from an empty cache, --device {dev} --jobs {jobs}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the script on any device")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything (the quick run gets the rest)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    s = args.smoke
    rows: list[tuple[str, dict]] = []

    def add(name: str, fn, *a) -> None:
        t0 = time.perf_counter()
        try:
            r = fn(*a)
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the rest still runs
            r = {"value": float("nan"), "unit": "", "note": f"ERROR {type(e).__name__}: {str(e)[:200]}"}
        r["seconds"] = time.perf_counter() - t0
        rows.append((name, r))
        print(
            f"[gpu_check] {name}: {r['value']:.4g} {r['unit']} ({r['note']}) [{r['seconds']:.0f}s]",
            file=sys.stderr,
            flush=True,
        )

    add("CUDA tests" if dev.type == "cuda" else "tests", run_tests, 180.0)
    n, steps, batch = (200, 4, 50) if s else (10_000, 60, 500)
    for model, width in (("vgg_tiny", 1.0), ("resnet_tiny", 1.0)) if s else (("vgg11", 4.0), ("resnet20", 16.0)):
        for prec in ("fp32", "bf16"):
            add(f"train {model} x{width:g} {prec}", train_throughput, model, width, prec, dev, n, steps, batch)
    for model, width in (("vgg_tiny", 1.0), ("resnet_tiny", 1.0)) if s else (("vgg11", 4.0), ("resnet20", 16.0)):
        add(f"WM {model} x{width:g}", wm_time, model, width, dev, 5 if s else 30)
    add("STE steps", ste_speed, dev, 32 if s else 512, 500 if s else 20_000, 5 if s else 50)
    left = args.budget - (time.perf_counter() - t_start)
    add("quick recipe" if not s else "tiny recipe", run_quick, args.device, max(30.0, left), s)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"\n| {name} (torch {torch.__version__}) | value | unit | time | note |")
    print("| --- | ---: | --- | ---: | --- |")
    for row, r in rows:
        v = "-" if r["value"] != r["value"] else f"{r['value']:.4g}"
        print(f"| {row} | {v} | {r['unit']} | {r['seconds']:.0f}s | {r['note']} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in rows}, indent=1)
        )
    tests = rows[0][1]
    if not tests.get("ok", False):
        print("\n" + tests.get("output", ""), file=sys.stderr)
    return 0 if tests.get("ok", False) else 1


if __name__ == "__main__":
    sys.exit(main())
