"""Op rules: normalisation layers.

BatchNorm / InstanceNorm (weight, bias, running_mean, running_var; never ``num_batches_tracked``) join their
per-channel entries to the stream on axis 1; LayerNorm and RMSNorm join their affine axes that cover the
stream axis (normalising over all units commutes with permuting them); GroupNorm with ``num_groups`` 1 or
``C`` is per-channel, other GroupNorms normalise groups of channels together and pin the stream (with a
warning naming the norm).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..trace_core import TracerCore, op_rule

_BN_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
#: LayerNorm and RMSNorm (torch >= 2.4) normalise over trailing axes; their affine entries follow the unit axis
_LN_MODULES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def per_channel(tr: TracerCore, node: fx.Node, prefix: str, src: Any, axis_of_stream: int = 1) -> dict[int, int]:
    """Norm layers with one entry per channel on axis 0 of every (non-scalar) parameter and buffer."""
    inf = dict(tr.tinfo(src))
    e = inf.get(axis_of_stream)
    if e is not None:
        for k, v in tr.state.items():
            if k.rsplit(".", 1)[0] == prefix and v.dim() >= 1:
                tr.join_key(e, k, 0)
    return inf


def _src(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


@op_rule(*_BN_MODULES)
def _batch_norm(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    tr.site_nodes.append((node, "norm"))
    return per_channel(tr, node, str(node.target), _src(node))


@op_rule(nn.GroupNorm)
def _group_norm(tr: TracerCore, node: fx.Node, m: nn.GroupNorm) -> Any:
    name, src = str(node.target), _src(node)
    tr.site_nodes.append((node, "norm"))
    if m.num_groups in (1, m.num_channels):
        return per_channel(tr, node, name, src)
    inf = tr.tinfo(src)
    if 1 in inf:
        tr.pin(
            inf[1],
            f"GroupNorm {name!r} normalises groups of {m.num_channels // m.num_groups} channels "
            f"together (num_groups={m.num_groups}; only 1 or num_channels={m.num_channels} "
            f"commute with channel permutations)",
        )
    return dict(inf)


@op_rule(*_LN_MODULES)
def _layer_norm(tr: TracerCore, node: fx.Node, m: nn.Module) -> Any:
    name, src = str(node.target), _src(node)
    tr.site_nodes.append((node, "norm"))
    inf = dict(tr.tinfo(src))
    s = tr.shape(src) or ()
    k = len(m.normalized_shape)
    for d, e in inf.items():
        if d >= len(s) - k:  # unit axis is among the normalised axes: its affine entries move with it
            tr.join_key(e, f"{name}.weight", d - (len(s) - k))
            tr.join_key(e, f"{name}.bias", d - (len(s) - k))
    return inf
