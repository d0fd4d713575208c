"""The pipeline half of ``lmckit reproduce``: load a recipe, build its stage graph, account stage costs.

:func:`prepare` reads and validates the recipe (with ``--set`` overrides),
checks that its dataset is findable (before any stage starts) and builds the
stage graph; :func:`stage_costs` sums each stage kind's compute time for
``timings.json``. The driver that runs the stages and then writes the report
folder is :func:`lmckit.reproduce.reproduce`: it sits above ``report`` in the
layering, so this package never imports the report writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import LmcError
from ..store import read_json
from .build import Plan, build_plan, check_data
from .executor import RunSummary
from .executor import plan as order
from .recipe import Recipe, load_recipe
from .stages import stage_path

__all__ = ["prepare", "stage_costs"]


def prepare(recipe: str = "quick", sets: Sequence[str] = (), data_dir: str | None = None) -> tuple[Recipe, Plan]:
    """Load and validate the recipe, check its data is present, build its stage graph.

    Also refuses, before anything trains, a matching method the recipe applies to a model it cannot
    align (:func:`check_methods_fit_models`).
    """
    r = load_recipe(recipe, sets)
    check_data(r, data_dir)
    plan = build_plan(r)
    check_methods_fit_models(plan, source=recipe)
    return r, plan


def check_methods_fit_models(plan: Plan, source: str = "") -> None:
    """Run each planned method's spec check (registry ``check_spec``) on the models it will align.

    A method that refuses some architectures (Sinkhorn: attention heads, block axes) would otherwise
    fail only at its match stage, after the models trained. Each model configuration is built once at
    initialisation (default input shape; structure does not depend on it) and traced. Raises
    :class:`LmcError` naming the method, the model and the recipe keys to change.
    """
    from ..match.registry import get_method, list_methods
    from ..models import create_model
    from ..perm import spec_for
    from .tasks import MatchStage

    hooked = {m for m in list_methods() if get_method(m).check_spec is not None}
    todo: dict[str, tuple[str, dict, set[str]]] = {}  # model configuration -> (name, options, methods)
    for stage in plan.targets():
        # match stages of the pair experiments, and those inside three-model stages
        for m in [stage, *(getattr(stage, "matches", None) or ())]:
            if isinstance(m, MatchStage) and m.method in hooked:
                cfg = m.b.train_config()
                key = f"{cfg.model} {sorted(cfg.model_options.items())!r}"
                todo.setdefault(key, (cfg.model, dict(cfg.model_options), set()))[2].add(m.method)
    for name, options, methods in todo.values():
        try:
            spec = spec_for(create_model(name, **options))
        except Exception:  # a model that cannot be built here fails in its training stage, with its own message
            continue
        for method in sorted(methods):
            try:
                get_method(method).check(spec)
            except LmcError as e:
                where = f"recipe {source}: " if source else "recipe: "
                raise LmcError(
                    f"{where}{method} cannot align model {name!r}: {e.message}",
                    f"remove {method} from match.methods (and three_models.methods / width_sweep.methods) "
                    f"for this model; {e.hint}"
                    if e.hint
                    else f"remove {method} from the recipe's methods",
                ) from None


def stage_costs(
    plan: Plan,
    cache: str | os.PathLike,
    summary: RunSummary | None,
    wall_seconds: float,
    load_at_start: tuple[float, float, float] | None = None,
) -> dict:
    """Cost of each stage kind, for ``timings.json``.

    Returns ``{"stages_by_kind": {kind: {"count", "ran", "cached", "seconds",
    "mean_seconds"}}, "wall_seconds", "conditions"}``: ``seconds`` is the
    compute time recorded in each stage folder's ``stage.json`` (the time of
    the run that made it, also for stages reused from the cache), ``ran`` and
    ``cached`` count this call's stages by outcome, ``wall_seconds`` is this
    call's time up to the report, and ``conditions`` the CPU count and load
    averages when it started and ended (timings on a shared machine depend on them).
    """
    kinds: dict[str, dict] = {}
    for s in order(plan.targets()):
        k = kinds.setdefault(s.KIND, {"count": 0, "ran": 0, "cached": 0, "seconds": 0.0})
        k["count"] += 1
        f = stage_path(Path(cache), s) / "stage.json"
        if f.exists():
            k["seconds"] += float(read_json(f, "stage record", expect=dict).get("seconds", 0.0))
    for o in summary.outcomes if summary is not None else []:
        if o.kind in kinds and o.status in ("ran", "cached"):
            kinds[o.kind][o.status] += 1
    for k in kinds.values():
        k["mean_seconds"] = k["seconds"] / max(k["count"], 1)
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    return {
        "stages_by_kind": kinds,
        "wall_seconds": wall_seconds,
        "conditions": {"cpus": os.cpu_count(), "load_average_start": load_at_start, "load_average_end": load_end},
    }
