"""The stages of a reproduction: train, match, barrier, analyse, three models.

Each stage is a thin, cached wrapper around a library call (``lmckit.train``,
``lmckit.match``, ``lmckit.lmc``, ``lmckit.analysis``); the algorithms live
there. Every stage reads its inputs from their folders under the output root
and writes ``result.json`` (plus ``perms.json`` for matches) into its own.

Method-specific settings of a match are kept in ``options`` (sorted
``(key, value)`` pairs) so that, e.g., changing STE's epochs changes the STE
stages' hashes but not those of weight matching.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..analysis import alignment_tracker, analyze_pair
from ..checkpoint import build_model, load_checkpoint
from ..errors import LmcError
from ..lmc import barrier_curve
from ..lmc.landscape import plane_landscape
from ..match.registry import get_method, mergemany_method
from ..merge import align_models, merged_accuracy_curve
from ..perm import apply_permutation, load_perms, save_perms, spec_for
from ..store import atomic_write_json, read_json, state_fingerprint
from ..train import TrainConfig, dataset_of, make_config, train_in_folder
from .stages import Stage, StageContext

#: The three-model experiment's name for MergeMany (a multi-model scheme, not a two-model method).
MERGE_MANY = "merge_many"

__all__ = [
    "TrainStage",
    "MatchStage",
    "BarrierStage",
    "AnalysisStage",
    "ThreeModelStage",
    "train_stage",
    "load_model_of",
    "load_trained",
]


def _pairs(d: Mapping[str, Any]) -> tuple:
    return tuple(
        sorted(
            (k, _pairs(v) if isinstance(v, Mapping) else (tuple(v) if isinstance(v, list) else v)) for k, v in d.items()
        )
    )


def _unpairs(p: tuple) -> dict[str, Any]:
    return {
        k: (
            _unpairs(v)
            if isinstance(v, tuple) and v and isinstance(v[0], tuple) and len(v[0]) == 2 and isinstance(v[0][0], str)
            else v
        )
        for k, v in p
    }


def _clean(x: Any) -> Any:
    """JSON-ready copy with NaN/inf turned into None (results.json must be NaN-free)."""

    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def _write(ctx: StageContext, obj: Any, name: str = "result.json") -> None:
    atomic_write_json(ctx.dir / name, _clean(obj))


# --------------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainStage(Stage):
    """Train one model with :func:`lmckit.train.train_in_folder`.

    ``config`` holds every field of the resolved :class:`lmckit.train.TrainConfig`
    as sorted pairs. The model is trained in this stage's own folder
    (``model.safetensors``, ``metrics.jsonl``, the run record ``train.json``; resumable
    per epoch from the ``.partial`` folder), so one trained model has one folder;
    ``result.json`` holds the final metrics.
    """

    KIND = "model"
    config: tuple = ()

    def train_config(self):
        return TrainConfig.from_dict(_unpairs(self.config))

    def width_mult(self) -> float:
        """The model's ``width_mult`` option (1.0 when not set)."""
        kw = _unpairs(self.config).get("model_kwargs", {})
        return float(kw.get("width_mult", 1.0)) if isinstance(kw, dict) else 1.0

    def label(self) -> str:
        d = _unpairs(self.config)
        return f"{d.get('model')} x{self.width_mult():g} on {d.get('dataset')} seed {d.get('seed')}"

    def cost(self) -> float:
        epochs = float(_unpairs(self.config).get("epochs", 1))
        return 5.0 * epochs * max(0.1, self.width_mult()) ** 1.5  # hidden layers cost ~ width^2

    def run(self, ctx: StageContext) -> None:
        cfg = self.train_config()
        res = train_in_folder(cfg, ctx.dir, device=ctx.runtime.device, progress=True, data_dir=ctx.runtime.data_dir)
        _write(
            ctx,
            {
                "test_loss": res.test_loss,
                "test_accuracy": res.test_accuracy,
                "train_loss": res.train_loss,
                "train_accuracy": res.train_accuracy,
                "seed": cfg.seed,
            },
        )


def train_stage(preset: str | None, overrides: Mapping[str, Any]) -> TrainStage:
    """A :class:`TrainStage` from a preset plus overrides (resolved through :func:`lmckit.train.make_config`)."""

    cfg = make_config(preset, **dict(overrides))
    return TrainStage(_pairs(cfg.to_dict()))


def load_model_of(ctx: StageContext, t: TrainStage):
    """``(state_dict, model config, train config)`` of a finished train stage."""

    return (*load_trained(ctx.input(t), ctx.root), t.train_config())


def load_trained(folder: Path, root: Path) -> tuple[dict, dict]:
    """``(state_dict, model config)`` of a finished model stage's folder.

    Caches written before lmckit trained in the stage folder hold a ``run_dir`` pointer (relative to
    ``root``) to a ``ROOT/train/<hash>`` run instead; those are still read.
    """

    rec = read_json(folder / "result.json", "stage result", expect=dict)
    sd, info = load_checkpoint(root / rec["run_dir"] if "run_dir" in rec else folder / "model.safetensors")
    return sd, info["model"]


