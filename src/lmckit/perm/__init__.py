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
    "uses_export",
    "CoverageWarning",
    "COVERAGE_WARN_THRESHOLD",
    "head_block_perm",
    "split_head_perm",
    "warn_low_coverage",
]


def has_rules(model) -> bool:
    """Whether ``model`` declares its own permutation symmetry (zoo models, or a user ``permutation_spec()``)."""
    return hasattr(model, "permutation_rules") or hasattr(model, "permutation_spec")


def uses_export(model) -> bool:
    """Whether ``model`` is traced through ``torch.export`` (:mod:`lmckit.perm.export_trace`) instead of torch.fx.

    True for Hugging Face ``transformers`` models (which torch.fx cannot trace) and for any model with a true
    ``lmckit_tracer == "export"`` attribute; the choice is by where the class comes from, not by its name.
    """
    if getattr(model, "lmckit_tracer", None) == "export":
        return True
    return type(model).__module__.split(".", 1)[0] == "transformers"


def spec_for(model, example_input=None) -> PermutationSpec:
    """The permutation spec of ``model``: its own rules where it has them, tracing otherwise.

    Zoo models declare their groups with ``permutation_rules(b)`` on a :class:`SpecBuilder` over
    their state dict (so ``models`` never imports ``perm``); a user architecture may instead
    return a whole spec from ``permutation_spec()``; models for which :func:`uses_export` holds
    (Hugging Face ``transformers``) are traced with ``torch.export`` (``example_input`` required:
    token ids or images); any other model is traced with torch.fx.
    """
    rules = getattr(model, "permutation_rules", None)
    if rules is not None:
        b = SpecBuilder(model.state_dict())
        rules(b)
        return b.build()
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    # lazy: torch.fx and the tracer load only for models without their own rules (zoo models never need them)
    if uses_export(model):
        from .export_trace import export_trace_spec

        if example_input is None:  # the model's own `example_input`, else a clear LmcError
            from .trace import example_input_for

            example_input = example_input_for(model)
        return export_trace_spec(model, example_input)
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
    "export_trace_spec": "export_trace",
    "export_trace_streams": "export_trace",
    "check_spec": "check",
    "CheckReport": "check",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
