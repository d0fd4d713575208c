"""Op rules: reshapes, flattening, attention-head splits and merges, transposes and permutes.

A unit axis survives a reshape iff some output axis has its size and the same prefix product (``flatten`` of
a ``C x 1 x 1`` map does, of a ``C x H x W`` map with ``H*W > 1`` does not: that gives a block stream, unit
``i`` owning the run ``i*H*W ...``). A ``view``/``reshape`` splitting a unit axis into ``(H, d)`` makes a
head-structured stream (a head axis carrying a plain permutation of the heads, a within-head axis carrying
one permutation per head, which must travel with its head axis); ``(3, H, d)`` (timm's fused ``qkv``) cuts
the stream into three such streams, picked apart by ``unbind`` or indexing (:mod:`lmckit.perm.rules.cat_split`);
reshaping ``(H, d)`` back gives the flat stream again. Transposes and permutes move the axes' streams.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..trace_core import TracerCore, _op_name, _prod, op_rule

_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "unflatten",
    "view_as",
    "reshape_as",
    "squeeze_",
    "unsqueeze_",
}
_TRANSPOSE_FUNCS = {torch.transpose, torch.swapaxes, torch.swapdims}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}


# --------------------------------------------------------------------------- helpers
def reshape(tr: TracerCore, node: fx.Node, src: Any) -> dict[int, int]:
    """A unit axis survives a reshape iff some output axis has its size and the same prefix product.

    Row-major layout: element ``(pre, c, post)`` sits at ``pre*C*POST + c*POST + post``;
    an output axis ``j`` with ``prod(out[:j]) == prod(in[:d])`` and ``out[j] == C``
    has the same offsets, so the units keep their axis (flatten of ``C x 1 x 1``). Otherwise, in
    order: a head axis and its within-head axis merge back into one unit axis; a unit axis splits
    into (projections, heads, head dim) or (heads, head dim); a unit axis merges with the axes after
    it into blocks; else its units are pinned.
    """
    in_shape, out_shape = tr.shape(src), tr.shape(node)
    if in_shape is None or out_shape is None:
        return tr.opaque(node)
    inf = tr.tinfo(src)
    out, done = _merge_heads(tr, inf, in_shape, out_shape)
    for d, e in inf.items():
        if d in done:
            continue
        pre, c = _prod(in_shape[:d]), in_shape[d]
        j = next((j for j in range(len(out_shape)) if out_shape[j] == c and _prod(out_shape[:j]) == pre), None)
        if j is not None:
            out[j] = e
            continue
        if tr.w_partner.get(e) is None:
            split = _split_projections(tr, node, e, pre, c, out_shape) or _split_heads(tr, e, pre, c, out_shape)
            if split:
                out.update(split)
                continue
        blocks = _flatten_blocks(tr, node, src, e, d, pre, c, in_shape, out_shape)
        if blocks:
            out.update(blocks)
            continue
        tr.pin(
            e,
            f"{_op_name(node)} at node {node.name!r} reshapes {list(in_shape)} -> {list(out_shape)}, "
            f"mixing the {c} units of axis {d} with other axes (e.g. flattening a feature map "
            f"larger than 1x1 into a Linear)",
        )
    return out


def _merge_heads(
    tr: TracerCore, inf: dict[int, int], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> tuple[dict[int, int], set[int]]:
    """A head axis followed by its within-head axis merged back into one unit axis: ``(out axes, input
    axes consumed)``."""
    out: dict[int, int] = {}
    done: set[int] = set()
    for d, e in inf.items():
        w = inf.get(d + 1)
        if w is not None and tr.w_partner.get(w) is not None and tr.uf.find(tr.w_partner[w]) == tr.uf.find(e):
            pre, n = _prod(in_shape[:d]), in_shape[d] * in_shape[d + 1]
            j = next((j for j in range(len(out_shape)) if out_shape[j] == n and _prod(out_shape[:j]) == pre), None)
            if j is not None:
                f = tr.uf.make()
                tr.extra_sizes[f] = n
                tr.joints.append((f, in_shape[d], in_shape[d + 1], e, w))
                out[j] = f
                done.update((d, d + 1))
    return out, done


def _split_projections(
    tr: TracerCore, node: fx.Node, e: int, pre: int, c: int, out_shape: tuple[int, ...]
) -> dict[int, int] | None:
    """A unit axis split into (projections, heads, head dim): fused q/k/v, one head split per projection."""
    j4 = next(
        (
            j
            for j in range(len(out_shape) - 2)
            if _prod(out_shape[:j]) == pre
            and out_shape[j] * out_shape[j + 1] * out_shape[j + 2] == c
            and out_shape[j] > 1
            and out_shape[j + 1] > 1
            and out_shape[j + 2] > 1
        ),
        None,
    )
    if j4 is None:
        return None
    S, H, dh = out_shape[j4], out_shape[j4 + 1], out_shape[j4 + 2]
    pairs = []
    for i in range(S):
        piece = tr.fresh(H * dh)
        tr.slices.append((e, i * H * dh, (i + 1) * H * dh, piece, f"{_op_name(node)} at node {node.name!r}"))
        eh, ew = tr.uf.make(), tr.uf.make()
        tr.extra_sizes[eh], tr.extra_sizes[ew] = H, dh
        tr.w_partner[ew] = eh
        tr.joints.append((piece, H, dh, eh, ew))
        pairs.append((eh, ew))
    st, ph, pw = tr.uf.make(), tr.uf.make(), tr.uf.make()
    tr.stacks[st] = (ph, pw, pairs)
    tr.stack_src[st] = e
    return {j4: st, j4 + 1: ph, j4 + 2: pw}


def _split_heads(tr: TracerCore, e: int, pre: int, c: int, out_shape: tuple[int, ...]) -> dict[int, int] | None:
    """A unit axis split into (heads, head dim): a head-structured stream."""
    j3 = next(
        (
            j
            for j in range(len(out_shape) - 1)
            if _prod(out_shape[:j]) == pre
            and out_shape[j] * out_shape[j + 1] == c
            and out_shape[j] > 1
            and out_shape[j + 1] > 1
        ),
        None,
    )
    if j3 is None:
        return None
    H, dh = out_shape[j3], out_shape[j3 + 1]
    eh, ew = tr.uf.make(), tr.uf.make()
    tr.extra_sizes[eh], tr.extra_sizes[ew] = H, dh
    tr.w_partner[ew] = eh
    tr.joints.append((e, H, dh, eh, ew))
    return {j3: eh, j3 + 1: ew}


def _flatten_blocks(
    tr: TracerCore,
    node: fx.Node,
    src: Any,
    e: int,
    d: int,
    pre: int,
    c: int,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> dict[int, int] | None:
    """The unit axis merged with the (unit-free) axes after it (flatten of C x H x W): blocks of H*W."""
    j2 = next(
        (
            j
            for j in range(len(out_shape))
            if _prod(out_shape[:j]) == pre
            and out_shape[j] % c == 0
            and any(_prod(in_shape[d:k]) == out_shape[j] for k in range(d + 2, len(in_shape) + 1))
        ),
        None,
    )
    if j2 is None or any(
        dd in tr.tinfo(src) for dd in range(d + 1, len(in_shape)) if _prod(in_shape[d : dd + 1]) <= out_shape[j2]
    ):
        return None
    return {j2: tr.refined([(e, c, out_shape[j2] // c)], f"{_op_name(node)} at node {node.name!r}")}


def transpose(tr: TracerCore, node: fx.Node, src: Any, order: list[int]) -> dict[int, int]:
    """Output axis ``i`` is input axis ``order[i]``."""
    inv = {o: i for i, o in enumerate(order)}
    return {inv[d]: e for d, e in tr.tinfo(src).items()}


def attribute(tr: TracerCore, node: fx.Node) -> Any:
    """``getattr(x, name)``: shape-like attributes are not tensors; ``.T``/``.mT`` transpose."""
    src, attr = node.args[0], node.args[1]
    if node.meta.get("tensor_meta") is None:
        return None  # .shape, .dtype, .device, .ndim ...
    n = len(tr.shape(src) or ())
    if attr == "T":
        return transpose(tr, node, src, list(range(n))[::-1])
    if attr == "mT" and n >= 2:
        return transpose(tr, node, src, list(range(n - 2)) + [n - 1, n - 2])
    if attr in ("data", "real"):
        return dict(tr.tinfo(src))
    return tr.opaque(node)


def swap(tr: TracerCore, node: fx.Node, src: Any, d0: int, d1: int) -> dict[int, int]:
    n = len(tr.shape(src) or ())
    order = list(range(n))
    d0, d1 = d0 % n, d1 % n
    order[d0], order[d1] = order[d1], order[d0]
    return transpose(tr, node, src, order)


# --------------------------------------------------------------------------- rules
@op_rule(*_RESHAPE_FUNCS, *_RESHAPE_METHODS)
def _reshape(tr: TracerCore, node: fx.Node) -> Any:
    return reshape(tr, node, node.args[0] if node.args else None)


@op_rule(*_RESHAPE_MODULES)
def _reshape_module(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    return reshape(tr, node, node.args[0] if node.args else None)


@op_rule(*_TRANSPOSE_FUNCS, *_TRANSPOSE_METHODS)
def _swap(tr: TracerCore, node: fx.Node) -> Any:
    a = node.args
    return swap(tr, node, a[0], a[1], a[2])


@op_rule(torch.permute)
def _permute_function(tr: TracerCore, node: fx.Node) -> Any:
    src = node.args[0]
    return transpose(tr, node, src, [int(x) % len(tr.shape(src)) for x in node.args[1]])


@op_rule("permute")
def _permute_method(tr: TracerCore, node: fx.Node) -> Any:
    a, src = node.args, node.args[0]
    dims = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:]
    return transpose(tr, node, src, [int(x) % len(tr.shape(src)) for x in dims])


@op_rule("t")
def _t(tr: TracerCore, node: fx.Node) -> Any:
    src = node.args[0]
    return transpose(tr, node, src, [1, 0]) if len(tr.shape(src) or ()) == 2 else dict(tr.tinfo(src))


@op_rule(getattr)
def _getattr(tr: TracerCore, node: fx.Node) -> Any:
    return attribute(tr, node)
