"""Cached stages and the stage graph of the studies beyond the paper (issue 12).

Each study is switched on in the recipe's ``[studies.*]`` tables (see
:mod:`lmckit.pipeline.recipe`) and adds stages to the plan; the report
section is :mod:`lmckit.report.studies`. Every study reuses the ordinary
train / match / barrier / analysis stages where it can (so they are shared
with the main experiment and with other recipes through the cache) and adds
one stage of its own where it measures something new:

* ``directions``: :class:`DirectionsStage` (WM on the top / tail singular parts,
  applied to the full model; naive and full WM beside them).
* ``alignment_dose``: :class:`DoseStage` (re-assign a fraction f of WM's units).
* ``weight_decay``: an ordinary experiment (naive + WM, distances and R) per
  weight-decay value, plus :class:`SpectrumStage` (spectrum concentration).
* ``many_models``: :class:`ManyModelsStage` per method (N = 2..5 models).
* ``ste_protocols``: STE match stages per protocol (``protocol`` in their
  options), their barrier and analysis stages, and a three-model stage per
  protocol; WM's beside them.

All study barriers are measured on the test split with the recipe's
``barrier`` settings (lambdas, limit, BN batches).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis import distances, svd_alignment
from ..analysis.svd import state_svds
from ..checkpoint import build_model
from ..evaluate import evaluate
from ..lmc import barrier_curve, has_batchnorm, mix_states, reset_bn_stats
from ..match import merge_many
from ..match.ste import PRESETS, PROTOCOLS
from ..perm import apply_permutation, perm_changed_units, spec_for
from ..studies import direction_matching, reassign_fraction, spectrum_concentration
from ..train import dataset_of
from .experiment import _experiment
from .recipe_schema import Recipe
from .recipe_settings import _match_options
from .stages import Stage, StageContext
from .tasks import (
    AnalysisStage,
    BarrierStage,
    MatchStage,
    ThreeModelStage,
    TrainStage,
    _Pair,
    _write,
    load_model_of,
    load_stage_perms,
)

__all__ = [
    "DirectionsStage",
    "DoseStage",
    "SpectrumStage",
    "ManyModelsStage",
    "JointManyStage",
    "StudyPlan",
    "build_studies",
    "evaluate_perms",
]

GAMMAS = (0.0, 0.3)


def evaluate_perms(
    p: _Pair, perms, points: int, limit: int, bn_batches: int, gammas=GAMMAS, wm=None, svds=None
) -> dict[str, Any]:
    """Test-loss barrier, L2 distance, R(gamma) of ``pi(theta_b)`` against ``theta_a`` (``perms=None``: identity).

    Returns ``loss_barrier``, ``accuracy_barrier``, ``midpoint_loss``, ``l2_before``,
    ``l2_after``, ``reduction``, ``R`` (``{gamma: R after}``) and, with ``wm``,
    ``changed_vs_wm`` (fraction of units assigned differently from ``wm``).
    """

    sd_b = apply_permutation(p.spec, perms, p.sd_b) if perms is not None else dict(p.sd_b)
    bar = barrier_curve(
        p.model,
        p.sd_a,
        sd_b,
        p.dataset,
        splits=("test",),
        points=points,
        limit=limit or None,
        device=p.device,
        bn_batches=bn_batches,
        progress=False,
    ).to_dict(collapse=True)
    dist = distances(p.spec, p.sd_a, p.sd_b, perms)
    svd_a, svd_b = svds if svds is not None else (None, None)
    R = svd_alignment(p.spec, p.sd_a, p.sd_b, perms, gammas, svds_a=svd_a, svds_b=svd_b).R
    out = {
        "loss_barrier": bar["loss_barrier"],
        "accuracy_barrier": bar["accuracy_barrier"],
        "midpoint_loss": bar["midpoint_loss"],
        "l2_before": dist["l2_before"],
        "l2_after": dist["l2_after"],
        "reduction": dist["reduction"],
        "R": {g: v["after"] for g, v in R.items()},
    }
    if wm is not None:
        out["changed_vs_wm"] = perm_changed_units(perms, wm) if perms is not None else None
    return out


def _svds(p: _Pair):
    return state_svds(p.spec, p.sd_a), state_svds(p.spec, p.sd_b)


# --------------------------------------------------------------------------- study 2: directions
@dataclass(frozen=True)
class DirectionsStage(Stage):
    """WM-top / WM-tail (:func:`lmckit.studies.direction_matching`) beside naive and full WM, on one pair.

    ``variants`` in ``result.json``: ``naive``, ``wm`` and ``top@gamma`` /
    ``tail@gamma`` for every gamma, each with :func:`evaluate_perms`'s numbers
    (the permutation applied to the full model B) and, for the partial ones,
    the kept rank per layer.
    """

    KIND = "study-directions"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    wm: MatchStage = MatchStage()
    gammas: tuple[float, ...] = (0.3, 0.1)
    max_iter: int = 100
    seed: int = 0
    points: int = 25
    limit: int = 0
    bn_batches: int = 10

    def label(self) -> str:
        return f"WM-top/tail at gamma {list(self.gammas)}, {self.wm.label()}"

    def run(self, ctx: StageContext) -> None:
        p = _Pair(ctx, self.a, self.b, self.wm)
        svds = _svds(p)
        kw = dict(points=self.points, limit=self.limit, bn_batches=self.bn_batches, wm=p.perms, svds=svds)
        variants = {
            "naive": {"part": "none", "gamma": None, **evaluate_perms(p, None, **kw)},
            "wm": {"part": "all", "gamma": 0.0, **evaluate_perms(p, p.perms, **kw)},
        }
        for g in self.gammas:
            for part in ("top", "tail"):
                res = direction_matching(
                    p.spec, p.sd_a, p.sd_b, g, part, seed=self.seed, max_iter=self.max_iter, device=p.device
                )
                kept = res.extra["kept"]
                frac = sum(v["kept"] for v in kept.values()) / max(sum(v["rank"] for v in kept.values()), 1)
                variants[f"{part}@{g:g}"] = {
                    "part": part,
                    "gamma": float(g),
                    "kept_fraction": frac,
                    **evaluate_perms(p, res.perms, **kw),
                }
                print(f"{part}@{g:g}: barrier {variants[f'{part}@{g:g}']['loss_barrier']:.4f}", flush=True)
        _write(ctx, {"variants": variants})


# --------------------------------------------------------------------------- study 3: alignment dose
@dataclass(frozen=True)
class DoseStage(Stage):
    """WM's permutation with a fraction f of every group's units re-assigned at random
    (:func:`lmckit.studies.reassign_fraction`).

    ``points`` in ``result.json``: one record per (fraction, draw) with
    :func:`evaluate_perms`'s numbers and ``changed_vs_wm``. Draw ``d`` of
    fraction ``f`` is seeded by ``(seed, index of f, d)``.
    """

    KIND = "study-dose"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    wm: MatchStage = MatchStage()
    fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    draws: int = 3
    seed: int = 0
    points: int = 25
    limit: int = 0
    bn_batches: int = 10

    def label(self) -> str:
        return f"alignment dose f={list(self.fractions)} x{self.draws}, {self.wm.label()}"

    def run(self, ctx: StageContext) -> None:
        p = _Pair(ctx, self.a, self.b, self.wm)
        svds = _svds(p)
        pts = []
        for i, f in enumerate(self.fractions):
            for d in range(self.draws):
                gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + i * 1009 + d)
                perms = reassign_fraction(p.perms, f, gen)
                rec = evaluate_perms(p, perms, self.points, self.limit, self.bn_batches, wm=p.perms, svds=svds)
                pts.append({"fraction": float(f), "draw": d, **rec})
                print(f"f={f:g} draw {d}: barrier {rec['loss_barrier']:.4f} R(0.3) {rec['R'].get('0.3')}", flush=True)
        _write(ctx, {"points": pts})


# --------------------------------------------------------------------------- study 4: weight decay (spectra)
@dataclass(frozen=True)
class SpectrumStage(Stage):
    """Spectrum concentration of one trained model (:func:`lmckit.studies.spectrum_concentration`)."""

    KIND = "study-spectrum"
    VERSION = 2  # adds decay_factor
    model: TrainStage = TrainStage()
    gamma: float = 0.3

    def label(self) -> str:
        return f"spectrum concentration at gamma {self.gamma:g}, {self.model.label()}"

    def run(self, ctx: StageContext) -> None:
        sd, model_cfg, cfg = load_model_of(ctx, self.model)
        spec = spec_for(build_model(model_cfg, sd, self.model.label()))
        out: dict[str, Any] = {"gamma": self.gamma, **spectrum_concentration(spec, sd, self.gamma)}
        if cfg.optimizer in ("adamw", "sgd") and cfg.schedule == "constant":
            # decoupled (AdamW) or plain SGD decay alone multiplies the weights by (1 - lr wd) every step
            n = dataset_of(cfg, ctx.runtime.data_dir).size("train")
            steps = cfg.epochs * math.ceil(n / cfg.batch_size)
            out["decay_factor"] = (1.0 - cfg.lr * cfg.weight_decay) ** steps
            out["steps"] = steps
        _write(ctx, out)


# --------------------------------------------------------------------------- study 5: many models
@dataclass(frozen=True)
class ManyModelsStage(Stage):
    """N = 2, 3, ... models brought into one unit order, against N.

    ``method`` ``weight`` / ``activation`` / ``ste``: ``matches[i]`` aligns
    ``models[i]`` to the anchor ``models[0]`` (ordinary cached match stages),
    so the aligned models do not depend on N and every pair's barrier is
    measured once. ``merge_many``: :func:`lmckit.match.merge_many` runs on the
    first N models for every N. Per N: test accuracy and loss of the uniform
    average of the N aligned models (BatchNorm reset where the model has
    BatchNorm), the mean test-loss barrier over all pairs of the N aligned
    models, and the mean R(gamma) between aligned non-anchor models (pairs
    among models 1..N-1; none for N = 2).
    """

    KIND = "study-many"
    models: tuple[TrainStage, ...] = ()
    method: str = "weight"
    matches: tuple[MatchStage | None, ...] = ()
    counts: tuple[int, ...] = (2, 3, 4, 5)
    seed: int = 0
    wm_max_iter: int = 100
    points: int = 25
    limit: int = 0
    bn_batches: int = 10
    gammas: tuple[float, ...] = GAMMAS

    def label(self) -> str:
        return f"{self.method}, N = {list(self.counts)} models"

    def run(self, ctx: StageContext) -> None:
        loaded = [load_model_of(ctx, t) for t in self.models]
        states = [sd for sd, _, _ in loaded]
        model_cfg, cfg = loaded[0][1], loaded[0][2]
        dev = ctx.device
        model = build_model(model_cfg, states[0], self.models[0].label()).to(dev)
        spec = spec_for(model)
        dataset = dataset_of(cfg, ctx.runtime.data_dir)
        bn = has_batchnorm(model)
        cache: dict[tuple, dict[str, Any]] = {}

        def pair_numbers(key: tuple, sa, sb) -> dict[str, Any]:
            if key not in cache:
                bar = barrier_curve(
                    model,
                    sa,
                    sb,
                    dataset,
                    splits=("test",),
                    points=self.points,
                    limit=self.limit or None,
                    device=dev,
                    bn_batches=self.bn_batches,
                    progress=False,
                ).to_dict(collapse=True)
                R = svd_alignment(
                    spec, sa, sb, None, self.gammas, svds_a=state_svds(spec, sa), svds_b=state_svds(spec, sb)
                ).R
                cache[key] = {"loss_barrier": bar["loss_barrier"], "R": {g: v["before"] for g, v in R.items()}}
            return cache[key]

        if self.method != "merge_many":
            perms = [None] + [
                load_stage_perms(ctx.input(m) / "perms.json", spec, states[0], sd)
                for m, sd in zip(self.matches[1:], states[1:])
            ]
            aligned_all = [
                apply_permutation(spec, q, sd) if q is not None else dict(sd) for q, sd in zip(perms, states)
            ]
        rows = []
        for n in self.counts:
            extra: dict[str, Any] = {}
            if self.method == "merge_many":
                res = merge_many(spec, states[:n], seed=self.seed, wm_max_iter=self.wm_max_iter, device=dev)
                aligned = [apply_permutation(spec, q, sd) for q, sd in zip(res.perms, states[:n])]
                extra = {"passes": res.passes, "converged": res.converged}
                tag: tuple = (n,)
            else:
                aligned = aligned_all[:n]
                tag = ()
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            nums = {(i, j): pair_numbers(tag + (i, j), aligned[i], aligned[j]) for i, j in pairs}
            sd = mix_states(aligned, [1.0 / n] * n)
            m = build_model(model_cfg, sd, f"average of {n} models").to(dev)
            if bn:
                reset_bn_stats(m, dataset, num_batches=self.bn_batches, device=dev)
            loss, acc = evaluate(
                m, dataset, "test", device=dev, limit=self.limit or None, where=f"the average of {n} aligned models"
            )
            non_anchor = [(i, j) for i, j in pairs if i > 0]
            rows.append(
                {
                    "n": n,
                    "merged_loss": loss,
                    "merged_accuracy": acc,
                    "pair_barriers": [nums[q]["loss_barrier"] for q in pairs],
                    "mean_pair_barrier": sum(nums[q]["loss_barrier"] for q in pairs) / len(pairs),
                    "R_non_anchor": (
                        {g: sum(nums[q]["R"][g] for q in non_anchor) / len(non_anchor) for g in nums[pairs[0]]["R"]}
                        if non_anchor
                        else None
                    ),
                    **extra,
                }
            )
            print(f"N={n}: merged acc {acc:.4f}, mean pair barrier {rows[-1]['mean_pair_barrier']:.4f}", flush=True)
        _write(ctx, {"method": self.method, "rows": rows})


#: the many-models study's "pairwise" method: weight matching of every pair, no common order (its cycle error)
PAIRWISE = "pairwise"


@dataclass(frozen=True)
class JointManyStage(Stage):
    """N = 2, 3, ... models brought into one order by a many-model method of the registry, or matched pair by pair.

    ``method``: a name of :func:`lmckit.match.registry.list_many_methods` other than MergeMany (which
    :class:`ManyModelsStage` runs), e.g. ``ste-mm`` (Ito et al.'s joint STE, e5-a/STE-MM
    ``srcs/search/mult/ste.py``) or ``c2m3`` (Crisostomi et al., NeurIPS 2024), run with ``options`` on the
    first N models for every N of ``counts`` (N below the method's ``min_models`` is skipped); or
    :data:`PAIRWISE`: weight matching of every pair separately (:func:`lmckit.match.cycle.pairwise_weight_matching`),
    whose permutations need not compose.

    Per N, the row has :class:`ManyModelsStage`'s numbers (the uniform average's test ``merged_loss`` and
    ``merged_accuracy``, BatchNorm reset where the model has BatchNorm; ``pair_barriers`` of every pair
    ``i < j`` of the aligned models, in that order; ``mean_pair_barrier``) and ``cycle_error``
    (:func:`lmckit.match.cycle.cycle_error`, N >= 3: the fraction of (triangle, unit) pairs whose
    composed permutation around the triangle is not the identity; 0 for every method mapping to one
    common order) and the method's ``seconds``. For :data:`PAIRWISE` each pair's barrier is between
    model i and model j matched directly to i, and the merge averages the models matched to model 0.
    """

    KIND = "study-many-joint"
    models: tuple[TrainStage, ...] = ()
    method: str = "c2m3"
    options: tuple = ()
    counts: tuple[int, ...] = (2, 3, 4, 5)
    seed: int = 0
    points: int = 25
    limit: int = 0
    bn_batches: int = 10

    def label(self) -> str:
        return f"{self.method}, N = {list(self.counts)} models"

    def cost(self) -> float:
        return 60.0 * len(self.counts)

    def run(self, ctx: StageContext) -> None:
        import time

        from ..match.cycle import cycle_error, pairwise_from_common, pairwise_weight_matching
        from ..match.registry import get_many_method

        loaded = [load_model_of(ctx, t) for t in self.models]
        states = [sd for sd, _, _ in loaded]
        model_cfg, cfg = loaded[0][1], loaded[0][2]
        dev = ctx.device
        model = build_model(model_cfg, states[0], self.models[0].label()).to(dev)
        spec = spec_for(model)
        dataset = dataset_of(cfg, ctx.runtime.data_dir)
        bn = has_batchnorm(model)
        opts = dict(self.options)
        rows = []
        pairwise_all = None
        if self.method == PAIRWISE:
            t0 = time.perf_counter()
            pairwise_all = pairwise_weight_matching(spec, states, seed=self.seed, device=dev, **opts)
            pw_seconds = time.perf_counter() - t0
        else:
            many = get_many_method(self.method)
        for n in self.counts:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            if pairwise_all is not None:
                pw = {q: pairwise_all[q] for q in pairs}
                bars = [
                    self._barrier(model, dataset, dev, states[i], apply_permutation(spec, pw[(i, j)], states[j]))
                    for i, j in pairs
                ]
                aligned = [dict(states[0])] + [apply_permutation(spec, pw[(0, j)], states[j]) for j in range(1, n)]
                extra = {"seconds": pw_seconds}
            else:
                if n < many.min_models:
                    continue
                t0 = time.perf_counter()
                res = many.match(
                    spec, states[:n], model=model, dataset=dataset, options=opts, seed=self.seed, device=dev
                )
                extra = {"seconds": time.perf_counter() - t0, "passes": res.passes, "converged": bool(res.converged)}
                aligned = [apply_permutation(spec, q, sd) for q, sd in zip(res.perms, states[:n])]
                pw = pairwise_from_common(res.perms)
                bars = [self._barrier(model, dataset, dev, aligned[i], aligned[j]) for i, j in pairs]
            if n >= 3:
                extra["cycle_error"] = cycle_error(pw, n)
            sd = mix_states(aligned, [1.0 / n] * n)
            m = build_model(model_cfg, sd, f"average of {n} models").to(dev)
            if bn:
                reset_bn_stats(m, dataset, num_batches=self.bn_batches, device=dev)
            loss, acc = evaluate(m, dataset, "test", device=dev, limit=self.limit or None)
            rows.append(
                {
                    "n": n,
                    "merged_loss": loss,
                    "merged_accuracy": acc,
                    "pair_barriers": bars,
                    "mean_pair_barrier": sum(bars) / len(bars),
                    **extra,
                }
            )
            print(f"N={n}: merged acc {acc:.4f}, mean pair barrier {rows[-1]['mean_pair_barrier']:.4f}", flush=True)
        _write(ctx, {"method": self.method, "rows": rows})

    def _barrier(self, model, dataset, dev, sa, sb) -> float:
        bar = barrier_curve(
            model,
            sa,
            sb,
            dataset,
            splits=("test",),
            points=self.points,
            limit=self.limit or None,
            device=dev,
            bn_batches=self.bn_batches,
            progress=False,
        ).to_dict(collapse=True)
        return float(bar["loss_barrier"])


# --------------------------------------------------------------------------- the plan
@dataclass
class StudyPlan:
    """The stages of every enabled study (read back by :mod:`lmckit.report.studies`)."""

    directions: list[DirectionsStage] = field(default_factory=list)
    dose: list[DoseStage] = field(default_factory=list)
    weight_decay: list[dict[str, Any]] = field(default_factory=list)  # {"value", "experiment", "spectra"}
    many: dict[str, ManyModelsStage] = field(default_factory=dict)
    # {"wm" | protocol: {"epochs", "settings", "pairs": [{"pair", "match", "barrier", "analysis"}], "three"}}
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)

    def targets(self) -> list[Stage]:
        """Every study stage; the weight-decay study last (it trains its own models, the others reuse the main ones)."""
        out: list[Stage] = [*self.directions, *self.dose, *self.many.values()]
        for d in self.protocols.values():
            for r in d["pairs"]:
                out += [x for x in (r["match"], r["barrier"], r["analysis"]) if x is not None]
            if d.get("three") is not None:
                out.append(d["three"])
        for w in self.weight_decay:
            out += w["experiment"].stages() + list(w["spectra"])
        return out

    def empty(self) -> bool:
        return not self.targets()


def _ste_options(recipe: Recipe, protocol: str, epochs: int, train_limit: int) -> tuple:
    """MatchStage options of an STE run with the protocol's literature optimiser settings (:data:`PROTOCOLS`)."""

    pre = PRESETS[PROTOCOLS[protocol]]
    opts = (
        ("batch_size", pre.batch_size),
        ("epochs", int(epochs)),
        ("lr", pre.lr),
        ("max_iter", recipe.match.ste.max_iter),
        ("train_limit", int(train_limit)),
    )
    return opts + ((("protocol", protocol),) if protocol != "heldout-best" else ())


