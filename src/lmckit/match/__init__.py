"""Permutation search: weight matching, activation matching, multi-model matching.

Every two-model method returns a :class:`MatchResult` whose ``perms`` align
model B to model A: ``apply_permutation(spec, res.perms, sd_b)``.
"""

__all__ = [
    "MatchResult",
    "MultiMatchResult",
    "weight_matching",
    "activation_matching",
    "anchor_matching",
    "merge_many",
    "l2_distance",
    "objective_keys",
    "ste_matching",
    "ste_mm",
    "c2m3",
    "cycle_error",
    "triangle_cycle_errors",
    "pairwise_from_common",
    "pairwise_weight_matching",
]


_LAZY = {
    "MatchResult": "result",
    "MultiMatchResult": "result",
    "weight_matching": "weight",
    "l2_distance": "weight",
    "objective_keys": "weight",
    "ste_matching": "ste",
    "ste_mm": "ste_mm",
    "c2m3": "c2m3",
    "cycle_error": "cycle",
    "triangle_cycle_errors": "cycle",
    "pairwise_from_common": "cycle",
    "pairwise_weight_matching": "cycle",
}


def __getattr__(name):  # lazy: importing lmckit.match.registry (the CLI's help) must not load torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "activation_matching":
        from .activation import activation_matching

        return activation_matching
    if name in ("anchor_matching", "merge_many"):
        from . import multi

        return getattr(multi, name)
    raise AttributeError(name)
