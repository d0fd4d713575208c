"""``match.symmetry``: symmetry classes beyond permutations compared side by side in one recipe (issue 29).

For every main experiment (one per ``[[models]]`` entry), every pair the recipe
matches, every class of ``match.symmetry`` other than ``permutation`` and every
method of ``match.methods`` that aligns under such a class (weight and
activation matching, :data:`~lmckit.pipeline.recipe_schema.SYMMETRY_METHODS`),
one :class:`SymmetryStage`: both models' LayerNorm/RMSNorm gains and biases
folded into the next Linear (:func:`lmckit.perm.symmetry.fold_norms`; a no-op
without norms), B aligned to A under the class (each group takes the largest
class up to it that the model admits), then what the permutation rows measure:
the barriers along the path between folded A and the transformed folded B on
the recipe's splits, the L2 distance before and after (absolute, over the keys
:func:`lmckit.analysis.distances` counts, and relative to ``||A||``), and
R(gamma) when the recipe computes R. Folding changes the interpolation path, so
for a model where folding changes something (a LayerNorm) the same stage also
runs each method's *permutation* matching on the folded weights: the baseline
on the same path. Without norms the recipe's own permutation rows are that
baseline (folded = raw).

A recipe without the key (or with ``["permutation"]``) plans none of this: its
stage hashes and ``results.json`` stay byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .experiment import Experiment
from .recipe_schema import SYMMETRY_METHODS, Recipe
from .recipe_settings import _match_options
from .stages import Stage, StageContext
from .tasks import TrainStage, _Pair, _unpairs, _write

__all__ = ["SymmetryStage", "SymmetryEntry", "build_symmetry", "FOLDED", "RAW"]

#: the parameterisations a row's path interpolates
FOLDED, RAW = "folded", "raw"


@dataclass(frozen=True)
class SymmetryStage(Stage):
    """Align folded B to folded A under ``symmetry`` with ``method``; barriers, L2 and R on the folded path.

    ``symmetry``: a class of :data:`lmckit.perm.symmetry.CLASSES` with an exact step (``permutation``: the
    folded-weights baseline, run with the matching registry's method as the match stages run it).
    ``options``: the match stage's options (weight: ``max_iter``, for the permutation baseline; activation:
    ``samples``). ``sym_max_iter``: weight matching's sweeps under a class beyond permutations
    (``match.symmetry_max_iter``). ``gammas``:
    R(gamma) thresholds (empty: no R). Writes ``result.json`` and, for a class beyond permutations,
    ``transform.safetensors`` (:func:`lmckit.perm.symmetry.save_transform`; it applies to the *folded* B).
    """

    KIND = "symmetry"
    a: TrainStage = TrainStage()
    b: TrainStage = TrainStage()
    method: str = "weight"
    symmetry: str = "orthogonal"
    seed: int = 0
    options: tuple = ()
    points: int = 25
    splits: tuple[str, ...] = ("train", "test")
    limit: int = 0
    bn_batches: int = 10
    gammas: tuple[float, ...] = ()
    sym_max_iter: int = 1000

    def label(self) -> str:
        sa, sb = _unpairs(self.a.config).get("seed"), _unpairs(self.b.config).get("seed")
        return f"{self.method} {self.symmetry} (folded), seed {sa}-{sb}"

    def cost(self) -> float:
        return 2.0 + 0.25 * self.points * len(self.splits)

    def run(self, ctx: StageContext) -> None:
        from ..analysis import distances, svd_alignment
        from ..checkpoint import build_model
        from ..lmc import barrier_curve
        from ..match.symmetric import relative_distance
        from ..perm.symmetry import apply_transform, fold_norms, save_transform
        from ..store import state_fingerprint

        p = _Pair(ctx, self.a, self.b)
        model_b = build_model(p.model.lmckit_config, p.sd_b, self.b.label()).to(p.device)
        (fa, folded, skipped), (fb, _, _) = fold_norms(p.model), fold_norms(model_b)
        fsa = {k: v.detach() for k, v in fa.state_dict().items()}
        fsb = {k: v.detach() for k, v in fb.state_dict().items()}
        out: dict[str, Any] = {"method": self.method, "symmetry": self.symmetry, "parameterisation": FOLDED}
        out["folded"], out["not_folded"] = list(folded), list(skipped)
        if self.symmetry == "permutation":
            aligned, rec = self._permutation(ctx, p, fa, fsa, fsb)
        else:
            res = self._transform(ctx, p, fa, fb, fsa, fsb)
            aligned = apply_transform(p.spec, res.sym, res.transform, fsb)
            rec = {
                "objective_before": float(res.objective[0]),
                "objective_after": float(res.objective[-1]),
                "sweeps": int(res.sweeps),
                "converged": bool(res.converged),
                "classes": {g: s.cls for g, s in res.sym.items()},
                "limits": {g: s.limit for g, s in res.sym.items() if s.limit},
            }
            save_transform(
                ctx.dir / "transform.safetensors",
                res.transform,
                res.sym,
                symmetry=self.symmetry,
                method=self.method,
                seed=self.seed,
                folded=list(folded),
                model_a_sha256=state_fingerprint(p.sd_a),
                model_b_sha256=state_fingerprint(p.sd_b),
                model=p.model.lmckit_config,
            )
        out.update(rec)
        before, after = distances(p.spec, fsa, fsb), distances(p.spec, fsa, aligned)
        out["l2_before"], out["l2_after"] = before["l2_before"], after["l2_before"]
        out["relative_l2_before"] = relative_distance(p.spec, fsa, fsb)
        out["relative_l2_after"] = relative_distance(p.spec, fsa, aligned)
        if self.gammas:
            r0 = svd_alignment(p.spec, fsa, fsb, None, self.gammas).R
            r1 = svd_alignment(p.spec, fsa, aligned, None, self.gammas).R
            out["R"] = {g: {"before": r0[g]["before"], "after": r1[g]["before"]} for g in r0}
        bar = barrier_curve(
            fa,
            fsa,
            aligned,
            p.dataset,
            splits=self.splits,
            points=self.points,
            limit=self.limit or None,
            device=p.device,
            bn_batches=self.bn_batches,
            progress=True,
            names=(f"folded model A ({self.a.label()})", f"folded model B ({self.b.label()}), {self.symmetry}"),
        )
        out["barrier"] = bar.to_dict()
        _write(ctx, out)

    def _opts(self):
        from .tasks import stage_match_options

        return stage_match_options(self.method, dict(self.options))

    def _permutation(self, ctx: StageContext, p: _Pair, fa, fsa, fsb) -> tuple[dict, dict]:
        from ..match.registry import get_method
        from ..perm import apply_permutation

        res = get_method(self.method).match(
            p.spec, fsa, fsb, model=fa, dataset=p.dataset, options=self._opts(), seed=self.seed, device=p.device
        )
        rec = {
            "objective_before": float(res.initial_objective),
            "objective_after": float(res.final_objective),
            "sweeps": int(res.sweeps),
        }
        return apply_permutation(p.spec, res.perms, fsb), rec

    def _transform(self, ctx: StageContext, p: _Pair, fa, fb, fsa, fsb):
        if self.method == "weight":
            from ..match.symmetric import weight_matching_sym

            return weight_matching_sym(
                p.spec, fsa, fsb, self.symmetry, model=fa, seed=self.seed, max_iter=self.sym_max_iter
            )
        if self.method == "activation":
            from ..match import activation_matching

            o = self._opts()
            return activation_matching(
                fa,
                fb,
                p.dataset,
                p.spec,
                num_batches=o.num_batches,
                batch_size=o.batch_size,
                seed=self.seed,
                device=p.device,
                symmetry=self.symmetry,
            )
        from ..errors import LmcError

        raise LmcError(
            f"method {self.method!r} supports the permutation class only (symmetry {self.symmetry})",
            f"match.symmetry applies to {', '.join(SYMMETRY_METHODS)}",
        )


@dataclass(frozen=True)
class SymmetryEntry:
    """One planned row: experiment label, pair, method, class, the path's parameterisation, its stage."""

    label: str
    pair: tuple[int, int]
    method: str
    symmetry: str
    parameterisation: str
    stage: SymmetryStage


