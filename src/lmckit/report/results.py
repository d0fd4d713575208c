"""Collect the outputs of a finished pipeline into one results tree, and judge the paper's claims.

Everything here reads stage folders (``result.json``) by path; nothing is
recomputed. Aggregates are ``{"mean", "std", "n", "values"}`` over model
pairs (and weight-matching searches where there are several); ``std`` is the
sample standard deviation (0 for a single value).

Each claim of docs/definitions.md is judged from the numbers with a criterion written
next to it (``criterion``), never in advance. The criteria are the project's
reading of the paper's words ("near 0", "clearly differs", ...), stated in
the report so a reader can disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data import load_dataset
from ..pipeline.build import Experiment, Plan
from ..pipeline.executor import plan as order
from ..pipeline.recipe import recipe_to_dict
from ..pipeline.stages import stage_hash, stage_path
from ..store import read_json
from .architectures import architecture_summary
from .claims import CLAIMS, Evidence, paper_value
from .claims import dig as _get
from .experiment import _experiment, _read, _with_split_matrices  # noqa: F401  (importable from here as before)
from .lm import add_lm_units
from .paper import collect_paper
from .stats import stats, t_interval  # noqa: F401  (likewise)
from .studies import collect_studies, study_claims
from .symmetry import collect_symmetry

__all__ = [
    "collect",
    "stats",
    "t_interval",
    "judge_claims",
    "timings",
    "ste_drift",
    "changed_fraction",
    "evaluation_sizes",
]


def _split_sizes(dataset: str) -> dict[str, int]:
    """Images per split of ``dataset`` (empty when it cannot be loaded here)."""
    try:
        d = load_dataset(dataset)
        return {sp: int(d.size(sp)) for sp in d.splits()}
    except Exception:  # noqa: BLE001 - sizes are informative; the stages already ran on the data
        return {}


def evaluation_sizes(recipe: Any, sizes: dict[str, int]) -> dict[str, Any]:
    """How many images each measurement used (``recipe``: the JSON view of the recipe; ``sizes``: split sizes).

    A ``limit`` of 0 means the whole split; evaluations take the first N images of a split in file order,
    training-data subsets (Taylor, projections, AM, BN reset) are seeded random draws.
    """

    def cap(limit: int, split: str) -> int | None:
        n = sizes.get(split)
        if not limit:
            return n
        return min(limit, n) if n is not None else int(limit)

    b, an, mt = recipe["barrier"], recipe["analysis"], recipe["match"]
    out: dict[str, Any] = {
        "split_sizes": dict(sizes),
        "barrier": {sp: cap(b["limit"], sp) for sp in b["splits"]},
        "barrier_lambdas": b["lambdas"],
        "taylor_train_images": cap(an["taylor_samples"], "train"),
        "projection_train_images": cap(max(1, an["projection_samples"] // 500) * 500, "train"),
        "rank_test_images": cap(an["eval_limit"], "test"),
        "activation_matching_train_images": cap(mt["am_samples"], "train"),
        "ste_train_images": cap(mt["ste"]["train_limit"], "train"),
        "three_models_test_images": cap(b["limit"], "test"),
    }
    return out


def collect(plan: Plan, root: str | Path) -> dict[str, Any]:
    """The results tree of a finished plan (no timings: see :func:`timings`)."""
    root = Path(root)
    res: dict[str, Any] = {"recipe": recipe_to_dict(plan.recipe), "notes": list(plan.notes)}
    res["evaluation"] = evaluation_sizes(res["recipe"], _split_sizes(plan.recipe.data.dataset))
    res["experiments"] = [_experiment(root, e, True) for e in plan.experiments]
    if plan.three:
        three = {}
        for meth, st in plan.three.items():
            d = _read(root, st)
            pb = d["pair_barrier"]
            sp = pb["splits"][0]
            three[meth] = {
                "pair_loss_barrier": pb["loss_barrier"][sp],
                "pair_accuracy_barrier": pb["accuracy_barrier"][sp],
                "pair_curve": {"lambdas": pb["lambdas"], "loss": pb["loss"][sp], "accuracy": pb["accuracy"][sp]},
                "merged": d["merged"],
                "split": sp,
            }
            if "landscape" in d:
                ld = d["landscape"]
                three[meth]["landscape"] = {k: ld[k] for k in ("xs", "ys", "loss", "accuracy", "models")}
        res["three_models"] = three
    if plan.width:
        res["width_sweep"] = [_experiment(root, e, False) for e in plan.width]
    drift = ste_drift(plan, root)
    if drift:
        res["ste_drift"] = drift
    if getattr(plan, "studies", None) is not None:
        res["studies"] = collect_studies(plan, root)
    sym = collect_symmetry(plan, root)  # match.symmetry beyond permutations (issue 29); absent by default
    if sym is not None:
        res["symmetry"] = sym

    arch = architecture_summary(plan, res, root)
    if arch:
        res["architectures"] = arch
    add_lm_units(res)  # language models: units and perplexities (issue 26)
    res["claims"] = judge_claims(res) + study_claims(res)
    if plan.recipe.paper.enabled:  # issue 30: the claims per model entry and STE protocol, side by side
        res["paper"] = collect_paper(res)
    return res


# --------------------------------------------------------------------------- STE drift and the WM baseline
DRIFT_SERIES = ("changed_vs_wm", "tilde_dist", "tilde_rel_dist", "r03", "heldout_loss")


def _perm_lists(root: Path, spec) -> dict[str, list[int]]:
    return read_json(stage_path(root, spec) / "perms.json", "permutation file", expect=dict)["perms"]


def changed_fraction(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Fraction of all units whose assignment differs between two permutation sets (JSON lists).

    .. math:: \\frac{\\sum_g |\\{i : \\pi^a_g(i) \\ne \\pi^b_g(i)\\}|}{\\sum_g n_g}

    the same quantity as :func:`lmckit.perm.perm_changed_units`, which STE records against plain WM.
    """
    if set(a) != set(b):
        raise ValueError(f"permutation sets of different groups: {sorted(a)} vs {sorted(b)}")
    tot = sum(len(a[g]) for g in a)
    diff = sum(sum(x != y for x, y in zip(a[g], b[g])) for g in a)
    return diff / max(tot, 1)


