"""Second-order Taylor estimate of the midpoint barrier (docs/definitions.md, Claim 2).

With ``theta_m = (theta_a + pi(theta_b)) / 2`` and ``Delta = theta_a - pi(theta_b)``,
``theta_a = theta_m + Delta/2`` and ``pi(theta_b) = theta_m - Delta/2``, so expanding
``L`` around ``theta_m`` the first-order terms cancel in the average:

    (L(theta_a) + L(pi(theta_b))) / 2 = L(theta_m) + (1/8) Delta^T H Delta + O(|Delta|^4),
    barrier(1/2) = L(theta_m) - (L(theta_a) + L(pi(theta_b))) / 2 ~ -(1/8) Delta^T H Delta,

with ``H`` the Hessian of the loss at ``theta_m``. The estimate is exact when
``L`` is quadratic in the parameters (the third-order term also cancels).

Implementation choices:

- ``Delta`` runs over all trainable parameters (``model.named_parameters()``
  with ``requires_grad``); buffers (BatchNorm statistics) are not
  differentiated. Models without BatchNorm are evaluated in eval mode.
  Models with BatchNorm are evaluated with batch statistics (train-mode BN on
  batches of ``batch_size``): the stored running statistics of the midpoint
  are the average of the two models' and say nothing about the midpoint's
  activations (that is why barriers use a BN reset), while batch statistics
  give, for each batch, one fixed function of the parameters whose value at
  the midpoint matches a BN reset up to batch-size effects. Running
  statistics are neither read nor changed (buffers are cloned).
- ``Delta^T H Delta`` is accumulated batch by batch with a Hessian-vector
  product by double backward (``grad(grad(L) . Delta) . Delta``); no dense
  Hessian is formed. Cost: about three forward passes worth per batch.
- ``L`` is the mean of ``loss_fn`` over a seeded random subset of
  ``num_samples`` images of ``split`` (default: training set); the measured
  midpoint barrier is computed on the same subset with the same loss, so the
  two numbers are directly comparable.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import check_device, check_int, check_module
from ..evaluate import module_mode
from ..limits import MAX_BATCH, MAX_SAMPLES
from ..perm import PermutationSpec
from ..states import check_compatible
from ..tied import drop_tied

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def taylor_midpoint(
    model: nn.Module,
    spec: PermutationSpec | None,
    sd_a: Mapping[str, torch.Tensor],
    sd_b_permuted: Mapping[str, torch.Tensor],
    dataset,
    num_samples: int = 10000,
    seed: int = 0,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    loss_fn: LossFn | None = None,
    split: str = "train",
) -> dict[str, Any]:
    """Taylor estimate ``-(1/8) Delta^T H Delta`` beside the measured midpoint barrier.

    Parameters
    ----------
    model: module of the architecture (only its structure is used; not modified).
    spec: permutation spec (used to check both states fit; may be ``None``).
    sd_a: ``theta_a``.  sd_b_permuted: ``pi(theta_b)`` (already permuted).
    dataset: a :class:`lmckit.data.Dataset`.
    num_samples: size of the seeded subset of ``split`` (capped at the split size).
    loss_fn: ``(outputs, labels) -> per-sample losses`` (default cross-entropy).

    Returns
    -------
    dict with ``taylor_midpoint``, ``measured_midpoint``, ``loss_a``, ``loss_b``,
    ``loss_mid``, ``dHd`` (``Delta^T H Delta``), ``delta_norm``, ``num_samples``,
    ``seconds``.
    """
    t0 = time.perf_counter()
    check_module(model)
    check_compatible([sd_a, sd_b_permuted], ["model A", "model B"])
    if spec is not None:
        spec.check_state(sd_a, "model A")
        spec.check_state(sd_b_permuted, "model B")
    num_samples = check_int(num_samples, "num_samples", 1, MAX_SAMPLES)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_BATCH)
    seed = check_int(seed, "seed")
    loss_fn = loss_fn or _cross_entropy
    dev = check_device(device) if device is not None else next(model.parameters()).device
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    # clone: train-mode BatchNorm updates running statistics in place
    state_a = {k: v.detach().to(dev).clone() for k, v in sd_a.items()}
    state_b = {k: v.detach().to(dev).clone() for k, v in sd_b_permuted.items()}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    state_m = {k: (torch.lerp(a, state_b[k], 0.5) if a.is_floating_point() else a) for k, a in state_a.items()}
    delta = {k: state_a[k] - state_b[k] for k in trainable}
    dtype = state_a[trainable[0]].dtype if trainable else torch.float32

    n_all = dataset.size(split)
    n = min(int(num_samples), n_all)
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = dataset.on_device(split, dev)  # the split held on the device: no per-batch host copy
    idx = idx.to(images.device)
    n_t = n * int(labels[0].numel()) if n else 1  # targets: one per image, T per window of a language model

    def batches():
        for s in range(0, n, batch_size):
            j = idx[s : s + batch_size]
            x = dataset.normalize(images[j])
            yield (x.to(dtype) if x.is_floating_point() else x), labels[j]  # token ids stay integers

    with module_mode(model, train=has_bn):

        def mean_loss(state: Mapping[str, torch.Tensor]) -> float:
            tot = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device, read once
            with torch.no_grad():
                for x, y in batches():
                    tot += loss_fn(torch.func.functional_call(model, drop_tied(model, state), (x,)), y).sum().double()
            return float(tot) / n_t

        loss_a, loss_b, loss_m = mean_loss(state_a), mean_loss(state_b), mean_loss(state_m)
        quad_t = torch.zeros((), dtype=torch.float64, device=dev)
        # the fused attention kernels (flash / memory-efficient) have no double backward: the
        # Hessian-vector product of a transformer needs the plain math kernel
        with sdpa_kernel(SDPBackend.MATH):
            quad_t = _quad_form(batches(), model, state_m, trainable, delta, loss_fn, n_t, quad_t)
        quad = float(quad_t)
    dnorm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))) if delta else 0.0
    return {
        "taylor_midpoint": -quad / 8.0,
        "measured_midpoint": loss_m - 0.5 * (loss_a + loss_b),
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_mid": loss_m,
        "dHd": quad,
        "delta_norm": dnorm,
        "num_samples": n,
        "split": split,
        "seed": seed,
        "bn_batch_statistics": has_bn,
        "seconds": time.perf_counter() - t0,
    }


def _quad_form(batches, model, state_m, trainable, delta, loss_fn, n, quad_t):
    """Accumulate ``Delta^T H Delta`` over ``batches`` by Hessian-vector products at the midpoint."""
    for x, y in batches:
        params = {k: state_m[k].clone().requires_grad_(True) for k in trainable}
        full = {**state_m, **params}
        loss = loss_fn(torch.func.functional_call(model, drop_tied(model, full), (x,)), y).sum() / n
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        g_dot_d = sum((g * delta[k]).sum() for g, k in zip(grads, params) if g is not None)
        if not isinstance(g_dot_d, torch.Tensor) or not g_dot_d.requires_grad:
            continue  # the loss is linear (or constant) in the parameters on this batch: no curvature
        hv = torch.autograd.grad(g_dot_d, list(params.values()), allow_unused=True)
        hd = sum((h * delta[k]).sum() for h, k in zip(hv, params) if h is not None)
        quad_t += hd.double() if isinstance(hd, torch.Tensor) else float(hd)
    return quad_t
