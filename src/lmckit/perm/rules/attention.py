"""Op rules: attention (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, ``matmul``).

- ``nn.MultiheadAttention`` (self-attention, ``kdim == vdim == embed_dim``, no ``add_bias_kv``): the input
  stream moves ``in_proj_weight``'s columns, its rows are segments ``(qk, qk, vo)``, ``out_proj``'s columns
  are ``vo`` and its output a new stream; ``qk`` and ``vo`` share a head structure (one head permutation,
  free permutations inside each head).
- hand-written attention: ``q @ k.transpose(-2, -1)`` / ``matmul`` joins the contracted axes (their sum is
  invariant) and broadcasts the batch axes; ``F.scaled_dot_product_attention`` joins Q's and K's features
  and all three head axes (the head split itself is a reshape: :mod:`lmckit.perm.rules.shape`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace_core import TracerCore, _op_name, op_rule


# --------------------------------------------------------------------------- helpers
def matmul(tr: TracerCore, node: fx.Node, x: Any, y: Any) -> Any:
    """``x @ y``: batch axes broadcast, the contracted axes' streams are joined (their sum is invariant)."""
    sx, sy, so = tr.shape(x), tr.shape(y), tr.shape(node)
    if sx is None or sy is None or so is None or len(sx) < 2 or len(sy) < 2:
        return tr.opaque(node)
    ix, iy = tr.tinfo(x), tr.tinfo(y)
    nx, ny, n = len(sx), len(sy), len(so)
    cx, cy = ix.get(nx - 1), iy.get(ny - 2)
    if cx is not None and cy is not None:
        tr.uf.union(cx, cy)
    elif cx is not None or cy is not None:
        tr.pin(
            cx if cx is not None else cy,
            f"{_op_name(node)} at node {node.name!r} contracts these units with a tensor that does not move with them",
        )
    out: dict[int, int] = {}
    for d in range(n - 2):  # batch axes, broadcast from the right
        streams, varies = [], False
        for inf, s in ((ix, sx), (iy, sy)):
            i = d - (n - len(s))
            if i < 0 or i >= len(s) - 2 or (s[i] == 1 and so[d] != 1):
                continue
            if i in inf:
                streams.append(inf[i])
            else:
                varies = True
        if streams:
            for e in streams[1:]:
                tr.uf.union(streams[0], e)
            if varies and so[d] > 1:
                tr.pin(
                    streams[0],
                    f"{_op_name(node)} at node {node.name!r} batches these units with a tensor "
                    f"that does not move with them",
                )
            out[d] = streams[0]
    if nx - 2 in ix:
        out[n - 2] = ix[nx - 2]
    if ny - 1 in iy:
        out[n - 1] = iy[ny - 1]
    return out


def sdpa(tr: TracerCore, node: fx.Node) -> Any:
    """``F.scaled_dot_product_attention(q, k, v)``: ``softmax(q k^T / s) v`` over the last two axes."""
    a = list(node.args)
    q = a[0] if len(a) > 0 else node.kwargs.get("query")
    k = a[1] if len(a) > 1 else node.kwargs.get("key")
    v = a[2] if len(a) > 2 else node.kwargs.get("value")
    mask = a[3] if len(a) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        tr.pin_all(mask, "attention masks must not depend on unit order")
    sq, sk, sv = tr.shape(q), tr.shape(k), tr.shape(v)
    if sq is None or sk is None or sv is None:
        return tr.opaque(node)
    iq, ik, iv = tr.tinfo(q), tr.tinfo(k), tr.tinfo(v)
    n = len(sq)
    eq, ek = iq.get(n - 1), ik.get(len(sk) - 1)
    if eq is not None and ek is not None:
        tr.uf.union(eq, ek)
    elif eq is not None or ek is not None:
        tr.pin(
            eq if eq is not None else ek,
            f"F.scaled_dot_product_attention at node {node.name!r}: query and key features do not move together",
        )
    for inf, s in ((ik, sk), (iv, sv)):  # the key/value token axis is summed over
        e = inf.get(len(s) - 2)
        if e is not None:
            tr.pin(e, f"F.scaled_dot_product_attention at node {node.name!r} mixes the token axis")
    out: dict[int, int] = {}
    for d in range(n - 2):
        streams = [inf[d] for inf in (iq, ik, iv) if d in inf]
        if streams:
            for e in streams[1:]:
                tr.uf.union(streams[0], e)
            if len(streams) < 3 and sq[d] > 1:
                tr.pin(
                    streams[0],
                    f"F.scaled_dot_product_attention at node {node.name!r}: query, key and "
                    f"value heads do not move together",
                )
            out[d] = streams[0]
    if n - 2 in iq:
        out[n - 2] = iq[n - 2]
    if len(sv) - 1 in iv:
        out[n - 1] = iv[len(sv) - 1]
    return out


