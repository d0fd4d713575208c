"""Permutation specs and the algebra of permutations on state dicts.

Convention
----------
A permutation of group ``g`` with ``n`` units is a LongTensor ``p`` of length
``n``. Applying it to a parameter along an axis moved by ``g`` takes
``W' = W.index_select(axis, p)``: unit ``i`` of the permuted model is unit
``p[i]`` of the original. In matrix form ``P[i, p[i]] = 1`` and, for a layer
``W_l`` whose rows are moved by ``P_l`` and columns by ``P_{l-1}``,
``W_l' = P_l W_l P_{l-1}^T`` exactly as in docs/definitions.md.

A conv kernel ``(out, in, k, k)`` is moved on axis 0 by the output group and
on axis 1 by the input group, so a permutation acts on whole input-channel
groups of the ``out x (in*k*k)`` matrix.

Block (segmented) axes
----------------------
An axis may also be moved by a *sequence of segments* ``((g, n, inner), ...)``
instead of one group name: the axis is cut, in order, into blocks of
``n * inner`` entries; a block whose ``g`` is ``None`` stays in place, block
``(g, n, inner)`` at offset ``o`` maps entry ``o + i*inner + r`` to
``o + p_g[i]*inner + r`` (whole runs of ``inner`` entries move with unit
``i``). This covers ``torch.cat`` along units (one segment per input),
``F.pad`` / zero channels (``(None, pad, 1)``), the gate blocks of an LSTM
(``4 x (g, h, 1)``), the fused ``in_proj`` of ``nn.MultiheadAttention``
(``(qk, E, 1), (qk, E, 1), (vo, E, 1)``) and ``flatten`` of a ``C x H x W``
map into a Linear (``(g, C, H*W)``). Permutations stay flat LongTensors per
group, so apply / invert / compose / JSON are unchanged.

Head structure
--------------
``spec.heads[name] = (H, (g1, g2, ...))`` constrains member groups of sizes
``H * d_m``: their permutations must map head blocks to head blocks with ONE
head mapping ``h`` shared by every member and a free permutation ``w_i`` inside
each head, ``p_m[i*d_m + j] = h[i]*d_m + w_{m,i}[j]``. Multi-head attention
is invariant exactly under this group (heads are interchangeable as wholes;
inside a head Q and K share one feature permutation, V and the output
projection's input another).

Ops per group (symmetries beyond permutations)
----------------------------------------------
``spec.ops[name]`` optionally lists the ops group ``name``'s units pass through
between the layers that write and read them, as labels ``"Kind:where"``
(``"LayerNorm:blocks.0.ln1.norm"``, ``"GELU:blocks.0.act"``,
``"MultiheadAttention:blocks.0.attn"``, ``"add"``; the kind is a module class
name or a function/method name, ``where`` the module, when there is one). It
is plain data that any spec producer may fill (zoo rules through
:meth:`SpecBuilder.ops`, the fx tracer from the graph); permutations never
read it. :mod:`lmckit.perm.symmetry` derives from it the largest class of maps
(signed permutation, orthogonal, invertible) that keeps the function, and
names the op that limits a group; a group without an entry is limited to
permutations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checks import as_perm, as_perms, check_device, check_int, check_state, same_groups
from ..errors import LmcError
from ..store import atomic_write_json, check_format, read_json

Perms = dict[str, torch.Tensor]
#: One segment of a block-permuted axis: ``(group or None, units, inner)``.
Segment = tuple
AxisEntry = Any  # None | str | tuple[Segment, ...]


def is_segmented(entry: AxisEntry) -> bool:
    """True for a block axis (a tuple of segments), false for ``None`` or a group name."""
    return isinstance(entry, (tuple, list))


def entry_groups(entry: AxisEntry) -> list[str]:
    """Groups that move an axis entry (none, one, or several for a block axis), in order, no repeats."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    out: list[str] = []
    for g, _, _ in entry:
        if g is not None and g not in out:
            out.append(g)
    return out


def entry_segments(
    entry: AxisEntry, length: int | None, sizes: Mapping[str, int]
) -> list[tuple[str | None, int, int, int]]:
    """``(group, n, inner, offset)`` per segment of an axis entry (a plain group is one segment)."""
    if entry is None:
        return [(None, int(length or 0), 1, 0)]
    if isinstance(entry, str):
        return [(entry, int(sizes[entry]), 1, 0)]
    out, off = [], 0
    for g, n, inner in entry:
        out.append((g, int(n), int(inner), off))
        off += int(n) * int(inner)
    return out