def load_stage_perms(path: Path, spec, sd_a: Mapping[str, Any], sd_b: Mapping[str, Any]):
    """The permutations of a match stage's ``perms.json`` (B aligned to A), checked against the two models.

    The file records the content hashes of the models it was computed for (``model_a_sha256``,
    ``model_b_sha256``: :func:`lmckit.store.state_fingerprint`); a file recording other models raises
    :class:`LmcError` naming it (a cache edited by hand, or a model stage recomputed with other weights).
    Files of earlier lmckit versions record none and are read as before.
    """
    perms = load_perms(path, spec)
    d = read_json(path, "permutation file")
    for key, sd, role in (("model_a_sha256", sd_a, "reference model A"), ("model_b_sha256", sd_b, "permuted model B")):
        rec = d.get(key)
        if rec is not None and rec != state_fingerprint(sd):
            raise LmcError(
                f"{path} was computed for other models: it records {key} {str(rec)[:19]}..., the {role} it is "
                f"read for is {state_fingerprint(sd)[:19]}...",
                "the cache was edited or mixed with another; delete that match folder and rerun lmckit reproduce",
            )
    return perms


class _Pair:
    """Models A and B (B un-permuted), their spec, a workspace model and the dataset."""

    def __init__(self, ctx: StageContext, a: TrainStage, b: TrainStage, match: "MatchStage | None" = None):
        self.sd_a, model_cfg, cfg = load_model_of(ctx, a)
        self.sd_b, model_cfg_b, _ = load_model_of(ctx, b)
        if model_cfg != model_cfg_b:
            raise LmcError(f"models {a.label()} and {b.label()} have different architectures")
        self.device = ctx.device
        self.model = build_model(model_cfg, self.sd_a, a.label()).to(self.device)
        self.spec = spec_for(self.model)
        self.dataset = dataset_of(cfg, ctx.runtime.data_dir)
        self.perms = (
            load_stage_perms(ctx.input(match) / "perms.json", self.spec, self.sd_a, self.sd_b)
            if match is not None
            else None
        )

    def sd_b_aligned(self):
        return apply_permutation(self.spec, self.perms, self.sd_b) if self.perms is not None else dict(self.sd_b)


# --------------------------------------------------------------------------- match
@dataclass(frozen=True)
class MatchStage(Stage):
    """Find the permutation of B that aligns it to A with a registry method (:mod:`lmckit.match.registry`).

    Writes ``perms.json`` (:func:`lmckit.perm.save_perms`) and ``result.json``
    (:meth:`lmckit.match.MatchResult.to_dict`). ``options`` holds the
    method's own settings (weight: max_iter; activation: samples;
    ste: epochs, lr, batch_size, max_iter, train_limit, and ``protocol`` when it is not the default
    ``heldout-best``, so earlier STE stages keep their hashes).
    """

    KIND = "match"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    method: str = "weight"
    seed: int = 0
    options: tuple = ()

    def label(self) -> str:
        return f"{self.method} seed {self.seed}: {self.a.label()} vs seed {_unpairs(self.b.config).get('seed')}"

    def cost(self) -> float:
        m = get_method(self.method)
        if m.cost is None:
            return 1.0
        try:
            return float(m.cost(stage_match_options(self.method, dict(self.options))))
        except LmcError:  # options the run itself will refuse, with its message
            return 1.0

    def run(self, ctx: StageContext) -> None:
        p = _Pair(ctx, self.a, self.b)
        method = get_method(self.method)
        res = method.match(
            p.spec,
            p.sd_a,
            p.sd_b,
            model=p.model,
            dataset=p.dataset,
            options=stage_match_options(self.method, dict(self.options), ctx.dir),
            seed=self.seed,
            device=p.device,
            progress=True,
            alignment=alignment_tracker(p.spec, p.sd_a, p.sd_b),
        )
        save_perms(
            ctx.dir / "perms.json",
            res.perms,
            method=self.method,
            seed=self.seed,
            model_a_sha256=state_fingerprint(p.sd_a),
            model_b_sha256=state_fingerprint(p.sd_b),
        )
        d = res.to_dict()
        d.pop("seconds", None)
        _write(ctx, d)
        atomic_write_json(ctx.dir / "timing.json", {"seconds": float(res.seconds)})