def _wm_vs_wm(root: Path, e: Experiment) -> list[float]:
    """Fraction of units differing between every two WM searches (different seeds) of the same pair."""
    by_pair: dict[tuple[int, int], list[dict[str, list[int]]]] = {}
    for (pair, meth, _search), st in sorted(e.matches.items(), key=lambda kv: kv[0][2]):
        if meth == "weight":
            by_pair.setdefault(pair, []).append(_perm_lists(root, st))
    out = []
    for perms in by_pair.values():
        out += [changed_fraction(perms[i], perms[j]) for i in range(len(perms)) for j in range(i + 1, len(perms))]
    return out


def _drift_run(label: str, pair: Sequence[int], d: dict[str, Any]) -> dict[str, Any] | None:
    dr = d.get("drift")
    if not isinstance(dr, dict) or not dr.get("epoch"):
        return None
    run: dict[str, Any] = {"label": label, "pair": list(pair), "epoch": list(dr["epoch"])}
    for k in DRIFT_SERIES:
        run[k] = [float(v) for v in dr[k]]
    # epoch 0 (the start) has no running training loss: keep that series with its own epochs
    tr = [(ep, v) for ep, v in zip(dr["epoch"], dr["train_midpoint_loss"]) if v is not None]
    run["train_epoch"] = [ep for ep, _ in tr]
    run["train_midpoint_loss"] = [float(v) for _, v in tr]
    run["identity_heldout_loss"] = float(dr["identity_heldout_loss"])
    return run


