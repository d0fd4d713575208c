"""Training throughput of lmckit.train against a bare PyTorch loop.

Both train the paper's MLP (784-512-512-512-10, Adam lr 1e-3, batch 500) for
one epoch on Fashion-MNIST held in memory as tensors, from the same
initialisation and batch order. The lmckit figure is the epoch's training time
that :func:`lmckit.train.train` records in ``metrics.jsonl`` (evaluation and
checkpointing excluded); its end-to-end time (data already loaded; test
evaluation, checkpoint, final train-split evaluation and the run folder
included) is printed too. Runs alternate (bare, lmckit, bare, ...) to share
the machine's noise; the best of ``--repeats`` counts.

    python benchmarks/bench_train.py [--repeats 3] [--threads N] [--train-size N] [--dataset fashion-mnist] \
        [--device cpu]

The target is ``ratio = lmckit / bare <= 1.2``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F


def bare_epoch(config, ds, device) -> float:
    """One epoch of the plainest loop over pre-normalised in-memory tensors; returns seconds."""
    from lmckit.train import build_untrained

    model = build_untrained(config, ds).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x = ds.normalize(ds.images["train"].to(device))
    y = ds.labels["train"].to(device)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    order = torch.randperm(x.shape[0], generator=gen).to(device)
    model.train()
    for start in range(0, x.shape[0], config.batch_size):
        idx = order[start : start + config.batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    float(loss.detach())  # one sync at the end
    return time.perf_counter() - t0


def lmckit_epoch(config, device, data_dir=None) -> tuple[float, float]:
    """(epoch training seconds as recorded by lmckit, end-to-end seconds of train())."""
    from lmckit.train import train

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        r = train(config, root, device=device, progress=False, data_dir=data_dir)
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[0]["seconds"], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on this many images (the rest held out as val; for a quick run on a busy machine)",
    )
    args = ap.parse_args()

    from lmckit.data import load_dataset
    from lmckit.device import resolve_device
    from lmckit.train import make_config

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    full = load_dataset(args.dataset, data_dir=args.data_dir).size("train")
    val = 0 if args.train_size is None else max(0, full - args.train_size)
    config = make_config("mlp-fmnist", dataset=args.dataset, epochs=1, val_size=val)
    ds = load_dataset(config.dataset, data_dir=args.data_dir, val_size=val)
    # Warm-up: allocator, thread pool, kernels.
    warm = config.replace(seed=12345)
    bare_epoch(warm, ds, dev)
    lmckit_epoch(warm, dev, args.data_dir)

    bare, lmc, total = [], [], []
    for i in range(args.repeats):
        bare.append(bare_epoch(config, ds, dev))
        e, t = lmckit_epoch(config, dev, args.data_dir)
        lmc.append(e)
        total.append(t)
        print(f"repeat {i + 1}: bare {bare[-1]:.3f}s  lmckit epoch {e:.3f}s  lmckit end-to-end {t:.3f}s", flush=True)
    b, lm, t = min(bare), min(lmc), min(total)
    n = ds.size("train")
    print(f"device {dev}, torch threads {torch.get_num_threads()}, {n} images, batch {config.batch_size}")
    print(f"bare loop       {b:.3f} s/epoch  ({n / b:,.0f} img/s)")
    print(f"lmckit train    {lm:.3f} s/epoch  ({n / lm:,.0f} img/s)")
    print(f"lmckit total    {t:.3f} s (epoch + test eval + checkpoint + train-split eval + run folder)")
    print(f"ratio lmckit/bare = {lm / b:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