def _model_facts(name: str, options: dict, classes: list[str]) -> tuple[bool, dict[str, str]]:
    """Built at initialisation: whether :func:`~lmckit.perm.symmetry.fold_norms` folds anything, and per class
    that no group of the folded model admits, one op that limits it. A model that cannot be built here counts
    as folding and admitting every class (nothing is skipped; its training stage reports the failure)."""
    try:
        from ..models import create_model
        from ..perm import spec_for
        from ..perm.symmetry import derive_symmetry, fold_norms

        folded_model, folded, _ = fold_norms(create_model(name, **options))
        spec = spec_for(folded_model)
        state = folded_model.state_dict()
        idle: dict[str, str] = {}
        for cls in classes:
            sym = derive_symmetry(spec, state, cls, model=folded_model)
            if all(s.cls == "permutation" for s in sym.values()):
                idle[cls] = next((f"{g}: {s.limit}" for g, s in sym.items() if s.limit), "")
        return bool(folded), idle
    except Exception:  # noqa: BLE001 - the training stage reports a model that cannot be built, with its message
        return True, {}


def build_symmetry(recipe: Recipe, experiments: list[Experiment]) -> tuple[list[SymmetryEntry], list[str]]:
    """The rows of ``match.symmetry`` beyond permutation (none for the default ``["permutation"]``), and notes
    for the report: a model none of whose groups admits a requested class (its rows repeat permutation
    matching on folded weights)."""
    classes = [c for c in recipe.match.symmetry if c != "permutation"]
    methods = [m for m in recipe.match.methods if m in SYMMETRY_METHODS]
    if not classes or not methods:
        return [], []
    b, an = recipe.barrier, recipe.analysis
    gammas = tuple(an.gammas) if an.enabled and an.alignment else ()
    out: list[SymmetryEntry] = []
    notes: list[str] = []
    for e in experiments:
        cfg = next(iter(e.trains.values())).train_config()
        folds, idle = _model_facts(cfg.model, dict(cfg.model_options), classes)
        for cls, limit in idle.items():
            notes.append(
                f"match.symmetry: no group of {e.label} admits {cls} maps"
                + (f" (e.g. {limit})" if limit else "")
                + f", so its {cls} rows repeat permutation matching"
            )
        for pair in e.pairs:
            ta, tb = e.trains[pair[0]], e.trains[pair[1]]
            for method in methods:
                opts = _match_options(recipe, method)
                for cls in (["permutation"] if folds else []) + classes:
                    st = SymmetryStage(
                        ta,
                        tb,
                        method,
                        cls,
                        0,
                        opts,
                        b.lambdas,
                        b.splits,
                        b.limit,
                        b.bn_batches,
                        gammas,
                        recipe.match.symmetry_max_iter,
                    )
                    out.append(SymmetryEntry(e.label, pair, method, cls, FOLDED, st))
    return out, notes
