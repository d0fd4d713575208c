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

Groups without a site module (attention Q/K and V/O features, recurrent
hidden states, blocks of concatenated or padded streams) are read where they
are produced: the output rows of the Linear/Conv whose ``weight`` rows the
group moves (the segment of a block axis: the group's channels only; a group
moving whole blocks of features, such as rotary-embedded Q/K heads, is read
with each within-block position as one sample), the
query/key/value projections of ``nn.MultiheadAttention`` computed from its
input (a Q/K unit pools its query and key activations), and each layer's
output sequence of ``nn.LSTM``/``nn.GRU`` (token axes are samples).

Then ``p_g = argmax_p sum_i M_g[i, p[i]]``, one linear assignment problem per
group; groups under a head structure are matched per head pair and then per
head, exactly as in weight matching (:func:`lmckit.match.weight._solve_heads`
on the members' similarity matrices) (no coordinate descent: each group's statistics do not depend on the
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

from ..checks import check_int, check_module, check_real
from ..device import resolve_device
from ..errors import LmcError
from ..evaluate import module_mode
from ..limits import MAX_BATCH, MAX_BATCHES
from ..perm import spec_for, uses_export
from ..perm.spec import PermutationSpec, entry_segments, is_segmented, warn_low_coverage
from .result import MatchResult
from .weight import _lap, _solve_heads, check_finite

METHODS = ("pearson", "cross_moment")


def resolve_sites(
    model: nn.Module,
    spec: PermutationSpec,
    sites: Mapping[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
) -> dict[str, list[str]]:
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
                raise LmcError(
                    f"activation site for group {g!r} is neither a module name nor a submodule of the model: {it!r}"
                )
        return out

    raw_sites: Mapping[str, Any] | None = sites
    if raw_sites is None and hasattr(model, "hidden_modules"):
        raw_sites = model.hidden_modules()
    if raw_sites is None and uses_export(model):  # an ATen graph has no modules: read groups where produced
        raw_sites = {g: [] for g in spec.sizes}
    if raw_sites is None:
        try:
            from ..perm import trace  # noqa: WPS433
        except ImportError:
            trace = None
        fn = getattr(trace, "activation_sites", None) if trace is not None else None
        if fn is None:
            raise LmcError(
                f"{type(model).__name__} does not say where its hidden activations are",
                "pass sites={group: [module names]} (CLI: use --method weight)",
            )
        raw_sites = fn(model, example_input)
    out = {g: as_names(v, g) for g, v in raw_sites.items()}
    unknown = [g for g in out if g not in spec.sizes]
    derived = set(derived_sources(model, spec)) if sites is None else set()
    missing = [g for g in spec.sizes if (g not in out or not out[g]) and g not in derived]
    if unknown:
        raise LmcError(
            f"activation sites name groups the permutation spec does not have: {unknown[:4]}",
            f"the spec's groups are {list(spec.sizes)[:6]}",
        )
    if missing:
        raise LmcError(
            f"no activation site for permutation groups {missing[:4]}; activation matching cannot align them",
            "pass sites for every group, or use weight matching",
        )
    mods = dict(model.named_modules())
    for g, lst in out.items():
        for n in lst:
            if n not in mods:
                raise LmcError(f"activation site {n!r} (group {g!r}) is not a module of the model")
    return out


def _rows_segment(entry: Any, group: str, sizes: Mapping[str, int]) -> list[tuple[int, int]] | None:
    """``(offset, n)`` of every block of ``group`` on an axis (``None`` if the group has runs of entries)."""
    out = []
    for g, n, inner, off in entry_segments(entry, None, sizes):
        if g == group:
            if inner != 1:
                return None
            out.append((off, n))
    return out


def derived_sources(model: nn.Module, spec: PermutationSpec) -> dict[str, list[tuple[str, Any]]]:
    """Group -> ``(module name, extractor)`` pairs reading the group's units where they are produced.

    ``extractor(module, inputs, output)`` returns a list of ``(samples, n_units)``
    tensors. See the module docstring for which layers are read.
    """
    out: dict[str, list[tuple[str, Any]]] = {}
    sizes = spec.sizes
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and f"{name}.in_proj_weight" in spec.axes:
            entry = spec.axes[f"{name}.in_proj_weight"][0]
            if not is_segmented(entry):
                continue
            for g, _, _, _ in entry_segments(entry, None, sizes):
                if g is None or g in out:
                    continue
                segs = _rows_segment(entry, g, sizes)
                if segs:
                    out[g] = [(name, _mha_extractor(segs))]
        elif isinstance(m, (nn.LSTM, nn.GRU)):
            for layer in range(m.num_layers):
                e = spec.axes.get(f"{name}.weight_hh_l{layer}", (None, None))[1]
                if isinstance(e, str) and e not in out:
                    out[e] = [(name, _rnn_extractor(layer))]
        elif (
            isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_transposed_linear(m)
        ) and f"{name}.weight" in spec.axes:
            # transposed linear layers (Hugging Face's Conv1D, weight (in, out)) move their units on axis 1
            entry = spec.axes[f"{name}.weight"][1 if _is_transposed_linear(m) else 0]
            axis = -1 if isinstance(m, nn.Linear) or _is_transposed_linear(m) else 1
            for g in [entry] if isinstance(entry, str) else [x for x, _, _ in entry] if is_segmented(entry) else []:
                if g is None or g in out:
                    continue
                segs = [(0, sizes[g])] if isinstance(entry, str) else _rows_segment(entry, g, sizes)
                if segs:
                    out[g] = [(name, _output_extractor(axis, segs))]
                elif is_segmented(entry) and axis == -1:  # whole blocks (heads whose features are pinned)
                    blocks = [(o, n, k) for x, n, k, o in entry_segments(entry, None, sizes) if x == g]
                    out[g] = [(name, _block_extractor(blocks))]
    return out


def _is_transposed_linear(m: nn.Module) -> bool:
    """``y = x W + b`` with ``W`` stored ``(in, out)`` and ``nf`` output features (``transformers``' Conv1D)."""
    w = getattr(m, "weight", None)
    return (
        not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.shape[1] == m.nf
    )


def _take(t: torch.Tensor, axis: int, segs: list[tuple[int, int]]) -> list[torch.Tensor]:
    flat = t.movedim(axis, -1)
    flat = flat.reshape(-1, flat.shape[-1])
    return [flat[:, o : o + n] for o, n in segs]


def _output_extractor(axis: int, segs: list[tuple[int, int]]):
    def fn(_m, _inputs, output):
        return _take(output, axis, segs)

    return fn


def _block_extractor(blocks: list[tuple[int, int, int]]):
    """Units that own runs of ``inner`` features (``(offset, n, inner)``): feature ``r`` of every unit is one
    sample, so two units' similarity sums the products of their features position by position (the
    features inside a block never move, e.g. rotary-embedded query/key heads)."""

    def fn(_m, _inputs, output):
        flat = output.reshape(-1, output.shape[-1])
        return [flat[:, o : o + n * k].reshape(-1, n, k).transpose(1, 2).reshape(-1, n) for o, n, k in blocks]

    return fn


def _mha_extractor(segs: list[tuple[int, int]]):
    def fn(m, inputs, _output):
        q = inputs[0]
        proj = torch.nn.functional.linear(q, m.in_proj_weight, m.in_proj_bias)
        parts = _take(proj, -1, segs)
        return [torch.cat(parts, 0)] if len(parts) > 1 else parts  # a Q/K unit pools its query and key samples

    return fn


def _rnn_extractor(layer: int):
    def fn(m, inputs, output):
        if layer == m.num_layers - 1:
            seq = output[0]
        else:  # intermediate layers: rerun the stack one layer at a time (same weights)
            seq = inputs[0]
            for lyr in range(layer + 1):
                single = type(m)(seq.shape[-1], m.hidden_size, 1, bias=m.bias, batch_first=m.batch_first).to(
                    seq.device, seq.dtype
                )
                with torch.no_grad():
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        if hasattr(m, f"{kind}_l{lyr}"):
                            getattr(single, f"{kind}_l0").copy_(getattr(m, f"{kind}_l{lyr}"))
                seq = single(seq)[0]
        return [seq.reshape(-1, seq.shape[-1])]

    return fn


class _Recorder:
    """Forward hooks collecting each site module's outputs (and derived group features) during one forward pass."""

    def __init__(self, model: nn.Module, names: set[str], derived: Mapping[str, list[tuple[str, Any]]] | None = None):
        mods = dict(model.named_modules())
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]
        self.derived: dict[str, list[torch.Tensor]] = {}
        for g, lst in (derived or {}).items():
            self.derived[g] = []
            for n, fn in lst:
                self.handles.append(mods[n].register_forward_hook(self._dhook(g, fn)))

    def _dhook(self, group: str, fn):
        def hook(module, inputs, output):
            self.derived[group].extend(x.detach() for x in fn(module, inputs, output))

        return hook

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name].append(output.detach())

        return hook

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()
        for v in self.derived.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _features(outputs: list[torch.Tensor], n_units: int, group: str, site: str) -> list[torch.Tensor]:
    feats = []
    for out in outputs:
        if out.dim() < 2 or out.shape[1] != n_units:
            raise LmcError(
                f"activation site {site!r} of group {group!r} outputs shape {tuple(out.shape)}; "
                f"expected {n_units} units on axis 1",
                "the site does not carry this group's units; pass sites= explicitly",
            )
        feats.append(out.movedim(1, -1).reshape(-1, n_units))
    return feats


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    dataset,
    spec: PermutationSpec | None = None,
    num_batches: int | None = 10,
    batch_size: int = 500,
    method: str = "pearson",
    seed: int = 0,
    device: torch.device | str | None = None,
    sites: Mapping[str, Any] | None = None,
    split: str = "train",
    eps: float = 1e-8,
    symmetry: str = "permutation",
) -> MatchResult | Any:
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
    symmetry:
        ``"permutation"`` (default, this function as documented above) or a
        larger class (``"signed"``, ``"orthogonal"``; :mod:`lmckit.perm.symmetry`):
        then each group takes the exact step of its class on the cross moment
        ``E[z^a z^b^T]`` (Procrustes per stream, the joint head step per head
        structure; :func:`lmckit.match.symmetric.activation_matching_sym`) and a
        :class:`~lmckit.match.symmetric.SymMatchResult` is returned. Norms must
        be folded in both models for a LayerNorm/RMSNorm stream to take
        orthogonal maps.

    Returns
    -------
    MatchResult
        ``objective = [sum_g trace(M_g), sum_g sum_i M_g[i, p_g[i]]]`` (identity,
        matched), ``sweeps=1``, ``method="activation"``; ``extra`` has the
        similarity, sample counts and the mean matched similarity per group.
    """
    t0 = time.perf_counter()
    if symmetry != "permutation":
        from ..perm.symmetry import derive_symmetry

        sym_a = derive_symmetry(spec or spec_for(model_a), model_a.state_dict(), symmetry, model=model_a)
    if method not in METHODS:
        raise LmcError(f"unknown activation-matching method {method!r}", f"choose one of {', '.join(METHODS)}")
    check_module(model_a, "model_a")
    check_module(model_b, "model_b")
    if num_batches is not None:
        num_batches = check_int(num_batches, "num_batches", 1, MAX_BATCHES)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_BATCH)
    seed = check_int(seed, "seed")
    eps = check_real(eps, "eps", 0.0)
    if device is None:
        p0 = next(model_a.parameters(), None)
        dev = p0.device if p0 is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    example = None
    if spec is None or (sites is None and not hasattr(model_a, "hidden_modules")):
        example = dataset.tensors(split, limit=2)[0]  # for fx tracing of non-zoo models
    if spec is None:
        spec = spec_for(model_a, example)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    check_finite(sd_a, "model A")
    check_finite(sd_b, "model B")
    warn_low_coverage(spec, "activation matching")
    sites_a = resolve_sites(model_a, spec, sites, example)
    derived_a = {g: v for g, v in derived_sources(model_a, spec).items() if not sites_a.get(g)} if sites is None else {}
    sites_a = {g: v for g, v in sites_a.items() if v}
    ma, mb = _on_device(model_a, dev), _on_device(model_b, dev)
    names = {n for lst in sites_a.values() for n in lst}
    rec_a, rec_b = (
        _Recorder(ma, names, derived_a),
        _Recorder(mb, names, derived_sources(mb, spec) and {g: derived_sources(mb, spec)[g] for g in derived_a}),
    )
    n_units = spec.sizes
    stats: dict[str, dict[str, Any]] = {g: {"n": 0} for g in list(sites_a) + list(derived_a)}
    gen = torch.Generator().manual_seed(int(seed))
    used = 0
    try:
        with torch.no_grad(), module_mode(ma, mb):
            for x, _y in dataset.batches(split, batch_size, shuffle=True, generator=gen, device=dev):
                if num_batches is not None and used >= int(num_batches):
                    break
                rec_a.clear()
                rec_b.clear()
                try:
                    ma(x)
                    mb(x)
                except RuntimeError as e:
                    raise LmcError(
                        f"the models cannot run on dataset {dataset.name!r} ({split} batches of shape "
                        f"{tuple(x.shape)}): {str(e).splitlines()[0]}",
                        "pass the dataset the models were trained on",
                    ) from None
                for g in stats:
                    if g in derived_a:
                        fa = torch.cat(rec_a.derived[g]).double()
                        fb = torch.cat(rec_b.derived[g]).double()
                    else:
                        lst = sites_a[g]
                        fa = torch.cat([f for n in lst for f in _features(rec_a.outputs[n], n_units[g], g, n)]).double()
                        fb = torch.cat([f for n in lst for f in _features(rec_b.outputs[n], n_units[g], g, n)]).double()
                    s = stats[g]
                    if s["n"] == 0:
                        s.update(
                            sa=torch.zeros(n_units[g], dtype=torch.float64, device=dev),
                            sb=torch.zeros_like(fa[0]),
                            saa=torch.zeros_like(fa[0]),
                            sbb=torch.zeros_like(fa[0]),
                            sab=torch.zeros(n_units[g], n_units[g], dtype=torch.float64, device=dev),
                        )
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
    if used == 0:
        raise LmcError(f"dataset {dataset.name!r} split {split!r} gave no batches", "use a non-empty split")
    if symmetry != "permutation":
        from .symmetric import _check_classes, activation_matching_sym

        _check_classes(sym_a, derive_symmetry(spec, sd_b, symmetry, model=model_b))
        cross = {g: (stats[g]["sab"] / float(stats[g]["n"])).cpu() for g in spec.sizes}
        res = activation_matching_sym(spec, sym_a, cross, symmetry)
        res.extra.update(
            seed=int(seed), batches=used, batch_size=int(batch_size), split=split, similarity="cross_moment"
        )
        res.seconds = time.perf_counter() - t0
        return res
    perms: dict[str, torch.Tensor] = {}
    before = after = 0.0
    per_group = {}
    sims = {g: _similarity(stats[g], method, eps).cpu().numpy() for g in spec.sizes}
    cols: dict[str, np.ndarray] = {}
    for _, (h, members) in spec.heads.items():
        for g, col in zip(members, _solve_heads(int(h), [sims[g] for g in members])):
            cols[g] = col
    for g in spec.sizes:
        m = sims[g]
        col = cols[g] if g in cols else _lap(m) if n_units[g] > 1 else np.zeros(1, dtype=np.int64)
        rows = np.arange(len(col))
        b, a = float(np.trace(m)), float(m[rows, col].sum())
        before += b
        after += a
        per_group[g] = a / len(col)
        perms[g] = torch.as_tensor(col, dtype=torch.long)
    extra = {
        "similarity": method,
        "seed": int(seed),
        "batches": used,
        "batch_size": int(batch_size),
        "split": split,
        "samples": {g: int(stats[g]["n"]) for g in spec.sizes},
        "mean_matched_similarity": per_group,
        "device": str(dev),
    }
    return MatchResult(
        perms=perms,
        objective=[before, after],
        sweeps=1,
        seconds=time.perf_counter() - t0,
        method="activation",
        converged=True,
        extra=extra,
    )


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
