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

Code
----
The union-find, the fx walk and the rule registry are :mod:`lmckit.perm.trace_core`; the rules above are
short functions in :mod:`lmckit.perm.rules`, one module per op family, each registered with
:func:`~lmckit.perm.trace_core.op_rule` for the torch functions, tensor methods and module types it
handles (supporting a new op is one such function: ``docs/adding-an-op-rule.md``); building the spec from
the union-find is :mod:`lmckit.perm.trace_build`. This module holds the entry points.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import LmcError
from ..models import model_entry
from .rules import attention, cat_split, elementwise, layers, norms, shape
from .rules import recurrent as recurrent_rules
from .spec import PermutationSpec
from .trace_build import Tracer
from .trace_core import SpecWarning, TraceResult, op_rule, symbolic_trace
from .trace_core import _DictInfo as _DictInfo  # re-exported: lmckit.perm.export_trace imports it from here
from .trace_core import _flat_nodes as _flat_nodes  # re-exported: lmckit.perm.export_trace imports it from here

__all__ = [
    "SpecWarning",
    "TraceResult",
    "trace_streams",
    "trace_spec",
    "activation_sites",
    "example_input_for",
    "op_rule",
]


class _Tracer(Tracer):
    """The fx tracer with the rule families' helpers as methods.

    The torch.export tracer (:mod:`lmckit.perm.export_trace`) subclasses this and calls the stream algebra as
    methods (``tr.broadcast(node, operands)``, ``tr.reshape(node, src)`` ...): each is the function of the
    same name in its rule module, with the tracer as first argument.
    """

    broadcast = elementwise.broadcast
    align = elementwise.align
    channelwise = elementwise.channelwise
    reduce = elementwise.reduce
    reduce_call = elementwise.reduce_call
    reshape = shape.reshape
    transpose = shape.transpose
    swap = shape.swap
    attribute = shape.attribute
    linear_like = layers.linear_like
    conv_like = layers.conv_like
    per_channel = norms.per_channel
    matmul = attention.matmul
    sdpa = attention.sdpa
    mha = attention.mha
    recurrent = recurrent_rules.recurrent
    cat = cat_split.cat
    stack = cat_split.stack
    getitem = cat_split.getitem
    split = cat_split.split
    split_call = cat_split.split_call
    unbind = cat_split.unbind
    pad = cat_split.pad


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
        gm = symbolic_trace(model)
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
