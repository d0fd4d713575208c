"""``match.symmetry`` in the report: symmetry classes side by side per model and method (issue 29).

:func:`collect_symmetry` reads the :class:`~lmckit.pipeline.symmetry.SymmetryStage` folders of a plan and,
for the same pairs, the recipe's own permutation rows (search 0's barrier and analysis stages, on raw
weights), and returns ``results["symmetry"]``: per pair one row per (method, class, parameterisation) and
a summary over pairs (:func:`lmckit.report.stats.stats`). :func:`write_symmetry` is the report's table. A
plan without symmetry stages (the default ``["permutation"]``) adds nothing to the results or the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.build import Plan
from ..pipeline.symmetry import FOLDED, RAW
from .experiment import _read
from .figures import METHOD_LABEL
from .markdown import _pm, _table, plain
from .stats import stats

__all__ = ["collect_symmetry", "write_symmetry"]

_QUANTITIES = ("loss_barrier", "accuracy_barrier")


def _barrier_part(bar: dict[str, Any]) -> dict[str, Any]:
    """Per split the loss/accuracy barrier and the path's two endpoint losses (the models' own)."""
    out: dict[str, Any] = {q: {sp: bar[q][sp] for sp in bar["splits"]} for q in _QUANTITIES}
    out["endpoint_loss"] = {sp: [bar["loss"][sp][0], bar["loss"][sp][-1]] for sp in bar["splits"]}
    return out


def _recipe_row(root: Path, e, pair, method: str, same_as_folded: bool) -> dict[str, Any] | None:
    """The recipe's own permutation row of ``method`` on ``pair`` (search 0; raw weights)."""
    key = (tuple(pair), method, 0)
    if key not in e.barriers:
        return None
    row: dict[str, Any] = {
        "model": e.label,
        "pair": list(pair),
        "method": method,
        "symmetry": "permutation",
        "parameterisation": RAW,
        "same_as_folded": same_as_folded,
        **_barrier_part(_read(root, e.barriers[key])),
    }
    if key in e.analyses:
        an = _read(root, e.analyses[key])
        row["l2_before"], row["l2_after"] = an["l2_before"], an["l2_after"]
        row["R"] = {g: {"before": r["before"], "after": r["after"]} for g, r in an["R"].items()}
    return row


def _stage_row(root: Path, entry) -> dict[str, Any]:
    d = _read(root, entry.stage)
    row: dict[str, Any] = {
        "model": entry.label,
        "pair": list(entry.pair),
        "method": entry.method,
        "symmetry": entry.symmetry,
        "parameterisation": FOLDED,
        "folded": d["folded"],
        **_barrier_part(d["barrier"]),
    }
    for k in ("l2_before", "l2_after", "relative_l2_before", "relative_l2_after", "sweeps", "converged", "R"):
        if k in d:
            row[k] = d[k]
    if "classes" in d:
        counts: dict[str, int] = {}
        for c in d["classes"].values():
            counts[c] = counts.get(c, 0) + 1
        row["group_classes"] = counts
    return row


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, method, class, parameterisation): barriers per split, L2 and R after, over pairs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["symmetry"], r["parameterisation"]), []).append(r)
    out = []
    for (model, method, cls, param), rs in groups.items():
        s: dict[str, Any] = {"model": model, "method": method, "symmetry": cls, "parameterisation": param}
        if param == RAW:
            s["same_as_folded"] = rs[0]["same_as_folded"]
        s["pairs"] = len(rs)
        for q in _QUANTITIES:
            s[q] = {sp: stats((r[q][sp] for r in rs), "model pairs") for sp in rs[0][q]}
        for k in ("l2_before", "l2_after", "relative_l2_before", "relative_l2_after"):
            if all(k in r for r in rs):
                s[k] = stats((r[k] for r in rs), "model pairs")
        if all("R" in r for r in rs):
            s["R_after"] = {g: stats((r["R"][g]["after"] for r in rs), "model pairs") for g in rs[0]["R"]}
        out.append(s)
    return out


def collect_symmetry(plan: Plan, root: str | Path) -> dict[str, Any] | None:
    """``results["symmetry"]``: the classes compared, per-pair rows and their summary (None: nothing planned)."""
    entries = list(getattr(plan, "symmetry", None) or [])
    if not entries:
        return None
    root = Path(root)
    rows: list[dict[str, Any]] = []
    for e in plan.experiments:
        mine = [x for x in entries if x.label == e.label]
        if not mine:
            continue
        folded_baseline = {(x.pair, x.method) for x in mine if x.symmetry == "permutation"}
        for pair in e.pairs:
            for method in dict.fromkeys(x.method for x in mine):
                rec = _recipe_row(root, e, pair, method, (tuple(pair), method) not in folded_baseline)
                if rec is not None:
                    rows.append(rec)
                for x in mine:
                    if x.pair == tuple(pair) and x.method == method:
                        rows.append(_stage_row(root, x))
    return {
        "classes": list(plan.recipe.match.symmetry),
        "splits": list(plan.recipe.barrier.splits),
        "rows": rows,
        "summary": _summary(rows),
    }


def _path(s: dict[str, Any]) -> str:
    if s["parameterisation"] == RAW:
        return "raw (= folded: nothing to fold)" if s.get("same_as_folded") else "raw"
    return "folded"


def write_symmetry(res: dict[str, Any]) -> list[str]:
    """The report's section: per model and method, each class's barriers, L2 and R over pairs side by side."""
    sym = res.get("symmetry")
    if not sym:
        return []
    split = "test" if "test" in sym["splits"] else sym["splits"][0]
    gam = "0.3" if any("0.3" in s.get("R_after", {}) for s in sym["summary"]) else None
    md = [
        "",
        "## Symmetry classes side by side",
        "",
        f"`match.symmetry = {sym['classes']}` (docs/symmetry.md). A class beyond permutations aligns B to A on "
        "*folded* models (LayerNorm/RMSNorm gain and bias folded into the next Linear; nothing changes without "
        "norms): its barrier is measured along the path between folded A and the transformed folded B, whose "
        "ends are the two models' own losses. Folding changes the interpolation path, so where it changes the "
        "model the permutation matching of the same method is also run on folded weights (path `folded`); "
        "`raw` is the recipe's own permutation row (first search). Each group takes the largest class up to "
        "the requested one that the model admits (`lmckit check-spec --symmetry` lists them). "
        f"{split} split; mean ± sample std over model pairs; L2 over the parameters `lmckit analyze` counts, "
        "on the row's path.",
        "",
    ]
    rows = []
    for s in sym["summary"]:
        row = {
            "model": plain(s["model"]),
            "method": METHOD_LABEL.get(s["method"], s["method"]),
            "class": s["symmetry"],
            "path": _path(s),
            "pairs": s["pairs"],
            f"{split} loss barrier": _pm(s["loss_barrier"].get(split)),
            f"{split} acc barrier": _pm(s["accuracy_barrier"].get(split)),
            "L2 before": _pm(s.get("l2_before")),
            "L2 after": _pm(s.get("l2_after")),
        }
        if gam:
            row[f"R({gam}) after"] = _pm(s.get("R_after", {}).get(gam))
        rows.append(row)
    return md + _table(rows)