# ---------------------------------------------------------------- attention and recurrent layers
def mha(tr: TracerCore, node: fx.Node, name: str, m: nn.MultiheadAttention) -> Any:
    """Self-attention by ``nn.MultiheadAttention``: head-structured Q/K and V/O groups."""
    a = list(node.args) + [None] * 3
    q = a[0]
    k = a[1] if a[1] is not None else node.kwargs.get("key")
    v = a[2] if a[2] is not None else node.kwargs.get("value")
    bad = None
    if not m._qkv_same_embed_dim:
        bad = "kdim/vdim differ from embed_dim"
    elif m.bias_k is not None:
        bad = "add_bias_kv is set"
    extra = {kw: node.kwargs.get(kw) for kw in ("key_padding_mask", "attn_mask") if node.kwargs.get(kw) is not None}
    extra_pos = [x for x in node.args[3:] if isinstance(x, fx.Node)]
    if bad is not None:
        return tr.opaque(node, f"nn.MultiheadAttention {name!r}: {bad}")
    s = tr.shape(q)
    if s is None or len(s) not in (2, 3):
        return tr.opaque(node)
    last = len(s) - 1
    streams = [tr.tinfo(t) for t in (q, k, v)]
    for inf in streams:
        for d, e in inf.items():
            if d != last:
                tr.pin(e, f"nn.MultiheadAttention {name!r} mixes axis {d}, which carries units")
    for t in list(extra.values()) + extra_pos:
        tr.pin_all(t, f"nn.MultiheadAttention {name!r}: masks must not depend on unit order")
    ins = [inf.get(last) for inf in streams]
    col = tr.key(f"{name}.in_proj_weight", 1)
    for e in ins:
        if e is not None:
            tr.uf.union(col, e)
    if any(e is None for e in ins):
        tr.pin(col, f"nn.MultiheadAttention {name!r} reads an unpermuted query/key/value")
    E, H = m.embed_dim, m.num_heads
    qk = tr.fresh(E, f"{name}.qk")
    vo = tr.fresh(E, f"{name}.vo")
    rows = tr.refined([(qk, E, 1), (qk, E, 1), (vo, E, 1)], f"nn.MultiheadAttention {name!r}")
    tr.join_key(rows, f"{name}.in_proj_weight", 0)
    tr.join_key(rows, f"{name}.in_proj_bias", 0)
    tr.join_key(vo, f"{name}.out_proj.weight", 1)
    tr.heads.append((name, H, [qk, vo]))
    keys = [(f"{name}.out_proj.weight", 0)] + ([(f"{name}.out_proj.bias", 0)] if m.out_proj.bias is not None else [])
    out = tr.producer(name, keys)
    tm = node.meta.get("tensor_meta")
    n_out = len(tm) if isinstance(tm, (tuple, list)) else 2
    first = {last: out}
    return (first,) + tuple({} for _ in range(n_out - 1))


# --------------------------------------------------------------------------- rules
@op_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
def _matmul(tr: TracerCore, node: fx.Node) -> Any:
    return matmul(tr, node, node.args[0], node.args[1])


@op_rule(F.scaled_dot_product_attention)
def _sdpa(tr: TracerCore, node: fx.Node) -> Any:
    return sdpa(tr, node)


@op_rule(nn.MultiheadAttention)
def _mha(tr: TracerCore, node: fx.Node, m: nn.MultiheadAttention) -> Any:
    return mha(tr, node, str(node.target), m)
