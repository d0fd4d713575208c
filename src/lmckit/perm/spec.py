"""Permutation specs and the algebra of permutations on state dicts.

Convention
----------
A permutation of group ``g`` with ``n`` units is a LongTensor ``p`` of length
``n``. Applying it to a parameter along an axis moved by ``g`` takes
``W' = W.index_select(axis, p)``: unit ``i`` of the permuted model is unit
``p[i]`` of the original. In matrix form ``P[i, p[i]] = 1`` and, for a layer
``W_l`` whose rows are moved by ``P_l`` and columns by ``P_{l-1}``,
``W_l' = P_l W_l P_{l-1}^T`` exactly as in PAPER.md.

A conv kernel ``(out, in, k, k)`` is moved on axis 0 by the output group and
on axis 1 by the input group, so a permutation acts on whole input-channel
groups of the ``out x (in*k*k)`` matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LmcError

Perms = dict[str, torch.Tensor]


@dataclass
class PermutationSpec:
    """Which axes of which state-dict entries each permutation group moves.

    Attributes
    ----------
    axes:
        For every state-dict key of the model, one entry per tensor axis: the
        name of the group that permutes that axis, or ``None``. Keys with only
        ``None`` (e.g. the output bias, ``num_batches_tracked``) are listed too
        so coverage can be reported and mismatched checkpoints detected.
    sizes:
        Number of units of each group, in network order (input to output).
    """

    axes: dict[str, tuple[str | None, ...]]
    sizes: dict[str, int]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived views
    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """Group name -> every ``(key, axis)`` it moves, in state-dict order."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for key, ax in self.axes.items():
            for i, g in enumerate(ax):
                if g is not None:
                    out[g].append((key, i))
        return out

    def coverage(self) -> dict[str, Any]:
        """How much of the model the spec permutes (reported, never silent)."""
        permuted = [k for k, ax in self.axes.items() if any(g is not None for g in ax)]
        n_el = {k: _numel(self.shapes.get(k, ())) for k in self.axes}
        return {
            "groups": len(self.sizes),
            "units": int(sum(self.sizes.values())),
            "entries": len(self.axes),
            "entries_permuted": len(permuted),
            "elements": int(sum(n_el.values())),
            "elements_permuted": int(sum(n_el[k] for k in permuted)),
        }

    def validate(self) -> None:
        """Internal consistency: every group is used, sizes agree with shapes."""
        used = self.groups
        for g, members in used.items():
            if not members:
                raise ValueError(f"permutation group {g!r} moves no axis")
        for key, ax in self.axes.items():
            shape = self.shapes.get(key)
            if shape is None:
                continue
            if len(shape) != len(ax):
                raise ValueError(f"{key}: spec lists {len(ax)} axes, tensor has {len(shape)}")
            for i, g in enumerate(ax):
                if g is not None and shape[i] != self.sizes[g]:
                    raise ValueError(f"{key} axis {i} has {shape[i]} units, group {g!r} has {self.sizes[g]}")

    def check_state(self, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
        """Raise :class:`LmcError` when a state dict does not fit this spec."""
        missing = [k for k in self.axes if k not in state]
        extra = [k for k in state if k not in self.axes]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} entries (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} unexpected entries (e.g. {', '.join(extra[:3])})")
            raise LmcError(f"{where} does not match the model architecture: it " + " and ".join(parts),
                           "both models must be the same architecture and width")
        for k, shape in self.shapes.items():
            if tuple(state[k].shape) != tuple(shape):
                raise LmcError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the architecture expects {tuple(shape)}",
                               "the models differ in width or architecture")

    def to_dict(self) -> dict[str, Any]:
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "sizes": dict(self.sizes),
                "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PermutationSpec":
        return cls(axes={k: tuple(v) for k, v in d["axes"].items()}, sizes=dict(d["sizes"]),
                   shapes={k: tuple(v) for k, v in d.get("shapes", {}).items()})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SpecBuilder:
    """Helper for writing spec rules: declare groups, then attach axes."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state
        self.axes: dict[str, list[str | None]] = {k: [None] * v.dim() for k, v in state.items()}
        self.sizes: dict[str, int] = {}

    def group(self, name: str, size: int) -> str:
        if name in self.sizes and self.sizes[name] != size:
            raise ValueError(f"group {name!r} declared with sizes {self.sizes[name]} and {size}")
        self.sizes[name] = size
        return name

    def move(self, key: str, axis: int, group: str | None) -> None:
        if group is None:
            return
        if key not in self.axes:
            raise KeyError(f"spec rule names {key!r}, not in the model's state dict")
        cur = self.axes[key][axis]
        if cur is not None and cur != group:
            raise ValueError(f"{key} axis {axis} claimed by groups {cur!r} and {group!r}")
        self.axes[key][axis] = group

    def out_axis(self, prefix: str, group: str | None) -> None:
        """Every entry of module ``prefix`` moved on axis 0 (weights, biases, norm stats)."""
        for k, v in self.state.items():
            if k.rsplit(".", 1)[0] == prefix and v.dim() >= 1:
                self.move(k, 0, group)

    def in_axis(self, prefix: str, group: str | None) -> None:
        self.move(f"{prefix}.weight", 1, group)

    def build(self) -> PermutationSpec:
        spec = PermutationSpec(axes={k: tuple(v) for k, v in self.axes.items()}, sizes=dict(self.sizes),
                               shapes={k: tuple(v.shape) for k, v in self.state.items()})
        spec.validate()
        return spec


# --------------------------------------------------------------------------- algebra
def identity_permutation(spec: PermutationSpec, device: torch.device | str = "cpu") -> Perms:
    return {g: torch.arange(n, device=device) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Perms:
    """Independent uniformly random permutation per group, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state dict with every axis permuted by its group.

    The caller's tensors are never modified. Entries with no permuted axis are
    shared (not copied) with ``state``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ax = spec.axes.get(key)
        if ax is None:
            out[key] = value
            continue
        w = value
        for i, g in enumerate(ax):
            if g is not None:
                w = w.index_select(i, perms[g].to(w.device))
        out[key] = w
    return out


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> Perms:
    """``inv[g][p[g][i]] = i``: applying ``p`` then ``inv`` is the identity."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose_permutations(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Perms:
    """Permutation equal to applying ``first`` and then ``then``.

    ``apply(then, apply(first, s))`` takes unit ``then[i]`` of the ``first``-permuted
    model, which is unit ``first[then[i]]`` of ``s``.
    """
    return {g: first[g][then[g].to(first[g].device)] for g in first}


def perm_changed_units(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all units whose assignment differs between two permutation sets."""
    tot = sum(int(p.numel()) for p in a.values())
    diff = sum(int((a[g].cpu() != b[g].cpu()).sum()) for g in a)
    return diff / max(tot, 1)


