"""The paper's claims: each one's statement, the criterion lmckit judges it by, and its judge.

Statements restate the claims of Ito, Yamada and Kumagai, "Analysis of Linear Mode Connectivity via
Permutation-Based Weight Matching" (arXiv 2402.04051, ICLR 2025) as listed in ``docs/definitions.md``
("Claims"). :data:`CLAIMS` is the table, in report order: one :class:`Claim` per claim, holding its
title, statement, figure, criterion (the project's reading of the paper's words) and the judge that
reads one experiment's aggregated results (:class:`Evidence`) and returns a :class:`Verdict`, or
None when the recipe did not measure what the claim needs. :func:`lmckit.report.results.judge_claims`
runs the table over a run's experiments. Published values come from the same document's "Published
values" section (:func:`paper_value`); where the paper gives no number for a setting, none is printed.

To add a claim: write its judge, add a :class:`Claim` row to :data:`CLAIMS` (and its statement to
``docs/definitions.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["CLAIMS", "Claim", "Evidence", "Verdict", "dig", "paper_value"]


def dig(d: Any, *path: Any, default: Any = None) -> Any:
    """``d[p0][p1]...`` through nested dicts, or ``default`` where a key is missing."""
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        else:
            return default
    return d


def _held(held: bool) -> str:
    return "held" if held else "did not hold"


@dataclass(frozen=True)
class Evidence:
    """One experiment's aggregated results (``results.json``'s ``experiments[i]``), as the judges read them.

    ``res`` is the whole results dict (recipe, three-model and width-sweep sections); ``first`` is True for
    the recipe's first experiment (the three-model and width claims are judged on it only).
    """

    res: dict[str, Any]
    experiment: dict[str, Any]
    first: bool

    @property
    def methods(self) -> dict[str, Any]:
        return self.experiment["methods"]

    @property
    def split(self) -> str:
        """The split the barriers are read on: ``test`` when measured, else the first one there is."""
        naive = dig(self.methods, "naive", "barrier", default={})
        return "test" if "test" in naive else next(iter(dig(self.methods, "naive", "barrier", default={"": 0})))

    @property
    def protocol(self) -> str:
        """STE's candidate-selection protocol (named in claims 5b and 6)."""
        return dig(self.res, "recipe", "match", "ste", "protocol", default="heldout-best")

    @property
    def gammas(self) -> list:
        """The gammas R(gamma) was measured at after WM, in the recipe's order."""
        return list(dig(self.methods, "weight", "R", default={}) or {})

    def barrier(self, method: str) -> float | None:
        """Mean loss barrier of ``method`` on :attr:`split` (None if not measured)."""
        return dig(self.methods, method, "barrier", self.split, "loss_barrier", "mean")

    def R(self, method: str, gamma: str, when: str = "after") -> float | None:
        """Mean alignment R(gamma) of ``method``, ``before`` or ``after`` matching (None if not measured)."""
        return dig(self.methods, method, "R", gamma, when, "mean")


@dataclass(frozen=True)
class Verdict:
    """A judge's finding: whether the claim held, the numbers it used and a sentence built from them.

    ``fill`` holds the values the claim's criterion template names (e.g. the gammas compared).
    """

    held: bool
    numbers: dict[str, Any]
    text: str
    fill: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: ``title``, ``statement``, the ``figure`` that shows it, the ``criterion``
    (a template filled from :attr:`Evidence.protocol` and :attr:`Verdict.fill`) and its ``judge``."""

    id: str
    title: str
    statement: str
    figure: str
    criterion: str
    judge: Callable[[Evidence], Verdict | None]

    def record(self, ev: Evidence) -> dict[str, Any] | None:
        """The claim's record for ``results.json`` (``id, figure, held, criterion, numbers, text``), or None."""
        v = self.judge(ev)
        if v is None:
            return None
        return {
            "id": self.id,
            "figure": self.figure,
            "held": bool(v.held),
            "criterion": self.criterion.format(proto=ev.protocol, **v.fill),
            "numbers": v.numbers,
            "text": v.text,
        }