def _joint_options(recipe: Recipe, method: str) -> tuple:
    """A joint many-models method's options: ``match.options.<method>`` (``pairwise``: WM's ``max_iter``)."""
    if method == PAIRWISE:
        return (("max_iter", recipe.match.max_iter),)
    return tuple(dict(recipe.match.options).get(method, ()))


def build_studies(recipe: Recipe, plan) -> StudyPlan | None:
    """The stages of the recipe's enabled studies on its first model entry (``None`` when none is enabled)."""
    st = recipe.studies
    if not any(
        s.enabled for s in (st.directions, st.alignment_dose, st.weight_decay, st.many_models, st.ste_protocols)
    ):
        return None
    sp = StudyPlan()
    main = plan.experiments[0]
    trains = main.trains
    seeds = recipe.train.seeds
    pairs = recipe.pairs()
    b = recipe.barrier
    bkw = dict(points=b.lambdas, limit=b.limit, bn_batches=b.bn_batches)
    wm_opts = _match_options(recipe, "weight")

    def wm(pair: tuple[int, int]) -> MatchStage:
        return MatchStage(trains[pair[0]], trains[pair[1]], "weight", 0, wm_opts)

    if st.directions.enabled:
        for pair in pairs[: st.directions.pairs]:
            sp.directions.append(
                DirectionsStage(
                    trains[pair[0]], trains[pair[1]], wm(pair), st.directions.gammas, recipe.match.max_iter, 0, **bkw
                )
            )
    if st.alignment_dose.enabled:
        for pair in pairs[: st.alignment_dose.pairs]:
            sp.dose.append(
                DoseStage(
                    trains[pair[0]],
                    trains[pair[1]],
                    wm(pair),
                    st.alignment_dose.fractions,
                    st.alignment_dose.draws,
                    0,
                    **bkw,
                )
            )
    if st.weight_decay.enabled:
        w = st.weight_decay
        m0 = recipe.models[0]
        sub = dataclasses.replace(
            recipe,
            match=dataclasses.replace(recipe.match, searches=1),
            analysis=dataclasses.replace(recipe.analysis, enabled=True, gammas=GAMMAS, taylor=False),
        )
        wseeds = seeds[: 2 * w.pairs]
        wpairs = [(wseeds[2 * i], wseeds[2 * i + 1]) for i in range(w.pairs)]
        for v in w.values:
            over = tuple(sorted({**dict(m0.overrides), "optimizer": w.optimizer, "weight_decay": float(v)}.items()))
            m = dataclasses.replace(m0, overrides=over)
            e = _experiment(
                sub, m, m0.width_mult, ["naive", "weight"], wseeds, wpairs, False, f"{m0.display()} weight decay {v:g}"
            )
            sp.weight_decay.append(
                {"value": float(v), "experiment": e, "spectra": [SpectrumStage(t, w.gamma) for t in e.trains.values()]}
            )
    if st.many_models.enabled:
        mm = st.many_models
        n = max(mm.counts)
        models = tuple(trains[s] for s in seeds[:n])
        for meth in mm.methods:
            matches: tuple = ()
            if meth != "merge_many":
                opts = _match_options(recipe, meth)
                matches = (None,) + tuple(MatchStage(models[0], t, meth, 0, opts) for t in models[1:])
            sp.many[meth] = ManyModelsStage(
                models, meth, matches, tuple(sorted(mm.counts)), 0, recipe.match.max_iter, **bkw
            )
        ps = st.ste_protocols
        for meth in mm.joint:  # many-model methods of the registry (STE-MM, C2M3) and pairwise WM
            sp.many[meth] = JointManyStage(
                models,
                meth,
                _joint_options(recipe, meth),
                tuple(sorted(mm.counts)),
                0,
                **bkw,
            )
        for proto in mm.ste_protocols:  # STE under each named protocol, with the ste_protocols study's settings
            opts = _ste_options(recipe, proto, ps.epochs[ps.protocols.index(proto)], ps.train_limit)
            matches = (None,) + tuple(MatchStage(models[0], t, "ste", 0, opts) for t in models[1:])
            sp.many[f"ste[{proto}]"] = ManyModelsStage(
                models, "ste", matches, tuple(sorted(mm.counts)), 0, recipe.match.max_iter, **bkw
            )
    if st.ste_protocols.enabled:
        ps = st.ste_protocols
        ppairs = [(seeds[2 * i], seeds[2 * i + 1]) for i in range(ps.pairs)]
        three_models = tuple(trains[s] for s in seeds[:3])
        an = dict(gammas=GAMMAS)

        def block(label: str, make_match, settings: dict[str, Any]) -> dict[str, Any]:
            rows = []
            for pair in ppairs:
                mt = make_match(trains[pair[0]], trains[pair[1]])
                rows.append(
                    {
                        "pair": pair,
                        "match": mt,
                        "barrier": BarrierStage(
                            trains[pair[0]], trains[pair[1]], mt, b.lambdas, ("test",), b.limit, b.bn_batches
                        ),
                        "analysis": AnalysisStage(trains[pair[0]], trains[pair[1]], mt, **an),
                    }
                )
            three = ThreeModelStage(
                three_models,
                label,
                (None,) + tuple(make_match(three_models[0], t) for t in three_models[1:]),
                0,
                (),
                b.lambdas,
                ("test",),
                0,
                b.limit,
                b.bn_batches,
            )
            return {"pairs": rows, "three": three, **settings}

        sp.protocols["naive"] = {
            "epochs": 0,
            "three": None,
            "pairs": [
                {
                    "pair": pair,
                    "match": None,
                    "analysis": None,
                    "barrier": BarrierStage(
                        trains[pair[0]], trains[pair[1]], None, b.lambdas, ("test",), b.limit, b.bn_batches
                    ),
                }
                for pair in ppairs
            ],
        }
        sp.protocols["wm"] = block("weight", lambda a, bb: MatchStage(a, bb, "weight", 0, wm_opts), {"epochs": 0})
        for proto, ep in zip(ps.protocols, ps.epochs):
            opts = _ste_options(recipe, proto, ep, ps.train_limit)
            sp.protocols[proto] = block(
                "ste", lambda a, bb, o=opts: MatchStage(a, bb, "ste", 0, o), {"epochs": int(ep), "settings": dict(opts)}
            )
    return sp
