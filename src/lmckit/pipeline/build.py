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
* the three-model experiment on the first model entry;
* with ``match.symmetry`` beyond ``["permutation"]``, per pair, class and method (weight, activation) a
  :class:`~lmckit.pipeline.symmetry.SymmetryStage` on folded models (:mod:`lmckit.pipeline.symmetry`).

Matching methods come from the registry (:mod:`lmckit.match.registry`): a
method named in a recipe runs with the options the recipe sets for it (the
``[match]`` table) and its registry defaults otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LmcError
from ..match.registry import mergemany_method
from .experiment import Experiment, Key, _experiment  # noqa: F401  (Experiment, Key: importable from here as before)
from .recipe_schema import Recipe
from .recipe_settings import RECIPE_OPTIONS, _match_options, _train_overrides  # noqa: F401  (likewise)
from .stages import Stage
from .studies import build_studies
from .symmetry import SymmetryEntry, build_symmetry
from .tasks import MERGE_MANY, MatchStage, ThreeModelStage

__all__ = ["Experiment", "Plan", "build_plan", "check_data"]


@dataclass
class Plan:
    recipe: Recipe
    experiments: list[Experiment]
    three: dict[str, ThreeModelStage] = field(default_factory=dict)
    width: list[Experiment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    studies: Any = None  # lmckit.pipeline.studies.StudyPlan of the recipe's [studies] (issue 12), or None
    symmetry: list[SymmetryEntry] = field(default_factory=list)  # match.symmetry's rows (issue 29)

    def targets(self) -> list[Stage]:
        out: list[Stage] = []
        for e in self.experiments + self.width:
            out += e.stages()
        out += list(self.three.values())
        if self.studies is not None:
            out += self.studies.targets()
        out += [s.stage for s in self.symmetry]
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
    plan.studies = build_studies(recipe, plan)
    plan.symmetry, sym_notes = build_symmetry(recipe, exps)
    plan.notes += sym_notes
    return plan
