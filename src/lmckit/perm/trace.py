"""Permutation specs for arbitrary models, derived by torch.fx tracing.

Idea
----
Trace ``model.forward`` with :mod:`torch.fx`, run the graph once on an example
input to learn every tensor's shape (``ShapeProp``), then walk the graph and
record, for every tensor, which of its axes are *equivariant* under hidden-unit
permutations: if the weights are permuted by ``pi``, the permuted model's value
of that tensor equals the original value with axis ``d`` re-indexed by the
permutation of some unit space ``s`` (``t' = t.index_select(d, p_s)``). Every
tensor therefore carries a map ``{axis: stream}``; an empty map means the tensor
is *invariant* (unchanged by the permutation), like the model input.

Streams, state-dict axes ``(key, axis)`` and a special ``PINNED`` element are
the elements of a union-find. Rules join them:

- a Linear / Conv / Embedding output starts a new stream (a *producer*) joined
  with the layer's ``weight`` axis 0 (1 for ConvTranspose / Embedding) and its
  bias; the input stream is joined with ``weight`` axis 1 (0 for ConvTranspose).
  In matrix form ``W' = P_out W P_in^T``, ``b' = P_out b``.
- elementwise ops (activations, dropout, arithmetic, ``torch.where``...) join
  the streams of their broadcast-aligned tensor operands: a residual ``x + f(x)``
  merges the two streams into one group. Adding a tensor that is invariant but
  varies along a stream axis (size > 1 there) would break equivariance, so that
  stream is pinned.
- BatchNorm / InstanceNorm (weight, bias, running_mean, running_var; never
  ``num_batches_tracked``), LayerNorm and RMSNorm (their affine axes that cover the stream
  axis), GroupNorm with ``num_groups`` 1 or ``C`` and PReLU join their per-channel
  entries to the stream. Other GroupNorms are refused (pinned with a warning).
- pooling, upsampling, softmax / normalize (equivariant along every axis),
  reductions (reducing over the stream axis gives an invariant tensor),
  transposes and reshapes (the stream axis must survive as an axis of the same
  size with the same prefix product; ``flatten`` of a ``C x 1 x 1`` map does,
  of a ``C x H x W`` map with ``H*W > 1`` does not and pins the stream),
  ``torch.cat``, ``stack``, ``getitem``.
- block permutations: a stream may be *refined* into consecutive pieces,
  its permutation then being the block-diagonal composition of the pieces'
  permutations (each piece its own stream, or ``None`` = fixed). ``torch.cat``
  along a unit axis refines the result into its inputs' streams; ``F.pad``
  (constant mode) along a unit axis adds fresh pieces for the zero channels
  (they may permute only among themselves); ``flatten`` of a ``C x H x W`` map
  gives a piece ``(c, C, H*W)`` (unit ``i`` owns the run ``i*H*W ...``);
  ``split`` / ``chunk`` / slicing of a unit axis refine the sliced stream at
  the cut points (unread ranges stay fixed). Axes of the state dict in a
  refined stream are moved by segments (see :mod:`lmckit.perm.spec`).
- ``nn.MultiheadAttention`` (self-attention, ``kdim == vdim == embed_dim``,
  no ``add_bias_kv``): the input stream moves ``in_proj_weight``'s columns,
  its rows are segments ``(qk, qk, vo)``, ``out_proj``'s columns are ``vo``
  and its output a new stream; ``qk`` and ``vo`` share a head structure
  (one head permutation, free permutations inside each head).
- hand-written attention: a ``view``/``reshape`` splitting a unit axis into
  ``(H, d)`` makes a head-structured stream (a head axis carrying a plain
  permutation of the heads, a within-head axis carrying one permutation per
  head, which must travel with its head axis); ``(3, H, d)`` (timm's fused
  ``qkv``) cuts the stream into three such streams, picked apart by
  ``unbind`` or indexing; ``q @ k.transpose(-2, -1)`` / ``matmul`` joins the
  contracted axes (their sum is invariant) and broadcasts the batch axes;
  ``F.scaled_dot_product_attention`` joins Q's and K's features and all three
  head axes; reshaping ``(H, d)`` back gives the flat stream again. Streams
  sharing one head axis form a head structure (Q/K and V/O); anything else
  touching head or within-head axes pins the whole family.
- ``nn.LSTM`` / ``nn.GRU`` (unidirectional, no projection): layer ``l`` has
  one hidden stream ``h_l``; every gate block of ``weight_ih_l``,
  ``weight_hh_l`` and the biases is moved by it on axis 0, ``weight_hh_l``'s
  columns and the next layer's input by it too.
- the model output is invariant: streams reaching it are pinned (silently;
  that is the output layer). Any op the tracer cannot see through pins every
  stream flowing into it, with a :class:`SpecWarning` naming the op (or an
  :class:`~lmckit.errors.LmcError` with ``strict=True``); its output is then
  invariant, which is exact because all its inputs are.

A pinned stream's permutation is the identity, which is always consistent,
so the spec is never silently wrong: at worst it permutes less (and says so).
Every class of the union-find that holds a producer and is not pinned becomes
one permutation group, named after its first producer module in graph order
(``"fc1"``, ``"layer1.0.conv1"``).
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import LmcError
from ..models import model_entry
from .spec import PermutationSpec
from .spec import entry_groups as _entry_groups

__all__ = ["SpecWarning", "TraceResult", "trace_streams", "trace_spec", "activation_sites", "example_input_for"]


class SpecWarning(UserWarning):
    """Part of a model cannot be permuted; its units are left in place."""


# --------------------------------------------------------------------------- op tables
_ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.RReLU,
)
_PASS_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin)
_CHANNELWISE_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
_BN_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)

_ELEMENTWISE_FUNCS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.hardtanh,
    F.softplus,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
    F.hardshrink,
    F.softshrink,
    F.threshold,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
    torch.exp,
    torch.log,
    torch.abs,
    torch.sqrt,
    torch.rsqrt,
    torch.neg,
    torch.square,
    torch.sin,
    torch.cos,
    torch.erf,
    torch.clamp,
    torch.clip,
    torch.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.sign,
    torch.reciprocal,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pos,
    operator.abs,
    operator.pow,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "exp_",
    "log",
    "abs",
    "neg",
    "sqrt",
    "rsqrt",
    "square",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "pow",
    "maximum",
    "minimum",
    "sin",
    "cos",
    "erf",
    "where",
    "sign",
    "reciprocal",
    "masked_fill",
}
_SELF_METHODS = {
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "contiguous",
    "clone",
    "detach",
    "requires_grad_",
    "cpu",
    "cuda",
}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, F.normalize}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_CHANNELWISE_FUNCS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.lp_pool1d,
    F.lp_pool2d,
    F.interpolate,
    F.upsample,
    F.upsample_nearest,
    F.upsample_bilinear,
}
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
_ALIGN_METHODS = {"expand", "expand_as", "repeat"}
_REDUCE_NAMES = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "nansum", "nanmean", "norm"}
_REDUCE_FUNCS = {getattr(torch, n) for n in _REDUCE_NAMES}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "nelement"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_TRANSPOSE_FUNCS = {torch.transpose, torch.swapaxes, torch.swapdims}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}

_PINNED = 0  # union-find element standing for "identity permutation"
#: LayerNorm and RMSNorm (torch >= 2.4) normalise over trailing axes; their affine entries follow the unit axis
_LN_MODULES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: ops after which a stream that no longer appears in the output was reduced over its units (not consumed by a layer)
_OP_REDUCTIONS = _REDUCE_NAMES | {"max", "min"}


class _DictInfo(dict):
    """Stream info of a dict-valued result (key -> info of that entry), not of a tensor."""


# --------------------------------------------------------------------------- result
@dataclass
class TraceResult:
    """Everything the tracer learned about a model.

    Attributes
    ----------
    spec:
        The permutation spec (groups in network order).
    warnings:
        One message per stream that could have been permuted but was pinned.
    sites:
        Group -> names of submodules whose output carries that group's units on
        axis 1 (see :func:`activation_sites`).
    producers:
        Group -> every module (or weight key prefix, for functional layers)
        whose output starts that group's units, in graph order.
    """

    spec: PermutationSpec
    warnings: list[str] = field(default_factory=list)
    sites: dict[str, list[str]] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)
    #: every op the tracer could not see through (whether or not units flowed into it)
    opaque: list[str] = field(default_factory=list)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0]  # element 0 is PINNED

    def make(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == _PINNED or (ra != _PINNED and rb < ra):  # keep PINNED (and older elements) as roots
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


def _flat_nodes(arg: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: out.append(n) or n)
    return out


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch") or mod == "" or mod == "builtins":
        return f"torch.{name}" if mod.startswith("torch") else name
    if mod == "_operator":
        return f"operator.{name}"
    return f"{mod}.{name}"


class _RecordingUnionFind(_UnionFind):
    """Union-find that remembers every union (to name streams as they were before pinning)."""

    def __init__(self, log: list[tuple[int, int]]) -> None:
        super().__init__()
        self.log = log

    def union(self, a: int, b: int) -> int:
        self.log.append((a, b))
        return super().union(a, b)


class _Tracer:
    """Walks a shape-propagated fx graph and builds the stream union-find."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], strict: bool):
        self.gm = gm
        self.state = state
        self.strict = strict
        self._unions: list[tuple[int, int]] = []
        self.uf: _UnionFind = _RecordingUnionFind(self._unions)
        self.key_elem: dict[tuple[str, int], int] = {}
        self.producer_name: dict[int, str] = {}  # producer element -> module name
        self.producer_order: list[int] = []
        self.pin_reasons: list[tuple[int, str, bool]] = []
        self.info: dict[fx.Node, Any] = {}
        self.module_calls: dict[str, int] = {}
        self.site_nodes: list[tuple[fx.Node, str]] = []  # (call_module node, kind)
        self.opaque_ops: list[str] = []
        self.op_records: list[tuple[str, tuple[int, ...], tuple[int, ...], bool]] = []  # for spec.ops
        self.elem_ops: list[tuple[int, str]] = []  # (element, op label) of units created inside a module
        self.refines: list[tuple[int, list[tuple[int | None, int, int]], str]] = []  # (elem, pieces, where)
        self.slices: list[tuple[int, int, int, int, str]] = []  # (elem, start, stop, piece elem, where)
        self.heads: list[tuple[str, int, list[int]]] = []  # (name, n_heads, member elems)
        self.extra_sizes: dict[int, int] = {}  # element -> size, for elements without state-dict axes
        # head-split streams: (flat stream, H, d, head-axis elem, within-head-axis elem); the head axis carries
        # a plain permutation of the H heads, the within-head axis one permutation per head (never alone)
        self.joints: list[tuple[int, int, int, int, int]] = []
        self.w_partner: dict[int, int] = {}  # within-head elem -> its head elem
        # fused q/k/v viewed as (3, H, d) (timm style): stack elem -> (head placeholder, within placeholder,
        # [(head elem, within elem) per q/k/v]); unbind/indexing the stack axis picks one projection's heads
        self.stacks: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}
        self.stack_src: dict[int, int] = {}  # stack elem -> the fused stream it was cut from
        self._alias_keys()

    # ---------------------------------------------------------------- elements
    def _alias_keys(self) -> None:
        """Tied tensors (two keys, one storage) must move together."""
        seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
        for k, v in self.state.items():
            if v.dim() == 0 or v.numel() == 0:
                continue
            sig = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            if sig in seen:
                for ax in range(v.dim()):
                    self.uf.union(self.key(seen[sig], ax), self.key(k, ax))
            else:
                seen[sig] = k

    def key(self, key: str, axis: int) -> int:
        e = self.key_elem.get((key, axis))
        if e is None:
            e = self.key_elem[(key, axis)] = self.uf.make()
        return e

    def join_key(self, stream: int | None, key: str, axis: int) -> None:
        if stream is not None and key in self.state and axis < self.state[key].dim():
            self.uf.union(stream, self.key(key, axis))

    def producer(self, name: str, keys: list[tuple[str, int]]) -> int:
        p = self.uf.make()
        self.producer_name[p] = name
        self.producer_order.append(p)
        for k, ax in keys:
            self.join_key(p, k, ax)
        return p

    def fresh(self, size: int, name: str | None = None) -> int:
        """A new stream of ``size`` units (a producer named ``name`` when given)."""
        e = self.uf.make()
        self.extra_sizes[e] = int(size)
        if name is not None:
            self.producer_name[e] = name
            self.producer_order.append(e)
        return e

    def refined(self, pieces: list[tuple[int | None, int, int]], where: str) -> int:
        """A new stream whose permutation is the block composition of ``pieces``."""
        e = self.uf.make()
        self.extra_sizes[e] = int(sum(n * inner for _, n, inner in pieces))
        self.refines.append((e, list(pieces), where))
        return e

    def pin(self, stream: int, reason: str, warn: bool = True) -> None:
        self.pin_reasons.append((stream, reason, warn))
        self.uf.union(_PINNED, stream)

    def pin_all(self, arg: Any, reason: str, warn: bool = True) -> None:
        for n in _flat_nodes(arg):
            self._pin_info(self.info.get(n), reason, warn)

    def _pin_info(self, inf: Any, reason: str, warn: bool) -> None:
        if isinstance(inf, _DictInfo):
            for i in inf.values():
                self._pin_info(i, reason, warn)
        elif isinstance(inf, dict):
            for e in inf.values():
                self.pin(e, reason, warn)
        elif isinstance(inf, (tuple, list)):
            for i in inf:
                self._pin_info(i, reason, warn)

    # ---------------------------------------------------------------- node facts
    def shape(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            tm = arg.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                return tuple(int(s) for s in tm.shape)
            return None
        if isinstance(arg, (int, float, bool)):
            return ()
        return None

    def tinfo(self, arg: Any) -> dict[int, int]:
        if isinstance(arg, fx.Node):
            inf = self.info.get(arg)
            return inf if isinstance(inf, dict) and not isinstance(inf, _DictInfo) else {}
        return {}

    def invariant_like(self, node: fx.Node) -> Any:
        tm = node.meta.get("tensor_meta")
        return self._inv(tm)

    def _inv(self, tm: Any) -> Any:
        if isinstance(tm, TensorMetadata):
            return {}
        if isinstance(tm, (tuple, list)):
            return tuple(self._inv(t) for t in tm)
        if isinstance(tm, dict):
            return _DictInfo({k: self._inv(v) for k, v in tm.items()})
        return None

    # ---------------------------------------------------------------- rules
    def opaque(self, node: fx.Node, why: str | None = None) -> Any:
        reason = why or f"{_op_name(node)} at node {node.name!r} is not understood by the tracer"
        self.opaque_ops.append(reason)
        self.pin_all((node.args, node.kwargs), reason)
        return self.invariant_like(node)

    def broadcast(self, node: fx.Node, operands: list[Any]) -> dict[int, int]:
        """Elementwise op: join the streams of broadcast-aligned operands per output axis."""
        out_shape = self.shape(node)
        if out_shape is None:
            return self.opaque(node)
        n = len(out_shape)
        out: dict[int, int] = {}
        for d in range(n):
            streams: list[int] = []
            invariant_varies = False
            for a in operands:
                s = self.shape(a)
                if s is None:
                    continue
                i = d - (n - len(s))
                if i < 0 or (s[i] == 1 and out_shape[d] != 1):
                    continue
                inf = self.tinfo(a)
                if i in inf:
                    streams.append(inf[i])
                else:
                    invariant_varies = True
            if not streams:
                continue
            for e in streams[1:]:
                self.uf.union(streams[0], e)
            if invariant_varies and out_shape[d] > 1:
                self.pin(
                    streams[0],
                    f"{_op_name(node)} at node {node.name!r} combines it with a tensor that does "
                    f"not move with these units (axis {d})",
                )
            out[d] = streams[0]
        return out

    def align(self, node: fx.Node, src: Any) -> dict[int, int]:
        """Single-tensor op keeping axes aligned from the right (expand, repeat, dtype casts)."""
        out_shape, in_shape = self.shape(node), self.shape(src)
        if out_shape is None or in_shape is None:
            return self.opaque(node)
        off = len(out_shape) - len(in_shape)
        out: dict[int, int] = {}
        for d, e in self.tinfo(src).items():
            if d + off >= 0 and out_shape[d + off] == in_shape[d]:
                out[d + off] = e
            else:
                self.pin(e, f"{_op_name(node)} at node {node.name!r} changes the size of axis {d}")
        return out

    def channelwise(self, node: fx.Node, src: Any) -> dict[int, int]:
        """Op acting per (batch, channel) on the trailing axes: pools, upsampling, padding modules."""
        out: dict[int, int] = {}
        for d, e in self.tinfo(src).items():
            if d in (0, 1):
                out[d] = e
            else:
                self.pin(e, f"{_op_name(node)} at node {node.name!r} mixes axis {d}, which carries units")
        return out

    def reshape(self, node: fx.Node, src: Any) -> dict[int, int]:
        """A unit axis survives a reshape iff some output axis has its size and the same prefix product.

        Row-major layout: element ``(pre, c, post)`` sits at ``pre*C*POST + c*POST + post``;
        an output axis ``j`` with ``prod(out[:j]) == prod(in[:d])`` and ``out[j] == C``
        has the same offsets, so the units keep their axis (flatten of ``C x 1 x 1``). Otherwise, in
        order: a head axis and its within-head axis merge back into one unit axis; a unit axis splits
        into (projections, heads, head dim) or (heads, head dim); a unit axis merges with the axes after
        it into blocks; else its units are pinned.
        """
        in_shape, out_shape = self.shape(src), self.shape(node)
        if in_shape is None or out_shape is None:
            return self.opaque(node)
        inf = self.tinfo(src)
        out, done = self._merge_heads(inf, in_shape, out_shape)
        for d, e in inf.items():
            if d in done:
                continue
            pre, c = _prod(in_shape[:d]), in_shape[d]
            j = next((j for j in range(len(out_shape)) if out_shape[j] == c and _prod(out_shape[:j]) == pre), None)
            if j is not None:
                out[j] = e
                continue
            if self.w_partner.get(e) is None:
                split = self._split_projections(node, e, pre, c, out_shape) or self._split_heads(e, pre, c, out_shape)
                if split:
                    out.update(split)
                    continue
            blocks = self._flatten_blocks(node, src, e, d, pre, c, in_shape, out_shape)
            if blocks:
                out.update(blocks)
                continue
            self.pin(
                e,
                f"{_op_name(node)} at node {node.name!r} reshapes {list(in_shape)} -> {list(out_shape)}, "
                f"mixing the {c} units of axis {d} with other axes (e.g. flattening a feature map "
                f"larger than 1x1 into a Linear)",
            )
        return out

    def _merge_heads(
        self, inf: dict[int, int], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
    ) -> tuple[dict[int, int], set[int]]:
        """A head axis followed by its within-head axis merged back into one unit axis: ``(out axes, input
        axes consumed)``."""
        out: dict[int, int] = {}
        done: set[int] = set()
        for d, e in inf.items():
            w = inf.get(d + 1)
            if (
                w is not None
                and self.w_partner.get(w) is not None
                and self.uf.find(self.w_partner[w]) == self.uf.find(e)
            ):
                pre, n = _prod(in_shape[:d]), in_shape[d] * in_shape[d + 1]
                j = next((j for j in range(len(out_shape)) if out_shape[j] == n and _prod(out_shape[:j]) == pre), None)
                if j is not None:
                    f = self.uf.make()
                    self.extra_sizes[f] = n
                    self.joints.append((f, in_shape[d], in_shape[d + 1], e, w))
                    out[j] = f
                    done.update((d, d + 1))
        return out, done

    def _split_projections(
        self, node: fx.Node, e: int, pre: int, c: int, out_shape: tuple[int, ...]
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
            piece = self.fresh(H * dh)
            self.slices.append((e, i * H * dh, (i + 1) * H * dh, piece, f"{_op_name(node)} at node {node.name!r}"))
            eh, ew = self.uf.make(), self.uf.make()
            self.extra_sizes[eh], self.extra_sizes[ew] = H, dh
            self.w_partner[ew] = eh
            self.joints.append((piece, H, dh, eh, ew))
            pairs.append((eh, ew))
        st, ph, pw = self.uf.make(), self.uf.make(), self.uf.make()
        self.stacks[st] = (ph, pw, pairs)
        self.stack_src[st] = e
        return {j4: st, j4 + 1: ph, j4 + 2: pw}

    def _split_heads(self, e: int, pre: int, c: int, out_shape: tuple[int, ...]) -> dict[int, int] | None:
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
        eh, ew = self.uf.make(), self.uf.make()
        self.extra_sizes[eh], self.extra_sizes[ew] = H, dh
        self.w_partner[ew] = eh
        self.joints.append((e, H, dh, eh, ew))
        return {j3: eh, j3 + 1: ew}

    def _flatten_blocks(
        self,
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
            dd in self.tinfo(src) for dd in range(d + 1, len(in_shape)) if _prod(in_shape[d : dd + 1]) <= out_shape[j2]
        ):
            return None
        return {j2: self.refined([(e, c, out_shape[j2] // c)], f"{_op_name(node)} at node {node.name!r}")}

    def reduce(self, node: fx.Node, src: Any, dim: Any, keepdim: bool) -> dict[int, int] | None:
        in_shape, out_shape = self.shape(src), self.shape(node)
        if in_shape is None or out_shape is None:
            return None
        n = len(in_shape)
        if dim is None:
            dims = set(range(n))
        elif isinstance(dim, int):
            dims = {dim % n}
        elif isinstance(dim, (tuple, list)) and all(isinstance(x, int) for x in dim):
            dims = {x % n for x in dim}
        else:
            return None
        expect = n if keepdim else n - len(dims)
        if len(out_shape) != expect:
            return None
        out: dict[int, int] = {}
        for d, e in self.tinfo(src).items():
            if d in dims:
                continue  # reducing over units is permutation invariant
            out[d if keepdim else d - sum(1 for r in dims if r < d)] = e
        return out

    def transpose(self, node: fx.Node, src: Any, order: list[int]) -> dict[int, int]:
        """Output axis ``i`` is input axis ``order[i]``."""
        inv = {o: i for i, o in enumerate(order)}
        return {inv[d]: e for d, e in self.tinfo(src).items()}

    def cat(self, node: fx.Node, tensors: list[Any], dim: int) -> dict[int, int]:
        out_shape = self.shape(node)
        if out_shape is None:
            return self.opaque(node)
        n = len(out_shape)
        dim %= n
        if len(tensors) == 1:
            return dict(self.tinfo(tensors[0]))
        out: dict[int, int] = {}
        for d in range(n):
            if d == dim:
                if any(d in self.tinfo(t) for t in tensors):
                    pieces = []
                    for t in tensors:
                        s = self.shape(t)
                        if s is None:
                            return self.opaque(node)
                        pieces.append((self.tinfo(t).get(d), int(s[d]), 1))
                    out[d] = self.refined(pieces, f"{_op_name(node)} at node {node.name!r}")
                continue
            streams = [self.tinfo(t)[d] for t in tensors if d in self.tinfo(t)]
            if not streams:
                continue
            for e in streams[1:]:
                self.uf.union(streams[0], e)
            if len(streams) < len(tensors) and out_shape[d] > 1:
                self.pin(
                    streams[0],
                    f"{_op_name(node)} at node {node.name!r} concatenates them with a tensor that "
                    f"does not move with these units",
                )
            out[d] = streams[0]
        return out

    def stack(self, node: fx.Node, tensors: list[Any], dim: int) -> dict[int, int]:
        out_shape = self.shape(node)
        if out_shape is None:
            return self.opaque(node)
        dim %= len(out_shape)
        per_dim: dict[int, list[int]] = {}
        for t in tensors:
            for d, e in self.tinfo(t).items():
                per_dim.setdefault(d if d < dim else d + 1, []).append(e)
        out: dict[int, int] = {}
        for d, streams in per_dim.items():
            for e in streams[1:]:
                self.uf.union(streams[0], e)
            if len(streams) < len(tensors) and out_shape[d] > 1:
                self.pin(
                    streams[0],
                    f"{_op_name(node)} at node {node.name!r} stacks them with a tensor that does not "
                    f"move with these units",
                )
            out[d] = streams[0]
        return out

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        inf = self.info.get(src) if isinstance(src, fx.Node) else None
        if isinstance(inf, (tuple, list)):
            return inf[idx] if isinstance(idx, int) and -len(inf) <= idx < len(inf) else self.opaque(node)
        if isinstance(inf, _DictInfo):
            return inf[idx] if idx in inf else self.opaque(node)
        in_shape = self.shape(src)
        if in_shape is None or not isinstance(inf, dict):
            return self.invariant_like(node) if inf is None and not _flat_nodes(idx) else self.opaque(node)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(
            isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items
        ):
            return self.opaque(node, f"{_op_name(node)} at node {node.name!r} indexes the tensor with another tensor")
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
                if e is not None and e in self.stacks and len(items) == 1:  # qkv[0]: one projection
                    return self._pick(inf, d_in, it % in_shape[d_in])
                if e is not None:
                    self.pin(e, f"indexing at node {node.name!r} selects single units of axis {d_in}")
                d_in += 1
                continue
            full = it == slice(None) or (
                it.start in (None, 0) and it.step in (None, 1) and (it.stop is None or it.stop >= in_shape[d_in])
            )
            if e is not None:
                if full:
                    out[d_out] = e
                else:
                    sl = self._slice_piece(node, e, it, in_shape[d_in])
                    if sl is None:
                        self.pin(
                            e, f"slicing at node {node.name!r} selects a strided subset of the units of axis {d_in}"
                        )
                    else:
                        out[d_out] = sl
            d_in += 1
            d_out += 1
        for d in range(d_in, len(in_shape)):
            if d in inf:
                out[d_out + d - d_in] = inf[d]
        return out

    def _slice_piece(self, node: fx.Node, e: int, it: slice, n: int) -> int | None:
        """A contiguous slice of stream ``e``: a new stream for that piece (``None`` for strided slices)."""
        if not all(x is None or isinstance(x, int) for x in (it.start, it.stop, it.step)) or it.step not in (None, 1):
            return None
        start, stop, _ = it.indices(n)
        if stop <= start:
            return None
        p = self.fresh(stop - start)
        self.slices.append((e, start, stop, p, f"slicing at node {node.name!r}"))
        return p

    def split(self, node: fx.Node, src: Any, sizes: list[int], dim: int) -> Any:
        """``split`` / ``chunk`` / ``unbind``-free splitting: one piece per output along ``dim``."""
        s = self.shape(src)
        inf = self.tinfo(src)
        if s is None:
            return self.opaque(node)
        dim %= len(s)
        outs = []
        off = 0
        for size in sizes:
            o = {d: e for d, e in inf.items() if d != dim}
            if dim in inf:
                if size == s[dim]:
                    o[dim] = inf[dim]
                else:
                    p = self.fresh(size)
                    self.slices.append((inf[dim], off, off + size, p, f"{_op_name(node)} at node {node.name!r}"))
                    o[dim] = p
            outs.append(o)
            off += size
        return tuple(outs)

    def split_call(self, node: fx.Node, method: bool) -> Any:
        a = node.args
        src = a[0]
        name = str(node.target) if method else getattr(node.target, "__name__", "")
        s = self.shape(src)
        if s is None:
            return self.opaque(node)
        tm = node.meta.get("tensor_meta")
        dim_raw = self._dim_arg(node, 2, 0)
        if (
            isinstance(tm, (tuple, list))
            and all(isinstance(t, TensorMetadata) for t in tm)
            and isinstance(dim_raw, int)
        ):
            return self.split(node, src, [int(t.shape[dim_raw % len(s)]) for t in tm], int(dim_raw))
        if name == "chunk":
            chunks = int(self._dim_arg(node, 1, None, "chunks"))
            dim = int(self._dim_arg(node, 2, 0))
            n = s[dim % len(s)]
            step = -(-n // chunks)
            sizes = [min(step, n - i) for i in range(0, n, step)]
        else:
            arg = self._dim_arg(node, 1, None, "split_size_or_sections" if not method else "split_size")
            if arg is None:
                arg = node.kwargs.get("split_size_or_sections")
            dim = int(self._dim_arg(node, 2, 0))
            n = s[dim % len(s)]
            if isinstance(arg, int):
                sizes = [min(arg, n - i) for i in range(0, n, arg)]
            elif isinstance(arg, (list, tuple)) and all(isinstance(x, int) for x in arg):
                sizes = list(arg)
            else:
                return self.opaque(node)
        return self.split(node, src, sizes, dim)

    def unbind(self, node: fx.Node, src: Any, dim: int) -> Any:
        s = self.shape(src)
        if s is None:
            return self.opaque(node)
        dim %= len(s)
        inf = self.tinfo(src)
        if dim in inf and inf[dim] in self.stacks:
            return tuple(self._pick(inf, dim, i) for i in range(s[dim]))
        if dim in inf:
            self.pin(inf[dim], f"{_op_name(node)} at node {node.name!r} takes single units apart")
        return tuple({(d if d < dim else d - 1): e for d, e in inf.items() if d != dim} for _ in range(s[dim]))

    def _pick(self, inf: dict[int, int], dim: int, i: int) -> dict[int, int]:
        """Projection ``i`` of a fused (projections, heads, head dim) tensor: its own head axes."""
        ph, pw, pairs = self.stacks[inf[dim]]
        out = {}
        for d, e in inf.items():
            if d == dim:
                continue
            out[d if d < dim else d - 1] = pairs[i][0] if e == ph else pairs[i][1] if e == pw else e
        return out

    def matmul(self, node: fx.Node, x: Any, y: Any) -> Any:
        """``x @ y``: batch axes broadcast, the contracted axes' streams are joined (their sum is invariant)."""
        sx, sy, so = self.shape(x), self.shape(y), self.shape(node)
        if sx is None or sy is None or so is None or len(sx) < 2 or len(sy) < 2:
            return self.opaque(node)
        ix, iy = self.tinfo(x), self.tinfo(y)
        nx, ny, n = len(sx), len(sy), len(so)
        cx, cy = ix.get(nx - 1), iy.get(ny - 2)
        if cx is not None and cy is not None:
            self.uf.union(cx, cy)
        elif cx is not None or cy is not None:
            self.pin(
                cx if cx is not None else cy,
                f"{_op_name(node)} at node {node.name!r} contracts these units "
                f"with a tensor that does not move with them",
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
                    self.uf.union(streams[0], e)
                if varies and so[d] > 1:
                    self.pin(
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

    def sdpa(self, node: fx.Node) -> Any:
        """``F.scaled_dot_product_attention(q, k, v)``: ``softmax(q k^T / s) v`` over the last two axes."""
        a = list(node.args)
        q = a[0] if len(a) > 0 else node.kwargs.get("query")
        k = a[1] if len(a) > 1 else node.kwargs.get("key")
        v = a[2] if len(a) > 2 else node.kwargs.get("value")
        mask = a[3] if len(a) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            self.pin_all(mask, "attention masks must not depend on unit order")
        sq, sk, sv = self.shape(q), self.shape(k), self.shape(v)
        if sq is None or sk is None or sv is None:
            return self.opaque(node)
        iq, ik, iv = self.tinfo(q), self.tinfo(k), self.tinfo(v)
        n = len(sq)
        eq, ek = iq.get(n - 1), ik.get(len(sk) - 1)
        if eq is not None and ek is not None:
            self.uf.union(eq, ek)
        elif eq is not None or ek is not None:
            self.pin(
                eq if eq is not None else ek,
                f"F.scaled_dot_product_attention at node {node.name!r}: query and key features do not move together",
            )
        for inf, s in ((ik, sk), (iv, sv)):  # the key/value token axis is summed over
            e = inf.get(len(s) - 2)
            if e is not None:
                self.pin(e, f"F.scaled_dot_product_attention at node {node.name!r} mixes the token axis")
        out: dict[int, int] = {}
        for d in range(n - 2):
            streams = [inf[d] for inf in (iq, ik, iv) if d in inf]
            if streams:
                for e in streams[1:]:
                    self.uf.union(streams[0], e)
                if len(streams) < 3 and sq[d] > 1:
                    self.pin(
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

    def check_heads(self, node: fx.Node) -> None:
        """A within-head axis must travel with its head axis (one permutation per head is no axis permutation)."""
        inf = self.info.get(node)
        if not isinstance(inf, dict) or isinstance(inf, _DictInfo):
            return
        heads = {self.uf.find(e) for e in inf.values()}
        for _d, e in inf.items():
            h = self.w_partner.get(e)
            if h is not None and self.uf.find(h) not in heads:
                self.pin(e, f"{_op_name(node)} at node {node.name!r} separates a head's features from their head")

    # ---------------------------------------------------------------- attention and recurrent layers
    def mha(self, node: fx.Node, name: str, m: nn.MultiheadAttention) -> Any:
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
            return self.opaque(node, f"nn.MultiheadAttention {name!r}: {bad}")
        s = self.shape(q)
        if s is None or len(s) not in (2, 3):
            return self.opaque(node)
        last = len(s) - 1
        streams = [self.tinfo(t) for t in (q, k, v)]
        for inf in streams:
            for d, e in inf.items():
                if d != last:
                    self.pin(e, f"nn.MultiheadAttention {name!r} mixes axis {d}, which carries units")
        for t in list(extra.values()) + extra_pos:
            self.pin_all(t, f"nn.MultiheadAttention {name!r}: masks must not depend on unit order")
        ins = [inf.get(last) for inf in streams]
        col = self.key(f"{name}.in_proj_weight", 1)
        for e in ins:
            if e is not None:
                self.uf.union(col, e)
        if any(e is None for e in ins):
            self.pin(col, f"nn.MultiheadAttention {name!r} reads an unpermuted query/key/value")
        E, H = m.embed_dim, m.num_heads
        qk = self.fresh(E, f"{name}.qk")
        vo = self.fresh(E, f"{name}.vo")
        rows = self.refined([(qk, E, 1), (qk, E, 1), (vo, E, 1)], f"nn.MultiheadAttention {name!r}")
        self.join_key(rows, f"{name}.in_proj_weight", 0)
        self.join_key(rows, f"{name}.in_proj_bias", 0)
        self.join_key(vo, f"{name}.out_proj.weight", 1)
        self.heads.append((name, H, [qk, vo]))
        keys = [(f"{name}.out_proj.weight", 0)] + (
            [(f"{name}.out_proj.bias", 0)] if m.out_proj.bias is not None else []
        )
        out = self.producer(name, keys)
        tm = node.meta.get("tensor_meta")
        n_out = len(tm) if isinstance(tm, (tuple, list)) else 2
        first = {last: out}
        return (first,) + tuple({} for _ in range(n_out - 1))

    def recurrent(self, node: fx.Node, name: str, m: nn.RNNBase) -> Any:
        """``nn.LSTM`` / ``nn.GRU``: one hidden stream per layer, every gate block moved by it."""
        if m.bidirectional or getattr(m, "proj_size", 0):
            return self.opaque(node, f"{type(m).__name__} {name!r} is bidirectional or projected (not supported)")
        gates = {"LSTM": 4, "GRU": 3}.get(m.mode, None)
        if gates is None:
            return self.opaque(node, f"{type(m).__name__} {name!r} ({m.mode}) is not supported")
        src = node.args[0]
        s = self.shape(src)
        if s is None:
            return self.opaque(node)
        last = len(s) - 1
        inf = self.tinfo(src)
        for d, e in inf.items():
            if d != last:
                self.pin(e, f"{type(m).__name__} {name!r} mixes axis {d}, which carries units")
        hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
        h = m.hidden_size
        prev = inf.get(last)
        if prev is not None:
            self.join_key(prev, f"{name}.weight_ih_l0", 1)
        else:
            self.pin(self.key(f"{name}.weight_ih_l0", 1), f"{name!r} reads an unpermuted input")
        layer_streams = []
        for layer in range(m.num_layers):
            hs = self.fresh(h, name if m.num_layers == 1 else f"{name}.l{layer}")
            self.elem_ops.append((hs, f"{type(m).__name__}:{name}"))  # gates: elementwise nonlinear (spec.ops)
            rows = self.refined([(hs, h, 1)] * gates, f"{type(m).__name__} {name!r} gates")
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                self.join_key(rows, f"{name}.{kind}_l{layer}", 0)
            self.join_key(hs, f"{name}.weight_hh_l{layer}", 1)
            if layer + 1 < m.num_layers:
                self.join_key(hs, f"{name}.weight_ih_l{layer + 1}", 1)
            layer_streams.append(hs)
        if hx is not None:
            for e in layer_streams:
                self.pin(e, f"{type(m).__name__} {name!r} is given an initial state that does not move with its units")
        out = {last: layer_streams[-1]}
        uses_state = any(
            (u.args[1] != 0 and len(u.users) > 0)
            if (u.op == "call_function" and u.target is operator.getitem)
            else True
            for u in node.users
        )
        if m.num_layers == 1:
            state_inf = {2: layer_streams[0]}
        else:
            state_inf = {}
            if uses_state:
                for e in layer_streams:
                    self.pin(
                        e,
                        f"{type(m).__name__} {name!r}: its final state mixes the layers' units on one axis "
                        f"(use the output sequence)",
                    )
        hidden = (dict(state_inf), dict(state_inf)) if m.mode == "LSTM" else dict(state_inf)
        return (out, hidden)

    # ---------------------------------------------------------------- layers
    def linear_like(self, node: fx.Node, name: str, src: Any, w: str, b: str | None) -> dict[int, int]:
        """``y = x W^T + b`` over the last axis: ``W' = P_out W P_in^T``."""
        inf = self.tinfo(src)
        s = self.shape(src)
        last = (len(s) - 1) if s else 0
        if last in inf:
            self.join_key(inf[last], w, 1)
        elif w in self.state:  # reads an unpermuted axis: those weight columns stay (matters for tied weights)
            self.pin(self.key(w, 1), f"{name!r} reads an unpermuted input with weights tied to these units")
        keys = [(w, 0)] + ([(b, 0)] if b else [])
        p = self.producer(name, keys)
        out = {d: e for d, e in inf.items() if d != last}
        out[last] = p
        return out

    def conv_like(
        self, node: fx.Node, name: str, src: Any, w: str, b: str | None, groups: int, transposed: bool = False
    ) -> dict[int, int]:
        inf = self.tinfo(src)
        for d, e in inf.items():
            if d != 1:
                self.pin(e, f"convolution {name!r} mixes axis {d}, which carries units")
        in_e = inf.get(1)
        w_shape = tuple(self.state[w].shape) if w in self.state else None
        if w_shape is None:
            return self.opaque(node)
        cin = w_shape[0] if transposed else w_shape[1] * groups
        cout = w_shape[1] * groups if transposed else w_shape[0]
        if groups == 1:
            if in_e is not None:
                self.join_key(in_e, w, 0 if transposed else 1)
            else:
                self.pin(
                    self.key(w, 0 if transposed else 1),
                    f"{name!r} reads an unpermuted input with weights tied to these units",
                )
            keys = [(w, 1 if transposed else 0)] + ([(b, 0)] if b else [])
            return {1: self.producer(name, keys)}
        if not transposed and groups == cin == cout:  # depthwise: channel c only reads channel c
            if in_e is None:
                return {}
            self.join_key(in_e, w, 0)
            if b:
                self.join_key(in_e, b, 0)
            return {1: in_e}
        if in_e is not None:
            self.pin(in_e, f"grouped convolution {name!r} (groups={groups}) mixes channels within groups only")
        return {}

    def per_channel(self, node: fx.Node, prefix: str, src: Any, axis_of_stream: int = 1) -> dict[int, int]:
        """Norm layers with one entry per channel on axis 0 of every (non-scalar) parameter and buffer."""
        inf = dict(self.tinfo(src))
        e = inf.get(axis_of_stream)
        if e is not None:
            for k, v in self.state.items():
                if k.rsplit(".", 1)[0] == prefix and v.dim() >= 1:
                    self.join_key(e, k, 0)
        return inf

    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        m = self.gm.get_submodule(name)
        self.module_calls[name] = self.module_calls.get(name, 0) + 1
        src = node.args[0] if node.args else None
        has_bias = lambda mod: getattr(mod, "bias", None) is not None  # noqa: E731
        if isinstance(m, nn.Linear):
            self.site_nodes.append((node, "producer"))
            return self.linear_like(node, name, src, f"{name}.weight", f"{name}.bias" if has_bias(m) else None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self.site_nodes.append((node, "producer"))
            return self.conv_like(node, name, src, f"{name}.weight", f"{name}.bias" if has_bias(m) else None, m.groups)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            self.site_nodes.append((node, "producer"))
            if m.groups != 1:
                return self.opaque(node, f"grouped transposed convolution {name!r} is not supported")
            return self.conv_like(node, name, src, f"{name}.weight", f"{name}.bias" if has_bias(m) else None, 1, True)
        if isinstance(m, nn.Embedding):
            self.pin_all(src, f"embedding {name!r} takes indices")
            s = self.shape(node)
            self.site_nodes.append((node, "producer"))
            return {len(s) - 1: self.producer(name, [(f"{name}.weight", 1)])} if s else self.opaque(node)
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(node, name, m)
        if isinstance(m, (nn.LSTM, nn.GRU)):
            return self.recurrent(node, name, m)
        if isinstance(m, _BN_MODULES):
            self.site_nodes.append((node, "norm"))
            return self.per_channel(node, name, src)
        if isinstance(m, nn.GroupNorm):
            self.site_nodes.append((node, "norm"))
            if m.num_groups in (1, m.num_channels):
                return self.per_channel(node, name, src)
            inf = self.tinfo(src)
            if 1 in inf:
                self.pin(
                    inf[1],
                    f"GroupNorm {name!r} normalises groups of {m.num_channels // m.num_groups} channels "
                    f"together (num_groups={m.num_groups}; only 1 or num_channels={m.num_channels} "
                    f"commute with channel permutations)",
                )
            return dict(inf)
        if isinstance(m, _LN_MODULES):
            self.site_nodes.append((node, "norm"))
            inf = dict(self.tinfo(src))
            s = self.shape(src) or ()
            k = len(m.normalized_shape)
            for d, e in inf.items():
                if d >= len(s) - k:  # unit axis is among the normalised axes: its affine entries move with it
                    self.join_key(e, f"{name}.weight", d - (len(s) - k))
                    self.join_key(e, f"{name}.bias", d - (len(s) - k))
            return inf
        if isinstance(m, nn.PReLU):
            self.site_nodes.append((node, "act"))
            inf = dict(self.tinfo(src))
            if m.num_parameters > 1:
                if 1 in inf:
                    self.join_key(inf[1], f"{name}.weight", 0)
                else:
                    return self.broadcast(node, [src])
            return inf
        if isinstance(m, _ACT_MODULES):
            self.site_nodes.append((node, "act"))
            return self.broadcast(node, [src])
        if isinstance(m, _PASS_MODULES) or isinstance(m, _SOFTMAX_MODULES):
            return dict(self.tinfo(src))
        if isinstance(m, _CHANNELWISE_MODULES):
            return self.channelwise(node, src)
        if isinstance(m, _RESHAPE_MODULES):
            return self.reshape(node, src)
        return self.opaque(node, f"module {name!r} ({type(m).__name__}) is not understood by the tracer")

    # ---------------------------------------------------------------- functions and methods
    def _dim_arg(self, node: fx.Node, pos: int, default: Any = None, kw: str = "dim") -> Any:
        if kw in node.kwargs:
            return node.kwargs[kw]
        return node.args[pos] if len(node.args) > pos else default

    def _keyed(self, arg: Any) -> str | None:
        """State-dict key behind a ``get_attr`` node (for functional layers)."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and str(arg.target) in self.state:
            return str(arg.target)
        return None

    def call_function(self, node: fx.Node) -> Any:
        t = node.target
        a = node.args
        src = a[0] if a else None
        if t is operator.getitem:
            return self.getitem(node)
        if t is getattr:
            return self.attribute(node)
        if t in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            w = self._keyed(a[1] if len(a) > 1 else node.kwargs.get("weight"))
            b_arg = a[2] if len(a) > 2 else node.kwargs.get("bias")
            b = self._keyed(b_arg)
            if w is None or (b_arg is not None and b is None):
                return self.opaque(
                    node, f"{_op_name(node)} at node {node.name!r} uses weights that are not module parameters"
                )
            name = w.rsplit(".", 1)[0] if "." in w else w
            if t is F.linear:
                return self.linear_like(node, name, src, w, b)
            groups = self._dim_arg(node, 6, 1, "groups")
            return self.conv_like(node, name, src, w, b, int(groups))
        if t in _ELEMENTWISE_FUNCS:
            return self.broadcast(node, list(a) + list(node.kwargs.values()))
        if t in _SOFTMAX_FUNCS:
            return dict(self.tinfo(src))
        if t in _CHANNELWISE_FUNCS:
            return self.channelwise(node, src)
        if t is F.pad:
            return self.pad(node, src, a[1] if len(a) > 1 else node.kwargs.get("pad"))
        if t in _RESHAPE_FUNCS:
            return self.reshape(node, src)
        if t in _CAT_FUNCS:
            return self.cat(node, list(src), int(self._dim_arg(node, 1, 0)))
        if t is torch.stack:
            return self.stack(node, list(src), int(self._dim_arg(node, 1, 0)))
        if t in (torch.matmul, operator.matmul, torch.bmm):
            return self.matmul(node, a[0], a[1])
        if t is F.scaled_dot_product_attention:
            return self.sdpa(node)
        if t in (torch.split, torch.chunk):
            return self.split_call(node, False)
        if t is torch.unbind:
            return self.unbind(node, src, int(self._dim_arg(node, 1, 0)))
        if t in _TRANSPOSE_FUNCS:
            return self.swap(node, src, a[1], a[2])
        if t is torch.permute:
            return self.transpose(node, src, [int(x) % len(self.shape(src)) for x in a[1]])
        if t in _REDUCE_FUNCS or t in (torch.max, torch.min):
            return self.reduce_call(node, getattr(t, "__name__", ""), src)
        return self.opaque(node)

    def call_method(self, node: fx.Node) -> Any:
        m = str(node.target)
        a = node.args
        src = a[0]
        if m in _SHAPE_METHODS:
            return None
        if m in _ELEMENTWISE_METHODS:
            return self.broadcast(node, list(a) + list(node.kwargs.values()))
        if m in _SELF_METHODS:
            return self.align(node, src)
        if m in _SOFTMAX_METHODS:
            return dict(self.tinfo(src))
        if m in _RESHAPE_METHODS:
            return self.reshape(node, src)
        if m in _ALIGN_METHODS:
            return self.align(node, src)
        if m in _TRANSPOSE_METHODS:
            return self.swap(node, src, a[1], a[2])
        if m == "t":
            return self.transpose(node, src, [1, 0]) if len(self.shape(src) or ()) == 2 else dict(self.tinfo(src))
        if m == "permute":
            dims = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:]
            return self.transpose(node, src, [int(x) % len(self.shape(src)) for x in dims])
        if m in _REDUCE_NAMES or m in ("max", "min"):
            return self.reduce_call(node, m, src)
        if m in ("matmul", "bmm"):
            return self.matmul(node, a[0], a[1])
        if m in ("split", "chunk"):
            return self.split_call(node, True)
        if m == "unbind":
            return self.unbind(node, src, int(self._dim_arg(node, 1, 0)))
        return self.opaque(node)

    def attribute(self, node: fx.Node) -> Any:
        """``getattr(x, name)``: shape-like attributes are not tensors; ``.T``/``.mT`` transpose."""
        src, attr = node.args[0], node.args[1]
        if node.meta.get("tensor_meta") is None:
            return None  # .shape, .dtype, .device, .ndim ...
        n = len(self.shape(src) or ())
        if attr == "T":
            return self.transpose(node, src, list(range(n))[::-1])
        if attr == "mT" and n >= 2:
            return self.transpose(node, src, list(range(n - 2)) + [n - 1, n - 2])
        if attr in ("data", "real"):
            return dict(self.tinfo(src))
        return self.opaque(node)

    def swap(self, node: fx.Node, src: Any, d0: int, d1: int) -> dict[int, int]:
        n = len(self.shape(src) or ())
        order = list(range(n))
        d0, d1 = d0 % n, d1 % n
        order[d0], order[d1] = order[d1], order[d0]
        return self.transpose(node, src, order)

    def pad(self, node: fx.Node, src: Any, pad: Any) -> dict[int, int]:
        """Constant padding of a unit axis: the padded entries are equal, so they may permute among themselves."""
        s = self.shape(src)
        if s is None or not isinstance(pad, (tuple, list)) or not all(isinstance(x, int) for x in pad):
            return self.opaque(node)
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        out: dict[int, int] = {}
        for d, e in self.tinfo(src).items():
            k = len(s) - 1 - d  # pad lists (left, right) pairs from the last axis backwards
            if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
                lo, hi = int(pad[2 * k]), int(pad[2 * k + 1])
                if mode != "constant" or lo < 0 or hi < 0:
                    self.pin(e, f"F.pad at node {node.name!r} pads axis {d}, which carries units, in mode {mode!r}")
                    continue
                pieces: list[tuple[int | None, int, int]] = []
                if lo:
                    pieces.append((self.fresh(lo, f"{node.name}.pad_lo"), lo, 1))
                pieces.append((e, int(s[d]), 1))
                if hi:
                    pieces.append((self.fresh(hi, f"{node.name}.pad_hi"), hi, 1))
                out[d] = self.refined(pieces, f"F.pad at node {node.name!r}")
            else:
                out[d] = e
        return out

    def reduce_call(self, node: fx.Node, name: str, src: Any) -> Any:
        a = node.args
        if name in ("max", "min"):
            if len(a) >= 2 and isinstance(a[1], fx.Node):  # torch.max(a, b): elementwise
                return self.broadcast(node, [a[0], a[1]])
            if len(a) == 1 and not node.kwargs:
                return {}  # max of all elements: invariant
            return self.opaque(
                node,
                f"{_op_name(node)} at node {node.name!r} with a dim returns indices, which depend on the unit order",
            )
        if name == "norm":
            dim, keepdim = self._dim_arg(node, 2), self._dim_arg(node, 3, False, "keepdim")
        else:
            dim, keepdim = self._dim_arg(node, 1), self._dim_arg(node, 2, False, "keepdim")
        if not isinstance(keepdim, bool):
            return self.opaque(node)
        res = self.reduce(node, src, dim, keepdim)
        return self.opaque(node) if res is None else res

    # ---------------------------------------------------------------- walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.info[node] = self.invariant_like(node)
            elif node.op == "get_attr":
                key = str(node.target)
                s = self.shape(node)
                if key in self.state and s is not None:
                    self.info[node] = {i: self.key(key, i) for i in range(len(s)) if s[i] > 1}
                else:
                    self.info[node] = self.invariant_like(node)
            elif node.op == "call_module":
                self.info[node] = self.call_module(node)
                self._record_op(node)
            elif node.op == "call_function":
                self.info[node] = self.call_function(node)
                self._record_op(node)
            elif node.op == "call_method":
                self.info[node] = self.call_method(node)
                self._record_op(node)
            elif node.op == "output":
                self.pin_all(node.args, "model output", warn=False)
            if self.info.get(node) is None and node.op not in ("output",) and node.meta.get("tensor_meta") is not None:
                # a tensor-valued result no rule described: never let it pass as invariant silently
                self.info[node] = self.opaque(node)
            if self.w_partner:
                self.check_heads(node)

    def _record_op(self, node: fx.Node) -> None:
        """Remember which streams ``node`` reads, as ``spec.ops`` data (see :mod:`lmckit.perm.spec`).

        The label is ``"Kind:module"`` for modules, the function or method name otherwise
        (``mul_scalar`` / ``truediv_scalar`` when the other operand is a Python number); a
        reduction whose input stream does not survive into its output reduced over the units
        and gets the suffix ``/units``. Only :mod:`lmckit.perm.symmetry` reads these labels.
        """
        ins = {e for a in _flat_nodes((node.args, node.kwargs)) for e in self.tinfo(a).values()}
        if not ins:
            return
        if node.op == "call_module":
            label = f"{type(self.gm.get_submodule(str(node.target))).__name__}:{node.target}"
        else:
            label = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            label = str(label).strip("_")
            if label in ("mul", "truediv", "imul", "itruediv") and len(_flat_nodes(node.args)) == 1:
                label = label.lstrip("i") + "_scalar"
        outs: set[int] = set()
        stack = [self.info.get(node)]
        while stack:
            x = stack.pop()
            if isinstance(x, _DictInfo):
                stack.extend(x.values())
            elif isinstance(x, dict):
                outs.update(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
        self.op_records.append((label, tuple(ins), tuple(outs), label in _OP_REDUCTIONS))

    def _group_ops(self, root_group: dict[int, str], heads: dict[str, tuple[int, tuple[str, ...]]]) -> dict:
        """``spec.ops``: per group the labels of the ops its units (or its head-split axes) pass through.

        Ops on head-split axes are attributed through the head joints; ops on streams that belong
        to no group but not known to be linear are attributed to every head-structured group
        (conservative: a symmetry beyond permutations is then refused there, never wrongly granted).
        """
        uf = self.uf
        via: dict[int, set[str]] = {}
        for r, g in root_group.items():
            via.setdefault(r, set()).add(g)
        head_axes: set[int] = set()
        for f, _H, _d, h, w in self.joints:
            g = root_group.get(uf.find(f))
            if g is not None:
                head_axes.add(uf.find(h))  # the head axis carries head permutations only: ops there move whole heads
                via.setdefault(uf.find(w), set()).add(g)
        from .symmetry import is_linear_label  # lazy: symmetry is plain data + torch, no cycle at import

        in_heads = {g for _, members in heads.values() for g in members}
        ops: dict[str, list[str]] = {g: [] for g in root_group.values()}
        pinned = uf.find(_PINNED)
        for label, ins, outs, reduction in self.op_records:
            out_roots = {uf.find(o) for o in outs}
            for e in ins:
                r = uf.find(e)
                if r == pinned or (r in head_axes and r not in via):
                    continue
                lab = label + "/units" if reduction and r not in out_roots else label
                targets = via.get(r)
                if targets is None:
                    if is_linear_label(lab):
                        continue
                    targets = in_heads
                for g in targets:
                    if lab not in ops[g]:
                        ops[g].append(lab)
        for e, lab in self.elem_ops:
            g = root_group.get(uf.find(e))
            if g is not None and lab not in ops[g]:
                ops[g].append(lab)
        for name, _h, elems in self.heads:  # nn.MultiheadAttention's own Q/K and V/O groups
            for x in elems:
                g = root_group.get(uf.find(x))
                if g is not None and f"MultiheadAttention:{name}" not in ops[g]:
                    ops[g].append(f"MultiheadAttention:{name}")
        return ops

    # ---------------------------------------------------------------- block permutations
    def _class_size(self, r: int) -> int | None:
        for e, n in self.extra_sizes.items():
            if self.uf.find(e) == r:
                return n
        for (k, ax), e in self.key_elem.items():
            if self.uf.find(e) == r:
                return int(self.state[k].shape[ax])
        return None

    def _resolve_blocks(self) -> None:
        """Make refinements consistent per class (fixpoint): equal structures join piece by piece,
        slices become refinements, conflicts and pinned refined streams pin their pieces."""
        uf = self.uf
        for _ in range(1000):
            before = (tuple(uf.find(i) for i in range(len(uf.parent))), len(self.refines))
            full: dict[int, list[tuple[list, str]]] = {}
            for e, pieces, where in self.refines:
                full.setdefault(uf.find(e), []).append((pieces, where))
            sl: dict[int, list[tuple[int, int, int, str]]] = {}
            for e, a, b, p, where in self.slices:
                sl.setdefault(uf.find(e), []).append((a, b, p, where))
            pinned = uf.find(_PINNED)
            for r, lst in full.items():
                all_pieces = [x for pieces, _ in lst for x, _, _ in pieces if x is not None]
                if r == pinned:
                    for x in all_pieces:
                        if uf.find(x) != pinned:
                            self.pin(x, f"{lst[0][1]}: the combined stream is left unpermuted")
                    for _, _, p, where in sl.get(r, []):
                        if uf.find(p) != pinned:
                            self.pin(p, f"{where}: the sliced stream is left unpermuted")
                    continue
                ref, where0 = lst[0]
                struct = [(n, inner) for _, n, inner in ref]
                for other, where in lst[1:]:
                    if [(n, inner) for _, n, inner in other] != struct:
                        self.pin(r, f"{where} and {where0} split one stream into different blocks")
                        break
                    for (x, _, _), (y, _, _) in zip(ref, other):
                        if x is not None and y is not None:
                            uf.union(x, y)
                        elif x is not None or y is not None:
                            self.pin(x if x is not None else y, f"{where}: these units meet fixed units of {where0}")
                offs, off = [], 0
                for x, n, inner in ref:
                    offs.append((off, off + n * inner, x, inner))
                    off += n * inner
                for a, b, p, where in sl.get(r, []):
                    hit = next((x for o0, o1, x, inner in offs if o0 == a and o1 == b and inner == 1), "miss")
                    if hit == "miss":
                        self.pin(r, f"{where} cuts a block of {where0} (its cuts must fall between blocks)")
                    elif hit is None:
                        self.pin(p, f"{where} reads fixed units")
                    else:
                        uf.union(p, hit)
            for r, lst in sl.items():
                if r in full:
                    continue
                if r == pinned:
                    for _, _, p, where in lst:
                        if uf.find(p) != pinned:
                            self.pin(p, f"{where}: the sliced stream is left unpermuted")
                    continue
                n = self._class_size(r)
                ivs: dict[tuple[int, int], int] = {}
                for a, b, p, _ in lst:
                    if (a, b) in ivs:
                        uf.union(ivs[(a, b)], p)
                    else:
                        ivs[(a, b)] = p
                order = sorted(ivs)
                overlap = any(order[i][1] > order[i + 1][0] for i in range(len(order) - 1))
                if n is None or overlap:
                    self.pin(r, f"{lst[0][3]}: overlapping slices of one stream")
                    continue
                pieces: list[tuple[int | None, int, int]] = []
                pos = 0
                for a, b in order:
                    if a > pos:
                        pieces.append((None, a - pos, 1))
                    pieces.append((ivs[(a, b)], b - a, 1))
                    pos = b
                if pos < n:
                    pieces.append((None, n - pos, 1))
                e = self.uf.make()
                self.uf.union(e, r)
                self.refines.append((e, pieces, lst[0][3]))
            self._check_stacks()
            self._resolve_joints(full)
            for name, _, elems in self.heads:
                roots = {uf.find(x) for x in elems}
                if pinned in roots or roots & set(full) or len(roots) < len(elems):
                    for x in elems:
                        if uf.find(x) != pinned:
                            self.pin(x, f"attention heads of {name!r} cannot be permuted")
            after = (tuple(uf.find(i) for i in range(len(uf.parent))), len(self.refines))
            if after == before:
                return

    def _check_stacks(self) -> None:
        """A fused (projections, heads, head dim) tensor may only be permuted/unbound: if its placeholder
        axes met anything else, its projections' streams are pinned."""
        uf = self.uf
        if not self.stacks:
            return
        count: dict[int, int] = {}
        for i in range(1, len(uf.parent)):
            r = uf.find(i)
            count[r] = count.get(r, 0) + 1
        for st, (ph, pw, pairs) in self.stacks.items():
            if any(count.get(uf.find(x), 0) != 1 or uf.find(x) == uf.find(_PINNED) for x in (st, ph, pw)):
                src = self.stack_src[st]
                if uf.find(src) != uf.find(_PINNED):
                    self.pin(
                        src,
                        "its (projections, heads, head dim) view is used other than by unbind/indexing "
                        "(which would keep Q, K and V apart)",
                    )
                for h, w in pairs:
                    for x in (h, w):
                        if uf.find(x) != uf.find(_PINNED):
                            self.pin(x, "a fused q/k/v tensor split into heads is used other than by unbind/indexing")

    def _resolve_joints(self, full: dict[int, Any]) -> None:
        """Head-split streams: joints sharing head and within-head axes are one flat stream; a family of
        flat streams sharing one head axis becomes a head structure. Anything else touching the head or
        within-head axes (parameters, plain streams, pinning) pins the whole family."""
        if not self.joints:
            return
        uf = self.uf
        pinned = uf.find(_PINNED)
        by_hw: dict[tuple[int, int], list[int]] = {}
        for f, _H, _d, h, w in self.joints:
            by_hw.setdefault((uf.find(h), uf.find(w)), []).append(f)
        for fs in by_hw.values():
            for f in fs[1:]:
                uf.union(fs[0], f)
        allowed = {x for _, _, _, h, w in self.joints for x in (h, w)}
        key_roots = {uf.find(e) for e in self.key_elem.values()}
        other_roots = {uf.find(i) for i in range(1, len(uf.parent)) if i not in allowed}
        fam: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for j in self.joints:
            fam.setdefault(uf.find(j[3]), []).append(j)
        for hr, js in fam.items():
            bad = None
            w_roots = {uf.find(j[4]) for j in js}
            flat_roots = {uf.find(j[0]) for j in js}
            if hr == pinned or pinned in w_roots or pinned in flat_roots:
                bad = "the heads or their features are left unpermuted"
            elif hr in other_roots or w_roots & other_roots or hr in key_roots:
                bad = "the head axis or a head's feature axis meets other streams or parameters"
            elif len({j[1] for j in js}) != 1:
                bad = "different head counts"
            elif flat_roots & set(full):
                bad = "a head-split stream is itself split into blocks"
            if bad is None:
                for fr in flat_roots:
                    if len({uf.find(j[4]) for j in js if uf.find(j[0]) == fr}) > 1:
                        bad = "one stream is split into heads in two different ways"
            if bad is not None:
                for _, _, _, h, w in js:
                    for x in (h, w):
                        if uf.find(x) != pinned:
                            self.pin(x, f"attention heads: {bad}")
                for f, *_ in js:
                    if uf.find(f) != pinned:
                        self.pin(f, f"attention heads: {bad}")

    def _expand(
        self, r: int, refined: dict[int, list], stack: tuple[int, ...] = ()
    ) -> list[tuple[int | None, int, int]] | None:
        """Segments (root or None, n, inner) of refined class ``r``, flattened; ``None`` on a cycle."""
        pinned = self.uf.find(_PINNED)
        out: list[tuple[int | None, int, int]] = []
        for x, n, inner in refined[r]:
            rx = self.uf.find(x) if x is not None else None
            if rx is None or rx == pinned:
                out.append((None, n, inner))
            elif rx in refined:
                if rx in stack or rx == r:
                    return None
                sub = self._expand(rx, refined, stack + (r,))
                if sub is None:
                    return None
                out += [(y, m, k * inner) for y, m, k in sub]
            else:
                out.append((rx, n, inner))
        merged: list[tuple[int | None, int, int]] = []  # adjacent fixed runs become one
        for y, m, k in out:
            if y is None and merged and merged[-1][0] is None:
                merged[-1] = (None, merged[-1][1] * merged[-1][2] + m * k, 1)
            elif y is None:
                merged.append((None, m * k, 1))
            else:
                merged.append((y, m, k))
        return merged

    def build(self) -> TraceResult:
        """The spec from the traced streams: name the groups, fill every state axis, collect head structures."""
        self._resolve_blocks()
        uf = self.uf
        pinned_root = uf.find(_PINNED)
        members: dict[int, list[tuple[str, int]]] = {}  # stream root -> the state axes it moves
        for (k, ax), e in self.key_elem.items():
            members.setdefault(uf.find(e), []).append((k, ax))
        producers: dict[int, list[str]] = {}  # stream root -> names of the modules producing it
        for p in self.producer_order:
            r = uf.find(p)
            producers.setdefault(r, [])
            if self.producer_name[p] not in producers[r]:
                producers[r].append(self.producer_name[p])
        msgs = self._pin_messages()
        refined: dict[int, list] = {}
        for e, pieces, _ in self.refines:
            refined.setdefault(uf.find(e), pieces)
        refined.pop(pinned_root, None)
        seg_of, used_in_segments = self._segments(refined, members, producers, msgs)
        root_group, sizes = self._name_groups(members, refined, used_in_segments, pinned_root, msgs)
        axes: dict[str, list[Any]] = {k: [None] * v.dim() for k, v in self.state.items()}
        for r, g in root_group.items():
            for k, ax in members.get(r, []):
                axes[k][ax] = g
        for r, segs in seg_of.items():
            entry = tuple((root_group.get(y) if y is not None else None, n, inner) for y, n, inner in segs)
            if all(g is None for g, _, _ in entry):
                continue
            for k, ax in members[r]:
                axes[k][ax] = entry[0][0] if (len(entry) == 1 and entry[0][2] == 1) else entry
        heads = self._head_structures(root_group, pinned_root)
        used = {g for ax in axes.values() for e in ax for g in _entry_groups(e)}
        for g in [g for g in sizes if g not in used]:  # a stream whose every axis ended in fixed blocks
            del sizes[g]
        heads = {n: hv for n, hv in heads.items() if all(g in sizes for g in hv[1])}
        ops = self._group_ops(root_group, heads)
        spec = PermutationSpec(
            axes={k: tuple(v) for k, v in axes.items()},
            sizes=sizes,
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            heads=heads,
            ops={g: tuple(v) for g, v in ops.items() if g in sizes},
        )
        spec.validate()
        if self.strict and msgs:
            raise LmcError(
                "cannot build a complete permutation spec: " + "; ".join(msgs),
                "write a permutation_spec() method for this model, or trace with strict=False to "
                "leave those units unpermuted",
            )
        res = TraceResult(spec=spec, warnings=msgs, producers={root_group[r]: producers.get(r, []) for r in root_group})
        res.sites = self._sites(root_group)
        res.opaque = list(dict.fromkeys(self.opaque_ops))
        return res

    def _pin_messages(self) -> list[str]:
        """One warning per stream that had producers with >1 unit and was pinned for a reason.

        (Pinning by the model output is expected and silent.)
        """
        why_by_label: dict[str, list[str]] = {}
        for e, why, warn in self.pin_reasons:
            if not warn:
                continue
            size = self._size(e)
            if (size is not None and size <= 1) or not any(self._same_before_pin(p, e) for p in self.producer_order):
                continue  # single units, or parameter axes that never were a unit space
            lst = why_by_label.setdefault(self._label(e), [])
            if why not in lst:
                lst.append(why)
        return [f"{label} left unpermuted: {'; '.join(whys)}" for label, whys in why_by_label.items()]

    def _segments(
        self,
        refined: dict[int, list],
        members: dict[int, list[tuple[str, int]]],
        producers: dict[int, list[str]],
        msgs: list[str],
    ) -> tuple[dict[int, list[tuple[int | None, int, int]]], dict[int, str]]:
        """Block structure of each refined stream with state axes: ``(segments by stream, piece -> owner name)``.

        A stream whose blocks do not add up to its axes' size is left unpermuted (a message in ``msgs``).
        """
        seg_of: dict[int, list[tuple[int | None, int, int]]] = {}  # refined class with state axes -> segments
        used_in_segments: dict[int, str] = {}  # piece root -> name of the refined class (for naming)
        for r in refined:
            if r not in members:
                continue
            segs = self._expand(r, refined)
            total = sum(n * inner for _, n, inner in segs) if segs is not None else -1
            sizes_k = {int(self.state[k].shape[ax]) for k, ax in members[r]}
            if segs is None or sizes_k != {total}:
                msgs.append(
                    f"entries {', '.join(f'{k}[{ax}]' for k, ax in members[r][:3])} left unpermuted: "
                    f"inconsistent block structure"
                )
                continue
            seg_of[r] = segs
            owner = (producers.get(r) or [members[r][0][0].rsplit(".", 1)[0]])[0]
            for y, _, _ in segs:
                if y is not None:
                    used_in_segments.setdefault(y, owner)
        return seg_of, used_in_segments

    def _name_groups(
        self,
        members: dict[int, list[tuple[str, int]]],
        refined: dict[int, list],
        used_in_segments: dict[int, str],
        pinned_root: int,
        msgs: list[str],
    ) -> tuple[dict[int, str], dict[str, int]]:
        """Name each permutable stream after its first producer (``#2``... on clashes), pieces of blocks after
        their owner (``owner.0``...): ``(stream root -> group, group -> size)``.

        Raises :class:`LmcError` in strict mode when the tracer joined axes of different sizes.
        """
        sizes: dict[str, int] = {}
        root_group: dict[int, str] = {}
        for p in self.producer_order:
            r = self.uf.find(p)
            if r == pinned_root or r in root_group or r in refined or (r not in members and r not in used_in_segments):
                continue
            if r not in members:
                size = self._class_size(r)
            else:
                size_set = {int(self.state[k].shape[ax]) for k, ax in members[r]}
                if len(size_set) != 1:
                    msg = (
                        f"units of {self.producer_name[p]!r} left unpermuted: the tracer joined axes of different "
                        f"sizes {sorted(size_set)} ({', '.join(f'{k}[{ax}]' for k, ax in members[r][:4])})"
                    )
                    if self.strict:
                        raise LmcError("cannot build a permutation spec: " + msg)
                    msgs.append(msg)
                    continue
                size = size_set.pop()
            g = self.producer_name[p]
            base, i = g, 2
            while g in sizes:
                g, i = f"{base}#{i}", i + 1
            root_group[r] = g
            sizes[g] = size
        for r, owner in used_in_segments.items():  # pieces without a producer of their own
            if r in root_group or r == pinned_root:
                continue
            size = self._class_size(r)
            sz_members = {int(self.state[k].shape[ax]) for k, ax in members.get(r, [])}
            if size is None or (sz_members and sz_members != {size}):
                continue
            g, i = f"{owner}.{0}", 0
            while g in sizes:
                i += 1
                g = f"{owner}.{i}"
            root_group[r] = g
            sizes[g] = size
        return root_group, sizes

    def _head_structures(self, root_group: dict[int, str], pinned_root: int) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Attention-head constraints: groups whose units move in whole heads together (joints and declared heads)."""
        uf = self.uf
        heads: dict[str, tuple[int, tuple[str, ...]]] = {}
        fam: dict[int, tuple[int, list[str]]] = {}
        for f, H, _d, h, _w in self.joints:
            g = root_group.get(uf.find(f))
            if g is None or uf.find(h) == pinned_root:
                continue
            entry = fam.setdefault(uf.find(h), (H, []))
            if g not in entry[1]:
                entry[1].append(g)
        for H, gs in fam.values():
            heads[f"{gs[0]}.heads"] = (H, tuple(gs))
        for name, h, elems in self.heads:
            gs = [root_group.get(uf.find(x)) for x in elems]
            if all(g is not None for g in gs):
                heads[name] = (h, tuple(gs))
        return heads

    def _label(self, e: int) -> str:
        """Readable name for the stream of element ``e`` at the time it was pinned: its producers."""
        names = [self.producer_name[p] for p in self.producer_order if self._same_before_pin(p, e)]
        if names:
            return "units of " + ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        keys = [f"{k}[{ax}]" for (k, ax), x in self.key_elem.items() if self._same_before_pin(x, e)]
        return "entries " + ", ".join(keys[:3]) if keys else f"stream #{e}"

    def _same_before_pin(self, a: int, b: int) -> bool:
        return self._unpinned_root(a) == self._unpinned_root(b)

    def _unpinned_root(self, e: int) -> int:
        if not hasattr(self, "_shadow"):
            self._shadow = self._shadow_uf()
        return self._shadow.find(e)

    def _shadow_uf(self) -> _UnionFind:
        """The union-find replayed without any pinning (unions through PINNED dropped)."""
        sh = _UnionFind()
        sh.parent = list(range(len(self.uf.parent)))
        for a, b in self._unions:
            if a != _PINNED and b != _PINNED:
                sh.union(a, b)
        return sh

    def _size(self, e: int) -> int | None:
        for (k, ax), x in self.key_elem.items():
            if self._same_before_pin(x, e):
                return int(self.state[k].shape[ax])
        return None

    def _sites(self, root_group: dict[int, str]) -> dict[str, list[str]]:
        rank = {"act": 0, "norm": 1, "producer": 2}
        best: dict[str, tuple[int, list[str]]] = {}
        for node, kind in self.site_nodes:
            name = str(node.target)
            if self.module_calls.get(name, 0) != 1:
                continue  # a module called twice cannot be hooked unambiguously
            inf = self.info.get(node)
            if not isinstance(inf, dict) or 1 not in inf:
                continue
            g = root_group.get(self.uf.find(inf[1]))
            if g is None:
                continue
            r = rank[kind]
            cur = best.get(g)
            if cur is None or r < cur[0]:
                best[g] = (r, [name])
            elif r == cur[0] and name not in cur[1]:
                cur[1].append(name)
        return {g: list(best[g][1]) if g in best else [] for g in root_group.values()}


# --------------------------------------------------------------------------- entry points
def example_input_for(model: nn.Module, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """A random ``(batch, C, S, S)`` input for a zoo model, from its config and factory defaults.

    A non-zoo model with an ``example_input`` tensor attribute (or method returning one) gets that.
    Raises :class:`LmcError` for other models not built by :func:`lmckit.models.create_model`.
    """
    ex = getattr(model, "example_input", None)  # user architectures (--arch) may carry their own example batch
    if ex is not None:
        ex = ex() if callable(ex) else ex
        if isinstance(ex, torch.Tensor):
            return ex
    cfg = getattr(model, "lmckit_config", None)
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise LmcError(
            f"no example input given for {type(model).__name__}, and it is not an lmckit zoo model",
            "pass example_input (a batch the model accepts, e.g. torch.randn(8, 3, 32, 32))",
        )
    params = inspect.signature(model_entry(cfg["name"]).factory).parameters
    c = cfg.get("in_channels", params["in_channels"].default if "in_channels" in params else 3)
    s = cfg.get("image_size", params["image_size"].default if "image_size" in params else 32)
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, int(c), int(s), int(s), generator=gen)
    return x.to(p.device) if p is not None else x


def trace_streams(model: nn.Module, example_input: torch.Tensor | None = None, strict: bool = False) -> TraceResult:
    """Trace ``model`` and return its spec, the warnings and the activation sites.

    The model is not modified (its train/eval flags are restored and no
    running statistics are updated). See the module docstring for the rules.
    """
    if example_input is None:
        example_input = example_input_for(model)
    try:
        gm = fx.symbolic_trace(model)
    except LmcError:
        raise
    except Exception as e:  # noqa: BLE001  (fx raises many types)
        raise LmcError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e}",
            "remove data-dependent Python control flow from forward(), or give the model a permutation_spec() method",
        ) from None
    modes = {m: m.training for m in model.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:  # noqa: BLE001
        raise LmcError(
            f"the example input of shape {tuple(example_input.shape)} does not run through "
            f"{type(model).__name__}: {type(e).__name__}: {e}",
            "pass an example input the model accepts",
        ) from None
    finally:
        for m, t in modes.items():
            m.training = t
    state = model.state_dict()
    tr = _Tracer(gm, state, strict)
    tr.run()
    return tr.build()


def trace_spec(model: nn.Module, example_input: torch.Tensor | None = None, strict: bool = False) -> PermutationSpec:
    """Permutation spec of an arbitrary model by torch.fx tracing.

    Parameters
    ----------
    model:
        Any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace.
    example_input:
        A batch the model accepts (shapes drive the reshape and broadcast rules);
        derived from the config for zoo models when omitted.
    strict:
        Raise :class:`LmcError` instead of warning when some units cannot be
        permuted.

    Returns
    -------
    PermutationSpec
        Covers every state-dict key. Streams the tracer cannot see through are
        left unpermuted and each is reported by a :class:`SpecWarning`.
    """
    res = trace_streams(model, example_input, strict)
    for msg in res.warnings:
        warnings.warn(f"trace_spec({type(model).__name__}): {msg}", SpecWarning, stacklevel=2)
    return res.spec


def activation_sites(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Group -> names of submodules whose outputs carry that group's units (for activation matching).

    The units sit on axis 1 of each site's output (the last axis for ``(N, C)``
    tensors). Zoo models answer from ``model.hidden_modules()`` (the
    post-activation modules). Traced models use, per group, the elementwise
    activation modules (ReLU, GELU, ...) carrying it; when there is none (e.g.
    the activation is a functional ``F.relu``) the norm layers carrying it, and
    failing those the producing Linear/Conv layers (pre-activation outputs).
    Modules called more than once are skipped (a hook on them would see several
    streams). A group that only functional layers produce gets an empty list.
    """
    if hasattr(model, "hidden_modules"):
        names: dict[int, str] = {}
        for n, m in model.named_modules():
            names.setdefault(id(m), n)
        out: dict[str, list[str]] = {}
        for g, mods in model.hidden_modules().items():
            mods = mods if isinstance(mods, (list, tuple)) else [mods]
            out[g] = [names[id(m)] for m in mods]
        return out
    return trace_streams(model, example_input).sites
