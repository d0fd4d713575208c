"""Symmetry classes and their derivation: which class of maps each group admits, and the op that limits it.

Part of :mod:`lmckit.perm.symmetry` (read its docstring first): :data:`CLASSES`, the op-label tables read
from ``spec.ops``, :class:`GroupSymmetry` and :func:`derive_symmetry` / :func:`refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import LmcError
from .spec import PermutationSpec

__all__ = ["CLASSES", "Transform", "GroupSymmetry", "derive_symmetry", "refusal", "is_linear_label"]

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
