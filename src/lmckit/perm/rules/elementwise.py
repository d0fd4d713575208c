"""Op rules: elementwise ops and broadcasting, casts, activations, softmax, pooling, reductions.

- elementwise ops (activations, dropout, arithmetic, ``torch.where``...) join the streams of their
  broadcast-aligned tensor operands: a residual ``x + f(x)`` merges the two streams into one group. Adding a
  tensor that is invariant but varies along a stream axis (size > 1 there) would break equivariance, so that
  stream is pinned; PReLU with one slope per channel moves its slopes with the channels;
- casts, copies, ``expand`` / ``repeat`` keep axes aligned from the right; softmax / normalize and identity
  modules (dropout in eval, ``nn.Identity``) keep every axis;
- pooling, upsampling and padding modules act per (batch, channel) on the trailing axes;
- reductions over the unit axis give an invariant tensor (``max``/``min`` with a dim return indices, which
  depend on the unit order: opaque).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace_core import REDUCTION_LABELS, TracerCore, _op_name, op_rule

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
_ALIGN_METHODS = {"expand", "expand_as", "repeat"}
_REDUCE_NAMES = REDUCTION_LABELS - {"max", "min"}
_REDUCE_FUNCS = {getattr(torch, n) for n in _REDUCE_NAMES}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "nelement"}


# --------------------------------------------------------------------------- helpers
def broadcast(tr: TracerCore, node: fx.Node, operands: list[Any]) -> dict[int, int]:
    """Elementwise op: join the streams of broadcast-aligned operands per output axis."""
    out_shape = tr.shape(node)
    if out_shape is None:
        return tr.opaque(node)
    n = len(out_shape)
    out: dict[int, int] = {}
    for d in range(n):
        streams: list[int] = []
        invariant_varies = False
        for a in operands:
            s = tr.shape(a)
            if s is None:
                continue
            i = d - (n - len(s))
            if i < 0 or (s[i] == 1 and out_shape[d] != 1):
                continue
            inf = tr.tinfo(a)
            if i in inf:
                streams.append(inf[i])
            else:
                invariant_varies = True
        if not streams:
            continue
        for e in streams[1:]:
            tr.uf.union(streams[0], e)
        if invariant_varies and out_shape[d] > 1:
            tr.pin(
                streams[0],
                f"{_op_name(node)} at node {node.name!r} combines it with a tensor that does "
                f"not move with these units (axis {d})",
            )
        out[d] = streams[0]
    return out


def align(tr: TracerCore, node: fx.Node, src: Any) -> dict[int, int]:
    """Single-tensor op keeping axes aligned from the right (expand, repeat, dtype casts)."""
    out_shape, in_shape = tr.shape(node), tr.shape(src)
    if out_shape is None or in_shape is None:
        return tr.opaque(node)
    off = len(out_shape) - len(in_shape)
    out: dict[int, int] = {}
    for d, e in tr.tinfo(src).items():
        if d + off >= 0 and out_shape[d + off] == in_shape[d]:
            out[d + off] = e
        else:
            tr.pin(e, f"{_op_name(node)} at node {node.name!r} changes the size of axis {d}")
    return out


def channelwise(tr: TracerCore, node: fx.Node, src: Any) -> dict[int, int]:
    """Op acting per (batch, channel) on the trailing axes: pools, upsampling, padding modules."""
    out: dict[int, int] = {}
    for d, e in tr.tinfo(src).items():
        if d in (0, 1):
            out[d] = e
        else:
            tr.pin(e, f"{_op_name(node)} at node {node.name!r} mixes axis {d}, which carries units")
    return out


def reduce(tr: TracerCore, node: fx.Node, src: Any, dim: Any, keepdim: bool) -> dict[int, int] | None:
    in_shape, out_shape = tr.shape(src), tr.shape(node)
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
    for d, e in tr.tinfo(src).items():
        if d in dims:
            continue  # reducing over units is permutation invariant
        out[d if keepdim else d - sum(1 for r in dims if r < d)] = e
    return out


def reduce_call(tr: TracerCore, node: fx.Node, name: str, src: Any) -> Any:
    a = node.args
    if name in ("max", "min"):
        if len(a) >= 2 and isinstance(a[1], fx.Node):  # torch.max(a, b): elementwise
            return broadcast(tr, node, [a[0], a[1]])
        if len(a) == 1 and not node.kwargs:
            return {}  # max of all elements: invariant
        return tr.opaque(
            node,
            f"{_op_name(node)} at node {node.name!r} with a dim returns indices, which depend on the unit order",
        )
    if name == "norm":
        dim, keepdim = tr._dim_arg(node, 2), tr._dim_arg(node, 3, False, "keepdim")
    else:
        dim, keepdim = tr._dim_arg(node, 1), tr._dim_arg(node, 2, False, "keepdim")
    if not isinstance(keepdim, bool):
        return tr.opaque(node)
    res = reduce(tr, node, src, dim, keepdim)
    return tr.opaque(node) if res is None else res


# --------------------------------------------------------------------------- rules
@op_rule(*_ELEMENTWISE_FUNCS, *_ELEMENTWISE_METHODS)
def _elementwise(tr: TracerCore, node: fx.Node) -> Any:
    return broadcast(tr, node, list(node.args) + list(node.kwargs.values()))


@op_rule(*_SOFTMAX_FUNCS, *_SOFTMAX_METHODS)
def _softmax(tr: TracerCore, node: fx.Node) -> Any:
    """Equivariant along every axis (softmax, log-softmax, normalize): the input's streams."""
    return dict(tr.tinfo(node.args[0] if node.args else None))


@op_rule(*_SELF_METHODS, *_ALIGN_METHODS)
def _align(tr: TracerCore, node: fx.Node) -> Any:
    return align(tr, node, node.args[0])


@op_rule(*_SHAPE_METHODS)
def _shape_query(tr: TracerCore, node: fx.Node) -> Any:
    return None  # not a tensor


@op_rule(*_CHANNELWISE_FUNCS)
def _channelwise(tr: TracerCore, node: fx.Node) -> Any:
    return channelwise(tr, node, node.args[0] if node.args else None)


@op_rule(*_REDUCE_FUNCS, torch.max, torch.min)
def _reduce_function(tr: TracerCore, node: fx.Node) -> Any:
    return reduce_call(tr, node, getattr(node.target, "__name__", ""), node.args[0] if node.args else None)


@op_rule(*_REDUCE_NAMES, "max", "min")
def _reduce_method(tr: TracerCore, node: fx.Node) -> Any:
    return reduce_call(tr, node, str(node.target), node.args[0])


def _src(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


@op_rule(*_ACT_MODULES)
def _activation(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    tr.site_nodes.append((node, "act"))
    return broadcast(tr, node, [_src(node)])


@op_rule(nn.PReLU)
def _prelu(tr: TracerCore, node: fx.Node, m: nn.PReLU) -> Any:
    """One slope per channel (``num_parameters > 1``) moves with the channel axis 1."""
    tr.site_nodes.append((node, "act"))
    src = _src(node)
    inf = dict(tr.tinfo(src))
    if m.num_parameters > 1:
        if 1 in inf:
            tr.join_key(inf[1], f"{node.target}.weight", 0)
        else:
            return broadcast(tr, node, [src])
    return inf


@op_rule(*_PASS_MODULES, *_SOFTMAX_MODULES)
def _passthrough(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    return dict(tr.tinfo(_src(node)))


@op_rule(*_CHANNELWISE_MODULES)
def _channelwise_module(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    return channelwise(tr, node, _src(node))