# --------------------------------------------------------------------------- JSON I/O
def perms_to_json(perms: Mapping[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {"format": "lmckit.permutation", "version": 1, "perms": {g: [int(i) for i in p.tolist()] for g, p in perms.items()}, **extra}


def validate_perms(spec: PermutationSpec, perms: Mapping[str, Any], where: str = "permutation") -> Perms:
    """Check a permutation set fits ``spec`` and return it as LongTensors.

    Raises :class:`LmcError` for unknown or missing groups, wrong lengths,
    out-of-range or duplicated indices.
    """
    if not isinstance(perms, Mapping):
        raise LmcError(f"{where}: expected a mapping of group name to index list, got {type(perms).__name__}")
    unknown = [g for g in perms if g not in spec.sizes]
    missing = [g for g in spec.sizes if g not in perms]
    if unknown or missing:
        msg = []
        if unknown:
            msg.append(f"unknown groups {unknown[:4]}")
        if missing:
            msg.append(f"missing groups {missing[:4]}")
        raise LmcError(f"{where} does not fit the model: " + ", ".join(msg) + f" (the model has groups {list(spec.sizes)[:6]}{'...' if len(spec.sizes) > 6 else ''})",
                       "use a permutation file computed for these models (lmckit match)")
    out: Perms = {}
    for g, n in spec.sizes.items():
        p = perms[g]
        if isinstance(p, torch.Tensor):
            lst = p.tolist()
        elif isinstance(p, (list, tuple)):
            lst = list(p)
        else:
            raise LmcError(f"{where}: group {g!r} is a {type(p).__name__}, expected a list of integers")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in lst):
            raise LmcError(f"{where}: group {g!r} contains non-integer entries")
        if len(lst) != n:
            raise LmcError(f"{where}: group {g!r} has {len(lst)} entries, the model has {n} units", "use a permutation computed for models of this width")
        if lst and (min(lst) < 0 or max(lst) >= n):
            raise LmcError(f"{where}: group {g!r} has indices outside 0..{n - 1}")
        if len(set(lst)) != n:
            raise LmcError(f"{where}: group {g!r} is not a permutation (duplicated indices)")
        out[g] = torch.tensor(lst, dtype=torch.long)
    return out


def save_perms(path: str | Path, perms: Mapping[str, torch.Tensor], **extra: Any) -> Path:
    from ..store import atomic_write_json

    return atomic_write_json(path, perms_to_json(perms, **extra))


def load_perms(path: str | Path, spec: PermutationSpec | None = None) -> Perms:
    """Read a permutation JSON file (written by :func:`save_perms`); validate against ``spec``."""
    from ..store import read_json

    d = read_json(path, "permutation file")
    if not isinstance(d, dict) or "perms" not in d:
        raise LmcError(f"permutation file {path} has no 'perms' key", "pass a file written by lmckit match")
    if spec is None:
        raw = d["perms"]
        if not isinstance(raw, dict):
            raise LmcError(f"permutation file {path}: 'perms' must be a mapping")
        fake = PermutationSpec(axes={}, sizes={g: len(v) if isinstance(v, list) else -1 for g, v in raw.items()})
        return validate_perms(fake, raw, f"permutation file {path}")
    return validate_perms(spec, d["perms"], f"permutation file {path}")
