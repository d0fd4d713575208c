"""Permutation specs (which axes each hidden-unit permutation moves) and their algebra."""

import importlib

from .spec import (
    COVERAGE_WARN_THRESHOLD,
    CoverageWarning,
    Perms,
    PermutationSpec,
    SpecBuilder,
    apply_permutation,
    compose_permutations,
    head_block_perm,
    identity_permutation,
    invert_permutation,
    load_perms,
    perm_changed_units,
    perms_to_json,
    random_permutation,
    save_perms,
    split_head_perm,
    validate_perms,
    warn_low_coverage,
)

__all__ = [
    "PermutationSpec",
    "Perms",
    "SpecBuilder",
    "apply_permutation",
    "compose_permutations",
    "identity_permutation",
    "invert_permutation",
    "load_perms",
    "perm_changed_units",
    "perms_to_json",
    "random_permutation",
    "save_perms",
    "validate_perms",
    "spec_for",
    "has_rules",
    "CoverageWarning",
    "COVERAGE_WARN_THRESHOLD",
    "head_block_perm",
    "split_head_perm",
    "warn_low_coverage",
]


def has_rules(model) -> bool:
    """Whether ``model`` declares its own permutation symmetry (zoo models, or a user ``permutation_spec()``)."""
    return hasattr(model, "permutation_rules") or hasattr(model, "permutation_spec")


def spec_for(model, example_input=None) -> PermutationSpec:
    """The permutation spec of ``model``: its own rules where it has them, fx tracing otherwise.

    Zoo models declare their groups with ``permutation_rules(b)`` on a :class:`SpecBuilder` over
    their state dict (so ``models`` never imports ``perm``); a user architecture may instead
    return a whole spec from ``permutation_spec()``; any other model is traced with torch.fx.
    """
    rules = getattr(model, "permutation_rules", None)
    if rules is not None:
        b = SpecBuilder(model.state_dict())
        rules(b)
        return b.build()
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    # lazy: torch.fx and the tracer load only for models without their own rules (zoo models never need them)
    from .trace import trace_spec

    return trace_spec(model, example_input)


# fx tracing and the invariance check, imported on first use (torch.fx is only needed for them; lmckit.perm stays
# cheap for `lmckit models` and every zoo-model path)
_LAZY = {
    "trace_spec": "trace",
    "trace_streams": "trace",
    "activation_sites": "trace",
    "example_input_for": "trace",
    "SpecWarning": "trace",
    "TraceResult": "trace",
    "check_spec": "check",
    "CheckReport": "check",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
