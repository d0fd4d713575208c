"""``hf-gpt2``: a tiny GPT-2 language model of the Hugging Face class, as a zoo model (the ``gpt2-text`` recipe).

The factory builds ``transformers.GPT2LMHeadModel`` from a small ``GPT2Config`` (no download, dropout off,
no KV cache) and prepares it for lmckit with :func:`lmckit.hf.adapt`: ``model(x)`` maps token ids
``(B, T)`` to logits ``(B, V, T)`` (vocabulary on axis 1), so ``F.cross_entropy(model(x), y)`` with next-token
targets ``(B, T)`` is the mean loss in nats per token, and training, evaluation, matching and the barrier
run on it as on the image models of the zoo.

Its permutation spec is not written by hand: :mod:`lmckit.perm.export_trace` derives it with
``torch.export`` (head-aware, Conv1D's transposed weights, the fused ``c_attn`` split into W_Q / W_K /
W_V, tied input and output embeddings). The trace runs once per architecture per process
(:func:`gpt2_spec`). ``transformers`` is the optional extra ``pip install 'lmckit[hf]'``: without it
the factory raises :class:`~lmckit.errors.LmcError` saying so; the rest of the zoo never needs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import LmcError
from ..models.registry import register_model

#: traced specs by architecture (width, depth, heads, inner width, context, vocabulary)
_SPECS: dict[tuple[int, ...], Any] = {}


def _arch_key(model: nn.Module) -> tuple[int, ...]:
    c = model.config
    return (c.n_embd, c.n_layer, c.n_head, c.n_inner or 4 * c.n_embd, c.n_positions, c.vocab_size)


def gpt2_spec(model: nn.Module):
    """The permutation spec of an ``hf-gpt2`` model, traced by torch.export once per architecture.

    Parameters
    ----------
    model:
        A model built by :func:`hf_gpt2` (adapted: it carries ``example_input`` token ids ``(2, T)``).

    Returns
    -------
    lmckit.perm.PermutationSpec
        The spec of :func:`lmckit.perm.export_trace.export_trace_streams` on the model's example input
        (the same object for every model of one architecture in this process).
    """
    import warnings

    key = _arch_key(model)
    if key not in _SPECS:
        from ..perm.export_trace import export_trace_streams
        from . import _build, adapt

        # traced on a fresh CPU copy of the architecture, never on ``model`` itself: the spec is structural,
        # and a model on the ``meta`` device (lmckit.checkpoint.build_model's size check builds one) traces to
        # a wrong spec (every parameter has the same null address, so the tracer merges the blocks' groups)
        with torch.device("cpu"):
            fresh = adapt(_build(type(model), model.config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SPECS[key] = export_trace_streams(fresh, fresh.example_input).spec
    return _SPECS[key]


def build_gpt2(vocab: int, context: int, width: int, depth: int, heads: int, inner: int | None = None) -> nn.Module:
    """A ``GPT2LMHeadModel`` of this size, adapted for lmckit (dropout 0, no cache); see the module docstring.

    Parameters
    ----------
    vocab:
        Vocabulary size ``V`` (256 for byte tokens).
    context:
        Largest sequence length ``T`` (GPT-2's ``n_positions``).
    width:
        Embedding width ``d`` (``n_embd``); a multiple of ``heads``.
    depth:
        Transformer blocks (``n_layer``), at least 1.
    heads:
        Attention heads per block (``n_head``).
    inner:
        MLP hidden width (``n_inner``; ``None``: ``4 * width``).

    Returns
    -------
    torch.nn.Module
        The model in eval mode, with ``permutation_spec()`` (:func:`gpt2_spec`) and ``example_input``.

    Raises
    ------
    LmcError
        When ``transformers`` is not installed, or ``width`` is not a multiple of ``heads``.
    """
    from . import _build, adapt, require_transformers

    T = require_transformers()
    if depth < 1:
        raise LmcError(f"model 'hf-gpt2': depth must be at least 1, got {depth}", "fix the depth setting")
    if width % heads:
        raise LmcError(
            f"model 'hf-gpt2': width {width} is not a multiple of heads {heads}",
            "choose a width (times width_mult) divisible by the number of heads",
        )
    cfg = T.GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=width, n_layer=depth, n_head=heads, n_inner=inner,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = adapt(_build(T.GPT2LMHeadModel, cfg))
    model.permutation_spec = lambda: gpt2_spec(model)
    return model


@register_model(
    "hf-gpt2",
    "Hugging Face GPT2LMHeadModel on byte tokens: width 64, depth 2, 4 heads, MLP 4x, context from the dataset "
    "(options width, depth, heads, mlp_ratio, width_mult, norm=layernorm; needs lmckit[hf])",
)
def hf_gpt2(
    in_channels: int = 1,
    image_size: int = 128,
    num_classes: int = 256,
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    width_mult: float = 1.0,
    norm: str = "layernorm",
) -> nn.Module:
    """A tiny causal GPT-2 (``transformers.GPT2LMHeadModel``) for a token dataset.

    For a token dataset (:mod:`lmckit.data.text`) the dataset options mean: ``image_size`` is the context
    length ``T`` (``n_positions``), ``num_classes`` the vocabulary ``V``, ``in_channels`` is 1. The width is
    ``round(width * width_mult)`` rounded to a multiple of ``heads``; the MLP has ``round(mlp_ratio * width)``
    units. GPT-2's pre-norm LayerNorms are part of the class: ``norm`` must be ``"layernorm"`` (a recipe says
    ``norm = "layernorm"`` for this model). Raises :class:`LmcError` without ``transformers``
    (``pip install 'lmckit[hf]'``) and for another ``norm``.
    """
    if norm != "layernorm":
        raise LmcError(
            f"model 'hf-gpt2' has GPT-2's own LayerNorms; norm {norm!r} is not available",
            'set norm = "layernorm" for this model (models.N.norm in a recipe, --norm layernorm)',
        )
    if in_channels != 1:
        raise LmcError(
            f"model 'hf-gpt2' reads token ids (one channel), not {in_channels}-channel images",
            "train it on a text dataset (e.g. kjv)",
        )
    d = max(heads, int(round(width * width_mult / heads)) * heads)
    return build_gpt2(num_classes, image_size, d, depth, heads, max(1, int(round(mlp_ratio * d))))
