"""Op rules: recurrent layers (``nn.LSTM``, ``nn.GRU``; unidirectional, no projection).

Layer ``l`` has one hidden stream ``h_l``; every gate block of ``weight_ih_l``, ``weight_hh_l`` and the
biases is moved by it on axis 0, ``weight_hh_l``'s columns and the next layer's input by it too. An
initial state given by the caller pins the layers' streams (it does not move with the units).
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..trace_core import TracerCore, op_rule


def recurrent(tr: TracerCore, node: fx.Node, name: str, m: nn.RNNBase) -> Any:
    """``nn.LSTM`` / ``nn.GRU``: one hidden stream per layer, every gate block moved by it."""
    if m.bidirectional or getattr(m, "proj_size", 0):
        return tr.opaque(node, f"{type(m).__name__} {name!r} is bidirectional or projected (not supported)")
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, None)
    if gates is None:
        return tr.opaque(node, f"{type(m).__name__} {name!r} ({m.mode}) is not supported")
    src = node.args[0]
    s = tr.shape(src)
    if s is None:
        return tr.opaque(node)
    last = len(s) - 1
    inf = tr.tinfo(src)
    for d, e in inf.items():
        if d != last:
            tr.pin(e, f"{type(m).__name__} {name!r} mixes axis {d}, which carries units")
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    h = m.hidden_size
    prev = inf.get(last)
    if prev is not None:
        tr.join_key(prev, f"{name}.weight_ih_l0", 1)
    else:
        tr.pin(tr.key(f"{name}.weight_ih_l0", 1), f"{name!r} reads an unpermuted input")
    layer_streams = []
    for layer in range(m.num_layers):
        hs = tr.fresh(h, name if m.num_layers == 1 else f"{name}.l{layer}")
        tr.elem_ops.append((hs, f"{type(m).__name__}:{name}"))  # gates: elementwise nonlinear (spec.ops)
        rows = tr.refined([(hs, h, 1)] * gates, f"{type(m).__name__} {name!r} gates")
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            tr.join_key(rows, f"{name}.{kind}_l{layer}", 0)
        tr.join_key(hs, f"{name}.weight_hh_l{layer}", 1)
        if layer + 1 < m.num_layers:
            tr.join_key(hs, f"{name}.weight_ih_l{layer + 1}", 1)
        layer_streams.append(hs)
    if hx is not None:
        for e in layer_streams:
            tr.pin(e, f"{type(m).__name__} {name!r} is given an initial state that does not move with its units")
    out = {last: layer_streams[-1]}
    uses_state = any(
        (u.args[1] != 0 and len(u.users) > 0) if (u.op == "call_function" and u.target is operator.getitem) else True
        for u in node.users
    )
    if m.num_layers == 1:
        state_inf = {2: layer_streams[0]}
    else:
        state_inf = {}
        if uses_state:
            for e in layer_streams:
                tr.pin(
                    e,
                    f"{type(m).__name__} {name!r}: its final state mixes the layers' units on one axis "
                    f"(use the output sequence)",
                )
    hidden = (dict(state_inf), dict(state_inf)) if m.mode == "LSTM" else dict(state_inf)
    return (out, hidden)


@op_rule(nn.LSTM, nn.GRU)
def _recurrent(tr: TracerCore, node: fx.Node, m: nn.RNNBase) -> Any:
    return recurrent(tr, node, str(node.target), m)
