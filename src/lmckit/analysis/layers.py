"""Which state-dict entries are "layers" for the SVD analyses, and how they read as matrices.

Rule (docs/definitions.md, "Setting"): every entry named ``*.weight`` with two or more
axes is a layer ``W_l``. Its rows are moved by ``P`` = the group of axis 0
(``None``: identity) and its columns by ``Q`` = the group of axis 1
(``None``: identity). A conv kernel ``(out, in, kh, kw)`` is read as the
``out x (in*kh*kw)`` matrix ``W.reshape(out, -1)``; the permutation of input
channels then acts on whole groups of ``kh*kw`` columns, i.e. as the
Kronecker product ``Q ⊗ I_{kh*kw}``. lmckit never builds that matrix: it
permutes the kernel's axis 1 (or the rows of ``V`` viewed as
``(in, kh*kw, r)``) and reshapes.

The output layer is the layer whose axis-0 group is ``None`` (its rows are
the logits, which no permutation moves).

Attention, recurrent and block layers (issue 11)
------------------------------------------------
Weights named ``*weight*`` (``in_proj_weight``, ``weight_ih_l0``,
``weight_hh_l0``) are layers too. A weight whose rows are moved by ``k >= 2``
equal-length segments with one unit per row (the gate blocks i, f, g, o of an
LSTM, r, z, n of a GRU, the Q, K, V blocks of a fused ``in_proj`` / ``qkv``
projection) is read as ``k`` matrices, one per gate or projection
(``W_Q, W_K, W_V``; ``W_i, W_f, W_g, W_o``), each with its own rows'
permutation ``P`` (Q and K: the Q/K group, V: the V/O group, every gate: the
layer's hidden permutation) and the columns' permutation ``Q``; ``W_O``
(``out_proj``) is an ordinary layer (rows: the stream, columns: V/O). Any
other block axis (``torch.cat``, padded channels, ``flatten`` of a feature
map) is read as one matrix whose rows or columns are permuted by the composite
index vector (a block-diagonal permutation, or ``Q ⊗ I_{H*W}`` for a flatten).
Head-structured permutations are ordinary permutations of the rows/columns,
so ``R(gamma)`` needs nothing else for attention.

A fused projection stored transposed, ``(in, 3 * d)`` (GPT-2's ``Conv1D``
``c_attn``: columns are the Q, K, V blocks), is split the same way along its
columns: three ``in x d`` matrices ``c_attn:q|k|v`` whose rows are moved by the
stream's group and whose columns by the Q/K or V/O group. A transposed layer
``W^T`` has the singular values of ``W`` with ``u`` and ``v`` exchanged, so
``R(gamma)``, the spectra and rank truncation read it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..checks import check_real, check_state
from ..perm import PermutationSpec
from ..perm.spec import axis_index, check_spec, entry_segments, is_segmented
from ..states import check_compatible

_GATE_LABELS = {3: ("q", "k", "v"), 4: ("i", "f", "g", "o")}  # fused projections; LSTM gates
_RNN_LABELS = {3: ("r", "z", "n"), 4: ("i", "f", "g", "o")}  # GRU / LSTM gates (torch's row order)

# Buffers that are statistics, not trainable parameters: excluded from distances.
STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Layer:
    """One weight matrix of the network.

    Attributes
    ----------
    key: state-dict key of the weight (``fc1.weight``).
    name: its module prefix (``fc1``).
    shape: the tensor's shape (``(out, in)`` or ``(out, in, kh, kw)``).
    out_group, in_group: permutation groups of axes 0 and 1 (``None``: identity).
    """

    key: str
    name: str
    shape: tuple[int, ...]
    out_group: str | None
    in_group: str | None
    out_entry: Any = None  # axis-0 entry of the spec (a group, block segments, or None) of this matrix's rows
    in_entry: Any = None
    row_offset: int = 0  # rows [row_offset, row_offset + shape[0]) of the state entry (gate / Q, K, V blocks)
    split: bool = False
    col_offset: int = 0  # columns [col_offset, col_offset + shape[1]) of a transposed fused weight (Conv1D c_attn)
    col_split: bool = False

    @property
    def is_output(self) -> bool:
        return self.out_group is None and self.out_entry is None

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= int(s)
        return n

    @property
    def kernel(self) -> int:
        """``kh*kw`` for a conv kernel, 1 for a linear layer."""
        return self.cols // int(self.shape[1])

    @property
    def rank(self) -> int:
        """Number of singular values: ``min(out, in*k*k)``."""
        return min(self.rows, self.cols)


def layers_of(spec: PermutationSpec, state: Mapping[str, torch.Tensor] | None = None) -> list[Layer]:
    """The layers of a model, in state-dict order.

    Shapes come from ``state`` when given, else from ``spec.shapes``. Raises
    ``ValueError`` if a spec permutes a kernel's spatial axes (no zoo or
    traced model does; such a layer could not be read as ``P W Q^T``).
    """
    check_spec(spec)
    if state is not None:
        check_state(state, "state")
    out: list[Layer] = []
    for key, axes in spec.axes.items():
        last = key.rsplit(".", 1)[-1]
        if not (last == "weight" or last.startswith("weight_") or last.endswith("_weight")):
            continue
        shape = tuple(state[key].shape) if state is not None and key in state else tuple(spec.shapes.get(key, ()))
        if len(shape) < 2:
            continue
        if state is not None and key in state and not state[key].is_floating_point():
            continue
        if any(g is not None for g in axes[2:]):
            raise ValueError(f"{key}: a permutation on a spatial axis is not supported by the SVD analyses")
        name = key[: -len(".weight")] if key.endswith(".weight") else "" if key == "weight" else key
        e0 = axes[0] if axes else None
        e1 = axes[1] if len(axes) > 1 else None
        plain = lambda e: e if isinstance(e, str) else None  # noqa: E731
        if is_segmented(e0):
            segs = entry_segments(e0, shape[0], spec.sizes)
            if (
                len(segs) >= 2
                and all(inner == 1 and g is not None for g, _, inner, _ in segs)
                and len({n for _, n, _, _ in segs}) == 1
            ):
                table = _RNN_LABELS if ".weight_ih" in key or ".weight_hh" in key else _GATE_LABELS
                labels = table.get(len(segs), tuple(str(i) for i in range(len(segs))))
                for (g, n, _, off), lab in zip(segs, labels):
                    out.append(Layer(key, f"{name}:{lab}", (n,) + shape[1:], g, plain(e1), g, e1, off, True))
                continue
        if len(shape) == 2 and is_segmented(e1) and not is_segmented(e0):  # a transposed fused Q, K, V projection
            segs = entry_segments(e1, shape[1], spec.sizes)
            if (
                len(segs) >= 2
                and all(inner == 1 and g is not None for g, _, inner, _ in segs)
                and len({n for _, n, _, _ in segs}) == 1
            ):
                labels = _GATE_LABELS.get(len(segs), tuple(str(i) for i in range(len(segs))))
                for (g, n, _, off), lab in zip(segs, labels):
                    out.append(
                        Layer(key, f"{name}:{lab}", (shape[0], n), plain(e0), g, e0, g, col_offset=off, col_split=True)
                    )
                continue
        out.append(Layer(key, name, shape, plain(e0), plain(e1), e0, e1))
    return out


def layer_weight(layer: Layer, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The layer's weight tensor (its block of rows for a gate / Q, K, V matrix)."""
    w = state[layer.key]
    if layer.col_split:
        return w.narrow(1, layer.col_offset, int(layer.shape[1]))
    return w.narrow(0, layer.row_offset, layer.rows) if layer.split else w


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """``(out, in, ...)`` -> ``(out, in*prod(...))`` (a view where possible)."""
    return w.reshape(w.shape[0], -1)


