"""Permutation specs from ``torch.export`` graphs: a table of rules over core ATen ops.

Why
---
``torch.fx.symbolic_trace`` cannot trace most Hugging Face ``transformers``
models (data-dependent Python in ``forward``; measured: GPT2LMHeadModel,
BertForSequenceClassification, LlamaForCausalLM, ViTForImageClassification
all fail), while ``torch.export.export(model, (x,))`` succeeds on all of them
in eval mode and yields a graph of a small, stable set of ATen ops
(``aten.linear``, ``aten.addmm``, ``aten.layer_norm``,
``aten.scaled_dot_product_attention``, ``aten.view``, ``aten.transpose``...).
This module walks that graph with the fx tracer's machinery
(:class:`lmckit.perm.trace._Tracer`: the union-find of streams and state-dict
axes, block refinements, head structures and spec building are imported, not
copied) and replaces only the per-op dispatch by :data:`ATEN_RULES`, one rule
per ATen op family. Adding an op is one entry in that table.

Rules (the semantics are those of the fx tracer's module docstring)
-------------------------------------------------------------------
- ``linear(x, W, b)``: ``W' = P_out W P_in^T``; ``addmm(b, x, M)`` / ``mm`` /
  ``matmul`` with ``M`` a parameter of shape ``(in, out)`` (GPT-2's ``Conv1D``,
  whose weight is stored transposed): ``M' = P_in M P_out^T``, ``b' = P_out b``;
  ``M = t(W)`` is treated as ``linear``.
- ``embedding(W, idx)``: a producer moving ``W``'s columns (axis 1); tied
  weights (GPT-2's ``wte`` / ``lm_head``) share storage and move together.
- ``layer_norm`` / ``rms_norm``: the affine entries move with the normalised
  unit axis (normalising over all units commutes with permuting them).
  Hand-written RMSNorm (Llama) is seen through as ``pow``, ``mean`` over the
  unit axis (invariant), ``rsqrt`` and elementwise ``mul`` by the weight.
- ``scaled_dot_product_attention``: as ``F.scaled_dot_product_attention``; with ``enable_gqa=True`` the
  key/value heads are first repeated to the query heads, as below.
- repeated heads: ``x[:, :, None].expand(B, n, r, ...).reshape(B, n*r, ...)`` (``transformers``'
  ``repeat_kv``) merges a unit axis with ``r`` broadcast copies of it into a repeated-heads stream of
  ``n*r`` units, tied to its source by a head structure (grouped-query attention, below);
  ``repeat_interleave(x, r, dim)`` with an integer ``r`` is the same stream.
- elementwise ops, casts, ``dropout``, ``expand``, views and reshapes,
  ``transpose`` / ``permute`` / ``t``, ``split`` / ``chunk`` / ``unbind``,
  ``slice`` / ``select``, ``cat`` / ``stack``, reductions, ``softmax``,
  ``conv2d``: as in the fx tracer.
- any op whose tensor inputs carry no units (masks, position ids, RoPE
  tables) gives an invariant result without a warning: that is exact.
  Any other unknown op pins the units flowing into it and says so.

Grouped-query attention
-----------------------
``n`` key/value heads, ``H = n*r`` query heads of ``d`` features; query head ``g*r + k`` reads key/value
head ``g`` (``repeat_kv`` and ``enable_gqa`` both repeat in blocks). The spec has, per layer, a
key/value-head group ``KV`` of ``n`` units (``k_proj`` and ``v_proj`` rows in blocks of ``d``) and a
query-head group ``Q`` of ``H`` units (``q_proj`` rows and ``o_proj`` columns in blocks of ``d``), and the
head structure ``(n, (Q, KV))``: ``p_KV = s`` and ``p_Q[g*r + k] = s[g]*r + t_g[k]``, i.e. a permutation
``s`` of the key/value groups shared by both groups and a free permutation ``t_g`` of the query heads inside
each group (:func:`lmckit.perm.spec.head_block_perm` with ``n`` heads of ``r`` units; ``KV`` has one unit
per head). Every such permutation keeps the function exactly: the new query head ``g*r + k`` is the old
head ``s[g]*r + t_g[k]``, whose group is ``s[g]``, and the new key/value head ``g`` is the old head ``s[g]``;
as the ``r`` repeats of a key/value head are equal copies, the repeated keys and values permuted by ``p_Q``
are the repeats of the keys and values permuted by ``s`` for every choice of the ``t_g``. So each new query
head attends exactly as the old head it came from, its output is that head's output, and ``o_proj``'s
columns, moved by the same head map, sum the same terms. Moving a query head to another group is not in
this set and changes the function (tests/test_hf_specs.py checks both).

Not covered, and why: within-head features. Rotary embeddings rotate feature pairs ``(j, j + d/2)`` by
position-dependent angles of distinct frequencies, and no permutation but the identity commutes with that
(a pair moved to another pair changes its frequency; swapping the two features of a pair reverses its
rotation), so Q/K features are pinned, as in multi-head Llama. V/O features (free in multi-head attention:
``v_proj`` rows and ``o_proj`` columns inside each head) would need ``o_proj``'s columns of query head
``g*r + k`` moved by ``t_g`` on the heads and by key/value head ``g``'s feature map at once, a product of two
groups on one axis; a permutation spec moves an axis by one group (or by blocks of distinct groups), and its
head structures leave each member's within-head maps free, so neither can tie ``o_proj``'s feature map to
``v_proj``'s: V/O features are pinned in grouped-query attention (exact; so are Q/K features of a model
without rotary embeddings). The projections' rows and columns still all move, by whole heads.

Entry points: :func:`export_trace_streams` and :func:`export_trace_spec`
(the same results as :func:`lmckit.perm.trace.trace_streams` /
:func:`~lmckit.perm.trace.trace_spec`). Models that need them are picked by
:func:`lmckit.perm.uses_export`.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import LmcError
from .spec import PermutationSpec
from .trace import SpecWarning, TraceResult, _DictInfo, _flat_nodes, _Tracer
from .trace_core import _op_name

__all__ = ["ATEN_RULES", "export_graph", "export_trace_streams", "export_trace_spec"]

aten = torch.ops.aten

Rule = Callable[["_ExportTracer", fx.Node], Any]
#: ATen op packet -> rule (``rule(tracer, node) -> stream info of the node's value``).
ATEN_RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            ATEN_RULES[op] = fn
        return fn

    return deco


def _arg(node: fx.Node, pos: int, kw: str, default: Any = None) -> Any:
    if kw in node.kwargs:
        return node.kwargs[kw]
    return node.args[pos] if len(node.args) > pos else default


# ------------------------------------------------------------------ identity-like and elementwise
@_rule(
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.lift_fresh_copy,
    aten.to,
    aten._to_copy,
    aten.type_as,
    aten.dropout,
    aten.feature_dropout,
    aten.alpha_dropout,
    aten.softmax,
    aten._softmax,
    aten.log_softmax,
    aten._log_softmax,
)
def _same(tr: _ExportTracer, node: fx.Node) -> Any:
    """Value-preserving (casts, copies, eval dropout) or equivariant along every axis (softmax)."""
    return dict(tr.tinfo(node.args[0]))


_ELEMENTWISE = [
    "add", "sub", "rsub", "mul", "div", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid",
    "relu", "gelu", "silu", "mish", "elu", "selu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid",
    "softplus", "erf", "sin", "cos", "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "maximum",
    "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "__and__",
    "__or__", "bitwise_and", "bitwise_or", "bitwise_not", "reciprocal", "square", "fill", "zeros_like",
    "ones_like", "full_like", "sign", "floor", "ceil", "round", "relu6", "glu_placeholder",
]  # fmt: skip


@_rule(*[getattr(aten, n) for n in _ELEMENTWISE if hasattr(aten, n)])
def _elementwise(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.broadcast(node, list(node.args) + list(node.kwargs.values()))


@_rule(aten.expand, aten.expand_as, aten.repeat)
def _expand(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.align(node, node.args[0])


# ------------------------------------------------------------------ shape ops
@_rule(aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten)
def _reshape(tr: _ExportTracer, node: fx.Node) -> Any:
    out = tr.repeat_heads(node, node.args[0])
    return out if out is not None else tr.reshape(node, node.args[0])


@_rule(aten.transpose, aten.swapaxes, aten.swapdims)
def _transpose(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.swap(node, node.args[0], int(node.args[1]), int(node.args[2]))


@_rule(aten.permute)
def _permute(tr: _ExportTracer, node: fx.Node) -> Any:
    n = len(tr.shape(node.args[0]) or ())
    return tr.transpose(node, node.args[0], [int(x) % n for x in node.args[1]])


@_rule(aten.t, aten.numpy_T)
def _t(tr: _ExportTracer, node: fx.Node) -> Any:
    n = len(tr.shape(node.args[0]) or ())
    return tr.transpose(node, node.args[0], list(range(n))[::-1]) if n == 2 else dict(tr.tinfo(node.args[0]))


@_rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def _split(tr: _ExportTracer, node: fx.Node) -> Any:
    src = node.args[0]
    s = tr.shape(src)
    vals = node.meta.get("val")
    dim = _arg(node, 2, "dim", 0)
    if s is None or not isinstance(vals, (list, tuple)) or not isinstance(dim, int):
        return tr.opaque(node)
    return tr.split(node, src, [int(v.shape[dim % len(s)]) for v in vals], dim)


@_rule(aten.unbind)
def _unbind(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.unbind(node, node.args[0], int(_arg(node, 1, "dim", 0)))


@_rule(aten.slice)
def _slice(tr: _ExportTracer, node: fx.Node) -> Any:
    src = node.args[0]
    s = tr.shape(src)
    if s is None:
        return tr.opaque(node)
    dim = int(_arg(node, 1, "dim", 0)) % len(s)
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    if any(not (x is None or isinstance(x, int)) for x in (start, end, step)):
        return tr.opaque(node)
    items = [slice(None)] * dim + [slice(start, min(end, s[dim]) if end is not None else None, step)]
    return tr.index_items(node, src, items)


@_rule(aten.select)
def _select(tr: _ExportTracer, node: fx.Node) -> Any:
    src = node.args[0]
    s = tr.shape(src)
    if s is None:
        return tr.opaque(node)
    dim = int(node.args[1]) % len(s)
    return tr.index_items(node, src, [slice(None)] * dim + [int(node.args[2])])


@_rule(aten.cat, aten.concat, aten.concatenate)
def _cat(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.cat(node, list(node.args[0]), int(_arg(node, 1, "dim", 0)))


@_rule(aten.stack)
def _stack(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.stack(node, list(node.args[0]), int(_arg(node, 1, "dim", 0)))


# ------------------------------------------------------------------ reductions
@_rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.logsumexp, aten.var, aten.std, aten.prod)
def _reduce(tr: _ExportTracer, node: fx.Node) -> Any:
    src = node.args[0]
    dim = _arg(node, 1, "dim", None)
    keepdim = _arg(node, 2, "keepdim", False)
    if node.target.overloadpacket in (aten.var, aten.std):
        keepdim = node.kwargs.get("keepdim", keepdim if isinstance(keepdim, bool) else False)
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        dim = None
    if not isinstance(keepdim, bool):
        return tr.opaque(node)
    res = tr.reduce(node, src, dim, keepdim)
    return tr.opaque(node) if res is None else res


# ------------------------------------------------------------------ layers
@_rule(aten.linear)
def _linear(tr: _ExportTracer, node: fx.Node) -> Any:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias", None)
    wk, bk = tr._keyed(w), tr._keyed(b)
    if wk is None or (b is not None and bk is None):
        return tr.matmul_bias(node, x, w, b, transposed=True)
    return tr.linear_like(node, _layer_name(wk), x, wk, bk)


@_rule(aten.addmm)
def _addmm(tr: _ExportTracer, node: fx.Node) -> Any:
    b, x, m = node.args[0], node.args[1], node.args[2]
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        return tr.opaque(node, f"aten.addmm at node {node.name!r} with beta/alpha != 1")
    return tr.matmul_bias(node, x, m, b)


@_rule(aten.mm, aten.matmul, aten.bmm)
def _mm(tr: _ExportTracer, node: fx.Node) -> Any:
    return tr.matmul_bias(node, node.args[0], node.args[1], None)


@_rule(aten.embedding)
def _embedding(tr: _ExportTracer, node: fx.Node) -> Any:
    w, idx = node.args[0], node.args[1]
    wk = tr._keyed(w)
    tr.pin_all(idx, f"aten.embedding at node {node.name!r} takes indices")
    s = tr.shape(node)
    if wk is None or not s:
        return tr.opaque(node, f"aten.embedding at node {node.name!r} uses a table that is not a parameter")
    tr.site_nodes_export.append((node, "producer"))
    return {len(s) - 1: tr.producer(_layer_name(wk), [(wk, 1)])}


@_rule(aten.layer_norm, aten.rms_norm)
def _norm(tr: _ExportTracer, node: fx.Node) -> Any:
    src = node.args[0]
    k = len(node.args[1])
    if node.target.overloadpacket is aten.layer_norm:
        w, b = _arg(node, 2, "weight", None), _arg(node, 3, "bias", None)
    else:
        w, b = _arg(node, 2, "weight", None), None
    inf = dict(tr.tinfo(src))
    s = tr.shape(src) or ()
    for arg in (w, b):
        if arg is None:
            continue
        key = tr._keyed(arg)
        if key is None:
            return tr.opaque(node, f"{node.target} at node {node.name!r} has an affine that is not a parameter")
        for d, e in inf.items():
            if d >= len(s) - k:  # the unit axis is normalised: its affine entries move with it
                tr.join_key(e, key, d - (len(s) - k))
    return inf


@_rule(aten.conv1d, aten.conv2d, aten.conv3d)
def _conv(tr: _ExportTracer, node: fx.Node) -> Any:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias", None)
    wk, bk = tr._keyed(w), tr._keyed(b)
    if wk is None or (b is not None and bk is None):
        return tr.opaque(node, f"{node.target} at node {node.name!r} uses weights that are not parameters")
    return tr.conv_like(node, _layer_name(wk), x, wk, bk, int(_arg(node, 6, "groups", 1)))


@_rule(aten.scaled_dot_product_attention)
def _sdpa(tr: _ExportTracer, node: fx.Node) -> Any:
    if node.kwargs.get("enable_gqa"):
        return tr.sdpa_gqa(node)
    return tr.sdpa(node)


@_rule(aten.repeat_interleave)
def _repeat_interleave(tr: _ExportTracer, node: fx.Node) -> Any:
    """``x.repeat_interleave(r, dim)`` with an integer ``r``: unit ``i`` of axis ``dim`` becomes units
    ``i*r .. i*r + r-1`` (the blocks of ``repeat_kv``; see :meth:`_ExportTracer.repeat_heads`)."""
    src, r, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim", None)
    s = tr.shape(src)
    if s is None or not isinstance(r, int) or isinstance(r, bool) or not isinstance(dim, int):
        return tr.opaque(node, f"aten.repeat_interleave at node {node.name!r} without an integer count and axis")
    dim %= len(s)
    inf = tr.tinfo(src)
    if dim not in inf or r == 1:
        return dict(inf)
    return tr._repeated(inf, dim, s[dim], r, f"aten.repeat_interleave at node {node.name!r}", drop=None)


def _layer_name(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


class _GetItem:
    """A stand-in ``operator.getitem`` node (``src[items]``) for the fx tracer's indexing rule."""

    op = "call_function"
    target = operator.getitem

    def __init__(self, node: fx.Node, src: Any, items: tuple) -> None:
        self.name, self.meta, self.args, self.kwargs = node.name, node.meta, (src, items), {}


