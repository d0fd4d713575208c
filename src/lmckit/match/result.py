"""Result objects shared by every matching method.

One result type for two-model matching (:class:`MatchResult`) and one for
multi-model matching (:class:`MultiMatchResult`), in the spirit of POT's
``OTResult``: the permutations, the objective history and timings, plus
``to_dict()`` (JSON-ready) and ``summary()`` (one readable line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..perm.spec import Perms


@dataclass
class MatchResult:
    """Permutations that align model B to model A.

    Attributes
    ----------
    perms:
        ``{group: LongTensor}`` in :mod:`lmckit.perm`'s convention: unit ``i``
        of the aligned model is unit ``perms[g][i]`` of B, so
        ``apply_permutation(spec, perms, sd_b)`` is aligned to A.
    objective:
        Objective value after each sweep, starting with the value at the
        initial permutations (for weight matching: ``sum <A, pi(B)>_F`` over
        the matched entries; for activation matching: the summed correlation
        of matched units). Non-decreasing for weight matching.
    sweeps:
        Number of coordinate-descent sweeps run (1 for activation matching).
    seconds:
        Wall time of the search (input checks and preparation included).
    method:
        ``"weight"``, ``"activation"``, ...
    converged:
        True when the last sweep changed nothing (not stopped by ``max_iter``).
    extra:
        Method-specific details (seed, restarts, solves skipped, ...).
    """

    perms: Perms
    objective: list[float]
    sweeps: int
    seconds: float
    method: str
    converged: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_objective(self) -> float:
        return float(self.objective[0])

    @property
    def final_objective(self) -> float:
        return float(self.objective[-1])

    def to_dict(self, with_perms: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "objective_before": self.initial_objective,
            "objective_after": self.final_objective,
            "objective": [float(v) for v in self.objective],
            "sweeps": int(self.sweeps),
            "seconds": float(self.seconds),
            "converged": bool(self.converged),
            **self.extra,
        }
        if with_perms:
            d["perms"] = {g: [int(i) for i in p.tolist()] for g, p in self.perms.items()}
        return d

    def summary(self) -> str:
        return (
            f"{self.method} matching: objective {self.initial_objective:.6g} -> {self.final_objective:.6g} "
            f"in {self.sweeps} sweep{'s' if self.sweeps != 1 else ''}, {self.seconds:.3f}s"
            + ("" if self.converged else " (stopped at max_iter, not converged)")
        )


@dataclass
class MultiMatchResult:
    """Permutations that bring several models into one common unit order.

    Attributes
    ----------
    perms:
        One permutation set per model; ``apply_permutation(spec, perms[i], states[i])``
        puts model ``i`` in the common order. The reference model (the anchor,
        or model 0 for MergeMany) gets the identity.
    objective:
        History of the method's objective: for anchor matching the summed
        final weight-matching objectives of every model against the anchor
        (one entry per stage: before, after); for MergeMany one entry per pass
        (the first before any matching).
    passes:
        Outer passes (MergeMany) or number of pairwise matchings (anchor).
    seconds, method, converged, extra:
        As in :class:`MatchResult`.
    pairwise:
        The per-model :class:`MatchResult` of the last matching of each model
        (``None`` for the anchor).
    """

    perms: list[Perms]
    objective: list[float]
    passes: int
    seconds: float
    method: str
    converged: bool = True
    pairwise: list[MatchResult | None] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_perms: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "objective": [float(v) for v in self.objective],
            "passes": int(self.passes),
            "seconds": float(self.seconds),
            "converged": bool(self.converged),
            "pairwise": [None if r is None else r.to_dict() for r in self.pairwise],
            **self.extra,
        }
        if with_perms:
            d["perms"] = [{g: [int(i) for i in p.tolist()] for g, p in ps.items()} for ps in self.perms]
        return d

    def summary(self) -> str:
        return (
            f"{self.method}: {len(self.perms)} models, {self.passes} pass{'es' if self.passes != 1 else ''}, "
            f"{self.seconds:.3f}s" + ("" if self.converged else " (stopped at max_iter, not converged)")
        )


def perms_equal(a: Perms, b: Perms) -> bool:
    """True when two permutation sets are identical group by group."""
    return a.keys() == b.keys() and all(torch.equal(a[g].cpu(), b[g].cpu()) for g in a)