def ste_drift(plan: Plan, root: str | Path) -> dict[str, Any]:
    """Per-epoch drift of every STE run of the plan, beside the WM seed-to-seed baseline.

    ``runs``: one record per distinct STE match stage (the experiments' pairs,
    then the three-model matches to the anchor not already listed) with the
    series :func:`lmckit.match.ste.drift_history` records per epoch (epoch 0 =
    the start, ``theta~ = theta_a``, ``pi = WM``): ``changed_vs_wm`` (fraction
    of units assigned differently from plain WM), ``tilde_dist`` /
    ``tilde_rel_dist`` (``||theta~ - theta_a||_2``, absolute and relative to
    ``||theta_a||_2``), ``r03`` (R(0.3) of the current permutation) and the
    held-out and running training midpoint losses. ``wm_vs_wm``: stats of the
    fraction of units differing between two weight-matching searches with
    different seeds on the same pair (every two searches of every pair), the
    scale against which STE's reassignment is judged. ``summary``: stats over
    runs of the first and last values. Empty when the plan has no STE run.
    """
    root = Path(root)
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()
    wm: list[float] = []

    def add(label: str, st) -> None:
        h = stage_hash(st)
        if h in seen:
            return
        seen.add(h)
        a, b = (_unpair_seed(t) for t in (st.a, st.b))
        run = _drift_run(label, [a, b], _read(root, st))
        if run is not None:
            runs.append(run)

    for e in plan.experiments + plan.width:
        for (pair, meth, _s), st in e.matches.items():
            if meth == "ste":
                add(f"{e.label}: seeds {pair[0]}-{pair[1]}", st)
    for e in plan.experiments:  # the baseline from the same models as the STE runs (not the width sweep's)
        wm += _wm_vs_wm(root, e)
    for three in plan.three.values():
        for st in three.matches:
            if st is not None and getattr(st, "method", None) == "ste":
                a, b = _unpair_seed(st.a), _unpair_seed(st.b)
                add(f"{plan.experiments[0].label}: seeds {a}-{b} (three models)", st)
    if not runs:
        return {}
    out: dict[str, Any] = {"runs": runs}
    if wm:
        out["wm_vs_wm"] = stats(wm, "pairs of WM searches with different seeds, same model pair")
    out["summary"] = {
        f"{k}_{w}": stats((r[k][i] for r in runs), "STE runs")
        for k in ("changed_vs_wm", "tilde_rel_dist", "r03", "heldout_loss")
        for w, i in (("start", 0), ("end", -1))
    }
    out["summary"]["epochs"] = max(r["epoch"][-1] for r in runs)
    return out


def _unpair_seed(t) -> int:
    return int(dict(t.config).get("seed", -1))


def timings(plan: Plan, root: str | Path) -> dict[str, Any]:
    """Seconds per stage kind (from each folder's ``stage.json``): kept out of results.json."""
    root = Path(root)
    per: dict[str, float] = {}
    where: set[tuple[Any, Any]] = (
        set()
    )  # (torch threads, device) the stages ran with: results can differ in the last digits
    for s in order(plan.targets()):
        f = stage_path(root, s) / "stage.json"
        if f.exists():
            rec = read_json(f, "stage record", expect=dict)
            per[s.KIND] = per.get(s.KIND, 0.0) + float(rec.get("seconds", 0.0))
            where.add((rec.get("threads"), rec.get("device")))
    return {
        "stage_seconds_by_kind": per,
        "stage_seconds_total": sum(per.values()),
        "ran_with": [{"threads": t, "device": d} for t, d in sorted(where, key=str)],
    }


# --------------------------------------------------------------------------- claims
def judge_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (model, claim) the recipe's results can speak to.

    Each record: ``id``, ``model`` (the experiment's label: claims are judged per model when a recipe has
    several; the three-model and width claims use the first model, as the recipe does), ``figure``,
    ``statement`` (the claim, :data:`lmckit.report.claims.CLAIMS`), ``criterion``, ``numbers``, ``held``,
    ``text`` (a sentence from the numbers) and ``paper`` (the published value with its source; absent when the
    paper gives none for this setting).
    """
    claims: list[dict[str, Any]] = []
    dataset = _get(res, "recipe", "data", "dataset", default="")
    for i, e in enumerate(res.get("experiments", [])):
        ev = Evidence(res, e, first=i == 0)
        for claim in CLAIMS.values():
            c = claim.record(ev)
            if c is None:
                continue
            c["model"] = e["label"]
            c["title"], c["statement"] = claim.title, claim.statement
            paper = paper_value(c["id"], dataset, e["label"])
            if paper is not None:  # results.json holds no nulls: absent when nothing is published
                c["paper"] = paper
            claims.append(c)
    return claims
