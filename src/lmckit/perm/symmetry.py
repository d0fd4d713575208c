"""Symmetry classes beyond permutations: signed permutations, orthogonal and invertible maps.

A permutation spec says which axes of which state-dict entries a group's units
occupy. A network's function is often invariant under more than permutations
of those units (Theus et al., "Generalized Linear Mode Connectivity for
Transformers", arXiv 2506.22712, NeurIPS 2025; docs/definitions.md derives
every case below). This module adds, per group,

- the *class* of maps applied to its units, one of :data:`CLASSES` in
  increasing size: ``"permutation"`` (``P``), ``"signed"`` (``D P``, ``D``
  diagonal of +-1), ``"orthogonal"`` (``Q^T Q = I``; under a LayerNorm only
  those with ``Q 1 = 1``) and ``"invertible"`` (any ``M`` with ``det M != 0``);
- the largest class the group admits, derived from the ops its units pass
  through (``spec.ops``, filled by the zoo rules and the fx tracer), and the op
  that limits it (a LayerNorm, a GELU, an LSTM ...), so a refusal names it;
- one interface per class: :func:`sample`, :func:`apply_transform` (a matrix
  applied along every axis the group moves), :func:`invert_transform`,
  :func:`compose_transforms` and the exact weight-matching step :func:`step`
  (``argmax_M tr(M^T C)`` over the class: LAP, sign choice, orthogonal
  Procrustes, restricted Procrustes on the ones-complement).

Convention
----------
A transform is a dict ``group -> tensor``: a LongTensor index ``p`` for a
group whose class is ``"permutation"`` (the fast path of
:mod:`lmckit.perm.spec`, unchanged) and an ``n x n`` float64 matrix ``M``
otherwise. ``M`` acts like the permutation matrix ``P[i, p[i]] = 1``: an axis
that *writes* the units (a weight's rows, a bias, a class token) becomes
``M W`` (new unit ``i`` is ``sum_j M[i, j]`` old unit ``j``); an axis that
*reads* them (a Linear weight's columns) becomes ``W M^{-1}``, which is
``W M^T`` for the orthogonal and signed classes (so for them the two kinds of
axes need not be told apart). Norm gains and biases on a transformed stream are
not transformed: the orthogonal classes require them folded away
(:func:`fold_norms`: gain 1, bias 0, invariant under the class), the signed
class moves them by the permutation part ``|M|`` (a gain commutes with signs).
Under a head structure (``spec.heads``) a group's matrix is block-structured:
``M[block i, block h(i)] = A_i`` with one head permutation ``h`` shared by the
structure's groups and one ``d x d`` map ``A_i`` of the class per head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..errors import LmcError
from .spec import PermutationSpec, entry_segments, head_block_perm

__all__ = [
    "CLASSES",
    "GroupSymmetry",
    "derive_symmetry",
    "sample",
    "random_transform",
    "identity_transform",
    "apply_transform",
    "invert_transform",
    "compose_transforms",
    "transform_matrix",
    "step",
    "head_step",
    "fold_norms",
    "is_permutation_transform",
]

#: The symmetry classes, smallest first.
CLASSES = ("permutation", "signed", "orthogonal", "invertible")
_RANK = {c: i for i, c in enumerate(CLASSES)}
_ALL = frozenset(CLASSES)

Transform = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------- op table
#: Ops linear in the units (they commute with any invertible map of the unit space): readers/writers,
#: residual additions, reshapes, token-axis reductions and indexing.
_LINEAR_KINDS = frozenset(
    {
        "Linear",
        "linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "conv1d",
        "conv2d",
        "conv3d",
        "Embedding",
        "Identity",
        "Dropout",
        "add",
        "iadd",
        "sub",
        "isub",
        "neg",
        "cat",
        "stack",
        "getitem",
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "transpose",
        "permute",
        "contiguous",
        "expand",
        "expand_as",
        "repeat",
        "split",
        "chunk",
        "unbind",
        "squeeze",
        "unsqueeze",
        "mean",
        "sum",
        "mul_scalar",
        "getattr",
        "size",
        "dim",
        "truediv_scalar",
        "MultiheadAttention",
    }
)
#: Ops of attention that a head's Q/K or V/O map passes through (the scores ``q.k`` contract the
#: within-head axis; ``att @ v`` is linear in ``v``).
_ATTN_KINDS = frozenset({"MultiheadAttention", "scaled_dot_product_attention", "matmul", "bmm"})
#: Odd elementwise activations: ``f(-x) = -f(x)``, so they commute with signed permutations.
_ODD_KINDS = frozenset({"Tanh", "tanh", "Hardtanh", "hardtanh", "Softsign", "softsign", "Tanhshrink"})
_FOLD_NORMS = ("LayerNorm", "RMSNorm")
_NORM_KINDS = frozenset(
    {
        "LayerNorm",
        "RMSNorm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "layer_norm",
        "rms_norm",
        "batch_norm",
        "group_norm",
    }
)
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


def is_linear_label(label: str) -> bool:
    """Whether an op label (``spec.ops``) is linear in the units it reads (commutes with every class)."""
    return _split_label(label)[0] in _LINEAR_KINDS


def _split_label(label: str) -> tuple[str, str]:
    kind, _, where = label.partition(":")
    return kind, where


def _desc(label: str) -> str:
    kind, where = _split_label(label)
    return f"{kind} {where!r}" if where else kind


@dataclass(frozen=True)
class GroupSymmetry:
    """The class applied to one group and why it is not larger.

    Attributes
    ----------
    group, size:
        Group name and number of units.
    cls:
        The class used (one of :data:`CLASSES`): the requested one when the
        group admits it, else the largest admitted class below it.
    admitted:
        Every class the group admits (a LayerNorm stream admits
        ``permutation`` and ``orthogonal`` but not ``signed``).
    limit:
        One line naming the op that keeps a larger class out (``None`` when
        every class is admitted).
    heads, head_structure:
        ``heads > 1``: the group is a member of head structure
        ``head_structure`` (head-block maps, one head permutation shared by
        its groups).
    fix_ones:
        Orthogonal maps restricted to ``Q 1 = 1`` (the stream passes through
        a LayerNorm, which centres).
    norm_keys:
        State entries of norms on the group (not transformed by matrices; see
        the module docstring).
    reads:
        ``(key, axis)`` pairs that read the units (transformed by ``M^{-T}``);
        filled for the invertible class only.
    """

    group: str
    size: int
    cls: str
    admitted: tuple[str, ...]
    limit: str | None = None
    heads: int = 1
    head_structure: str | None = None
    fix_ones: bool = False
    norm_keys: tuple[str, ...] = ()
    reads: frozenset = field(default_factory=frozenset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "admitted": list(self.admitted),
            "limit": self.limit,
            "heads": self.heads,
            "fix_ones": self.fix_ones,
        }


def _is_trivial_norm(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    w = state.get(f"{prefix}.weight")
    b = state.get(f"{prefix}.bias")
    return (w is None or bool((w == 1).all())) and (b is None or bool((b == 0).all()))


def _module_of(model: nn.Module | None, key: str) -> nn.Module | None:
    if model is None or "." not in key:
        return None
    try:
        return model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        return None


def _reads(spec: PermutationSpec, model: nn.Module | None, group: str) -> tuple[frozenset, str | None]:
    """``(key, axis)`` pairs that read ``group``'s units, or a reason why they cannot be told apart."""
    if model is None:
        return frozenset(), "telling readers from writers needs the model (pass model=)"
    out = set()
    for key, ax in spec.axes.items():
        for i, e in enumerate(ax):
            if e is None or group not in ([e] if isinstance(e, str) else [s[0] for s in e]):
                continue
            m = _module_of(model, key)
            name = key.rsplit(".", 1)[-1]
            if isinstance(m, nn.MultiheadAttention) and name == "in_proj_weight":
                if i == 1:
                    out.add((key, i))
                elif sum(1 for s in ax[i] if s[0] == group) > 1:  # Q and K rows share the group
                    return frozenset(), (
                        f"Q and K of {key.rsplit('.', 1)[0]!r} share group {group!r}: an invertible A on Q needs "
                        "A^-T on K (orthogonal is its own inverse transpose; invertible head maps are not implemented)"
                    )
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name == "weight" and i == 1:
                out.add((key, i))
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)):
                continue
            elif key.rsplit(".", 1)[-1] in ("weight",) and len(spec.shapes.get(key, ())) >= 2:
                return frozenset(), f"{key!r} is a matrix of an unknown layer: cannot tell if it reads or writes"
    return frozenset(out), None


