"""Projections of layer inputs onto right-singular vectors (docs/definitions.md, Claim 4).

For a layer ``W = sum_i sigma_i u_i v_i^T`` and its input vectors ``z`` over
training data, we report

    p_i = mean_z |v_i . z|       for each singular index i (sorted by sigma_i),

beside the same quantity for ``r`` random unit directions ``d_j`` (a seeded
Gaussian baseline: for inputs spread evenly over all directions the two
would match). Inputs concentrating on the top singular directions show as
``p_i`` falling with ``i`` and ``p_top >> p_random``.

The input vector of a linear layer is its input row (``(N, ..., in)``
flattened to rows). For a conv layer it is the unfolded ``in*k*k`` patch at
each output position (``torch.nn.functional.unfold`` with the layer's
kernel size, dilation, padding and stride), matching the ``out x (in*k*k)``
reading of the kernel; when a batch has more than ``max_positions`` patch
vectors a seeded random subset is used. The forward passes run in eval mode
(BatchNorm uses its stored statistics) through
``torch.func.functional_call`` so the caller's model keeps its weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_device, check_int, check_module
from ..evaluate import module_mode
from ..limits import MAX_BATCH, MAX_BATCHES
from ..perm import PermutationSpec
from ..perm.spec import check_spec
from .layers import layers_of
from .svd import SVDs, layer_svd


def input_projections(
    model: nn.Module,
    spec: PermutationSpec,
    sd: Mapping[str, torch.Tensor],
    dataset,
    num_batches: int = 4,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    split: str = "train",
    max_positions: int = 4096,
    seed: int = 0,
    svds: SVDs | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean ``|v_i . z|`` of each layer's inputs ``z`` against singular index ``i``.

    Parameters
    ----------
    model: module of the architecture (its weights are not used or changed).
    spec: its permutation spec (defines the layers).
    sd: the weights to analyse.
    dataset: a :class:`lmckit.data.Dataset`; ``num_batches`` seeded random
        batches of ``batch_size`` images of ``split`` are used.
    svds: precomputed :func:`~lmckit.analysis.svd.state_svds` of ``sd`` (optional).
    max_positions: per batch and conv layer, at most this many patch vectors.
    seed: the batches are ``dataset.batches(split, batch_size, shuffle=True)`` with a generator
        seeded ``seed``; the position subsample and random directions use ``seed + 1``.

    Returns
    -------
    layer name -> ``{"sigma", "mean_abs", "mean_sq", "random_mean_abs"}``
    (lists, length ``r``; ``mean_sq`` is mean ``(v_i . z)^2``) plus ``"mean_norm"`` (mean ``||z||``) and
    ``"count"`` (vectors used). Layers that are not ``nn.Linear`` / ungrouped ``nn.Conv2d`` / Hugging Face
    ``Conv1D`` (GPT-2; its weight is stored ``(in, out)``, so its inputs are projected on the stored
    matrix's left singular vectors) are skipped, as are the row / column blocks of fused weights.
    """
    check_module(model)
    check_spec(spec)
    spec.check_state(sd, "sd")
    num_batches = check_int(num_batches, "num_batches", 1, MAX_BATCHES)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_BATCH)
    max_positions = check_int(max_positions, "max_positions", 1)
    seed = check_int(seed, "seed")
    dev = check_device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + 1)  # random directions and position subsample
    targets: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for layer in layers_of(spec, sd):
        try:
            mod = model.get_submodule(layer.name)
        except AttributeError:
            continue
        # Hugging Face's Conv1D (GPT-2) stores W^T, (in, out): its inputs meet the LEFT singular vectors
        conv1d = type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2
        if not (
            isinstance(mod, nn.Linear)
            or conv1d
            or (
                isinstance(mod, nn.Conv2d)
                and mod.groups == 1
                and mod.padding_mode == "zeros"
                and isinstance(mod.padding, tuple)
            )
        ):
            continue
        if layer.split or layer.col_split:
            continue
        u, s, v = svds[layer.name] if svds is not None else layer_svd(sd[layer.key])
        if conv1d:
            v = u
        rnd = torch.randn(v.shape[0], v.shape[1], generator=gen, dtype=torch.float64)
        rnd = rnd / rnd.norm(dim=0, keepdim=True)
        targets[layer.name] = (mod, s.float(), v.float().to(dev), rnd.float().to(dev))
    acc = {
        n: {
            "abs": torch.zeros(t[2].shape[1], device=dev),
            "sq": torch.zeros(t[2].shape[1], device=dev),
            "rnd": torch.zeros(t[3].shape[1], device=dev),
            "norm": 0.0,
            "count": 0,
        }
        for n, t in targets.items()
    }

    def hook_for(name: str, mod: nn.Module):
        _, _, v, rnd = targets[name]

        def hook(_m, inputs, _out):
            x = inputs[0].detach()
            if isinstance(mod, nn.Conv2d):
                z = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                z = z.transpose(1, 2).reshape(-1, z.shape[1])
                if z.shape[0] > max_positions:
                    idx = torch.randperm(z.shape[0], generator=gen)[:max_positions].to(z.device)
                    z = z.index_select(0, idx)
            else:
                z = x.reshape(-1, x.shape[-1])
            z = z.to(v.dtype)
            a = acc[name]
            zv = z @ v
            a["abs"] += zv.abs().sum(0)
            a["sq"] += (zv**2).sum(0)
            a["rnd"] += (z @ rnd).abs().sum(0)
            a["norm"] += z.norm(dim=1).sum().double()  # a device scalar, read once at the end
            a["count"] += int(z.shape[0])

        return hook

    handles = [t[0].register_forward_hook(hook_for(n, t[0])) for n, t in targets.items()]
    # tied tensors (a language model's embedding and output layer) are passed once: functional_call ties them
    seen, tied = {}, set()
    for k, v in model.state_dict().items():
        if v.numel() and seen.setdefault((v.data_ptr(), tuple(v.shape)), k) != k:
            tied.add(k)
    params = {k: t.to(dev) for k, t in sd.items() if k not in tied}
    try:
        with torch.no_grad(), module_mode(model):
            batches = dataset.batches(
                split, batch_size, shuffle=True, device=dev, generator=torch.Generator().manual_seed(seed)
            )
            for i, (x, _y) in enumerate(batches):
                if i >= num_batches:
                    break
                torch.func.functional_call(model, params, (x,))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for name, a in acc.items():
        n = max(a["count"], 1)
        out[name] = {
            "sigma": targets[name][1].tolist(),
            "mean_abs": (a["abs"] / n).cpu().tolist(),
            "mean_sq": (a["sq"] / n).cpu().tolist(),
            "random_mean_abs": (a["rnd"] / n).cpu().tolist(),
            "mean_norm": float(a["norm"]) / n,
            "count": a["count"],
        }
    return out


def projection_summary(proj: Mapping[str, Mapping[str, Any]], top_fraction: float = 0.1) -> list[dict[str, Any]]:
    """Per layer: mean ``|v_i . z|`` over the top ``top_fraction`` of indices, over the bottom half,
    over random directions, and ``top / random``."""
    rows = []
    for name, d in proj.items():
        m = torch.tensor(d["mean_abs"])
        r = len(m)
        if r == 0:
            continue
        k = max(1, int(round(top_fraction * r)))
        top, bottom = float(m[:k].mean()), float(m[r // 2 :].mean()) if r > 1 else float(m.mean())
        rnd = float(torch.tensor(d["random_mean_abs"]).mean())
        rows.append(
            {
                "name": name,
                "rank": r,
                "top_k": k,
                "top_mean": top,
                "bottom_half_mean": bottom,
                "random_mean": rnd,
                "top_over_random": top / rnd if rnd > 0 else float("inf"),
                "mean_norm": d["mean_norm"],
            }
        )
    return rows