# --------------------------------------------------------------------------- judges, one per claim
def _judge_1(ev: Evidence) -> Verdict | None:
    nb, wb = ev.barrier("naive"), ev.barrier("weight")
    red = dig(ev.methods, "weight", "distance", "reduction", "mean")
    if nb is None or wb is None or red is None:
        return None
    held = wb <= 0.2 * nb and red <= 0.3
    return Verdict(
        held,
        {"naive_barrier": nb, "wm_barrier": wb, "reduction": red},
        f"WM lowered the {ev.split} loss barrier from {nb:.3f} (naive) to {wb:.3f} while reducing the "
        f"L2 distance by only {100 * red:.1f}%: claim 1 {_held(held)} in this run.",
    )


def _judge_2(ev: Evidence) -> Verdict | None:
    tay = dig(ev.methods, "weight", "taylor")
    if not tay:
        return None
    t, m = tay["taylor_midpoint"]["mean"], tay["measured_midpoint"]["mean"]
    rel = abs(t - m) / max(abs(m), 1e-12)
    held = rel > 0.5
    return Verdict(
        held,
        {"taylor": t, "measured": m, "relative_difference": rel},
        f"The second-order Taylor estimate of the WM midpoint barrier is {t:.3f} against {m:.3f} "
        f"measured ({100 * rel:.0f}% apart): claim 2 {_held(held)}.",
    )


#: claim 3's "much more": WM's rise of R at the high gamma is at least this multiple of its rise at gamma = 0
CLAIM3_FACTOR = 2.0


