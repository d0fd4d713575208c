"""Transforms of the symmetry classes: sample, apply, invert, compose, and the transform files.

Part of :mod:`lmckit.perm.symmetry` (read its docstring for the convention: a transform is a dict
``group -> tensor``, an index for permutation-class groups and an ``n x n`` float64 matrix otherwise).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..errors import LmcError
from .spec import PermutationSpec, entry_segments, head_block_perm
from .symmetry_classes import CLASSES, GroupSymmetry, Transform

__all__ = [
    "sample",
    "ones_complement",
    "perm_matrix",
    "head_matrix",
    "random_transform",
    "identity_transform",
    "is_permutation_transform",
    "transform_matrix",
    "invert_transform",
    "compose_transforms",
    "apply_transform",
    "apply_segment",
    "log_condition",
    "TRANSFORM_FORMAT",
    "save_transform",
    "load_transform",
]


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


def apply_segment(x: torch.Tensor, axis: int, m: torch.Tensor, inner: int) -> torch.Tensor:
    """``x`` (one segment of ``n * inner`` entries on ``axis``) with ``m`` applied to its ``n`` units."""
    n = m.shape[0]
    y = x.movedim(axis, 0)  # (n * inner, *rest), unit-major: one (n, inner * rest) GEMM
    shp = y.shape
    y = m.to(y.device) @ y.reshape(n, -1).double()
    return y.reshape(shp).movedim(0, axis).to(x.dtype)


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
                            piece = apply_segment(piece, i, m.abs(), inner)
                            changed = True
                    else:
                        if (key, i) in sym[g].reads:
                            if g not in inv_t:
                                inv_t[g] = torch.linalg.inv(m.double()).T
                            m = inv_t[g]
                        piece = apply_segment(piece, i, m, inner)
                        changed = True
                parts.append(piece)
            if changed:
                w = torch.cat(parts, dim=i) if len(parts) > 1 else parts[0]
        out[key] = w
    return out


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
