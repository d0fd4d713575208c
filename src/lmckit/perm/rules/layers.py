"""Op rules: layers that start streams (``nn.Linear``, convolutions, ``nn.Embedding``, ``F.linear``, ``F.conv*``).

A Linear / Conv / Embedding output starts a new stream (a *producer*) joined with the layer's ``weight`` axis
0 (1 for ConvTranspose / Embedding) and its bias; the input stream is joined with ``weight`` axis 1 (0 for
ConvTranspose). In matrix form ``W' = P_out W P_in^T``, ``b' = P_out b``. A depthwise convolution moves with
its input channels; other grouped convolutions pin their input. Functional layers need their weights to be
parameters of the model (``get_attr`` nodes); the layer is then named after the weight's prefix.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace_core import TracerCore, _op_name, op_rule


# ---------------------------------------------------------------- layers
def linear_like(tr: TracerCore, node: fx.Node, name: str, src: Any, w: str, b: str | None) -> dict[int, int]:
    """``y = x W^T + b`` over the last axis: ``W' = P_out W P_in^T``."""
    inf = tr.tinfo(src)
    s = tr.shape(src)
    last = (len(s) - 1) if s else 0
    if last in inf:
        tr.join_key(inf[last], w, 1)
    elif w in tr.state:  # reads an unpermuted axis: those weight columns stay (matters for tied weights)
        tr.pin(tr.key(w, 1), f"{name!r} reads an unpermuted input with weights tied to these units")
    keys = [(w, 0)] + ([(b, 0)] if b else [])
    p = tr.producer(name, keys)
    out = {d: e for d, e in inf.items() if d != last}
    out[last] = p
    return out


def conv_like(
    tr: TracerCore, node: fx.Node, name: str, src: Any, w: str, b: str | None, groups: int, transposed: bool = False
) -> dict[int, int]:
    inf = tr.tinfo(src)
    for d, e in inf.items():
        if d != 1:
            tr.pin(e, f"convolution {name!r} mixes axis {d}, which carries units")
    in_e = inf.get(1)
    w_shape = tuple(tr.state[w].shape) if w in tr.state else None
    if w_shape is None:
        return tr.opaque(node)
    cin = w_shape[0] if transposed else w_shape[1] * groups
    cout = w_shape[1] * groups if transposed else w_shape[0]
    if groups == 1:
        if in_e is not None:
            tr.join_key(in_e, w, 0 if transposed else 1)
        else:
            tr.pin(
                tr.key(w, 0 if transposed else 1),
                f"{name!r} reads an unpermuted input with weights tied to these units",
            )
        keys = [(w, 1 if transposed else 0)] + ([(b, 0)] if b else [])
        return {1: tr.producer(name, keys)}
    if not transposed and groups == cin == cout:  # depthwise: channel c only reads channel c
        if in_e is None:
            return {}
        tr.join_key(in_e, w, 0)
        if b:
            tr.join_key(in_e, b, 0)
        return {1: in_e}
    if in_e is not None:
        tr.pin(in_e, f"grouped convolution {name!r} (groups={groups}) mixes channels within groups only")
    return {}


def _bias(m: nn.Module, name: str) -> str | None:
    return f"{name}.bias" if getattr(m, "bias", None) is not None else None


def _src(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


@op_rule(nn.Linear)
def _linear(tr: TracerCore, node: fx.Node, m: nn.Linear) -> Any:
    name = str(node.target)
    tr.site_nodes.append((node, "producer"))
    return linear_like(tr, node, name, _src(node), f"{name}.weight", _bias(m, name))


@op_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    name = str(node.target)
    tr.site_nodes.append((node, "producer"))
    return conv_like(tr, node, name, _src(node), f"{name}.weight", _bias(m, name), m.groups)


@op_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    name = str(node.target)
    tr.site_nodes.append((node, "producer"))
    if m.groups != 1:
        return tr.opaque(node, f"grouped transposed convolution {name!r} is not supported")
    return conv_like(tr, node, name, _src(node), f"{name}.weight", _bias(m, name), 1, True)


@op_rule(nn.Embedding)
def _embedding(tr: TracerCore, node: fx.Node, m: nn.Embedding) -> Any:
    name = str(node.target)
    tr.pin_all(_src(node), f"embedding {name!r} takes indices")
    s = tr.shape(node)
    tr.site_nodes.append((node, "producer"))
    return {len(s) - 1: tr.producer(name, [(f"{name}.weight", 1)])} if s else tr.opaque(node)


@op_rule(F.linear, F.conv1d, F.conv2d, F.conv3d)
def _functional_layer(tr: TracerCore, node: fx.Node) -> Any:
    t, a = node.target, node.args
    w = tr._keyed(a[1] if len(a) > 1 else node.kwargs.get("weight"))
    b_arg = a[2] if len(a) > 2 else node.kwargs.get("bias")
    b = tr._keyed(b_arg)
    if w is None or (b_arg is not None and b is None):
        return tr.opaque(node, f"{_op_name(node)} at node {node.name!r} uses weights that are not module parameters")
    name = w.rsplit(".", 1)[0] if "." in w else w
    if t is F.linear:
        return linear_like(tr, node, name, _src(node), w, b)
    groups = tr._dim_arg(node, 6, 1, "groups")
    return conv_like(tr, node, name, _src(node), w, b, int(groups))
