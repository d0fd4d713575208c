"""Slow scientific check on Fashion-MNIST: the MLP recipe of the paper.

Two 784-512-512-512-10 MLPs trained from different seeds (Adam 1e-3,
batch 500, 5 epochs) are separated by a clear test-loss barrier (> 0.5)
when interpolated naively and become linearly connected (< 0.1) after
weight matching.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from lmckit.lmc import barrier_curve
from lmckit.models import create_model
from lmckit.perm import apply_permutation, spec_for

pytestmark = pytest.mark.slow


def _train_mlp(dataset, seed: int, epochs: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for x, y in dataset.batches("train", 500, shuffle=True, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def fmnist():
    from lmckit.data import load_dataset

    return load_dataset("fashion-mnist")


def test_mlp_fashion_mnist_naive_barrier_and_weight_matching(fmnist):
    match = pytest.importorskip("lmckit.match")
    a, b = _train_mlp(fmnist, 0), _train_mlp(fmnist, 1)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    t0 = time.perf_counter()
    naive = barrier_curve(a, sa, sb, fmnist, points=25, progress=False)["test"]
    seconds = time.perf_counter() - t0
    spec = spec_for(a)
    res = match.weight_matching(spec, sa, sb, seed=0)
    sbp = apply_permutation(spec, res.perms, sb)
    wm = barrier_curve(a, sa, sbp, fmnist, points=25, progress=False)["test"]
    rep = barrier_curve(a, sa, sbp, fmnist, points=25, bn_reset="repair", progress=False)["test"]
    print(
        f"\nendpoint test loss {naive.endpoint_loss}, acc {naive.endpoint_accuracy}"
        f"\nnaive: loss barrier {naive.loss_barrier:.4f}, acc barrier {naive.accuracy_barrier:.4f}, "
        f"mid acc {naive.midpoint_accuracy:.4f}"
        f"\nWM:    loss barrier {wm.loss_barrier:.4f}, acc barrier {wm.accuracy_barrier:.4f}, "
        f"mid acc {wm.midpoint_accuracy:.4f}"
        f"\nWM+REPAIR: loss barrier {rep.loss_barrier:.4f}, acc barrier {rep.accuracy_barrier:.4f}"
        f"\n25-point test curve: {seconds:.2f}s"
    )
    assert min(naive.endpoint_accuracy) > 0.85
    assert naive.loss_barrier > 0.5
    assert wm.loss_barrier < 0.1
    assert rep.loss_barrier <= wm.loss_barrier + 0.02
