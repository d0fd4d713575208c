"""Activation matching (AM): align hidden units by the correlation of their activations.

For every permutation group ``g`` the activations ``z^a_i`` of model A's unit
``i`` and ``z^b_j`` of model B's unit ``j`` are collected over training data
at the group's sites (the modules of ``model.hidden_modules()``; a conv
output contributes one sample per image *and* spatial position, channel axis
1; a residual stream with several sites pools the samples of all of them).
With ``E`` the mean over samples:

- ``method="pearson"`` (default):
  ``M_g[i, j] = (E[z^a_i z^b_j] - E[z^a_i] E[z^b_j]) / (s^a_i s^b_j + eps)``,
  ``s`` the standard deviations (Ainsworth et al. 2023, Sec. 3.1; Li et al. 2015);
- ``method="cross_moment"``: ``M_g[i, j] = E[z^a_i z^b_j]``.

Then ``p_g = argmax_p sum_i M_g[i, p[i]]``, one linear assignment problem per
group (no coordinate descent: each group's statistics do not depend on the
other groups' permutations). Statistics are accumulated for all groups at once
in one forward pass per model per batch (sums, sums of squares and cross
products in float64). Models are evaluated in eval mode (BatchNorm uses its
running statistics) without gradients and are left as they were.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..errors import LmcError
from ..perm.spec import PermutationSpec
from .result import MatchResult
from .weight import _lap, check_finite

METHODS = ("pearson", "cross_moment")


def resolve_sites(model: nn.Module, spec: PermutationSpec, sites: Mapping[str, Any] | None = None,
                  example_input: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Group -> names of the modules whose outputs carry that group's units.

    ``sites`` (group -> module name or list of names) overrides; otherwise
    ``model.hidden_modules()`` (zoo models), otherwise
    ``lmckit.perm.trace.activation_sites(model, example_input)`` (fx tracing).
    """
    names = {id(m): n for n, m in model.named_modules()}

    def as_names(raw: Any, g: str) -> list[str]:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        out = []
        for it in items:
            if isinstance(it, str):
                out.append(it)
            elif isinstance(it, nn.Module) and id(it) in names:
                out.append(names[id(it)])
            else:
                raise LmcError(f"activation site for group {g!r} is neither a module name nor a submodule of the model: {it!r}")
        return out

    raw_sites: Mapping[str, Any] | None = sites
    if raw_sites is None and hasattr(model, "hidden_modules"):
        raw_sites = model.hidden_modules()
    if raw_sites is None:
        try:
            from ..perm import trace  # noqa: WPS433
        except ImportError:
            trace = None
        fn = getattr(trace, "activation_sites", None) if trace is not None else None
        if fn is None:
            raise LmcError(f"{type(model).__name__} does not say where its hidden activations are",
                           "pass sites={group: [module names]} (CLI: use --method weight)")
        raw_sites = fn(model, example_input)
    out = {g: as_names(v, g) for g, v in raw_sites.items()}
    unknown = [g for g in out if g not in spec.sizes]
    missing = [g for g in spec.sizes if g not in out or not out[g]]
    if unknown:
        raise LmcError(f"activation sites name groups the permutation spec does not have: {unknown[:4]}",
                       f"the spec's groups are {list(spec.sizes)[:6]}")
    if missing:
        raise LmcError(f"no activation site for permutation groups {missing[:4]}; activation matching cannot align them",
                       "pass sites for every group, or use weight matching")
    mods = dict(model.named_modules())
    for g, lst in out.items():
        for n in lst:
            if n not in mods:
                raise LmcError(f"activation site {n!r} (group {g!r}) is not a module of the model")
    return out


class _Recorder:
    """Forward hooks collecting each site module's outputs during one forward pass."""

    def __init__(self, model: nn.Module, names: set[str]):
        mods = dict(model.named_modules())
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name].append(output.detach())

        return hook

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _features(outputs: list[torch.Tensor], n_units: int, group: str, site: str) -> list[torch.Tensor]:
    feats = []
    for out in outputs:
        if out.dim() < 2 or out.shape[1] != n_units:
            raise LmcError(f"activation site {site!r} of group {group!r} outputs shape {tuple(out.shape)}; "
                           f"expected {n_units} units on axis 1",
                           "the site does not carry this group's units; pass sites= explicitly")
        feats.append(out.movedim(1, -1).reshape(-1, n_units))
    return feats