def _judge_3(ev: Evidence) -> Verdict | None:
    gam = ev.gammas
    if len(gam) < 2 or not ev.experiment.get("spectra"):
        return None
    g0, g1 = gam[0], gam[-1]
    rise0 = ev.R("weight", g0) - ev.R("weight", g0, "before")
    rise1 = ev.R("weight", g1) - ev.R("weight", g1, "before")
    diffs = []
    for la in ev.experiment["spectra"].values():
        sa, sb = la["sigma_a"], la["sigma_b"]
        k = max(1, len(sa) // 10)
        diffs += [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(sa[:k], sb[:k])]
    spec_diff = sum(diffs) / len(diffs) if diffs else 0.0
    held = rise1 >= CLAIM3_FACTOR * max(rise0, 0.0) and rise1 > 0 and spec_diff < 0.1
    return Verdict(
        held,
        {"R_rise_low_gamma": rise0, "R_rise_high_gamma": rise1, "top_sigma_rel_diff": spec_diff},
        f"WM raised R by {rise1:.3f} at gamma={g1} and by {rise0:.3f} at gamma={g0}; leading singular "
        f"values differ by {100 * spec_diff:.1f}% across seeds: claim 3 {_held(held)}.",
        {"g0": g0, "g1": g1},
    )


def _judge_4(ev: Evidence) -> Verdict | None:
    proj, rank = ev.experiment.get("projections"), ev.experiment.get("rank_sweep")
    if not (proj and rank):
        return None
    ratios = []
    for d in proj.values():
        v = d["mean_abs"]
        k = max(1, len(v) // 10)
        top = sum(v[:k]) / k
        rest = v[len(v) // 2 :] or v
        ratios.append(top / max(sum(rest) / len(rest), 1e-12))
    ratio = sum(ratios) / len(ratios)
    recs = rank["A"]
    full = next(r["accuracy"] for r in recs if r["kind"] == "full")
    cut = sorted((r for r in recs if r["kind"] != "full"), key=lambda r: r["kept_fraction"])
    good = [r for r in cut if r["accuracy"] >= 0.9 * full]
    best = good[0] if good else (cut[0] if cut else None)
    frac = best["kept_fraction"] if best else 1.0
    acc = best["accuracy"] if best else full
    held = ratio > 2.0 and bool(good) and frac <= 0.25
    kept = (
        f"keeping {100 * frac:.1f}% of the hidden-layer rank keeps {acc:.3f} of {full:.3f} accuracy"
        if good
        else f"no truncation tested kept 90% of the accuracy (keeping {100 * frac:.1f}% of the rank gives "
        f"{acc:.3f} of {full:.3f})"
    )
    return Verdict(
        held,
        {"projection_ratio": ratio, "full_accuracy": full, "kept_fraction": frac, "truncated_accuracy": acc},
        f"Layer inputs project {ratio:.1f}x more on the leading right-singular vectors than on the "
        f"trailing half, and {kept}: claim 4 {_held(held)}.",
    )


def _judge_5a(ev: Evidence) -> Verdict | None:
    gam = ev.gammas
    if not gam or ev.R("activation", gam[-1]) is None:
        return None
    g = gam[-1]
    rw, ra = ev.R("weight", g), ev.R("activation", g)
    held = abs(ra - rw) <= 0.5 * abs(rw)
    return Verdict(
        held,
        {"R_wm": rw, "R_am": ra},
        f"AM reached R({g}) = {ra:.3f} against WM's {rw:.3f}: claim 5 (AM behaves like WM) {_held(held)}.",
        {"g": g},
    )


def _judge_5b(ev: Evidence) -> Verdict | None:
    gam, nb, sb = ev.gammas, ev.barrier("naive"), ev.barrier("ste")
    if not gam or ev.R("ste", gam[-1]) is None or nb is None or sb is None:
        return None
    g, proto = gam[-1], ev.protocol
    rw, rs = ev.R("weight", g), ev.R("ste", g)
    lmc = sb <= 0.2 * nb
    low = rs <= 0.5 * rw
    held = lmc and low
    drift = dig(ev.methods, "ste", "match", "changed_vs_wm", "mean", default=0.0)
    return Verdict(
        held,
        {"ste_barrier": sb, "naive_barrier": nb, "R_ste": rs, "R_wm": rw, "ste_units_changed_vs_wm": drift},
        f"STE's ({proto} protocol) barrier is {sb:.3f} (naive {nb:.3f}) with R({g}) = {rs:.3f} against WM's "
        f"{rw:.3f}: STE {'reached' if lmc else 'did not reach'} LMC and its R "
        f"{'stayed low' if low else 'did not stay low'} (its permutation differs from WM's on "
        f"{100 * drift:.0f}% of units); claim 5 (STE) {_held(held)}.",
        {"g": g},
    )


def _judge_6(ev: Evidence) -> Verdict | None:
    three = ev.res.get("three_models", {}) if ev.first else {}
    if "weight" not in three or "ste" not in three:
        return None
    w, s = three["weight"]["pair_loss_barrier"], three["ste"]["pair_loss_barrier"]
    held = w < s
    return Verdict(
        held,
        {"wm_pair_barrier": w, "ste_pair_barrier": s},
        f"Between two models matched to a common anchor, the barrier is {w:.3f} with WM and {s:.3f} "
        f"with STE ({ev.protocol} protocol): claim 6 (WM does better) {_held(held)}.",
    )


def _judge_width(ev: Evidence) -> Verdict | None:
    ws = ev.res.get("width_sweep") if ev.first else None
    if not ws or len(ws) < 2:
        return None
    ws = sorted(ws, key=lambda x: x["width_mult"])
    b = [dig(x, "methods", "weight", "barrier", ev.split, "loss_barrier", "mean") for x in ws]
    if any(v is None for v in b):
        return None
    held = b[-1] < b[0]
    return Verdict(
        held,
        {"widths": [x["width_mult"] for x in ws], "wm_barrier": b},
        f"The WM barrier went from {b[0]:.3f} at width x{ws[0]['width_mult']:g} to {b[-1]:.3f} at "
        f"x{ws[-1]['width_mult']:g}: wider models {'were' if held else 'were not'} more "
        "linearly connected after WM.",
    )


#: the claims in report order: statements as in docs/definitions.md, criteria as lmckit reads them
CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "1",
            "WM gives LMC without closing the distance",
            "Weight matching gives linear mode connectivity (a loss barrier near 0 for wide enough models) while "
            "reducing the L2 distance between the models by only about 6-20%: distance reduction is not why LMC "
            "holds.",
            "interpolation",
            "WM loss barrier <= 0.2 x naive barrier and L2 distance reduction <= 30%",
            _judge_1,
        ),
        Claim(
            "2",
            "A Taylor argument does not explain LMC",
            "The second-order Taylor estimate of the midpoint barrier, -(1/8) Delta^T H Delta with "
            "Delta = theta_a - pi(theta_b) and H the loss Hessian at the midpoint, differs clearly from the "
            "measured barrier: the models are not close enough for a local argument to explain LMC.",
            "table",
            "|Taylor estimate - measured midpoint barrier| > 50% of the measured one (after WM)",
            _judge_2,
        ),
        Claim(
            "3",
            "WM aligns the dominant singular vectors",
            "Singular values of corresponding layers are nearly equal across seeds, and WM raises the alignment "
            "score R much more at gamma = 0.3 than at gamma = 0: it aligns the dominant singular vectors.",
            "R_bars",
            'WM\'s rise of R at gamma={g1} is at least twice its rise at gamma={g0} ("much more"), and the top '
            "10% singular values of corresponding layers differ by < 10% on average",
            _judge_3,
        ),
        Claim(
            "4",
            "The dominant directions carry the function",
            "Layer inputs concentrate on the top right-singular vectors, and keeping only the dominant singular "
            "directions of each hidden layer keeps most of the accuracy.",
            "projections",
            "inputs project > 2x more on the top 10% right-singular vectors than on the bottom half, "
            "and keeping <= 25% of the hidden-layer rank keeps >= 90% of the accuracy",
            _judge_4,
        ),
        Claim(
            "5a",
            "AM behaves like WM",
            "Activation matching behaves like weight matching on R and on the distance.",
            "R_bars",
            "|R_AM - R_WM| <= 50% of R_WM at gamma={g}",
            _judge_5a,
        ),
        Claim(
            "5b",
            "STE reaches LMC with R near 0",
            "The straight-through estimator reaches LMC between two models but leaves R near 0.",
            "R_bars",
            "STE ({proto} protocol) loss barrier <= 0.2 x naive and R_STE({g}) <= 0.5 x R_WM({g})",
            _judge_5b,
        ),
        Claim(
            "6",
            "WM merges three models better than STE",
            "With three models matched to one anchor, the barrier between pi_b(theta_b) and pi_c(theta_c) is "
            "smaller with WM, which aligns every model to the same dominant directions, than with STE.",
            "three_models",
            "barrier between the two anchor-matched models: WM < STE ({proto} protocol)",
            _judge_6,
        ),
        Claim(
            "width",
            "Wider models are more linearly connected",
            "Claim 1's 'for wide enough models': after WM the barrier falls as the width grows.",
            "width_sweep",
            "WM barrier at the largest width < at the smallest",
            _judge_width,
        ),
    )
}