def _activation_samples(opt: dict[str, Any]) -> dict[str, Any]:
    """``samples`` training images as batches of at most 500."""
    samples = int(opt.pop("samples", 5000))
    batch = min(500, samples)
    return {**opt, "num_batches": -(-samples // batch), "batch_size": batch}


def _ste_names(opt: dict[str, Any]) -> dict[str, Any]:
    """``max_iter`` is STE's inner weight matching; ``train_limit = 0`` means all training images."""
    opt = dict(opt)
    if "max_iter" in opt:
        opt["wm_max_iter"] = opt.pop("max_iter")
    if not opt.get("train_limit"):
        opt.pop("train_limit", None)
    return opt


#: Stage option names that differ from the registry's, kept so earlier stages keep their hashes:
#: ``method -> (stage options -> registry options)``. A method not listed here (e.g. ``sinkhorn``)
#: uses the registry's option names directly.
_LEGACY_STAGE_OPTIONS = {"activation": _activation_samples, "ste": _ste_names}


def stage_match_options(method: str, options: Mapping[str, Any], stage_dir: Path | None = None):
    """The registry options (:class:`lmckit.match.registry.MethodOptions`) of a match stage.

    ``options`` are the stage's own (``MatchStage.options`` as a dict); a
    method with a ``state_dir`` option (STE) keeps its resumable state in
    ``stage_dir / method``. Raises :class:`LmcError` for an unknown method or option.
    """

    m = get_method(method)
    opt = _LEGACY_STAGE_OPTIONS.get(method, dict)(dict(options))
    if stage_dir is not None and "state_dir" in {f.name for f in dataclasses.fields(m.options_type)}:
        opt["state_dir"] = str(Path(stage_dir) / method)
    return m.options(opt)


# --------------------------------------------------------------------------- barrier
@dataclass(frozen=True)
class BarrierStage(Stage):
    """Loss/accuracy along ``(1 - l) theta_a + l pi(theta_b)`` (:func:`lmckit.lmc.barrier_curve`).

    ``match=None`` is the naive (identity) path. BatchNorm models get their
    statistics reset at interior points (``bn_reset="auto"``).
    """

    KIND = "barrier"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    match: MatchStage | None = None
    points: int = 25
    splits: tuple[str, ...] = ("train", "test")
    limit: int = 0
    bn_batches: int = 10

    def label(self) -> str:
        m = self.match.method if self.match else "naive"
        return f"{m} path, seed {_unpairs(self.a.config).get('seed')}-{_unpairs(self.b.config).get('seed')}"

    def cost(self) -> float:
        return 0.25 * self.points * len(self.splits)

    def run(self, ctx: StageContext) -> None:
        p = _Pair(ctx, self.a, self.b, self.match)
        res = barrier_curve(
            p.model,
            p.sd_a,
            p.sd_b_aligned(),
            p.dataset,
            splits=self.splits,
            points=self.points,
            limit=self.limit or None,
            device=p.device,
            bn_batches=self.bn_batches,
            progress=True,
            names=(f"model A ({self.a.label()})", f"model B ({self.b.label()})"),
        )
        _write(ctx, res.to_dict())


# --------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class AnalysisStage(Stage):
    """Distances and SVD alignment of a matched pair, plus optional data-dependent analyses
    (:func:`lmckit.analysis.analyze_pair`, as ``lmckit analyze``; this stage writes what it computed).

    Always: :func:`lmckit.analysis.distances` and :func:`lmckit.analysis.svd_alignment`
    (R before/after at ``gammas``, per layer). ``arrays``: spectra and per-index
    alignment. ``taylor``: :func:`lmckit.analysis.taylor_midpoint` on the
    aligned pair. ``projections``: :func:`lmckit.analysis.input_projections`
    of model A. ``rank``: :func:`lmckit.analysis.rank_sweep` of model A and of
    the aligned midpoint at ``rank_fractions`` and the nonzero ``gammas``.
    """

    KIND = "analysis"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    match: MatchStage | None = None
    gammas: tuple[float, ...] = (0.0, 0.3)
    arrays: bool = False
    taylor: bool = False
    taylor_samples: int = 2000
    projections: bool = False
    projection_batches: int = 4
    rank: bool = False
    rank_fractions: tuple[float, ...] = ()
    eval_limit: int = 0
    seed: int = 0

    def label(self) -> str:
        m = self.match.method if self.match else "naive"
        return f"{m} analysis, seed {_unpairs(self.a.config).get('seed')}-{_unpairs(self.b.config).get('seed')}"

    def run(self, ctx: StageContext) -> None:
        p = _Pair(ctx, self.a, self.b, self.match)
        res = analyze_pair(
            p.model,
            p.spec,
            p.sd_a,
            p.sd_b,
            p.perms,
            dataset=p.dataset,
            gammas=self.gammas,
            rank_fractions=self.rank_fractions,
            eval_limit=self.eval_limit or None,
            projection_batches=self.projection_batches,
            taylor=self.taylor,
            taylor_samples=self.taylor_samples,
            projections=self.projections,
            rank_sweeps=self.rank,
            device=p.device,
            seed=self.seed,
        )
        dist = res.distances
        out: dict[str, Any] = {"l2_before": dist["l2_before"], "l2_after": dist["l2_after"]}
        out["reduction"], out["distance_per_layer"] = dist["reduction"], dist["per_layer"]
        s = res.svd.summary(arrays=self.arrays)
        out["R"], out["R_per_layer"] = s["R"], s["per_layer"]
        if self.taylor:
            out["taylor"] = res.taylor
        if self.projections:
            out["projections"] = {
                name: {"mean_abs": d["mean_abs"], "random_mean_abs": d["random_mean_abs"]}
                for name, d in res.projections.items()
            }
        if self.rank:
            out["rank_sweep"] = res.sweeps
        _write(ctx, out)


# --------------------------------------------------------------------------- three models
@dataclass(frozen=True)
class ThreeModelStage(Stage):
    """Several models brought into one unit order, then barrier, landscape and merged accuracy.

    ``models[0]`` is the anchor theta_a. For ``weight`` and ``ste``,
    ``matches[i]`` is the :class:`MatchStage` aligning ``models[i]`` to the
    anchor (``None`` for the anchor itself): the pairwise matchings are
    ordinary cached stages, shared with the two-model experiment, which is
    what anchor matching (:func:`lmckit.match.anchor_matching`) computes.
    For ``merge_many`` the stage runs :func:`lmckit.match.merge_many` itself
    (``matches`` empty). Measured on the aligned models theta_i' = pi_i(theta_i):

    * the barrier between ``theta_1'`` and ``theta_2'`` (neither is the anchor;
      :func:`lmckit.lmc.barrier_curve`);
    * with ``grid > 0``, the loss landscape on the plane through the first
      three aligned models (:func:`lmckit.lmc.plane_landscape`);
    * the test loss/accuracy of the uniform average of the first ``n`` aligned
      models, ``n = 1 .. len(models)`` (:func:`lmckit.lmc.mix_states`, then
      a BatchNorm reset for BN models).
    """

    KIND = "three"
    models: tuple[TrainStage, ...] = ()
    method: str = "weight"
    matches: tuple[MatchStage | None, ...] = ()
    seed: int = 0
    options: tuple = ()
    points: int = 25
    splits: tuple[str, ...] = ("test",)
    grid: int = 0
    limit: int = 0
    bn_batches: int = 10

    def label(self) -> str:
        return f"{self.method}, {len(self.models)} models"

    def cost(self) -> float:
        return 5.0 + 0.2 * self.points + 0.1 * self.grid * self.grid

    def run(self, ctx: StageContext) -> None:
        if len(self.models) < 3:
            raise LmcError(f"the three-model experiment needs at least 3 models, got {len(self.models)}")
        loaded = [load_model_of(ctx, t) for t in self.models]
        (_, model_cfg, cfg), states = loaded[0], [sd for sd, _, _ in loaded]
        dev = ctx.device
        model = build_model(model_cfg, states[0], self.models[0].label()).to(dev)
        spec = spec_for(model)
        dataset = dataset_of(cfg, ctx.runtime.data_dir)
        out: dict[str, Any] = {"method": self.method, "n_models": len(self.models)}
        if self.method == MERGE_MANY:
            wm = mergemany_method()
            opts = stage_match_options(wm, dict(self.options))
            res = align_models(model, states, wm, "mergemany", spec=spec, seed=self.seed, device=dev, options=opts)
            perms = res.perms
            out["passes"], out["converged"], out["objective"] = res.passes, res.converged, res.objective
        else:
            if len(self.matches) != len(self.models) or self.matches[0] is not None:
                raise LmcError("ThreeModelStage needs matches = (None, match of model 1, match of model 2, ...)")
            perms = [None] + [
                load_stage_perms(ctx.input(m) / "perms.json", spec, states[0], sd)
                for m, sd in zip(self.matches[1:], states[1:])
            ]
        aligned = [apply_permutation(spec, p, sd) if p is not None else dict(sd) for p, sd in zip(perms, states)]
        lim = self.limit or None
        bar = barrier_curve(
            model,
            aligned[1],
            aligned[2],
            dataset,
            splits=self.splits,
            points=self.points,
            limit=lim,
            device=dev,
            bn_batches=self.bn_batches,
            progress=True,
        )
        out["pair_barrier"] = bar.to_dict()
        if self.grid:
            land = plane_landscape(
                model,
                *aligned[:3],
                dataset,
                grid=self.grid,
                split="test",
                limit=lim,
                device=dev,
                bn_batches=self.bn_batches,
                progress=True,
            )
            out["landscape"] = land.to_dict()
        out["merged"] = merged_accuracy_curve(
            model, aligned, dataset, "test", "auto", dev, seed=0, limit=lim, start=1, bn_batches=self.bn_batches
        )
        _write(ctx, out)