def activation_matching(model_a: nn.Module, model_b: nn.Module, dataset, spec: PermutationSpec | None = None,
                        num_batches: int | None = 10, batch_size: int = 500, method: str = "pearson", seed: int = 0,
                        device: torch.device | str | None = None, sites: Mapping[str, Any] | None = None,
                        split: str = "train", eps: float = 1e-8) -> MatchResult:
    """Permutations of B's units that maximise the activation similarity to A's.

    Parameters
    ----------
    model_a, model_b:
        Two models of one architecture (not modified; temporarily set to eval mode).
    dataset:
        An :class:`lmckit.data.Dataset`; batches of ``split`` are drawn in a
        seeded random order.
    spec:
        Permutation spec (default ``lmckit.perm.spec_for(model_a)``).
    num_batches, batch_size:
        How much data to use (``num_batches=None``: the whole split).
    method:
        ``"pearson"`` (correlation) or ``"cross_moment"`` (``E[z^a z^b]``).
    seed:
        Seeds the batch order.
    device:
        Where the forward passes run; default the device of ``model_a``.
    sites:
        Optional group -> module name(s) override of ``model.hidden_modules()``.

    Returns
    -------
    MatchResult
        ``objective = [sum_g trace(M_g), sum_g sum_i M_g[i, p_g[i]]]`` (identity,
        matched), ``sweeps=1``, ``method="activation"``; ``extra`` has the
        similarity, sample counts and the mean matched similarity per group.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise LmcError(f"unknown activation-matching method {method!r}", f"choose one of {', '.join(METHODS)}")
    if num_batches is not None and int(num_batches) < 1:
        raise LmcError(f"num_batches must be at least 1, got {num_batches}")
    if device is None:
        p0 = next(model_a.parameters(), None)
        dev = p0.device if p0 is not None else torch.device("cpu")
    else:
        from ..device import resolve_device

        dev = resolve_device(device)
    example = None
    if spec is None or (sites is None and not hasattr(model_a, "hidden_modules")):
        example = dataset.tensors(split, limit=2)[0]  # for fx tracing of non-zoo models
    if spec is None:
        from ..perm import spec_for

        spec = spec_for(model_a, example)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    check_finite(sd_a, "model A")
    check_finite(sd_b, "model B")
    sites_a = resolve_sites(model_a, spec, sites, example)
    ma, mb = _on_device(model_a, dev), _on_device(model_b, dev)
    names = {n for lst in sites_a.values() for n in lst}
    rec_a, rec_b = _Recorder(ma, names), _Recorder(mb, names)
    modes = [(m, m.training) for m in (ma, mb)]
    n_units = spec.sizes
    stats: dict[str, dict[str, Any]] = {g: {"n": 0} for g in sites_a}
    gen = torch.Generator().manual_seed(int(seed))
    used = 0
    try:
        ma.eval()
        mb.eval()
        with torch.no_grad():
            for x, _y in dataset.batches(split, batch_size, shuffle=True, generator=gen, device=dev):
                if num_batches is not None and used >= int(num_batches):
                    break
                rec_a.clear()
                rec_b.clear()
                try:
                    ma(x)
                    mb(x)
                except RuntimeError as e:
                    raise LmcError(f"the models cannot run on dataset {dataset.name!r} ({split} batches of shape "
                                   f"{tuple(x.shape)}): {str(e).splitlines()[0]}",
                                   "pass the dataset the models were trained on") from None
                for g, lst in sites_a.items():
                    fa = torch.cat([f for n in lst for f in _features(rec_a.outputs[n], n_units[g], g, n)]).double()
                    fb = torch.cat([f for n in lst for f in _features(rec_b.outputs[n], n_units[g], g, n)]).double()
                    s = stats[g]
                    if s["n"] == 0:
                        s.update(sa=torch.zeros(n_units[g], dtype=torch.float64, device=dev), sb=torch.zeros_like(fa[0]),
                                 saa=torch.zeros_like(fa[0]), sbb=torch.zeros_like(fa[0]),
                                 sab=torch.zeros(n_units[g], n_units[g], dtype=torch.float64, device=dev))
                    s["n"] += fa.shape[0]
                    s["sa"] += fa.sum(0)
                    s["sb"] += fb.sum(0)
                    s["saa"] += (fa * fa).sum(0)
                    s["sbb"] += (fb * fb).sum(0)
                    s["sab"] += fa.t() @ fb
                used += 1
    finally:
        rec_a.remove()
        rec_b.remove()
        for m, was in modes:
            m.train(was)
    if used == 0:
        raise LmcError(f"dataset {dataset.name!r} split {split!r} gave no batches", "use a non-empty split")
    perms: dict[str, torch.Tensor] = {}
    before = after = 0.0
    per_group = {}
    for g in spec.sizes:
        s = stats[g]
        m = _similarity(s, method, eps).cpu().numpy()
        col = _lap(m) if n_units[g] > 1 else np.zeros(1, dtype=np.int64)
        rows = np.arange(len(col))
        b, a = float(np.trace(m)), float(m[rows, col].sum())
        before += b
        after += a
        per_group[g] = a / len(col)
        perms[g] = torch.as_tensor(col, dtype=torch.long)
    extra = {"similarity": method, "seed": int(seed), "batches": used, "batch_size": int(batch_size), "split": split,
             "samples": {g: int(stats[g]["n"]) for g in spec.sizes}, "mean_matched_similarity": per_group,
             "device": str(dev)}
    return MatchResult(perms=perms, objective=[before, after], sweeps=1, seconds=time.perf_counter() - t0,
                       method="activation", converged=True, extra=extra)


def _similarity(s: Mapping[str, Any], method: str, eps: float) -> torch.Tensor:
    n = float(s["n"])
    mab = s["sab"] / n
    if method == "cross_moment":
        return mab
    ma, mb = s["sa"] / n, s["sb"] / n
    cov = mab - torch.outer(ma, mb)
    sd_a = (s["saa"] / n - ma * ma).clamp_min(0).sqrt()
    sd_b = (s["sbb"] / n - mb * mb).clamp_min(0).sqrt()
    return cov / (torch.outer(sd_a, sd_b) + eps)


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``dev``, else a moved copy (the caller's model is untouched)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device == dev for t in tensors):
        return model
    return copy.deepcopy(model).to(dev)
