"""Exact weight-matching steps over the symmetry classes: ``argmax_M tr(M^T C)`` per class and per head structure.

Part of :mod:`lmckit.perm.symmetry`: :func:`step` (a LAP, a LAP on ``|C|`` with signs, orthogonal
Procrustes, restricted Procrustes on the ones-complement) and :func:`head_step` (one head permutation and
per-head maps, jointly optimal).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import LmcError
from .spec import head_block_perm
from .symmetry_transforms import _from_complement, head_matrix, ones_complement, perm_matrix

__all__ = ["procrustes", "step", "head_step"]


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
        if cls == "orthogonal":  # all H^2 Procrustes steps in one batched SVD (same LAPACK call per block)
            blocks = c.double().reshape(h, d, h, d).permute(0, 2, 1, 3)
            u, _, vt = torch.linalg.svd(blocks)
            q = u @ vt
            v = (q * blocks).sum((-1, -2))
            vals += v.numpy()
            for i in range(h):
                for j in range(h):
                    sols[(mi, i, j)] = q[i, j]
            continue
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
