"""Op rules: concatenation, stacking, splitting, indexing and padding (block permutations).

A stream may be *refined* into consecutive pieces, its permutation then being the block-diagonal composition
of the pieces' permutations (each piece its own stream, or ``None`` = fixed). ``torch.cat`` along a unit axis
refines the result into its inputs' streams (along another axis it joins them); ``torch.stack`` joins them;
``F.pad`` (constant mode) along a unit axis adds fresh pieces for the zero channels (they may permute only
among themselves); ``split`` / ``chunk`` / slicing of a unit axis refine the sliced stream at the cut points
(unread ranges stay fixed); indexing single units pins them; ``unbind`` / indexing a fused (projections,
heads, head dim) axis picks one projection's heads. Tuple, list and dict results are indexed by ``getitem``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from ..trace_core import TracerCore, _DictInfo, _flat_nodes, _op_name, op_rule

_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}


# --------------------------------------------------------------------------- helpers
def cat(tr: TracerCore, node: fx.Node, tensors: list[Any], dim: int) -> dict[int, int]:
    out_shape = tr.shape(node)
    if out_shape is None:
        return tr.opaque(node)
    n = len(out_shape)
    dim %= n
    if len(tensors) == 1:
        return dict(tr.tinfo(tensors[0]))
    out: dict[int, int] = {}
    for d in range(n):
        if d == dim:
            if any(d in tr.tinfo(t) for t in tensors):
                pieces = []
                for t in tensors:
                    s = tr.shape(t)
                    if s is None:
                        return tr.opaque(node)
                    pieces.append((tr.tinfo(t).get(d), int(s[d]), 1))
                out[d] = tr.refined(pieces, f"{_op_name(node)} at node {node.name!r}")
            continue
        streams = [tr.tinfo(t)[d] for t in tensors if d in tr.tinfo(t)]
        if not streams:
            continue
        for e in streams[1:]:
            tr.uf.union(streams[0], e)
        if len(streams) < len(tensors) and out_shape[d] > 1:
            tr.pin(
                streams[0],
                f"{_op_name(node)} at node {node.name!r} concatenates them with a tensor that "
                f"does not move with these units",
            )
        out[d] = streams[0]
    return out


def stack(tr: TracerCore, node: fx.Node, tensors: list[Any], dim: int) -> dict[int, int]:
    out_shape = tr.shape(node)
    if out_shape is None:
        return tr.opaque(node)
    dim %= len(out_shape)
    per_dim: dict[int, list[int]] = {}
    for t in tensors:
        for d, e in tr.tinfo(t).items():
            per_dim.setdefault(d if d < dim else d + 1, []).append(e)
    out: dict[int, int] = {}
    for d, streams in per_dim.items():
        for e in streams[1:]:
            tr.uf.union(streams[0], e)
        if len(streams) < len(tensors) and out_shape[d] > 1:
            tr.pin(
                streams[0],
                f"{_op_name(node)} at node {node.name!r} stacks them with a tensor that does not move with these units",
            )
        out[d] = streams[0]
    return out


def getitem(tr: TracerCore, node: fx.Node) -> Any:
    src, idx = node.args[0], node.args[1]
    inf = tr.info.get(src) if isinstance(src, fx.Node) else None
    if isinstance(inf, (tuple, list)):
        return inf[idx] if isinstance(idx, int) and -len(inf) <= idx < len(inf) else tr.opaque(node)
    if isinstance(inf, _DictInfo):
        return inf[idx] if idx in inf else tr.opaque(node)
    in_shape = tr.shape(src)
    if in_shape is None or not isinstance(inf, dict):
        return tr.invariant_like(node) if inf is None and not _flat_nodes(idx) else tr.opaque(node)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        return tr.opaque(node, f"{_op_name(node)} at node {node.name!r} indexes the tensor with another tensor")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * (len(in_shape) - used) + items[k + 1 :]
    out: dict[int, int] = {}
    d_in = d_out = 0
    for it in items:
        if it is None:
            d_out += 1
            continue
        e = inf.get(d_in)
        if isinstance(it, int):
            if e is not None and e in tr.stacks and len(items) == 1:  # qkv[0]: one projection
                return _pick(tr, inf, d_in, it % in_shape[d_in])
            if e is not None:
                tr.pin(e, f"indexing at node {node.name!r} selects single units of axis {d_in}")
            d_in += 1
            continue
        full = it == slice(None) or (
            it.start in (None, 0) and it.step in (None, 1) and (it.stop is None or it.stop >= in_shape[d_in])
        )
        if e is not None:
            if full:
                out[d_out] = e
            else:
                sl = _slice_piece(tr, node, e, it, in_shape[d_in])
                if sl is None:
                    tr.pin(e, f"slicing at node {node.name!r} selects a strided subset of the units of axis {d_in}")
                else:
                    out[d_out] = sl
        d_in += 1
        d_out += 1
    for d in range(d_in, len(in_shape)):
        if d in inf:
            out[d_out + d - d_in] = inf[d]
    return out


def _slice_piece(tr: TracerCore, node: fx.Node, e: int, it: slice, n: int) -> int | None:
    """A contiguous slice of stream ``e``: a new stream for that piece (``None`` for strided slices)."""
    if not all(x is None or isinstance(x, int) for x in (it.start, it.stop, it.step)) or it.step not in (None, 1):
        return None
    start, stop, _ = it.indices(n)
    if stop <= start:
        return None
    p = tr.fresh(stop - start)
    tr.slices.append((e, start, stop, p, f"slicing at node {node.name!r}"))
    return p


def split(tr: TracerCore, node: fx.Node, src: Any, sizes: list[int], dim: int) -> Any:
    """``split`` / ``chunk`` / ``unbind``-free splitting: one piece per output along ``dim``."""
    s = tr.shape(src)
    inf = tr.tinfo(src)
    if s is None:
        return tr.opaque(node)
    dim %= len(s)
    outs = []
    off = 0
    for size in sizes:
        o = {d: e for d, e in inf.items() if d != dim}
        if dim in inf:
            if size == s[dim]:
                o[dim] = inf[dim]
            else:
                p = tr.fresh(size)
                tr.slices.append((inf[dim], off, off + size, p, f"{_op_name(node)} at node {node.name!r}"))
                o[dim] = p
        outs.append(o)
        off += size
    return tuple(outs)


def split_call(tr: TracerCore, node: fx.Node, method: bool) -> Any:
    a = node.args
    src = a[0]
    name = str(node.target) if method else getattr(node.target, "__name__", "")
    s = tr.shape(src)
    if s is None:
        return tr.opaque(node)
    tm = node.meta.get("tensor_meta")
    dim_raw = tr._dim_arg(node, 2, 0)
    if isinstance(tm, (tuple, list)) and all(isinstance(t, TensorMetadata) for t in tm) and isinstance(dim_raw, int):
        return split(tr, node, src, [int(t.shape[dim_raw % len(s)]) for t in tm], int(dim_raw))
    if name == "chunk":
        chunks = int(tr._dim_arg(node, 1, None, "chunks"))
        dim = int(tr._dim_arg(node, 2, 0))
        n = s[dim % len(s)]
        step = -(-n // chunks)
        sizes = [min(step, n - i) for i in range(0, n, step)]
    else:
        arg = tr._dim_arg(node, 1, None, "split_size_or_sections" if not method else "split_size")
        if arg is None:
            arg = node.kwargs.get("split_size_or_sections")
        dim = int(tr._dim_arg(node, 2, 0))
        n = s[dim % len(s)]
        if isinstance(arg, int):
            sizes = [min(arg, n - i) for i in range(0, n, arg)]
        elif isinstance(arg, (list, tuple)) and all(isinstance(x, int) for x in arg):
            sizes = list(arg)
        else:
            return tr.opaque(node)
    return split(tr, node, src, sizes, dim)


def unbind(tr: TracerCore, node: fx.Node, src: Any, dim: int) -> Any:
    s = tr.shape(src)
    if s is None:
        return tr.opaque(node)
    dim %= len(s)
    inf = tr.tinfo(src)
    if dim in inf and inf[dim] in tr.stacks:
        return tuple(_pick(tr, inf, dim, i) for i in range(s[dim]))
    if dim in inf:
        tr.pin(inf[dim], f"{_op_name(node)} at node {node.name!r} takes single units apart")
    return tuple({(d if d < dim else d - 1): e for d, e in inf.items() if d != dim} for _ in range(s[dim]))


def _pick(tr: TracerCore, inf: dict[int, int], dim: int, i: int) -> dict[int, int]:
    """Projection ``i`` of a fused (projections, heads, head dim) tensor: its own head axes."""
    ph, pw, pairs = tr.stacks[inf[dim]]
    out = {}
    for d, e in inf.items():
        if d == dim:
            continue
        out[d if d < dim else d - 1] = pairs[i][0] if e == ph else pairs[i][1] if e == pw else e
    return out


def pad(tr: TracerCore, node: fx.Node, src: Any, pad: Any) -> dict[int, int]:
    """Constant padding of a unit axis: the padded entries are equal, so they may permute among themselves."""
    s = tr.shape(src)
    if s is None or not isinstance(pad, (tuple, list)) or not all(isinstance(x, int) for x in pad):
        return tr.opaque(node)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    out: dict[int, int] = {}
    for d, e in tr.tinfo(src).items():
        k = len(s) - 1 - d  # pad lists (left, right) pairs from the last axis backwards
        if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
            lo, hi = int(pad[2 * k]), int(pad[2 * k + 1])
            if mode != "constant" or lo < 0 or hi < 0:
                tr.pin(e, f"F.pad at node {node.name!r} pads axis {d}, which carries units, in mode {mode!r}")
                continue
            pieces: list[tuple[int | None, int, int]] = []
            if lo:
                pieces.append((tr.fresh(lo, f"{node.name}.pad_lo"), lo, 1))
            pieces.append((e, int(s[d]), 1))
            if hi:
                pieces.append((tr.fresh(hi, f"{node.name}.pad_hi"), hi, 1))
            out[d] = tr.refined(pieces, f"F.pad at node {node.name!r}")
        else:
            out[d] = e
    return out


# --------------------------------------------------------------------------- rules
@op_rule(*_CAT_FUNCS)
def _cat(tr: TracerCore, node: fx.Node) -> Any:
    return cat(tr, node, list(node.args[0]), int(tr._dim_arg(node, 1, 0)))


@op_rule(torch.stack)
def _stack(tr: TracerCore, node: fx.Node) -> Any:
    return stack(tr, node, list(node.args[0]), int(tr._dim_arg(node, 1, 0)))


@op_rule(operator.getitem)
def _getitem(tr: TracerCore, node: fx.Node) -> Any:
    return getitem(tr, node)


@op_rule(torch.split, torch.chunk)
def _split_function(tr: TracerCore, node: fx.Node) -> Any:
    return split_call(tr, node, False)


@op_rule("split", "chunk")
def _split_method(tr: TracerCore, node: fx.Node) -> Any:
    return split_call(tr, node, True)


@op_rule(torch.unbind, "unbind")
def _unbind(tr: TracerCore, node: fx.Node) -> Any:
    return unbind(tr, node, node.args[0], int(tr._dim_arg(node, 1, 0)))


@op_rule(F.pad)
def _pad(tr: TracerCore, node: fx.Node) -> Any:
    a = node.args
    return pad(tr, node, a[0] if a else None, a[1] if len(a) > 1 else node.kwargs.get("pad"))