def permute_rows(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``P x`` for ``x`` with rows indexed by units: row ``i`` becomes row ``perm[i]``."""
    return x if perm is None else x.index_select(0, perm.to(x.device))


def permute_kron_rows(x: torch.Tensor, perm: torch.Tensor | None, kernel: int) -> torch.Tensor:
    """``(Q ⊗ I_k) x`` for ``x`` of shape ``(in*k, r)``, without building the Kronecker product.

    Rows are grouped in blocks of ``k`` consecutive entries (one input channel
    of a conv kernel read as ``out x (in*k)``); block ``c`` of the result is
    block ``perm[c]`` of ``x``.
    """
    if perm is None:
        return x
    n = x.shape[0] // kernel
    return x.reshape(n, kernel, -1).index_select(0, perm.to(x.device)).reshape(x.shape[0], -1)


def perms_for(
    layer: Layer, perms: Mapping[str, torch.Tensor] | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(p, q)`` index vectors of the layer's output and input groups (``None`` = identity)."""
    if perms is None:
        return None, None
    if layer.split:
        p = perms[layer.out_group] if layer.out_group is not None else None
    elif layer.out_entry is not None:
        p = axis_index(layer.out_entry, perms, layer.rows)
    else:
        p = None
    q = axis_index(layer.in_entry, perms, int(layer.shape[1])) if layer.in_entry is not None else None
    return p, q


def is_stat_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in STAT_SUFFIXES


def module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def midpoint_state(
    sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], lam: float = 0.5
) -> dict[str, torch.Tensor]:
    """``(1 - lam) theta_a + lam theta_b`` on floating-point entries; integer entries are taken from ``a``.

    New tensors; neither input is modified. Pass ``pi(theta_b)`` as ``sd_b`` for
    the permuted midpoint. BatchNorm running statistics are averaged too; they
    are only meaningful after a BN reset.

    Computed with ``torch.lerp``, which rounds differently from
    :func:`lmckit.states.interpolate_states` (``(1 - lam) a + lam b``) in the last bit: the rank-sweep
    numbers of published results were computed this way, so the analyses keep it (switching would
    change them in the last digits). Barriers, landscapes, merging and STE use
    :mod:`lmckit.states`.
    """
    check_compatible([sd_a, sd_b], ["model A", "model B"])
    lam = check_real(lam, "lam")
    out: dict[str, torch.Tensor] = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        out[k] = torch.lerp(a, b.to(a.device, a.dtype), lam) if a.is_floating_point() else a.clone()
    return out
