"""The report's ``paper`` section (issue 30): claims 1-6 per model entry and per STE protocol, side by side.

Switched on by the recipe key ``paper.enabled`` (the shipped ``paper`` recipe). It reads nothing from disk:
it re-reads the run's aggregated results (``results.json``'s ``experiments``, ``claims`` and ``studies``) and
restates every claim's criterion (``docs/definitions.md``, "Claims", the same thresholds as
:mod:`lmckit.report.claims`) as conditions on a *per-pair margin*: a number per model pair whose mean is
compared with 0. For the linear criteria (claims 1, 5b, 6) the mean of the margins is exactly the margin
of the means the ``Claims`` section judges, so the verdicts agree; for claims 2, 3 and 5a (ratios) the
margin form is the one fixed here, in ``docs/definitions.md``, "The paper recipe", before the run.

Each condition carries the margin's mean, sample std, n and 95% Student-t interval over pairs
(:func:`lmckit.report.results.stats`) and says whether that interval lies wholly on the side the criterion
asks for (``decided: held``), wholly on the other (``decided: failed``) or across 0 (``within noise``). A
verdict is the mean's; the interval never changes it.

Settings ("protocols") compared:

* per model entry of the recipe (the ``paper`` recipe: the authors' training with the best *test* epoch,
  and the same with the best *held-out* epoch), claims 1, 2, 3, 4, 5a and 5b with the main experiment's STE
  (the recipe's ``match.ste.protocol``, lmckit's ``heldout-best`` in the shipped recipe);
* per STE protocol of the ``ste_protocols`` study (on the first entry's pairs): claim 5b;
* per STE protocol of the ``many_models`` study (models 1..N-1 matched to the anchor, model 0): claim 6 as
  the barrier between two anchor-matched models (all pairs among models 1..N-1 at the largest N; they share
  models, so the interval is optimistic) and as the uniform merge's test loss and accuracy against N.
"""

from __future__ import annotations

from typing import Any, Sequence

from .claims import CLAIM3_FACTOR, dig
from .stats import stats

__all__ = ["collect_paper", "write_paper", "CRITERIA"]

#: the thresholds of docs/definitions.md, "Claims" (as lmckit.report.claims judges them)
CLAIM1_BARRIER_RATIO = 0.2
CLAIM1_MAX_REDUCTION = 0.3
CLAIM2_MIN_REL = 0.5
CLAIM5A_MAX_REL = 0.5
CLAIM5B_BARRIER_RATIO = 0.2
CLAIM5B_R_RATIO = 0.5

#: each condition's per-pair margin and the side of 0 it must fall on (docs/definitions.md, "The paper recipe")
CRITERIA = {
    "1": [
        ("wm_barrier - 0.2 x naive_barrier (test loss)", "<= 0"),
        ("WM L2 distance reduction - 0.3", "<= 0"),
    ],
    "2": [("|Taylor - measured| - 0.5 x |measured| (WM midpoint barrier)", "> 0")],
    "3": [("rise of R(0.3) by WM - 2 x max(rise of R(0), 0)", "> 0")],
    "4": [("first pair only: inputs' top/bottom projection ratio > 2 and <= 25% rank keeps >= 90% accuracy", "n=1")],
    "5a": [("|R_AM(0.3) - R_WM(0.3)| - 0.5 x R_WM(0.3)", "<= 0")],
    "5b": [
        ("ste_barrier - 0.2 x naive_barrier (test loss)", "<= 0"),
        ("R_STE(0.3) - 0.5 x R_WM(0.3)", "<= 0"),
    ],
    "6": [("STE pair barrier - WM pair barrier (models matched to the anchor, test loss)", "> 0")],
    "6-merge": [("STE merged test loss - WM merged test loss (uniform average of N models)", "> 0")],
}

#: the paper's value per claim, with its source (PAPER.md and docs/definitions.md, "Published values")
PAPER = {
    "1": "WM barrier near 0; WM distance reduction 17.9% (MLP, Fashion-MNIST; Table 1)",
    "2": "the Taylor estimate differs clearly from the measured barrier (qualitative)",
    "3": "R(0.3) about 0.2 after WM, near 0 before (VGG-11, ResNet-20; no MLP value given)",
    "4": "dominant directions carry the function (qualitative)",
    "5a": "AM behaves like WM on R and distance (qualitative)",
    "5b": "STE: low two-model barrier with R near 0 (qualitative)",
    "6": "barrier between pi_b(theta_b) and pi_c(theta_c) smaller with WM than with STE (reviewer: small difference)",
    "6-merge": "uniform merge of N models better with WM than with STE as N grows (qualitative)",
}
PAPER_REDUCTION = 0.179


