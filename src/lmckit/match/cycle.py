"""Cycle consistency of pairwise permutations between many models.

Matching N models pair by pair gives permutations ``p_ij`` (aligning model ``j`` to model ``i``:
``apply_permutation(spec, p_ij, theta_j)``, position ``u`` holds unit ``p_ij[u]`` of ``j``) that
need not compose: going around a triangle ``i -> j -> k -> i``, unit ``u`` of model ``i`` is sent
to unit ``p_ki[p_jk[p_ij[u]]]`` of ``i``, which is ``u`` for every unit exactly when
``p_ij p_jk p_ki`` is the identity (Crisostomi et al., "C2M3: Cycle-Consistent Multi-Model
Merging", NeurIPS 2024, Sec. 3: ``P_AB P_BC P_CA = I``). Permutations into one common order
(anchor matching, MergeMany, STE-MM, C2M3: ``p_ij = p_j p_i^{-1}`` in these terms) are
cycle-consistent by construction; pairwise weight matching is not.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch

from ..errors import LmcError
from ..perm.spec import Perms, PermutationSpec, compose_permutations, invert_permutation

Pairwise = Mapping[tuple[int, int], Mapping[str, torch.Tensor]]


def pairwise_from_common(perms: Sequence[Mapping[str, torch.Tensor]]) -> dict[tuple[int, int], Perms]:
    """The pairwise permutations ``p_ij`` (``i < j``, aligning ``j`` to ``i``) implied by permutations into one order.

    ``perms[i]`` puts model ``i`` in a common order (a :class:`~lmckit.match.result.MultiMatchResult`'s
    ``perms``); then ``p_ij[v] = perms[j][perms[i]^{-1}[v]]``.
    """
    inv = [invert_permutation(p) for p in perms]
    return {(i, j): compose_permutations(perms[j], inv[i]) for i in range(len(perms)) for j in range(i + 1, len(perms))}


def _pair(pairwise: Pairwise, i: int, j: int) -> Mapping[str, torch.Tensor]:
    if (i, j) in pairwise:
        return pairwise[(i, j)]
    if (j, i) in pairwise:
        return invert_permutation(pairwise[(j, i)])
    raise LmcError(f"cycle error: no permutation between models {i} and {j}", "pass one for every pair (i, j)")


def triangle_cycle_errors(pairwise: Pairwise, n_models: int | None = None) -> dict[tuple[int, int, int], float]:
    """Per triangle ``i < j < k``: the fraction of units ``u`` (all groups) with ``p_ki[p_jk[p_ij[u]]] != u``.

    Parameters
    ----------
    pairwise:
        ``{(i, j): perms}`` aligning model ``j`` to model ``i``, for every unordered pair (either
        orientation; the other one is the inverse). Groups: those of the first entry.
    n_models:
        Number of models (default: one more than the largest index).

    Raises
    ------
    LmcError
        A pair missing, fewer than three models, or permutations of different groups or sizes.
    """
    if not pairwise:
        raise LmcError("cycle error needs pairwise permutations of at least three models, got none")
    n = n_models if n_models is not None else 1 + max(max(p) for p in pairwise)
    if n < 3:
        raise LmcError(f"cycle error needs at least three models, got {n}")
    groups = list(next(iter(pairwise.values())))
    out = {}
    for i, j, k in itertools.combinations(range(n), 3):
        pij, pjk, pki = _pair(pairwise, i, j), _pair(pairwise, j, k), _pair(pairwise, k, i)
        bad = tot = 0
        for g in groups:
            if not (g in pjk and g in pki) or not (pij[g].numel() == pjk[g].numel() == pki[g].numel()):
                raise LmcError(f"cycle error: the permutations of triangle {(i, j, k)} disagree on group {g!r}")
            a, b, c = pij[g].long().cpu(), pjk[g].long().cpu(), pki[g].long().cpu()
            around = c[b[a]]  # unit of i reached from unit u of i: i -> j -> k -> i
            bad += int((around != torch.arange(a.numel())).sum())
            tot += int(a.numel())
        out[(i, j, k)] = bad / max(tot, 1)
    return out


def cycle_error(pairwise: Pairwise, n_models: int | None = None) -> float:
    """The cycle error: the mean over triangles ``i < j < k`` of :func:`triangle_cycle_errors`.

    The fraction of (triangle, unit) pairs whose composed permutation ``p_ij p_jk p_ki`` does not
    send the unit back to itself; 0 exactly when every cycle of the pairwise permutations composes
    to the identity. Every triangle has the same number of units, so this is also the fraction of
    all units over all triangles. Raises :class:`LmcError` as :func:`triangle_cycle_errors`.
    """
    per = triangle_cycle_errors(pairwise, n_models)
    return sum(per.values()) / len(per)


def pairwise_weight_matching(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    seed: int = 0,
    max_iter: int = 100,
    device: torch.device | str | None = None,
) -> dict[tuple[int, int], Perms]:
    """Weight matching of every pair ``i < j`` (``p_ij`` aligns ``j`` to ``i``), seeded per pair.

    The independent pairwise matchings whose cycle error C2M3 removes
    (:func:`lmckit.match.weight.weight_matching`, seed ``seed + 1000 i + j``).
    """
    from .multi import _check_states
    from .weight import weight_matching

    _check_states(spec, states)
    out = {}
    for i, j in itertools.combinations(range(len(states)), 2):
        res = weight_matching(
            spec, states[i], states[j], seed=int(seed) + 1000 * i + j, max_iter=max_iter, device=device
        )
        out[(i, j)] = {g: p.cpu() for g, p in res.perms.items()}
    return out