def entry_length(entry: AxisEntry, sizes: Mapping[str, int]) -> int | None:
    if entry is None:
        return None
    if isinstance(entry, str):
        return int(sizes[entry])
    return int(sum(int(n) * int(inner) for _, n, inner in entry))


def axis_index(
    entry: AxisEntry, perms: Mapping[str, torch.Tensor], length: int, device: Any = None
) -> torch.Tensor | None:
    """Index vector moving one axis (``None`` when the axis is not moved)."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return perms[entry]
    parts = []
    off = 0
    for g, n, inner in entry:
        n, inner = int(n), int(inner)
        if g is None:
            parts.append(torch.arange(off, off + n * inner, device=device))
        else:
            p = perms[g].to(device) if device is not None else perms[g]
            parts.append((p[:, None] * inner + torch.arange(inner, device=p.device)[None, :]).reshape(-1) + off)
        off += n * inner
    return torch.cat(parts) if parts else torch.arange(length, device=device)


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

    axes: dict[str, tuple[AxisEntry, ...]]
    sizes: dict[str, int]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    heads: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    #: group -> op labels its units pass through (see "Ops per group" in the module docstring); optional
    ops: dict[str, tuple[str, ...]] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived views
    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """Group name -> every ``(key, axis)`` it moves, in state-dict order."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for key, ax in self.axes.items():
            for i, e in enumerate(ax):
                for g in entry_groups(e):
                    out[g].append((key, i))
        return out

    def coverage(self) -> dict[str, Any]:
        """How much of the model the spec permutes (reported, never silent).

        ``unit_axes`` / ``unit_axes_permuted``: the output units of the
        model's matrices (axis 0 of every tensor with at least two axes:
        weight rows, conv output channels, gate blocks; counted by size; a
        block axis counts the entries its groups move) and how many of them a
        group moves. ``hidden_coverage`` is their ratio: the output layer's
        rows (and embedding tables' vocabulary rows) can never move, so a
        fully permuted MLP 784-512-512-512-10 scores 0.99, a transformer whose
        attention and residual stream are pinned about 0.4, a spec that
        permutes nothing 0.
        """
        permuted = [k for k, ax in self.axes.items() if any(g is not None for g in ax)]
        n_el = {k: _numel(self.shapes.get(k, ())) for k in self.axes}
        ua = up = 0
        for k, ax in self.axes.items():
            shape = self.shapes.get(k, ())
            if len(shape) < 2:
                continue
            for i in (0,):
                ua += int(shape[i])
                e = ax[i]
                if isinstance(e, str):
                    up += int(shape[i])
                elif is_segmented(e):
                    up += sum(int(n) * int(inner) for g, n, inner in e if g is not None)
        return {
            "groups": len(self.sizes),
            "units": int(sum(self.sizes.values())),
            "entries": len(self.axes),
            "entries_permuted": len(permuted),
            "elements": int(sum(n_el.values())),
            "elements_permuted": int(sum(n_el[k] for k in permuted)),
            "heads": {name: {"heads": int(h), "groups": list(m)} for name, (h, m) in self.heads.items()},
            "unit_axes": int(ua),
            "unit_axes_permuted": int(up),
            "hidden_coverage": (up / ua) if ua else 0.0,
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
                if g is None:
                    continue
                if is_segmented(g):
                    for sg, n, _inner in g:
                        if sg is not None and int(n) != self.sizes[sg]:
                            raise ValueError(
                                f"{key} axis {i}: segment of group {sg!r} has {n} units, the group has {self.sizes[sg]}"
                            )
                    if entry_length(g, self.sizes) != shape[i]:
                        raise ValueError(
                            f"{key} axis {i} has {shape[i]} entries, its segments cover {entry_length(g, self.sizes)}"
                        )
                elif shape[i] != self.sizes[g]:
                    raise ValueError(f"{key} axis {i} has {shape[i]} units, group {g!r} has {self.sizes[g]}")
        for name, (h, members) in self.heads.items():
            for g in members:
                if g not in self.sizes:
                    raise ValueError(f"head structure {name!r} names unknown group {g!r}")
                if int(h) < 1 or self.sizes[g] % int(h):
                    raise ValueError(
                        f"head structure {name!r}: group {g!r} of {self.sizes[g]} units is not {h} equal heads"
                    )
        for g in self.ops:
            if g not in self.sizes:
                raise ValueError(f"spec ops name unknown group {g!r}")

    def check_state(self, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
        """Raise :class:`LmcError` when a state dict does not fit this spec (or is not a state dict)."""
        check_state(state, where)
        missing = [k for k in self.axes if k not in state]
        extra = [k for k in state if k not in self.axes]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} entries (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} unexpected entries (e.g. {', '.join(extra[:3])})")
            raise LmcError(
                f"{where} does not match the model architecture: it " + " and ".join(parts),
                "both models must be the same architecture and width",
            )
        for k, shape in self.shapes.items():
            if tuple(state[k].shape) != tuple(shape):
                raise LmcError(
                    f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the architecture expects {tuple(shape)}",
                    "the models differ in width or architecture",
                )

    def to_dict(self) -> dict[str, Any]:
        enc = lambda e: [list(s) for s in e] if is_segmented(e) else e  # noqa: E731
        out = {
            "axes": {k: [enc(e) for e in v] for k, v in self.axes.items()},
            "sizes": dict(self.sizes),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        if self.heads:
            out["heads"] = {n: [int(h), list(m)] for n, (h, m) in self.heads.items()}
        if self.ops:
            out["ops"] = {g: list(v) for g, v in self.ops.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PermutationSpec":
        dec = lambda e: tuple((s[0], int(s[1]), int(s[2])) for s in e) if isinstance(e, list) else e  # noqa: E731
        return cls(
            axes={k: tuple(dec(e) for e in v) for k, v in d["axes"].items()},
            sizes=dict(d["sizes"]),
            shapes={k: tuple(v) for k, v in d.get("shapes", {}).items()},
            heads={n: (int(v[0]), tuple(v[1])) for n, v in d.get("heads", {}).items()},
            ops={g: tuple(v) for g, v in d.get("ops", {}).items()},
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SpecBuilder:
    """Helper for writing spec rules: declare groups, then attach axes."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state
        self.axes: dict[str, list[AxisEntry]] = {k: [None] * v.dim() for k, v in state.items()}
        self.sizes: dict[str, int] = {}
        self.heads: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._ops: dict[str, list[str]] = {}

    def ops(self, group: str, *labels: str) -> None:
        """Record ops ``group``'s units pass through (``"Kind:where"`` labels; see the module docstring)."""
        cur = self._ops.setdefault(group, [])
        cur.extend(x for x in labels if x not in cur)

    def head_structure(self, name: str, n_heads: int, members: list[str]) -> None:
        """Constrain ``members`` to head-block permutations sharing one head mapping (see module docstring)."""
        self.heads[name] = (int(n_heads), tuple(members))

    def move_blocks(self, key: str, axis: int, segments: list[tuple[str | None, int, int]]) -> None:
        """Axis ``axis`` of ``key`` is moved block-wise by ``segments`` (``(group or None, n, inner)``)."""
        if key not in self.axes:
            raise KeyError(f"spec rule names {key!r}, not in the model's state dict")
        segs = tuple((g, int(n), int(inner)) for g, n, inner in segments)
        if len(segs) == 1 and segs[0][0] is not None and segs[0][2] == 1:
            self.move(key, axis, segs[0][0])
            return
        if all(g is None for g, _, _ in segs):
            return
        cur = self.axes[key][axis]
        if cur is not None and cur != segs:
            raise ValueError(f"{key} axis {axis} claimed twice ({cur!r} and {segs!r})")
        self.axes[key][axis] = segs

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
        spec = PermutationSpec(
            axes={k: tuple(v) for k, v in self.axes.items()},
            sizes=dict(self.sizes),
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            heads=dict(self.heads),
            ops={g: tuple(v) for g, v in self._ops.items()},
        )
        spec.validate()
        return spec


# --------------------------------------------------------------------------- algebra
def identity_permutation(spec: PermutationSpec, device: torch.device | str = "cpu") -> Perms:
    """The identity permutation of every group of ``spec``, on ``device`` (checked: LmcError if unusable)."""
    check_spec(spec)
    dev = check_device(device)
    return {g: torch.arange(n, device=dev) for g, n in spec.sizes.items()}


def check_spec(spec: Any, arg: str = "spec") -> None:
    """Raise :class:`LmcError` unless ``spec`` is a :class:`PermutationSpec` (an API argument check)."""
    if not isinstance(spec, PermutationSpec):
        raise LmcError(
            f"{arg} must be a PermutationSpec, got {type(spec).__name__}", "build one with lmckit.perm.spec_for(model)"
        )


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Perms:
    """Uniformly random permutation per group, seeded.

    Groups under a head structure get a random head permutation shared by
    every member and an independent random permutation inside each head of
    each member (uniform over the head-structured group).
    """
    check_spec(spec)
    gen = torch.Generator().manual_seed(check_int(seed, "seed", 0, 2**63 - 1))
    out = {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}
    for _, (h, members) in spec.heads.items():
        hp = torch.randperm(int(h), generator=gen)
        for g in members:
            d = spec.sizes[g] // int(h)
            within = torch.stack([torch.randperm(d, generator=gen) for _ in range(int(h))])
            out[g] = head_block_perm(hp, within)
    return out


def head_block_perm(head: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Flat permutation ``p[i*d + j] = head[i]*d + within[i, j]`` (``within``: ``H x d``).

    ``head`` must be a permutation of ``H`` heads and each row of ``within`` one of ``d`` units
    (:func:`lmckit.checks.as_perm`; else :class:`LmcError`).
    """
    head = as_perm(head, None, "head")
    if not isinstance(within, torch.Tensor) or within.dim() != 2 or within.shape[0] != head.numel():
        raise LmcError(f"within must be a tensor of shape (heads={head.numel()}, d), got {type(within).__name__}")
    for i in range(within.shape[0]):
        as_perm(within[i], None, f"within[{i}]")
    d = within.shape[1]
    return (head.long()[:, None] * d + within.long()).reshape(-1)


def split_head_perm(p: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inverse of :func:`head_block_perm`: ``(head, within)``, or ``None`` if ``p`` is not head-structured.

    ``p`` must be a permutation and ``n_heads`` an integer >= 1 (else :class:`LmcError`).
    """
    p = as_perm(p, None, "p")
    n_heads = check_int(n_heads, "n_heads", 1)
    n = p.numel()
    if n % n_heads:
        return None
    d = n // n_heads
    blocks = p.reshape(n_heads, d)
    head = blocks[:, 0] // d
    if not bool((blocks // d == head[:, None]).all()):
        return None
    return head, blocks - head[:, None] * d


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every axis permuted by its group.

    The caller's tensors are never modified. Entries with no permuted axis are
    shared (not copied) with ``state``.

    ``perms`` must hold every group of ``spec`` and no other, each a permutation of the group's size (a
    1-D integer tensor, a list of ints or a numpy integer array; see :mod:`lmckit.checks`); ``state``
    must be a mapping of names to tensors. Anything else raises :class:`LmcError` naming the argument
    and group (never a malformed state dict).
    """
    check_spec(spec)
    perms = as_perms(perms, "perms", spec.sizes)
    check_state(state, "state")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ax = spec.axes.get(key)
        if ax is None:
            out[key] = value
            continue
        w = value
        for i, g in enumerate(ax):
            if g is not None:
                w = w.index_select(i, axis_index(g, perms, w.shape[i], w.device).to(w.device))
        out[key] = w
    return out


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> Perms:
    """``inv[g][p[g][i]] = i``: applying ``p`` then ``inv`` is the identity.

    Raises :class:`LmcError` when an entry of ``perms`` is not a permutation (:func:`lmckit.checks.as_perm`).
    """
    return {g: torch.argsort(p) for g, p in as_perms(perms, "perms").items()}


def compose_permutations(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Perms:
    """Permutation equal to applying ``first`` and then ``then``.

    ``apply(then, apply(first, s))`` takes unit ``then[i]`` of the ``first``-permuted
    model, which is unit ``first[then[i]]`` of ``s``.

    Both must hold the same groups with the same sizes (else :class:`LmcError`).
    """
    first, then = as_perms(first, "first"), as_perms(then, "then")
    same_groups(first, then, ("first", "then"))
    return {g: first[g][then[g].to(first[g].device)] for g in first}


def perm_changed_units(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all units whose assignment differs between two permutation sets (same groups and sizes)."""
    a, b = as_perms(a, "a"), as_perms(b, "b")
    same_groups(a, b, ("a", "b"))
    tot = sum(int(p.numel()) for p in a.values())
    diff = sum(int((a[g].cpu() != b[g].cpu()).sum()) for g in a)
    return diff / max(tot, 1)


# --------------------------------------------------------------------------- JSON I/O
#: the ``format`` and ``version`` a permutation file records (files without them, from older lmckit, are read)
PERM_FORMAT = "lmckit.permutation"
PERM_VERSION = 1


def perms_to_json(perms: Mapping[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    """The JSON object of a permutation file (``format``, ``version``, ``perms`` and ``extra`` keys).

    Each entry is checked to be a permutation (:func:`lmckit.checks.as_perm`; else :class:`LmcError`).
    """
    perms = as_perms(perms, "perms")
    return {
        "format": PERM_FORMAT,
        "version": PERM_VERSION,
        "perms": {g: [int(i) for i in p.tolist()] for g, p in perms.items()},
        **extra,
    }


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
        raise LmcError(
            f"{where} does not fit the model: "
            + ", ".join(msg)
            + f" (the model has groups {list(spec.sizes)[:6]}{'...' if len(spec.sizes) > 6 else ''})",
            "use a permutation file computed for these models (lmckit match)",
        )
    out: Perms = {}
    for g, n in spec.sizes.items():
        p = perms[g]
        if isinstance(p, torch.Tensor) or type(p).__module__ == "numpy":
            lst = as_perm(p, None, f"{where}: group {g!r}").tolist()
        elif isinstance(p, (list, tuple)):
            lst = list(p)
        else:
            raise LmcError(f"{where}: group {g!r} is a {type(p).__name__}, expected a list of integers")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in lst):
            raise LmcError(f"{where}: group {g!r} contains non-integer entries")
        if len(lst) != n:
            raise LmcError(
                f"{where}: group {g!r} has {len(lst)} entries, the model has {n} units",
                "use a permutation computed for models of this width",
            )
        if lst and (min(lst) < 0 or max(lst) >= n):
            raise LmcError(f"{where}: group {g!r} has indices outside 0..{n - 1}")
        if len(set(lst)) != n:
            raise LmcError(f"{where}: group {g!r} is not a permutation (duplicated indices)")
        out[g] = torch.tensor(lst, dtype=torch.long)
    for name, (h, members) in spec.heads.items():
        heads = []
        for g in members:
            sp = split_head_perm(out[g], int(h))
            if sp is None:
                raise LmcError(
                    f"{where}: group {g!r} does not map whole attention heads to heads ({h} heads of "
                    f"{spec.sizes[g] // int(h)} units; head structure {name!r})",
                    "use a permutation computed for these models by lmckit (head-aware matching)",
                )
            heads.append(sp[0])
        if any(not torch.equal(heads[0], x) for x in heads[1:]):
            raise LmcError(
                f"{where}: groups {list(members)} permute the heads of {name!r} differently",
                "Q/K and V/O must share one head permutation",
            )
    return out


def save_perms(path: str | Path, perms: Mapping[str, torch.Tensor], **extra: Any) -> Path:
    return atomic_write_json(path, perms_to_json(perms, **extra))


def load_perms(path: str | Path, spec: PermutationSpec | None = None) -> Perms:
    """Read a permutation JSON file (written by :func:`save_perms`); validate against ``spec``."""
    d = read_json(path, "permutation file", allow_nan=False)
    if not isinstance(d, dict):
        raise LmcError(
            f"permutation file {path} holds a JSON {type(d).__name__}, not an object with a 'perms' key",
            "pass a file written by lmckit match",
        )
    check_format(d, f"permutation file {path}", PERM_FORMAT, PERM_VERSION)
    if "perms" not in d:
        raise LmcError(f"permutation file {path} has no 'perms' key", "pass a file written by lmckit match")
    if spec is None:
        raw = d["perms"]
        if not isinstance(raw, dict):
            raise LmcError(f"permutation file {path}: 'perms' must be a mapping")
        fake = PermutationSpec(axes={}, sizes={g: len(v) if isinstance(v, list) else -1 for g, v in raw.items()})
        return validate_perms(fake, raw, f"permutation file {path}")
    return validate_perms(spec, d["perms"], f"permutation file {path}")


# --------------------------------------------------------------------------- coverage warnings
#: WM and AM warn when a spec moves less than this fraction of the model's unit axes
#: (``PermutationSpec.coverage()["hidden_coverage"]``).
COVERAGE_WARN_THRESHOLD = 0.5


class CoverageWarning(UserWarning):
    """A permutation spec leaves most of the model's units in place: matching can align little."""


def warn_low_coverage(spec: PermutationSpec, where: str, threshold: float = COVERAGE_WARN_THRESHOLD) -> float:
    """Warn (:class:`CoverageWarning`) when ``spec`` covers less than ``threshold`` of the unit axes.

    Returns the fraction covered.

    The fraction is ``coverage()["hidden_coverage"]``: of the unit axes of every
    matrix (axis 0 of each tensor with two or more axes, counted by size), the
    share a group moves. A fully permuted MLP 784-512-512-512-10 scores 0.99;
    0.5 flags models whose attention, residual stream or recurrent layers were
    left pinned (a pre-LN transformer with only its MLP hidden units permuted
    scores about 0.4).
    """
    check_spec(spec)
    frac = float(spec.coverage()["hidden_coverage"])
    if frac < threshold:
        warnings.warn(
            f"{where}: the permutation spec moves only {frac:.0%} of the model's unit axes (threshold "
            f"{threshold:.0%}); units it pins cannot be aligned, so barriers will stay high. "
            f"Run `lmckit check-spec` to see what is pinned and why.",
            CoverageWarning,
            stacklevel=3,
        )
    return frac
