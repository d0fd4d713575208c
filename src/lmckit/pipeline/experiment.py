"""The stages of one model configuration: its training runs, and per pair and method its matches, barriers and analyses.

:func:`_experiment` builds an :class:`Experiment` from a recipe's model entry
at one width; the plan (:func:`lmckit.pipeline.build.build_plan`) makes one
per model entry and per width of the width sweep, and the studies
(:mod:`lmckit.pipeline.studies`) build their own on the first entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .recipe_schema import NAIVE, SEARCHED_METHOD, ModelEntry, Recipe
from .recipe_settings import _match_options, _train_overrides
from .stages import Stage
from .tasks import AnalysisStage, BarrierStage, MatchStage, TrainStage, train_stage

__all__ = ["Experiment", "Key"]

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