_TABLE1 = "Ito et al., Table 1 (as quoted by secondary sources; docs/definitions.md, 'Published values')"
_R_SRC = "Ito et al., reported for VGG-11 and ResNet-20 on CIFAR-10 (docs/definitions.md, 'Published values')"
#: (dataset, model name prefix) -> WM distance reduction published for that setting
_REDUCTION = {
    ("fashion-mnist", "mlp"): 0.179,
    ("mnist", "mlp"): 0.203,
    ("cifar10", "vgg"): 0.066,
    ("cifar10", "resnet"): 0.070,
}


def paper_value(claim: str, dataset: str, model: str) -> dict[str, Any] | None:
    """The published number (or qualitative finding) for ``claim`` in this setting, with its source; else None.

    Returns ``{"text": ..., "source": ...}`` and, when numeric, ``"value"`` (a fraction) and ``"quantity"``.
    """
    if claim == "1":
        for (ds, prefix), v in _REDUCTION.items():
            if dataset == ds and model.startswith(prefix):
                return {
                    "quantity": "WM L2 distance reduction",
                    "value": v,
                    "text": f"WM distance reduction {100 * v:.1f}% ({model.split()[0]}, {dataset})",
                    "source": _TABLE1,
                }
        return {"text": "WM distance reduction 6.6-20.3% across VGG-11, ResNet-20 and MLPs", "source": _TABLE1}
    if claim == "3":
        return {
            "quantity": "R(0.3) after WM",
            "value": 0.2,
            "text": "R(0.3) about 0.2 after WM, near 0 before (VGG-11, ResNet-20; no MLP value given)",
            "source": _R_SRC,
        }
    if claim == "5b":
        return {
            "text": "STE's R stays near 0 while its two-model barrier is low (qualitative)",
            "source": "Ito et al., Section on other permutation search methods (docs/definitions.md)",
        }
    if claim == "6":
        return {
            "text": "three-model barrier smaller with WM than with STE (a reviewer called the difference small)",
            "source": "Ito et al. and its ICLR 2025 review (docs/definitions.md)",
        }
    return None
