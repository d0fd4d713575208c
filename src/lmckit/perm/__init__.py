"""Permutation specs (which axes each hidden-unit permutation moves) and their algebra."""
from .spec import (
    PermutationSpec,
    Perms,
    SpecBuilder,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    load_perms,
    perm_changed_units,
    perms_to_json,
    random_permutation,
    save_perms,
    validate_perms,
)

__all__ = [
    "PermutationSpec", "Perms", "SpecBuilder", "apply_permutation", "compose_permutations",
    "identity_permutation", "invert_permutation", "load_perms", "perm_changed_units", "perms_to_json",
    "random_permutation", "save_perms", "validate_perms", "spec_for",
]


def spec_for(model, example_input=None) -> PermutationSpec:
    """The permutation spec of ``model``: its own rules for zoo models, fx tracing otherwise."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    from .trace import trace_spec  # noqa: WPS433  (fx tracing, only when needed)

    return trace_spec(model, example_input)