def derive_symmetry(
    spec: PermutationSpec,
    state: Mapping[str, torch.Tensor],
    symmetry: str = "permutation",
    model: nn.Module | None = None,
) -> dict[str, GroupSymmetry]:
    """Per group, the class used under ``symmetry`` and the op that limits it.

    Derivations (docs/definitions.md, "Symmetries beyond permutations"):

    - ops linear in the units (Linear/Conv readers and writers, residual
      additions, reshapes, token reductions) admit every class;
    - a LayerNorm admits orthogonal maps with ``Q 1 = 1`` once its gain and
      bias are folded (:func:`fold_norms`), never signs;
    - an RMSNorm admits orthogonal maps once its gain is folded, and signed
      permutations with the gain kept as a vector;
    - odd activations (tanh) admit signed permutations; any other
      elementwise activation (ReLU, GELU), BatchNorm/GroupNorm and LSTM/GRU
      gates only permutations;
    - attention heads (``spec.heads``) admit per-head signed or orthogonal
      maps (the scores ``q^T k`` are kept by ``A^T A = I``); V/O heads also
      invertible ones; Q/K heads that share a group in a fused projection
      not (``A`` on Q needs ``A^{-T}`` on K);
    - invertible maps need no norm on the stream and the model (``model=``)
      to tell reading axes from writing ones;
    - an op the table does not know limits the group to permutations, and a
      group without ``spec.ops`` is limited to permutations.

    Raises :class:`LmcError` for an unknown ``symmetry``.
    """
    if symmetry not in _RANK:
        raise LmcError(f"unknown symmetry class {symmetry!r}", f"choose one of {', '.join(CLASSES)}")
    head_of: dict[str, tuple[str, int]] = {}
    for name, (h, members) in spec.heads.items():
        for g in members:
            head_of[g] = (name, int(h))
    out: dict[str, GroupSymmetry] = {}
    for g, n in spec.sizes.items():
        ops = spec.ops.get(g)
        admitted = set(_ALL)
        limits: dict[str, str] = {}  # class -> why excluded (first reason)
        norm_keys: list[str] = []
        fix_ones = False

        def drop(classes, why, admitted=admitted, limits=limits):
            for c in classes:
                if c in admitted:
                    admitted.discard(c)
                    limits.setdefault(c, why)

        if g in head_of:
            drop(("invertible",), "")  # re-admitted below for V/O heads
            limits.pop("invertible", None)
        if ops is None:
            drop(_ALL - {"permutation"}, f"the spec does not record the ops group {g!r} passes through (spec.ops)")
            ops = ()
        for label in ops:
            kind, where = _split_label(label)
            if kind in _RECURRENT:
                drop(_ALL - {"permutation"}, f"{_desc(label)}: gates are elementwise nonlinear in the hidden units")
            elif kind in _FOLD_NORMS:
                norm_keys += [k for k in state if k.rsplit(".", 1)[0] == where]
                drop(("invertible",), f"{_desc(label)} normalises the stream (invertible maps change the norm)")
                if kind == "LayerNorm":
                    fix_ones = True
                    drop(("signed",), f"{_desc(label)} centres the stream (sign flips move the mean)")
                if not _is_trivial_norm(state, where):
                    drop(
                        ("orthogonal",),
                        f"{_desc(label)} has a learned gain/bias: fold it into the next Linear first "
                        "(lmckit.perm.symmetry.fold_norms)",
                    )
            elif kind in _NORM_KINDS:
                norm_keys += [k for k in state if k.rsplit(".", 1)[0] == where]
                drop(_ALL - {"permutation"}, f"{_desc(label)} normalises each unit on its own")
            elif kind in _ODD_KINDS:
                drop(("orthogonal", "invertible"), f"{_desc(label)} is elementwise (odd: signs commute with it)")
            elif g in head_of and kind in _ATTN_KINDS:
                continue
            elif kind in _LINEAR_KINDS:
                continue
            else:
                drop(_ALL - {"permutation"}, f"{_desc(label)} is elementwise or not known to commute with maps")
        heads, hname = 1, None
        reads: frozenset = frozenset()
        if g in head_of:
            hname, heads = head_of[g][0], head_of[g][1]
            if symmetry == "invertible" and "orthogonal" in admitted:
                rd, why = _reads(spec, model, g)
                if why is None and rd:
                    admitted.add("invertible")
                    reads = rd
                else:
                    limits["invertible"] = why or f"group {g!r} has no reading axis"
        elif "invertible" in admitted and symmetry == "invertible":
            rd, why = _reads(spec, model, g)
            if why is not None:
                drop(("invertible",), why)
            reads = rd
        want = symmetry
        cls = max((c for c in admitted if _RANK[c] <= _RANK[want]), key=_RANK.get)
        limit = limits.get(want) if cls != want else None
        out[g] = GroupSymmetry(
            group=g,
            size=int(n),
            cls=cls,
            admitted=tuple(c for c in CLASSES if c in admitted),
            limit=limit,
            heads=heads,
            head_structure=hname,
            fix_ones=fix_ones and cls == "orthogonal",
            norm_keys=tuple(dict.fromkeys(norm_keys)),
            reads=reads if cls == "invertible" else frozenset(),
        )
    return out


