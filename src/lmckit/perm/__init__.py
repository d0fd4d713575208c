"""Permutation specs (which axes each hidden-unit permutation moves) and their algebra."""

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
    "CoverageWarning",
    "COVERAGE_WARN_THRESHOLD",
    "head_block_perm",
    "split_head_perm",
    "warn_low_coverage",
]


def spec_for(model, example_input=None) -> PermutationSpec:
    """The permutation spec of ``model``: its own rules for zoo models, fx tracing otherwise."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    from .trace import trace_spec  # noqa: WPS433  (fx tracing, only when needed)

    return trace_spec(model, example_input)


# fx tracing and the invariance check, imported on first use (torch.fx is only needed for them)
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
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
