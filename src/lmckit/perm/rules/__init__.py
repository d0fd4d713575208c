"""The fx tracer's op rules, one module per op family; importing this package registers them all.

Each rule is a short function registered with :func:`lmckit.perm.trace_core.op_rule` for the torch
functions, tensor method names and module types it handles (see ``docs/adding-an-op-rule.md``):

- :mod:`~lmckit.perm.rules.elementwise`: elementwise ops and broadcasting, casts, activations, softmax,
  pooling, reductions;
- :mod:`~lmckit.perm.rules.shape`: reshapes, flattening, attention-head splits, transposes;
- :mod:`~lmckit.perm.rules.layers`: Linear, convolutions, Embedding (the layers that start streams);
- :mod:`~lmckit.perm.rules.norms`: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm;
- :mod:`~lmckit.perm.rules.attention`: ``nn.MultiheadAttention``, scaled dot-product attention, matmul;
- :mod:`~lmckit.perm.rules.recurrent`: LSTM, GRU;
- :mod:`~lmckit.perm.rules.cat_split`: cat, stack, split, chunk, unbind, indexing, padding.

The rules import the core (:mod:`lmckit.perm.trace_core`), never the other way round.
"""

from . import attention, cat_split, elementwise, layers, norms, recurrent, shape

__all__ = ["attention", "cat_split", "elementwise", "layers", "norms", "recurrent", "shape"]