_IGNORED = {aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride}


class _ExportTracer(_Tracer):
    """The fx tracer's stream algebra, dispatched on ATen ops (:data:`ATEN_RULES`)."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], strict: bool):
        super().__init__(gm, state, strict)
        self.site_nodes_export: list[tuple[fx.Node, str]] = []
        # repeated heads (grouped-query attention): (element of the n*r repeated units, element of the n
        # repeated units, n, r); see repeat_heads
        self.repeats: list[tuple[int, int, int, int]] = []
        # torch.export keeps one name of tied tensors (GPT-2's lm_head.weight for wte): name layers after the
        # first key in state-dict order that shares the storage
        first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
        self.canonical: dict[str, str] = {}
        for k, v in state.items():
            if v.dim() == 0 or v.numel() == 0:
                continue
            sig = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            self.canonical[k] = first.setdefault(sig, k)

    def _keyed(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            key = str(arg.target)
            if key in self.state:
                return self.canonical.get(key, key)
        return None

    def call_module(self, node: fx.Node) -> Any:
        if str(node.target).startswith("_guards"):
            return None  # torch.export's input guards: no tensor flows out
        return super().call_module(node)

    def _carries_units(self, node: fx.Node) -> bool:
        def has(inf: Any) -> bool:
            if isinstance(inf, dict):
                return bool(inf) if not isinstance(inf, _DictInfo) else any(has(v) for v in inf.values())
            if isinstance(inf, (tuple, list)):
                return any(has(v) for v in inf)
            return False

        return any(has(self.info.get(n)) for n in _flat_nodes((node.args, node.kwargs)))

    def call_function(self, node: fx.Node) -> Any:
        t = node.target
        if t is operator.getitem:
            return self.getitem(node)
        packet = getattr(t, "overloadpacket", None)
        if packet in _IGNORED:
            return None
        rule = ATEN_RULES.get(packet)
        if rule is not None:
            return rule(self, node)
        if not self._carries_units(node):
            return self.invariant_like(node)  # exact: no input moves with any permutation
        return self.opaque(node, f"{t} at node {node.name!r} has no rule in lmckit.perm.export_trace.ATEN_RULES")

    def index_items(self, node: fx.Node, src: Any, items: list[Any]) -> Any:
        """``src[items]`` by the fx tracer's ``getitem`` rule (items: ints and slices, leading axes)."""
        return self.getitem(_GetItem(node, src, tuple(items)))

    # ------------------------------------------------------------ repeated heads (grouped-query attention)
    def repeat_heads(self, node: fx.Node, src: Any) -> dict[int, int] | None:
        """``x[:, :, None].expand(B, n, r, ...).reshape(B, n*r, ...)`` (``repeat_kv``): a unit axis merged with
        the broadcast copies after it. ``None`` when ``node`` is not that pattern (the plain reshape rule runs).

        Output unit ``i*r + k`` is a copy of input unit ``i`` for every ``k``, so permuting the input by
        ``s`` gives the output permuted by ``P[i*r + k] = s[i]*r + t_i[k]`` for EVERY choice of the
        permutations ``t_i`` of the ``r`` copies (they are equal): the merged axis becomes a new stream
        (``n*r`` units) recorded in ``self.repeats`` with its source, and at build time its group is
        constrained to that two-level form by a head structure of ``n`` heads shared with the source's group
        (:meth:`_head_structures`). A within-head axis whose head is the repeated axis is pinned and
        dropped: each of its ``n`` per-head feature permutations would be read by ``r`` output heads that
        move by ``t_i``, a product (``t_i`` x feature map) on one axis that the spec does not express.
        """
        if not isinstance(src, fx.Node) or getattr(src.target, "overloadpacket", None) is not aten.expand:
            return None
        xs, es, os_ = self.shape(src.args[0]), self.shape(src), self.shape(node)
        if xs is None or es is None or os_ is None or len(xs) != len(es) or len(os_) != len(es) - 1:
            return None
        inf = self.tinfo(src)
        a = next(
            (
                a
                for a in range(1, len(es))
                if xs[a] == 1
                and es[a] > 1
                and a - 1 in inf
                and a not in inf
                and os_ == es[: a - 1] + (es[a - 1] * es[a],) + es[a + 1 :]
            ),
            None,
        )
        if a is None:
            return None
        return self._repeated(inf, a - 1, es[a - 1], es[a], f"{_op_name(node)} at node {node.name!r}", drop=a)

    def _repeated(self, inf: dict[int, int], d: int, n: int, r: int, where: str, drop: int | None) -> dict[int, int]:
        """Stream info after repeating axis ``d`` (``n`` units, element ``inf[d]``) ``r`` times in blocks
        (unit ``i`` -> ``i*r .. i*r + r-1``); ``drop``: an axis removed by the merge (its info is shifted)."""
        e = inf[d]
        rep = self.fresh(n * r)
        self.repeats.append((rep, e, n, r))
        out: dict[int, int] = {}
        for dd, x in inf.items():
            if dd == d:
                out[dd] = rep
                continue
            h = self.w_partner.get(x)
            if h is not None and self.uf.find(h) == self.uf.find(e):
                if self.uf.find(x) != self.uf.find(0):
                    self.pin(
                        x,
                        f"{where} repeats heads (grouped-query attention): a key/value head's features would move "
                        "with one permutation per key/value head, read by query heads that move inside their "
                        "group, which a permutation spec cannot express",
                        warn=False,
                    )
                continue
            out[dd - 1 if drop is not None and dd > drop else dd] = x
        return out

    def sdpa_gqa(self, node: fx.Node) -> Any:
        """``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``: key/value heads repeated in blocks
        (``repeat_interleave`` over the head axis) to the query heads, then :meth:`sdpa` (see
        :meth:`repeat_heads`)."""
        a = list(node.args)
        q = a[0] if len(a) > 0 else node.kwargs.get("query")
        kv = [a[i] if len(a) > i else node.kwargs.get(kw) for i, kw in ((1, "key"), (2, "value"))]
        sq = self.shape(q)
        if sq is None or len(sq) < 3:
            return self.opaque(node)
        H = sq[-3]
        saved: dict[fx.Node, Any] = {}
        try:
            for t in kv:
                s = self.shape(t)
                if not isinstance(t, fx.Node) or t in saved or s is None or len(s) < 3 or s[-3] == H:
                    continue
                if H % s[-3]:
                    return self.opaque(node, f"aten.scaled_dot_product_attention at node {node.name!r}: "
                                       f"{H} query heads are not groups of {s[-3]} key/value heads")  # fmt: skip
                inf = self.tinfo(t)
                saved[t] = self.info.get(t)
                d = len(s) - 3
                if d in inf:
                    where = f"aten.scaled_dot_product_attention (enable_gqa) at node {node.name!r}"
                    self.info[t] = self._repeated(inf, d, s[-3], H // s[-3], where, drop=None)
            return self.sdpa(node)
        finally:
            self.info.update(saved)

    def _resolve_repeats(self) -> None:
        """Make repeated heads consistent (a step of the block fixpoint): streams repeated into one stream share
        one source stream; a pinned source or repeat pins the other (a repeat of fixed units, or fixed
        repeated units, keep the source fixed); a repeat that is itself cut into blocks, or of a stream that is,
        pins both; head-split streams on the repeated axes lose their within-head permutations (see
        :meth:`repeat_heads`)."""
        uf = self.uf
        pinned = uf.find(0)
        why = "repeated heads (grouped-query attention): "
        by_rep: dict[int, list[tuple[int, int, int, int]]] = {}
        for rec in self.repeats:
            by_rep.setdefault(uf.find(rec[0]), []).append(rec)
        for lst in by_rep.values():
            if len({(n, r) for _, _, n, r in lst}) > 1:
                for rep, e, _, _ in lst:
                    for x in (rep, e):
                        if uf.find(x) != pinned:
                            self.pin(x, why + "one stream repeats sources of different sizes")
                continue
            for _, e, _, _ in lst[1:]:
                uf.union(lst[0][1], e)
        by_src: dict[int, tuple[int, int, int]] = {}
        refined = self._refined_roots()
        for rep, e, n, r in self.repeats:
            rr, re_ = uf.find(rep), uf.find(e)
            if rr == pinned and re_ != pinned:
                self.pin(e, why + "the repeated heads are left unpermuted")
            elif re_ == pinned and rr != pinned:
                self.pin(rep, why + "the repeated key/value heads are left unpermuted")
            elif rr != pinned and (rr == re_ or rr in refined or re_ in refined):
                for x in (rep, e):
                    self.pin(x, why + "the repeated heads or their source are cut into blocks")
            elif rr != pinned:
                first = by_src.setdefault(re_, (rep, n, r))
                if (first[1], first[2]) != (n, r):  # one source repeated twice as often: two structures, one group
                    for x in (first[0], rep):
                        if uf.find(x) != pinned:
                            self.pin(x, why + "one key/value stream is repeated in two different ways")
                elif uf.find(first[0]) != rr:
                    uf.union(first[0], rep)  # two repeats of one source: one repeated stream (a restriction)
        roots = {uf.find(x) for rec in self.repeats for x in rec[:2]} - {pinned}
        for f, _H, _d, h, w in self.joints:
            if (uf.find(h) in roots or uf.find(f) in roots) and uf.find(w) != pinned:
                self.pin(w, why + "a head's features cannot move with repeated heads", warn=False)

    def _check_repeat_sources(self) -> None:
        """A repeated stream that will be a group needs its source to be one (the head structure that ties
        them names both); a source that moves no parameter axis and no block is fixed, so its repeats are."""
        uf = self.uf
        pinned = uf.find(0)
        named = {uf.find(x) for _, pieces, _ in self.refines for x, _, _ in pieces if x is not None}
        named |= {uf.find(e) for e in self.key_elem.values()} & {uf.find(p) for p in self.producer_order}
        for rep, e, _, _ in self.repeats:
            if uf.find(rep) != pinned and uf.find(e) not in named:
                self.pin(rep, "repeated heads (grouped-query attention): their source moves no parameters")

    def _refined_roots(self) -> set[int]:
        return {self.uf.find(e) for e, _, _ in self.refines}

    def matmul_bias(self, node: fx.Node, x: Any, m: Any, b: Any, transposed: bool = False) -> Any:
        """``x @ m (+ b)``; when ``m`` is a parameter (or ``t(W)`` of one) the product is a producer.

        ``transposed``: ``m`` is stored ``(out, in)`` (``aten.linear``); else ``(in, out)`` (``Conv1D``).
        """
        key, tr_ = self._keyed(m), transposed
        if key is None and isinstance(m, fx.Node) and m.op == "call_function":
            if getattr(m.target, "overloadpacket", None) in (aten.t, aten.numpy_T) or (
                getattr(m.target, "overloadpacket", None) is aten.transpose and len(self.shape(m) or ()) == 2
            ):
                key, tr_ = self._keyed(m.args[0]), not transposed
        bk = self._keyed(b)
        if key is not None and self.state[key].dim() == 2 and (b is None or bk is not None):
            if tr_:
                return self.linear_like(node, _layer_name(key), x, key, bk)
            return self.conv1d_like(node, _layer_name(key), x, key, bk)
        if transposed:
            return self.opaque(node, f"aten.linear at node {node.name!r} uses weights that are not parameters")
        out = self.matmul(node, x, m)
        if b is not None and isinstance(out, dict):
            self.info[node] = out  # the product, then `+ b` broadcast (same output shape)
            out = self.broadcast(node, [node, b])
        return out

    def conv1d_like(self, node: fx.Node, name: str, src: Any, w: str, b: str | None) -> dict[int, int]:
        """``y = x M + b`` with ``M`` stored ``(in, out)`` (HF ``Conv1D``): ``M' = P_in M P_out^T``."""
        inf = self.tinfo(src)
        s = self.shape(src)
        last = (len(s) - 1) if s else 0
        if last in inf:
            self.join_key(inf[last], w, 0)
        else:
            self.pin(self.key(w, 0), f"{name!r} reads an unpermuted input with weights tied to these units")
        p = self.producer(name, [(w, 1)] + ([(b, 0)] if b else []))
        out = {d: e for d, e in inf.items() if d != last}
        out[last] = p
        return out

    # ------------------------------------------------------------ heads whose features are pinned (RoPE)
    def _resolve_joints(self, full: dict[int, Any]) -> None:
        """Heads that may move while their features may not: before the fx tracer's family rules, a head-split
        stream whose within-head axis is pinned (rotary position embeddings multiply each feature by a
        position-dependent cos/sin and swap feature halves) but whose head axis and flat stream are free
        becomes a block stream of whole heads: ``p[i*d + j] = h[i]*d + j``. That is the joint's own
        parametrisation with the within-head permutation fixed to the identity, so it is exact; the head
        axis then becomes a group of ``H`` units and joins the head structure of the heads' other
        streams (V/O) as a member with one unit per head."""
        self._resolve_repeats()
        uf = self.uf
        pinned = uf.find(0)
        keep = []
        if not hasattr(self, "head_only"):
            self.head_only: list[int] = []
            self.head_flat: list[tuple[int, int]] = []  # (head elem, its flat stream) of the head-only joints
        for j in self.joints:
            f, H, d, h, w = j
            if uf.find(w) == pinned and uf.find(h) != pinned and uf.find(f) != pinned:
                e = self.refined([(h, H, d)], "attention heads whose features are pinned")
                uf.union(e, f)
                self.head_only.append(h)
                self.head_flat.append((h, f))
                w_of = [x for x, hh in self.w_partner.items() if hh == h and uf.find(x) == pinned]
                for x in w_of:
                    del self.w_partner[x]
            else:
                keep.append(j)
        self.joints = keep
        super()._resolve_joints(full)  # the fx tracer's family rules, with this tracer's _joint_axes
        self._check_repeat_sources()

    def _joint_axes(self) -> set[int]:
        """The fx tracer's head family rules (``Tracer._resolve_joints``, same rules, same messages) run here
        too, except that the head elements of head-only streams and the within-head partners count as head
        axes (they are), not as other streams meeting the family."""
        return (
            super()._joint_axes()
            | set(getattr(self, "head_only", []))
            | set(self.w_partner)
            | set(self.w_partner.values())
        )

    def _segments(
        self,
        refined: dict[int, list],
        members: dict[int, list[tuple[str, int]]],
        producers: dict[int, list[str]],
        msgs: list[str],
    ) -> tuple[dict[int, list[tuple[int | None, int, int]]], dict[int, str]]:
        """The fx tracer's segments; the head group of a head-only joint is named after the projection that
        was split into those heads (``q_proj.0``), not after whichever block stream was seen first."""
        seg_of, used = super()._segments(refined, members, producers, msgs)
        uf = self.uf
        for h, f in reversed(getattr(self, "head_flat", [])):
            rh = uf.find(h)
            owner = (producers.get(uf.find(f)) or [None])[0]
            if rh in used and owner is not None:
                used[rh] = owner
        return seg_of, used

    def _name_groups(
        self,
        members: dict[int, list[tuple[str, int]]],
        refined: dict[int, list],
        used_in_segments: dict[int, str],
        pinned_root: int,
        msgs: list[str],
    ) -> tuple[dict[int, str], dict[str, int]]:
        """The fx tracer's names; a repeated stream whose source got no group (a stream the tracer could not
        name, e.g. one that joined axes of different sizes) is left unpermuted, as its source is."""
        root_group, sizes = super()._name_groups(members, refined, used_in_segments, pinned_root, msgs)
        uf = self.uf
        for rep, e, _, _ in self.repeats:
            rr, er = uf.find(rep), uf.find(e)
            if rr in root_group and er not in root_group:
                g = root_group.pop(rr)
                sizes.pop(g, None)
                msgs.append(f"units of {g!r} left unpermuted: repeated heads whose source is not permuted")
        return root_group, sizes

    def _head_structures(self, root_group: dict[int, str], pinned_root: int) -> dict[str, tuple[int, tuple[str, ...]]]:
        heads = super()._head_structures(root_group, pinned_root)
        uf = self.uf
        reps = {uf.find(rep): (uf.find(e), n) for rep, e, n, _ in self.repeats if uf.find(rep) != pinned_root}
        rep_roots = set(reps) | {e for e, _ in reps.values()}
        for h in dict.fromkeys(uf.find(x) for x in getattr(self, "head_only", [])):
            g = root_group.get(h)
            if g is None or h == pinned_root or h in rep_roots:
                continue
            n = self._class_size(h)
            members: list[str] = []
            for f, _H, _d, hh, _w in self.joints:  # the heads' other streams (V/O) share the head mapping
                gf = root_group.get(uf.find(f))
                if uf.find(hh) == h and gf is not None and gf not in members:
                    members.append(gf)
            for name in [k for k, (_, m) in heads.items() if set(m) & set(members)]:
                del heads[name]
            heads[f"{g}.heads"] = (int(n), tuple(members + [g]))
        for rr, (er, n) in reps.items():  # repeated heads: n source heads, the repeats of each one head
            g_rep, g_src = root_group.get(rr), root_group.get(er)
            if g_rep is not None and g_src is not None:  # (_name_groups never names a repeat without its source)
                heads[f"{g_rep}.heads"] = (int(n), (g_rep, g_src))
        return heads

    def _sites(self, root_group: dict[int, str]) -> dict[str, list[str]]:
        return {g: [] for g in root_group.values()}  # no modules in an ATen graph: activation sites are not known


def export_graph(model: nn.Module, example_input: Any) -> fx.GraphModule:
    """``torch.export.export(model, (x,)).module()`` in eval mode, errors as :class:`LmcError`.

    The model's train/eval flags are restored. ``example_input``: a tensor (token ids
    ``(B, T)`` int64 for language models, images ``(B, C, H, W)``) or a tuple of them.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, strict=False)
        return ep.module()
    except Exception as e:  # noqa: BLE001  (export raises many types)
        raise LmcError(
            f"cannot export {type(model).__name__} with torch.export: {type(e).__name__}: {str(e).splitlines()[0]}",
            "pass an example input the model accepts (token ids for language models), or give the model a "
            "permutation_spec() method",
        ) from None
    finally:
        for m, t in modes.items():
            m.training = t


def export_trace_streams(model: nn.Module, example_input: Any, strict: bool = False) -> TraceResult:
    """Trace ``model`` through ``torch.export`` and return its spec and the tracer's warnings.

    Same result type as :func:`lmckit.perm.trace.trace_streams` (``sites`` are empty: an ATen graph
    has no modules to hook). Raises :class:`LmcError` when the model does not export.
    """
    gm = export_graph(model, example_input)
    tr = _ExportTracer(gm, model.state_dict(), strict)
    tr.run()
    return tr.build()


def export_trace_spec(model: nn.Module, example_input: Any, strict: bool = False) -> PermutationSpec:
    """Permutation spec of ``model`` by ``torch.export`` tracing (warnings as :class:`SpecWarning`)."""
    res = export_trace_streams(model, example_input, strict)
    for msg in res.warnings:
        warnings.warn(f"export_trace_spec({type(model).__name__}): {msg}", SpecWarning, stacklevel=2)
    return res.spec
