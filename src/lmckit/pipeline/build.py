"""From a :class:`~lmckit.pipeline.recipe.Recipe` to the graph of stages that reproduces it.

For every model entry of the recipe (and every width of the width sweep):

* one :class:`TrainStage` per seed;
* model pairs from the seeds (``match.pairs``: disjoint ``(s0, s1), (s2, s3)``
  or all pairs);
* per pair and method: ``match.searches`` weight-matching searches (seeds
  0..searches-1), one search for activation matching and STE (naive needs none);
* per pair and method, a :class:`BarrierStage` for the first search and an
  :class:`AnalysisStage` for every search (R's mean and std run over pairs
  and searches). The first search of weight matching also carries the
  data-dependent analyses the recipe enables (spectra, projections, rank
  sweep); every method's first search carries the Taylor estimate.
* the three-model experiment on the first model entry.

Matching methods come from the registry (:mod:`lmckit.match.registry`): a
method named in a recipe runs with the options the recipe sets for it (the
``[match]`` table) and its registry defaults otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LmcError
from ..match.registry import mergemany_method
from .recipe import NAIVE, RESERVED_OVERRIDES, SEARCHED_METHOD, ModelEntry, Recipe
from .stages import Stage
from .tasks import MERGE_MANY, AnalysisStage, BarrierStage, MatchStage, ThreeModelStage, TrainStage, train_stage

__all__ = ["Experiment", "Plan", "build_plan", "check_data"]

Key = tuple[tuple[int, int], str, int]  # (pair, method, search)


@dataclass
class Experiment:
    """The stages of one model configuration (one model entry at one width)."""

    label: str
    width_mult: float
    trains: dict[int, TrainStage]
    pairs: list[tuple[int, int]]
    methods: list[str]
    matches: dict[Key, MatchStage] = field(default_factory=dict)
    barriers: dict[Key, BarrierStage] = field(default_factory=dict)
    analyses: dict[Key, AnalysisStage] = field(default_factory=dict)

    def stages(self) -> list[Stage]:
        return [*self.trains.values(), *self.matches.values(), *self.barriers.values(), *self.analyses.values()]


@dataclass
class Plan:
    recipe: Recipe
    experiments: list[Experiment]
    three: dict[str, ThreeModelStage] = field(default_factory=dict)
    width: list[Experiment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    studies: Any = None  # lmckit.pipeline.studies.StudyPlan of the recipe's [studies] (issue 12), or None

    def targets(self) -> list[Stage]:
        out: list[Stage] = []
        for e in self.experiments + self.width:
            out += e.stages()
        out += list(self.three.values())
        if self.studies is not None:
            out += self.studies.targets()
        return out


def check_data(recipe: Recipe, data_dir: str | None = None) -> None:
    """Fail fast, before any stage starts, when the recipe's dataset cannot be found."""
    from ..data import find_dataset, load_dataset
    from ..data.text import TEXT_DATASETS

    try:
        if recipe.data.dataset in TEXT_DATASETS:  # a token corpus: found (and checksummed) by loading it
            load_dataset(recipe.data.dataset, data_dir)
        else:
            find_dataset(recipe.data.dataset, data_dir)
    except LmcError as e:
        raise LmcError(
            f"recipe {recipe.name!r} needs the {recipe.data.dataset} dataset, which is not available: {e.message}",
            e.hint or "pass --data-dir",
        ) from None


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


def _experiment(
    recipe: Recipe,
    m: ModelEntry,
    width_mult: float,
    methods: list[str],
    seeds: tuple[int, ...],
    pairs: list[tuple[int, int]],
    full: bool,
    label: str,
) -> Experiment:
    preset = m.preset or recipe.train.preset
    trains = {s: train_stage(preset, _train_overrides(recipe, m, width_mult, s)) for s in seeds}
    exp = Experiment(label, width_mult, trains, pairs, methods)
    an = recipe.analysis
    b = recipe.barrier
    for pair in pairs:
        ta, tb = trains[pair[0]], trains[pair[1]]
        for method in methods:
            searches = recipe.match.searches if method == SEARCHED_METHOD else 1
            for search in range(searches):
                key = (pair, method, search)
                match = None
                if method != NAIVE:
                    match = MatchStage(ta, tb, method, search, _match_options(recipe, method))
                    exp.matches[key] = match
                if search == 0:
                    exp.barriers[key] = BarrierStage(ta, tb, match, b.lambdas, b.splits, b.limit, b.bn_batches)
                if an.enabled and method != NAIVE:
                    first_wm = full and search == 0 and method == SEARCHED_METHOD and pair == pairs[0]
                    exp.analyses[key] = AnalysisStage(
                        ta,
                        tb,
                        match,
                        an.gammas,
                        arrays=first_wm and an.spectra,
                        taylor=full and search == 0 and an.taylor,
                        taylor_samples=an.taylor_samples,
                        projections=first_wm and an.projections,
                        projection_batches=max(1, an.projection_samples // 500),
                        rank=first_wm and an.rank,
                        rank_fractions=an.rank_fractions if first_wm and an.rank else (),
                        eval_limit=an.eval_limit,
                    )
        if an.enabled and an.taylor and full and NAIVE in methods:
            exp.analyses[(pair, NAIVE, 0)] = AnalysisStage(
                ta, tb, None, an.gammas, taylor=True, taylor_samples=an.taylor_samples, eval_limit=an.eval_limit
            )
    return exp


def build_plan(recipe: Recipe) -> Plan:
    """The stage graph of a recipe (nothing runs)."""
    notes: list[str] = []
    methods = list(recipe.match.methods)
    pairs = recipe.pairs()
    exps = [
        _experiment(
            recipe,
            m,
            m.width_mult,
            methods,
            m.seeds or recipe.train.seeds,
            recipe.pairs(m.seeds) if m.seeds else pairs,
            True,
            m.display(),
        )
        for m in recipe.models
    ]
    plan = Plan(recipe, exps, notes=notes)
    t = recipe.three_models
    if t.enabled:
        trains = [exps[0].trains[s] for s in recipe.train.seeds[: t.models]]
        three_methods = list(t.methods) + ([MERGE_MANY] if t.merge_many else [])
        b = recipe.barrier
        for meth in three_methods:
            merge_many = meth == MERGE_MANY
            opts = _match_options(recipe, mergemany_method() if merge_many else meth)
            matches: tuple = ()
            if not merge_many:  # pairwise matchings to the anchor: shared, cached match stages
                matches = (None,) + tuple(MatchStage(trains[0], tr, meth, 0, opts) for tr in trains[1:])
            plan.three[meth] = ThreeModelStage(
                tuple(trains),
                meth,
                matches,
                0,
                opts if merge_many else (),
                b.lambdas,
                ("test",),
                t.grid if t.landscape else 0,
                b.limit,
                b.bn_batches,
            )
    w = recipe.width_sweep
    if w.enabled:
        m0 = recipe.models[0]
        seeds = recipe.train.seeds[: 2 * w.pairs]
        wpairs = [(seeds[2 * i], seeds[2 * i + 1]) for i in range(w.pairs)]
        wmethods = list(w.methods)
        wrecipe = recipe
        for width in w.widths:
            plan.width.append(
                _experiment(
                    wrecipe,
                    m0,
                    width * m0.width_mult,
                    wmethods,
                    seeds,
                    wpairs,
                    False,
                    f"{m0.name} x{width * m0.width_mult:g}",
                )
            )
    from .studies import build_studies

    plan.studies = build_studies(recipe, plan)
    return plan
