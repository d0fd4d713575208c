"""Permutation search: weight matching, activation matching, multi-model matching.

Every two-model method returns a :class:`MatchResult` whose ``perms`` align
model B to model A: ``apply_permutation(spec, res.perms, sd_b)``.
"""

from .result import MatchResult, MultiMatchResult
from .weight import l2_distance, objective_keys, weight_matching

__all__ = [
    "MatchResult",
    "MultiMatchResult",
    "weight_matching",
    "activation_matching",
    "anchor_matching",
    "merge_many",
    "l2_distance",
    "objective_keys",
]


def __getattr__(name):  # lazy: activation/multi import models and data only when used
    if name == "activation_matching":
        from .activation import activation_matching

        return activation_matching
    if name in ("anchor_matching", "merge_many"):
        from . import multi

        return getattr(multi, name)
    raise AttributeError(name)


from .ste import ste_matching  # noqa: E402  (STE, lmckit.match.ste)