def _interval(s: dict[str, Any], side: str) -> str:
    """Where the 95% interval of a margin lies: ``held`` (wholly on ``side``), ``failed``, ``within noise``."""
    if "ci95" not in s:
        return f"n = {s['n']}: no interval"
    lo, hi = s["ci95"]
    if side == "<= 0":
        return "held" if hi <= 0 else "failed" if lo > 0 else "within noise"
    return "held" if lo > 0 else "failed" if hi <= 0 else "within noise"


def _cond(quantity: str, side: str, margins: Sequence[float], over: str) -> dict[str, Any]:
    s = stats(margins, over)
    held = s["n"] > 0 and (s["mean"] <= 0 if side == "<= 0" else s["mean"] > 0)
    return {"quantity": quantity, "side": side, "margin": s, "held": bool(held), "decided": _interval(s, side)}


def _vals(d: Any, *path: str) -> list[float]:
    v = dig(d, *path, "values", default=None)
    return [float(x) for x in v] if isinstance(v, list) else []


def _split(e: dict[str, Any]) -> str:
    naive = dig(e, "methods", "naive", "barrier", default={}) or {}
    return "test" if "test" in naive else next(iter(naive), "test")


def _per_pair(values: list[float], pairs: int) -> list[float]:
    """The first search's value per pair (``values`` runs over pairs x searches, searches fastest)."""
    if pairs and len(values) > pairs and len(values) % pairs == 0:
        return values[:: len(values) // pairs]
    return values


def _record(claim: str, setting: str, conds: list[dict[str, Any]], note: str = "") -> dict[str, Any]:
    out = {
        "claim": claim,
        "setting": setting,
        "held": all(c["held"] for c in conds),
        "conditions": conds,
        "paper": PAPER[claim],
    }
    if note:
        out["note"] = note
    return out


def _entry_claims(res: dict[str, Any], i: int, e: dict[str, Any]) -> list[dict[str, Any]]:
    """Claims 1, 2, 3, 4, 5a, 5b of one model entry from its main experiment (margins per pair)."""
    M, sp, n = e["methods"], _split(e), len(e.get("pairs", []))
    label, out = e["label"], []
    over = "model pairs"
    nb = _vals(M, "naive", "barrier", sp, "loss_barrier")
    wb = _vals(M, "weight", "barrier", sp, "loss_barrier")
    red = _per_pair(_vals(M, "weight", "distance", "reduction"), n)
    if nb and wb and red:
        out.append(
            _record(
                "1",
                label,
                [
                    _cond(CRITERIA["1"][0][0], "<= 0", [w - CLAIM1_BARRIER_RATIO * b for w, b in zip(wb, nb)], over),
                    _cond(CRITERIA["1"][1][0], "<= 0", [r - CLAIM1_MAX_REDUCTION for r in red], over),
                ],
            )
        )
    tay = dig(M, "weight", "taylor")
    if tay:
        t, m = _vals(tay, "taylor_midpoint"), _vals(tay, "measured_midpoint")
        out.append(
            _record(
                "2",
                label,
                [_cond(CRITERIA["2"][0][0], "> 0", [abs(a - b) - CLAIM2_MIN_REL * abs(b) for a, b in zip(t, m)], over)],
            )
        )
    gam = list(dig(M, "weight", "R", default={}) or {})
    if len(gam) >= 2:
        g0, g1 = gam[0], gam[-1]
        a0 = _per_pair(_vals(M, "weight", "R", g0, "after"), n)
        a1 = _per_pair(_vals(M, "weight", "R", g1, "after"), n)
        b0, b1 = _vals(M, "weight", "R", g0, "before"), _vals(M, "weight", "R", g1, "before")
        rise = [(x1 - y1) - CLAIM3_FACTOR * max(x0 - y0, 0.0) for x0, y0, x1, y1 in zip(a0, b0, a1, b1)]
        conds = [_cond(CRITERIA["3"][0][0].replace("0.3", g1).replace("R(0)", f"R({g0})"), "> 0", rise, over)]
        c3 = next((c for c in res.get("claims", []) if c["id"] == "3" and c.get("model") == label), None)
        if c3 is not None:
            d = c3["numbers"]["top_sigma_rel_diff"]
            conds.append(
                {
                    "quantity": "first pair: top-10% singular values' relative difference - 0.1",
                    "side": "<= 0",
                    "margin": stats([d - 0.1], "the first pair"),
                    "held": d < 0.1,
                    "decided": "n = 1: no interval",
                }
            )
        out.append(_record("3", label, conds))
    c4 = next((c for c in res.get("claims", []) if c["id"] == "4" and c.get("model") == label), None)
    if c4 is not None:
        nums = c4["numbers"]
        out.append(
            _record(
                "4",
                label,
                [
                    {
                        "quantity": "first pair: top-10%/bottom-half projection ratio - 2",
                        "side": "> 0",
                        "margin": stats([nums["projection_ratio"] - 2.0], "the first pair"),
                        "held": nums["projection_ratio"] > 2.0,
                        "decided": "n = 1: no interval",
                    },
                    {
                        "quantity": "first pair: smallest kept rank fraction keeping 90% accuracy - 0.25",
                        "side": "<= 0",
                        "margin": stats([nums["kept_fraction"] - 0.25], "the first pair"),
                        "held": bool(c4["held"]),
                        "decided": "n = 1: no interval",
                    },
                ],
            )
        )
    if len(gam) >= 1 and "activation" in M:
        g = gam[-1]
        rw = _per_pair(_vals(M, "weight", "R", g, "after"), n)
        ra = _vals(M, "activation", "R", g, "after")
        if ra:
            out.append(
                _record(
                    "5a",
                    label,
                    [
                        _cond(
                            CRITERIA["5a"][0][0].replace("0.3", g),
                            "<= 0",
                            [abs(a - w) - CLAIM5A_MAX_REL * abs(w) for a, w in zip(ra, rw)],
                            over,
                        )
                    ],
                )
            )
    if len(gam) >= 1 and "ste" in M:
        g = gam[-1]
        sb = _vals(M, "ste", "barrier", sp, "loss_barrier")
        rs = _vals(M, "ste", "R", g, "after")
        rw = _per_pair(_vals(M, "weight", "R", g, "after"), n)
        proto = dig(res, "recipe", "match", "ste", "protocol", default="heldout-best")
        if sb and rs:
            out.append(_record("5b", f"{label}, STE {proto} (main experiment)", _claim5b(sb, nb, rs, rw)))
    return out


def _claim5b(sb, nb, rs, rw) -> list[dict[str, Any]]:
    over = "model pairs"
    return [
        _cond(CRITERIA["5b"][0][0], "<= 0", [s - CLAIM5B_BARRIER_RATIO * b for s, b in zip(sb, nb)], over),
        _cond(CRITERIA["5b"][1][0], "<= 0", [s - CLAIM5B_R_RATIO * w for s, w in zip(rs, rw)], over),
    ]


def _protocol_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Claim 5b per STE protocol of the ``ste_protocols`` study (first model entry's pairs)."""
    p = dig(res, "studies", "ste_protocols", default=None)
    if not p or "naive" not in p or "wm" not in p:
        return []
    first = res["experiments"][0]["label"]
    nb = [r["loss_barrier"] for r in p["naive"]["pairs"]]
    rw = [r["R03"] for r in p["wm"]["pairs"]]
    out = []
    for name, e in p.items():
        if name in ("naive", "wm"):
            continue
        sb = [r["loss_barrier"] for r in e["pairs"]]
        rs = [r.get("R03", 0.0) for r in e["pairs"]]
        out.append(_record("5b", f"{first}, STE {name} ({e.get('epochs', 0)} epoch(s))", _claim5b(sb, nb, rs, rw)))
    return out


def _non_anchor(row: dict[str, Any]) -> list[float]:
    """Pair barriers among models 1..N-1 (pairs (i, j), i < j, in the order the many-models stage lists them)."""
    n = row["n"]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return [b for (i, _), b in zip(pairs, row["pair_barriers"]) if i > 0]


#: many-models methods that match every model to the anchor (claim 6's setting); the rest align jointly
ANCHORED = ("weight", "activation", "ste")


def _anchored(name: str) -> bool:
    return name in ANCHORED or name.startswith("ste[")


def _wm_better(rows: list[dict[str, Any]], wm: list[dict[str, Any]]) -> list[int]:
    """The N at which WM's uniform merge has a lower test loss than ``rows``' method."""
    w = {r["n"]: r["merged_loss"] for r in wm}
    return [r["n"] for r in rows if r["n"] in w and w[r["n"]] < r["merged_loss"]]


def _many_claims(res: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Claim 6 both ways per STE variant of the ``many_models`` study, and the many-models table."""
    m = dig(res, "studies", "many_models", "methods", default=None)
    if not m or "weight" not in m:
        return [], None
    first = res["experiments"][0]["label"]
    wm = m["weight"][-1]
    nmax = wm["n"]
    w_pairs = _non_anchor(wm)
    out = []
    for name, rows in m.items():
        if not name.startswith("ste"):
            continue
        last = rows[-1]
        s_pairs = _non_anchor(last)
        main = dig(res, "recipe", "match", "ste", "protocol", default="heldout-best")
        label = f"ste {main}" if name == "ste" else f"ste {name[4:-1]}" if name.startswith("ste[") else name
        if s_pairs and len(s_pairs) == len(w_pairs):
            out.append(
                _record(
                    "6",
                    f"{first}, {label}, N = {nmax}",
                    [
                        _cond(
                            CRITERIA["6"][0][0],
                            "> 0",
                            [s - w for s, w in zip(s_pairs, w_pairs)],
                            f"pairs among models 1..{nmax - 1} (they share models)",
                        )
                    ],
                )
            )
        out.append(
            _record(
                "6-merge",
                f"{first}, {label}, N = {nmax}",
                [
                    {
                        "quantity": CRITERIA["6-merge"][0][0],
                        "side": "> 0",
                        "margin": stats([last["merged_loss"] - wm["merged_loss"]], f"one merge of {nmax} models"),
                        "held": last["merged_loss"] > wm["merged_loss"],
                        "decided": "n = 1: no interval",
                    }
                ],
                note="WM's merged loss lower at N = "
                + (", ".join(str(n) for n in _wm_better(rows, m["weight"])) or "none")
                + f" of {[r['n'] for r in rows]}",
            )
        )
    table = {
        name: [
            {
                "n": r["n"],
                "merged_loss": r["merged_loss"],
                "merged_accuracy": r["merged_accuracy"],
                "mean_pair_barrier": r["mean_pair_barrier"],
                **(
                    {"non_anchor_pair_barrier": stats(_non_anchor(r), "pairs among models 1..N-1")}
                    if r["n"] > 2
                    else {}
                ),
                "anchored": _anchored(name),
                **{k: r[k] for k in ("cycle_error", "seconds") if k in r},
            }
            for r in rows
        ]
        for name, rows in m.items()
    }
    return out, table


def _splits_study(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Train vs test split: each method's mean loss barrier on every measured split, per model entry."""
    rows = []
    for e in res.get("experiments", []):
        for meth, d in e["methods"].items():
            for sp, q in (d.get("barrier") or {}).items():
                rows.append({"model": e["label"], "method": meth, "split": sp, "loss_barrier": q["loss_barrier"]})
    return rows


#: the STE-MM authors' STE settings (e5-a/STE-MM configs/rebasin/method/ste.yaml; 60000 Fashion-MNIST images)
AUTHORS_STE = {"epochs": 10, "images": 60000, "batch_size": 256}


def _notes(res: dict[str, Any]) -> list[str]:
    """What this run did differently from the authors' protocol, in numbers (sizing, not choices)."""
    rec = res.get("recipe") or {}
    out = []
    ps = dig(rec, "studies", "ste_protocols", default={}) or {}
    if ps.get("enabled"):
        n = ps.get("train_limit") or AUTHORS_STE["images"]
        for proto, ep in zip(ps.get("protocols", []), ps.get("epochs", [])):
            out.append(
                f"STE {proto}: {ep} epoch(s) on the first {n} training images "
                f"(the authors: {AUTHORS_STE['epochs']} epochs on {AUTHORS_STE['images']}), "
                f"{100 * ep * n / (AUTHORS_STE['epochs'] * AUTHORS_STE['images']):.1f}% of their STE training"
            )
    mm = dig(rec, "match", "options", "ste-mm", default=None)
    if isinstance(mm, dict):
        ep, n = mm.get("epochs") or AUTHORS_STE["epochs"], mm.get("train_limit") or AUTHORS_STE["images"]
        out.append(
            f"STE-MM (joint, many models): {ep} epoch(s) on the first {n} training images "
            f"({100 * ep * n / (AUTHORS_STE['epochs'] * AUTHORS_STE['images']):.1f}% of the authors' STE training)"
        )
    return out


def collect_paper(res: dict[str, Any]) -> dict[str, Any]:
    """``results["paper"]``: the side-by-side claims (``claims``), WM's distance reduction per model entry
    beside the paper's 17.9% (``reduction``), the many-models table (``many_models``) and the train/test
    study (``splits``). Reads only ``res``."""
    claims: list[dict[str, Any]] = []
    reduction = []
    for i, e in enumerate(res.get("experiments", [])):
        claims += _entry_claims(res, i, e)
        red = dig(e, "methods", "weight", "distance", "reduction")
        if red:
            reduction.append({"model": e["label"], "reduction": red, "paper": PAPER_REDUCTION})
    claims += _protocol_claims(res)
    many, table = _many_claims(res)
    claims += many
    out: dict[str, Any] = {
        "claims": claims,
        "reduction": reduction,
        "splits": _splits_study(res),
        "notes": _notes(res),
    }
    if table is not None:
        out["many_models"] = table
    return out


# --------------------------------------------------------------------------- markdown
def _pm(s: dict[str, Any] | None, pct: bool = False) -> str:
    if not s or not s.get("n"):
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
    txt = f"{f(s['mean'])} ± {f(s['std'])}" if s["n"] > 1 else f(s["mean"])
    if "ci95" in s:
        txt += f" [{f(s['ci95'][0])}, {f(s['ci95'][1])}]"
    return txt + f" (n={s['n']})"


def _many_row(name: str, r: dict[str, Any]) -> str:
    """One row of the many-models table."""
    if "cycle_error" in r:
        cyc = f"{r['cycle_error']:.4f}"
    else:
        cyc = "0 (one anchor order)" if r["anchored"] and r["n"] >= 3 else "-"
    secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
    return (
        f"| {name} | {r['n']} | {r['merged_loss']:.4f} | {r['merged_accuracy']:.4f} | "
        f"{_pm(r.get('non_anchor_pair_barrier'))} | {r['mean_pair_barrier']:.4f} | {cyc} | {secs} |"
    )


def write_paper(res: dict[str, Any]) -> list[str]:
    """Markdown lines of the ``paper`` section (empty when ``res`` has none)."""
    p = res.get("paper")
    if not p:
        return []
    md = [
        "",
        "## The paper's claims under the authors' protocol and lmckit's",
        "",
        "Each claim's criterion (`docs/definitions.md`, 'Claims' and 'The paper recipe') as a margin per model "
        "pair: the claim holds when the margin's mean is on the side shown. Cells: mean ± sample std "
        "[95% Student-t interval] (n); 'interval' says whether that interval lies wholly on the claim's side "
        "(held), wholly on the other (failed) or across 0 (within noise). The verdict is the mean's; the "
        "interval never changes it.",
        "",
    ]
    if p.get("notes"):
        md += ["Sizing of this run against the authors' protocol (CPU budget; not tuned to any number):", ""]
        md += [f"- {n}." for n in p["notes"]] + [""]
    if p.get("reduction"):
        md += ["WM's L2 distance reduction (paper: 17.9%, MLP on Fashion-MNIST, Table 1):", ""]
        md += ["| model | reduction | paper |", "|---|---|---|"]
        md += [f"| {r['model']} | {_pm(r['reduction'], True)} | {100 * r['paper']:.1f}% |" for r in p["reduction"]]
        md += [""]
    md += ["| claim | setting | verdict | condition | margin | interval | paper |", "|---|---|---|---|---|---|---|"]
    for c in p["claims"]:
        for k, cond in enumerate(c["conditions"]):
            md.append(
                "| "
                + " | ".join(
                    [
                        c["claim"] if k == 0 else "",
                        c["setting"] if k == 0 else "",
                        ("**held**" if c["held"] else "**did not hold**") if k == 0 else "",
                        f"{cond['quantity']} {cond['side']}",
                        _pm(cond["margin"]),
                        cond["decided"],
                        c["paper"] if k == 0 else "",
                    ]
                )
                + " |"
            )
    notes = [c for c in p["claims"] if c.get("note")]
    if notes:
        md += [""] + [f"- claim {c['claim']}, {c['setting']}: {c['note']}." for c in notes]
    t = p.get("many_models")
    if t:
        md += [
            "",
            "### Many models: the uniform merge and the pair barriers against N",
            "",
            "Anchored methods match models 1..N-1 to model 0; MergeMany (and joint methods) align all N together. "
            "Merged: the uniform average of the N aligned models (test split). Pair barrier: mean test-loss "
            "barrier over pairs among models 1..N-1 (N >= 3).",
            "",
            "| method | N | merged loss | merged acc | pair barrier (non-anchor) | mean pair barrier (all) | "
            "cycle error | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in t.items():
            md += [_many_row(name, r) for r in rows]
    if p.get("splits"):
        md += ["", "### Train vs test split", "", "Mean loss barrier per split (model pairs):", ""]
        md += ["| model | method | split | loss barrier |", "|---|---|---|---|"]
        md += [f"| {r['model']} | {r['method']} | {r['split']} | {_pm(r['loss_barrier'])} |" for r in p["splits"]]
    return md
