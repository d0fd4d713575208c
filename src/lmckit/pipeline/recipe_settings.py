"""What a recipe asks of each stage: the training overrides of a model and the options of a match stage.

Both the recipe validation (:mod:`lmckit.pipeline.recipe_check`, which
resolves every model's training settings before anything runs) and the plan
builders (:mod:`lmckit.pipeline.experiment`, :mod:`lmckit.pipeline.build`,
:mod:`lmckit.pipeline.studies`) translate recipe sections into stage
settings; the translation lives here, below all of them, so each stage is
built from the settings the recipe was checked with.
"""

from __future__ import annotations

from typing import Any

from ..errors import LmcError
from .recipe_schema import RESERVED_OVERRIDES, ModelEntry, Recipe

__all__ = ["RECIPE_OPTIONS"]


def _train_overrides(recipe: Recipe, m: ModelEntry, width_mult: float, seed: int) -> dict[str, Any]:
    kw = dict(m.options)
    over: dict[str, Any] = {}
    over.update({k: _thaw(v) for k, v in recipe.train.overrides})
    over.update({k: _thaw(v) for k, v in m.overrides})
    # the recipe validates these (recipe._check_overrides); re-checked here for recipes built by hand
    for k, where in RESERVED_OVERRIDES.items():
        if k in over:
            raise LmcError(
                f"recipe: training overrides may not set {k!r}: it is set by {where}", f"remove {k} from the overrides"
            )
    extra_kw = over.pop("model_kwargs", {}) or {}
    if not isinstance(extra_kw, dict):
        raise LmcError(
            f"recipe: overrides model_kwargs must be a table, got {extra_kw!r}",
            "e.g. model_kwargs = {depth = 3}, or use models.N.options",
        )
    kw.update(extra_kw)
    kw["width_mult"] = float(width_mult)
    kw["norm"] = m.norm
    over.update({"model": m.name, "dataset": recipe.data.dataset, "seed": seed})
    over["model_kwargs"] = {k: _thaw(v) for k, v in kw.items()}
    return over


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
        return {k: _thaw(x) for k, x in v}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def _ste_options(m) -> tuple:
    s = m.ste
    opts = (
        ("batch_size", s.batch_size),
        ("epochs", s.epochs),
        ("lr", s.lr),
        ("max_iter", s.max_iter),
        ("train_limit", s.train_limit),
    )
    # defaults stay out of the options, so the STE stages' hashes of earlier runs still hold
    extra = (("project_every", s.project_every),) if s.project_every != 1 else ()
    extra += (("project_sweeps", s.project_sweeps),) if s.project_sweeps != 0 else ()
    return opts + extra + ((("protocol", s.protocol),) if s.protocol != "heldout-best" else ())


#: ``method -> (recipe.match -> the match stage's options)`` for the methods the ``[match]`` table
#: configures; any other registry method runs with its registry defaults (options ``()``).
RECIPE_OPTIONS = {
    "weight": lambda m: (("max_iter", m.max_iter),),
    "activation": lambda m: (("samples", m.am_samples),),
    "ste": _ste_options,
}


def _match_options(recipe: Recipe, method: str) -> tuple:
    """The match stage's options: the ``[match]`` table's for weight/activation/STE, else ``match.options.<method>``.

    A method without options in the recipe gets ``()`` (its registry defaults), so the hashes of
    earlier stages hold.
    """
    if method in RECIPE_OPTIONS:
        return RECIPE_OPTIONS[method](recipe.match)
    return dict(recipe.match.options).get(method, ())