def refusal(sym: Mapping[str, GroupSymmetry], symmetry: str) -> str | None:
    """Why no group of a model takes class ``symmetry`` (naming the limiting ops), or ``None`` if some does."""
    if symmetry == "permutation" or any(s.cls == symmetry for s in sym.values()):
        return None
    reasons = list(dict.fromkeys(s.limit for s in sym.values() if s.limit))
    return f"no group of the model admits {symmetry} maps: " + ("; ".join(reasons[:4]) or "no group to transform")


# ----------------------------------------------------------------------------------------------- sampling
def _haar(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal ``n x n`` (QR of a Gaussian with the sign fix of Mezzadri 2007)."""
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d[None, :]


def ones_complement(n: int) -> torch.Tensor:
    """Orthonormal basis ``B`` (``n x (n-1)``) of the vectors orthogonal to the all-ones vector (float64)."""
    e = torch.eye(n, dtype=torch.float64)
    e[:, 0] = 1.0
    q, _ = torch.linalg.qr(e)
    return q[:, 1:]


def _from_complement(r: torch.Tensor, n: int) -> torch.Tensor:
    """``Q = 11^T/n + B R B^T``: orthogonal with ``Q 1 = 1`` for any orthogonal ``R`` of size ``n-1``."""
    b = ones_complement(n)
    return torch.full((n, n), 1.0 / n, dtype=torch.float64) + b @ r @ b.T


def sample(cls: str, n: int, gen: torch.Generator, fix_ones: bool = False) -> torch.Tensor:
    """A random element of class ``cls`` on ``n`` units.

    ``"permutation"``: a LongTensor index (uniform); ``"signed"``: ``D P`` with
    uniform ``P`` and independent fair signs; ``"orthogonal"``: Haar
    (``fix_ones``: Haar on the ones-complement, ``Q 1 = 1``);
    ``"invertible"``: ``U diag(s) V`` with Haar ``U, V`` and ``s`` uniform in
    ``[0.5, 2]`` (condition number at most 4). Matrices are float64.
    """
    if cls == "permutation":
        return torch.randperm(n, generator=gen)
    if cls == "signed":
        p = torch.randperm(n, generator=gen)
        s = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return s[:, None] * perm_matrix(p)
    if cls == "orthogonal":
        if fix_ones and n > 1:
            return _from_complement(_haar(n - 1, gen), n)
        return _haar(n, gen)
    if cls == "invertible":
        s = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
        return _haar(n, gen) @ torch.diag(s) @ _haar(n, gen)
    raise LmcError(f"unknown symmetry class {cls!r}", f"choose one of {', '.join(CLASSES)}")


def perm_matrix(p: torch.Tensor) -> torch.Tensor:
    """``P[i, p[i]] = 1`` (float64): the matrix form of index ``p``."""
    n = p.numel()
    m = torch.zeros(n, n, dtype=torch.float64)
    m[torch.arange(n), p.long()] = 1.0
    return m


def head_matrix(head: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Block matrix ``M[block i, block head[i]] = blocks[i]`` (``H`` blocks of ``d x d``)."""
    h = len(blocks)
    d = blocks[0].shape[0] if h else 0
    m = torch.zeros(h * d, h * d, dtype=torch.float64)
    for i in range(h):
        j = int(head[i])
        m[i * d : (i + 1) * d, j * d : (j + 1) * d] = blocks[i]
    return m


def random_transform(spec: PermutationSpec, sym: Mapping[str, GroupSymmetry], seed: int = 0) -> Transform:
    """A random element of every group's class (head structures: a shared head permutation), seeded."""
    gen = torch.Generator().manual_seed(seed)
    out: Transform = {}
    done: set[str] = set()
    for _name, (h, members) in spec.heads.items():
        h = int(h)
        hp = torch.randperm(h, generator=gen)
        for g in members:
            d = spec.sizes[g] // h
            s = sym[g]
            if s.cls == "permutation":
                within = torch.stack([torch.randperm(d, generator=gen) for _ in range(h)])
                out[g] = head_block_perm(hp, within)
            else:
                out[g] = head_matrix(hp, [sample(s.cls, d, gen) for _ in range(h)])
            done.add(g)
    for g, n in spec.sizes.items():
        if g not in done:
            out[g] = sample(sym[g].cls, int(n), gen, sym[g].fix_ones)
    return out


def identity_transform(spec: PermutationSpec, sym: Mapping[str, GroupSymmetry]) -> Transform:
    """Identity of every group (an index for permutation groups, ``I`` otherwise)."""
    return {
        g: torch.arange(n) if sym[g].cls == "permutation" else torch.eye(n, dtype=torch.float64)
        for g, n in spec.sizes.items()
    }


def is_permutation_transform(t: torch.Tensor) -> bool:
    return t.dim() == 1


def transform_matrix(t: torch.Tensor) -> torch.Tensor:
    """The float64 matrix of a transform entry (an index becomes its permutation matrix)."""
    return perm_matrix(t) if t.dim() == 1 else t.double()


# ----------------------------------------------------------------------------------------------- algebra
def invert_transform(t: Mapping[str, torch.Tensor]) -> Transform:
    """Inverse of every entry (``argsort`` for indices, ``M^{-1}`` otherwise; ``M^T`` would do for orthogonal)."""
    return {g: (torch.argsort(v) if v.dim() == 1 else torch.linalg.inv(v.double())) for g, v in t.items()}


def compose_transforms(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Transform:
    """The transform equal to applying ``first`` and then ``then`` (``M = M_then M_first``).

    Index entries compose as :func:`lmckit.perm.compose_permutations`; mixed entries as matrices.
    """
    out: Transform = {}
    for g in first:
        a, b = first[g], then[g]
        if a.dim() == 1 and b.dim() == 1:
            out[g] = a[b]
        else:
            out[g] = transform_matrix(b) @ transform_matrix(a)
    return out


def _apply_segment(x: torch.Tensor, axis: int, m: torch.Tensor, inner: int) -> torch.Tensor:
    """``x`` (one segment of ``n * inner`` entries on ``axis``) with ``m`` applied to its ``n`` units."""
    n = m.shape[0]
    y = x.movedim(axis, -1)
    shp = y.shape
    y = y.reshape(*shp[:-1], n, inner).double()
    y = torch.matmul(m.to(y.device), y)
    return y.reshape(shp).movedim(-1, axis).to(x.dtype)


def apply_transform(
    spec: PermutationSpec,
    sym: Mapping[str, GroupSymmetry],
    t: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    exclude: str | tuple[str, int] | None = None,
    keys: Any = None,
) -> dict[str, torch.Tensor]:
    """A new state dict with every group's map applied along the axes it moves.

    Index entries move their segments as :func:`lmckit.perm.apply_permutation`
    does; a matrix ``M`` is applied as ``M W`` along writing axes and
    ``W M^{-1}`` along reading ones (``sym[g].reads``; only the invertible
    class has any). Norm entries (``sym[g].norm_keys``) keep their values under
    matrices, except that the signed class moves them by ``|M|``.
    ``exclude``: leave that group's axes untouched (a ``(group, axis)`` pair:
    only that axis of the listed entries); ``keys``: only these entries
    (others are omitted). Computed in float64, cast back to each entry's dtype;
    the caller's tensors are never modified.
    """
    inv_t: dict[str, torch.Tensor] = {}
    norm_of: dict[str, set[str]] = {}
    for g, s in sym.items():
        for k in s.norm_keys:
            norm_of.setdefault(k, set()).add(g)
    out: dict[str, torch.Tensor] = {}
    for key in state if keys is None else keys:
        value = state[key]
        ax = spec.axes.get(key)
        if ax is None or all(e is None for e in ax):
            out[key] = value
            continue
        w = value
        for i, e in enumerate(ax):
            if e is None:
                continue
            segs = entry_segments(e, w.shape[i], spec.sizes)
            parts, changed = [], False
            for g, n, inner, off in segs:
                piece = w.narrow(i, off, n * inner)
                if g is not None and g != exclude and (g, i) != exclude:
                    m = t[g]
                    if m.dim() == 1:
                        idx = (m[:, None] * inner + torch.arange(inner)[None, :]).reshape(-1)
                        piece = piece.index_select(i, idx.to(piece.device))
                        changed = True
                    elif g in norm_of.get(key, ()):  # norm gains: |M| under signed, untouched otherwise
                        if sym[g].cls == "signed":
                            piece = _apply_segment(piece, i, m.abs(), inner)
                            changed = True
                    else:
                        if (key, i) in sym[g].reads:
                            if g not in inv_t:
                                inv_t[g] = torch.linalg.inv(m.double()).T
                            m = inv_t[g]
                        piece = _apply_segment(piece, i, m, inner)
                        changed = True
                parts.append(piece)
            if changed:
                w = torch.cat(parts, dim=i) if len(parts) > 1 else parts[0]
        out[key] = w
    return out


# ----------------------------------------------------------------------------------------------- WM steps
def _scipy_lap(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(cost, maximize=True)
    col = np.empty(cost.shape[0], dtype=np.int64)
    col[r] = c
    return col


def procrustes(c: torch.Tensor) -> torch.Tensor:
    """``argmax_{Q orthogonal} tr(Q^T C) = U V^T`` for ``C = U S V^T`` (Schoenemann 1966)."""
    u, _, vt = torch.linalg.svd(c.double())
    return u @ vt


def step(
    cls: str, c: torch.Tensor, fix_ones: bool = False, lap: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[torch.Tensor, float]:
    """Exact ``argmax_M tr(M^T C)`` over class ``cls`` on ``n`` units, and the maximum.

    ``c``: the ``n x n`` cost ``sum_k A_k B_k^T`` (units of A in rows, of B in
    columns). ``"permutation"``: a LAP on ``C`` (returns an index);
    ``"signed"``: ``tr(M^T C) = sum_i s_i C[i, p(i)]``, maximised by a LAP on
    ``|C|`` and ``s_i = sign C[i, p(i)]``; ``"orthogonal"``: Procrustes
    ``U V^T`` (value: the nuclear norm ``sum S``); with ``fix_ones``,
    ``Q = 11^T/n + B R B^T`` and ``tr(Q^T C) = 1^T C 1 / n + tr(R^T B^T C B)``,
    so ``R`` is the Procrustes solution of ``B^T C B``. ``"invertible"`` has no
    maximum (the objective is unbounded on invertible maps): refused.
    ``lap``: a maximising assignment solver (default scipy's).
    """
    lap = lap or _scipy_lap
    c = c.double()
    n = c.shape[0]
    if cls == "permutation":
        col = torch.as_tensor(lap(c.cpu().numpy()), dtype=torch.long)
        return col, float(c[torch.arange(n), col].sum())
    if cls == "signed":
        col = torch.as_tensor(lap(c.abs().cpu().numpy()), dtype=torch.long)
        v = c[torch.arange(n), col]
        s = torch.where(v < 0, -1.0, 1.0).double()
        return s[:, None] * perm_matrix(col), float(v.abs().sum())
    if cls == "orthogonal":
        if fix_ones and n > 1:
            b = ones_complement(n)
            q = _from_complement(procrustes(b.T @ c @ b), n)
        else:
            q = procrustes(c)
        return q, float((q * c).sum())
    raise LmcError(
        f"weight matching has no exact step for {cls} maps (tr(M^T C) is unbounded on invertible matrices)",
        "use --symmetry orthogonal (the invertible class is for check-spec and applying given transforms)",
    )


def head_step(
    n_heads: int,
    costs: list[tuple[str, torch.Tensor]],
    lap: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Joint exact step of a head structure: one head permutation ``h`` and per-head maps for every member.

    ``costs``: per member group ``(class, C)`` with ``C`` of size ``H d x H d``.
    ``sum_m tr(M_m^T C_m) = sum_i sum_m tr(A_{m,i}^T C_m[i, h(i)])``, so the
    best maps for a fixed head pair ``(i, j)`` are each member's
    :func:`step` on block ``C_m[i, j]`` (value ``v_m(i, j)``), and the best
    ``h`` is the LAP on ``V[i, j] = sum_m v_m(i, j)``: the joint optimum
    over head permutations and per-head maps. Returns each member's matrix
    (an index for the permutation class) and the maximum.
    """
    lap = lap or _scipy_lap
    h = int(n_heads)
    vals = np.zeros((h, h))
    sols: dict[tuple[int, int, int], torch.Tensor] = {}
    for mi, (cls, c) in enumerate(costs):
        d = c.shape[0] // h
        for i in range(h):
            for j in range(h):
                m, v = step(cls, c[i * d : (i + 1) * d, j * d : (j + 1) * d], lap=lap)
                sols[(mi, i, j)] = m
                vals[i, j] += v
    col = lap(vals)
    head = torch.as_tensor(col, dtype=torch.long)
    out = []
    for mi, (cls, _c) in enumerate(costs):
        blocks = [sols[(mi, i, int(col[i]))] for i in range(h)]
        if cls == "permutation":
            out.append(head_block_perm(head, torch.stack(blocks)))
        else:
            out.append(head_matrix(head, blocks))
    return out, float(vals[np.arange(h), col].sum())


# ----------------------------------------------------------------------------------------------- folding
def fold_norms(model: nn.Module, example_input: Any = None) -> tuple[nn.Module, list[str], list[str]]:
    """A copy of ``model`` with every LayerNorm/RMSNorm gain and bias folded into the Linear layers it feeds.

    ``Linear(g * n(x) + beta) = (W diag(g)) n(x) + (W beta + b)``: the reader's
    weight takes ``W diag(g)``, its bias ``b + W beta``, the norm's gain becomes
    1 and its bias 0, so the function is unchanged (exactly, up to rounding)
    and an orthogonal map of the stream no longer has to move the gain. A norm
    is folded when every user of its output in the ``torch.fx`` graph is an
    ``nn.Linear`` or a self-attention ``nn.MultiheadAttention`` (query, key and
    value all the norm's output) with a bias where ``beta != 0``; shape queries
    and, given ``example_input``, token indexing that keeps the feature axis
    (``y[:, 0]``) between the norm and its reader are seen through.

    Returns ``(folded copy, folded norm names, skipped: one line each naming
    the norm and why)``. The model itself is never modified. A model fx
    cannot trace folds nothing (one skipped line says why).
    """
    import torch.fx as fx

    new = copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(new)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot fold", said in the skip line
        return new, [], [f"cannot fold norms: torch.fx could not trace {type(model).__name__} ({type(e).__name__})"]
    if example_input is not None:  # shapes let token indexing (y[:, 0]) between a norm and its reader be seen through
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input.to(next(iter(new.parameters())).dtype))
        except Exception:  # noqa: BLE001 - without shapes, indexing is simply not seen through
            pass
    folded, skipped = [], []
    norm_types = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        norm = new.get_submodule(str(node.target))
        if not isinstance(norm, norm_types) or getattr(norm, "weight", None) is None:
            continue
        name = str(node.target)
        if len(norm.normalized_shape) != 1:
            skipped.append(f"{name}: normalises {len(norm.normalized_shape)} axes")
            continue
        beta = getattr(norm, "bias", None)
        readers, why = [], None
        users = list(node.users)
        while users:
            u = users.pop()
            if _is_shape_query(u):
                continue
            if _keeps_last_axis(u, node):  # token indexing (``y[:, 0]``): the reader sees the same features
                users.extend(u.users)
                continue
            m = new.get_submodule(str(u.target)) if u.op == "call_module" else None
            if isinstance(m, nn.Linear) and u.args and u.args[0] in _chain(u.args[0], node):
                if beta is not None and m.bias is None and bool((beta != 0).any()):
                    why = f"reader {u.target!r} has no bias to take the norm's bias"
                readers.append(("linear", m))
            elif isinstance(m, nn.MultiheadAttention) and len(u.args) >= 3 and u.args[0] is u.args[1] is u.args[2]:
                if beta is not None and m.in_proj_bias is None and bool((beta != 0).any()):
                    why = f"reader {u.target!r} has no bias to take the norm's bias"
                readers.append(("mha", m))
            else:
                why = f"its output feeds {u.op} {u.target!s} (only Linear / self-attention readers can absorb it)"
        if why or not readers:
            skipped.append(f"{name}: {why or 'no reader'}")
            continue
        with torch.no_grad():
            g = norm.weight.detach().clone()
            b0 = beta.detach().clone() if beta is not None else None
            for kind, m in readers:
                w = m.weight if kind == "linear" else m.in_proj_weight
                bias = m.bias if kind == "linear" else m.in_proj_bias
                if b0 is not None and bias is not None:
                    bias.copy_((bias.double() + w.double() @ b0.double()).to(bias.dtype))
                w.copy_((w.double() * g.double()[None, :]).to(w.dtype))
            norm.weight.fill_(1.0)
            if beta is not None:
                beta.zero_()
        folded.append(name)
    return new, folded, skipped


def _is_shape_query(u: Any) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: reads no values."""
    if u.op == "call_function" and getattr(u.target, "__name__", "") == "getattr":
        return len(u.args) > 1 and u.args[1] in ("shape", "ndim", "dtype", "device")
    return u.op == "call_method" and u.target in ("size", "dim")


def _keeps_last_axis(u: Any, src: Any) -> bool:
    """``src[idx]`` with ``idx`` a tuple of ints/slices, no Ellipsis/None/tensors, shorter than ``src``'s rank."""
    if u.op != "call_function" or getattr(u.target, "__name__", "") != "getitem" or u.args[0] is not src:
        return False
    idx = u.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(i, (int, slice)) for i in idx):
        return False
    tm = src.meta.get("tensor_meta")
    return tm is not None and len(idx) < len(tm.shape)


def _chain(arg: Any, node: Any) -> set:
    """``{arg}`` when ``arg`` is ``node`` or reached from it by last-axis-keeping indexing only."""
    x = arg
    while x is not node and getattr(x, "op", None) == "call_function" and _keeps_last_axis(x, x.args[0]):
        x = x.args[0]
    return {arg} if x is node else set()


def log_condition(m: torch.Tensor) -> float:
    """``log10`` of the condition number of a transform matrix (0 for orthogonal maps)."""
    s = torch.linalg.svdvals(m.double())
    return math.log10(float(s[0] / s[-1])) if s.numel() and float(s[-1]) > 0 else float("inf")


# ----------------------------------------------------------------------------------------------- transform files
TRANSFORM_FORMAT = "lmckit.transform"


def save_transform(
    path: Any, transform: Mapping[str, torch.Tensor], sym: Mapping[str, GroupSymmetry], **header: Any
) -> Any:
    """Write a transform file: safetensors with one tensor per group, the JSON header in its metadata.

    Generalises the perm file (:func:`lmckit.perm.save_perms`): a permutation-class group is stored as
    its int64 index, any other as its ``n x n`` float64 matrix. The header (metadata key
    ``lmckit_transform``) has ``format``, ``version``, each group's ``class`` / ``fix_ones`` / ``heads``,
    and whatever the caller adds (``lmckit match`` records both models' content hashes, the symmetry
    class, and whether the norms were folded). Written atomically.
    """
    from ..store import save_state

    head = {
        "format": TRANSFORM_FORMAT,
        "version": 1,
        "groups": {g: {"class": s.cls, "fix_ones": s.fix_ones, "heads": s.heads} for g, s in sym.items()},
        **header,
    }
    tensors = {g: (t.long() if t.dim() == 1 else t.double()) for g, t in transform.items()}
    return save_state(path, tensors, {"lmckit_transform": head})


def load_transform(path: Any, spec: PermutationSpec, tol: float = 1e-6) -> tuple[Transform, dict[str, Any]]:
    """Read a transform file for ``spec``; check every entry is an element of its recorded class.

    Returns ``(transform, header)``. Raises :class:`LmcError` (naming the file and group) for a file that
    is not a transform file, groups that do not fit the spec, wrong shapes, an index that is not a
    permutation, a matrix off its class by more than ``tol`` (``Q^T Q = I``; ``Q 1 = 1`` when
    ``fix_ones``; one +-1 per row and column for ``signed``; block structure under a head structure).
    """
    from ..store import load_state
    from .spec import validate_perms

    tensors, meta = load_state(path)
    head = meta.get("lmckit_transform")
    if not isinstance(head, dict) or head.get("format") != TRANSFORM_FORMAT:
        raise LmcError(
            f"{path} is not a transform file (no lmckit_transform header)",
            "pass a file written by lmckit match --symmetry",
        )
    groups = head.get("groups") or {}
    unknown = sorted(set(tensors) ^ set(spec.sizes))
    if unknown or set(groups) != set(tensors):
        odd = unknown[:4] or sorted(set(groups) ^ set(tensors))[:4]
        raise LmcError(
            f"transform file {path} does not fit the model: groups {odd} are not in both the file and the model",
            "use a transform file computed for models of this architecture (lmckit match --symmetry)",
        )
    out: Transform = {}
    idx = {g: t for g, t in tensors.items() if t.dim() == 1}
    for g, t in tensors.items():
        n = spec.sizes[g]
        cls = groups[g].get("class")
        where = f"transform file {path}: group {g!r}"
        if t.dim() == 1:
            if cls != "permutation":
                raise LmcError(f"{where} is an index but its class is {cls!r}")
            continue
        if tuple(t.shape) != (n, n) or not t.is_floating_point():
            raise LmcError(f"{where} has shape {tuple(t.shape)}, the model has {n} units (expected {n} x {n})")
        t = t.double()
        eye = torch.eye(n, dtype=torch.float64)
        if cls in ("orthogonal", "signed") and float((t.T @ t - eye).abs().max()) > tol:
            raise LmcError(f"{where} is not orthogonal (class {cls})", "the file is corrupt or was edited")
        if cls == "signed" and not bool(((t.abs() - t.abs().round()).abs() < tol).all()):
            raise LmcError(f"{where} is not a signed permutation", "the file is corrupt or was edited")
        if groups[g].get("fix_ones") and float((t.sum(1) - 1).abs().max()) > tol:
            raise LmcError(f"{where} does not fix the all-ones direction (LayerNorm stream)")
        if cls == "invertible" and float(torch.linalg.svdvals(t)[-1]) <= tol:
            raise LmcError(f"{where} is singular")
        if cls not in ("orthogonal", "signed", "invertible"):
            raise LmcError(f"{where} has unknown class {cls!r}")
        out[g] = t
    if idx:
        sub = PermutationSpec(axes={}, sizes={g: spec.sizes[g] for g in idx})
        out.update(validate_perms(sub, idx, f"transform file {path}"))
    for name, (h, members) in spec.heads.items():  # one head permutation shared, within-head blocks only
        hp = None
        for g in members:
            d = spec.sizes[g] // int(h)
            m = transform_matrix(out[g]).abs().reshape(int(h), d, int(h), d).sum((1, 3))
            nz = m > tol
            if not bool((nz.sum(1) == 1).all()):
                raise LmcError(f"transform file {path}: group {g!r} mixes attention heads ({name!r})")
            cur = nz.float().argmax(1)
            if hp is not None and not torch.equal(hp, cur):
                raise LmcError(
                    f"transform file {path}: groups {list(members)} permute the heads of {name!r} differently"
                )
            hp = cur
    return out, head
