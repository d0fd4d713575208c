"""Folding LayerNorm / RMSNorm gains and biases into the Linear layers they feed (:func:`fold_norms`).

Part of :mod:`lmckit.perm.symmetry`: the orthogonal classes require a norm's gain 1 and bias 0 (then the norm
is invariant under the class); folding makes them so without changing the function.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

__all__ = ["fold_norms", "fold_states"]


def fold_norms(model: nn.Module, example_input: Any = None) -> tuple[nn.Module, list[str], list[str]]:
    """A copy of ``model`` with every LayerNorm/RMSNorm gain and bias folded into the Linear layers it feeds.

    ``Linear(g * n(x) + beta) = (W diag(g)) n(x) + (W beta + b)``: the reader's
    weight takes ``W diag(g)``, its bias ``b + W beta``, the norm's gain becomes
    1 and its bias 0, so the function is unchanged (exactly, up to rounding)
    and an orthogonal map of the stream no longer has to move the gain. A norm
    is folded when every user of its output in the ``torch.fx`` graph is an
    ``nn.Linear`` or a self-attention ``nn.MultiheadAttention`` (query, key and
    value all the norm's output) with a bias where ``beta != 0``; shape queries
    and, given ``example_input``, token indexing that keeps the feature axis
    (``y[:, 0]``) between the norm and its reader are seen through.

    Returns ``(folded copy, folded norm names, skipped: one line each naming
    the norm and why)``. The model itself is never modified. A model fx
    cannot trace folds nothing (one skipped line says why).
    """
    import torch.fx as fx

    new = copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(new)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot fold", said in the skip line
        return new, [], [f"cannot fold norms: torch.fx could not trace {type(model).__name__} ({type(e).__name__})"]
    if example_input is not None:  # shapes let token indexing (y[:, 0]) between a norm and its reader be seen through
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input.to(next(iter(new.parameters())).dtype))
        except Exception:  # noqa: BLE001 - without shapes, indexing is simply not seen through
            pass
    folded, skipped = [], []
    norm_types = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        norm = new.get_submodule(str(node.target))
        if not isinstance(norm, norm_types) or getattr(norm, "weight", None) is None:
            continue
        name = str(node.target)
        if len(norm.normalized_shape) != 1:
            skipped.append(f"{name}: normalises {len(norm.normalized_shape)} axes")
            continue
        beta = getattr(norm, "bias", None)
        readers, why = [], None
        users = list(node.users)
        while users:
            u = users.pop()
            if _is_shape_query(u):
                continue
            if _keeps_last_axis(u, node):  # token indexing (``y[:, 0]``): the reader sees the same features
                users.extend(u.users)
                continue
            m = new.get_submodule(str(u.target)) if u.op == "call_module" else None
            if isinstance(m, nn.Linear) and u.args and u.args[0] in _chain(u.args[0], node):
                if beta is not None and m.bias is None and bool((beta != 0).any()):
                    why = f"reader {u.target!r} has no bias to take the norm's bias"
                readers.append(("linear", m))
            elif isinstance(m, nn.MultiheadAttention) and len(u.args) >= 3 and u.args[0] is u.args[1] is u.args[2]:
                if beta is not None and m.in_proj_bias is None and bool((beta != 0).any()):
                    why = f"reader {u.target!r} has no bias to take the norm's bias"
                readers.append(("mha", m))
            else:
                why = f"its output feeds {u.op} {u.target!s} (only Linear / self-attention readers can absorb it)"
        if why or not readers:
            skipped.append(f"{name}: {why or 'no reader'}")
            continue
        with torch.no_grad():
            g = norm.weight.detach().clone()
            b0 = beta.detach().clone() if beta is not None else None
            for kind, m in readers:
                w = m.weight if kind == "linear" else m.in_proj_weight
                bias = m.bias if kind == "linear" else m.in_proj_bias
                if b0 is not None and bias is not None:
                    bias.copy_((bias.double() + w.double() @ b0.double()).to(bias.dtype))
                w.copy_((w.double() * g.double()[None, :]).to(w.dtype))
            norm.weight.fill_(1.0)
            if beta is not None:
                beta.zero_()
        folded.append(name)
    return new, folded, skipped


def _is_shape_query(u: Any) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: reads no values."""
    if u.op == "call_function" and getattr(u.target, "__name__", "") == "getattr":
        return len(u.args) > 1 and u.args[1] in ("shape", "ndim", "dtype", "device")
    return u.op == "call_method" and u.target in ("size", "dim")


def _keeps_last_axis(u: Any, src: Any) -> bool:
    """``src[idx]`` with ``idx`` a tuple of ints/slices, no Ellipsis/None/tensors, shorter than ``src``'s rank."""
    if u.op != "call_function" or getattr(u.target, "__name__", "") != "getitem" or u.args[0] is not src:
        return False
    idx = u.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(i, (int, slice)) for i in idx):
        return False
    tm = src.meta.get("tensor_meta")
    return tm is not None and len(idx) < len(tm.shape)


def _chain(arg: Any, node: Any) -> set:
    """``{arg}`` when ``arg`` is ``node`` or reached from it by last-axis-keeping indexing only."""
    x = arg
    while x is not node and getattr(x, "op", None) == "call_function" and _keeps_last_axis(x, x.args[0]):
        x = x.args[0]
    return {arg} if x is node else set()


def fold_states(model: nn.Module, states: Any) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[str]]:
    """Each state dict of ``model``'s architecture with its norms folded (:func:`fold_norms`), on the CPU.

    Returns ``(model 0 folded: a template for the spec and the symmetry derivation, the folded states, the names
    of the folded norms)``. The function of every model is unchanged (up to rounding); neither ``model`` nor
    the states are modified.
    """
    out: list[dict[str, torch.Tensor]] = []
    first, names = None, []
    for sd in states:
        m = copy.deepcopy(model).cpu()
        m.load_state_dict(dict(sd))
        folded, folded_names, _ = fold_norms(m)
        if first is None:
            first, names = folded, folded_names
        out.append({k: v.detach().clone() for k, v in folded.state_dict().items()})
    return first, out, names
