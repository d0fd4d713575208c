"""Report section of the studies beyond the paper (issue 12): results tree, verdicts, tables and figures.

:func:`collect_studies` reads the study stages of a finished plan
(:class:`lmckit.pipeline.studies.StudyPlan`) into ``results["studies"]``;
:func:`study_claims` turns each study's numbers into one sentence with its
criterion (appended to the report's claims, ``id`` ``study-*``);
:func:`write_studies` adds the markdown section and figures. Numbers the
literature published are printed beside lmckit's, labelled with their source
(docs/definitions.md, "Published values").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..pipeline.stages import stage_path
from ..store import read_json
from ..studies import spearman
from . import studies_figures as SF
from .experiment import _experiment
from .stats import stats

__all__ = ["collect_studies", "study_claims", "write_studies", "PUBLISHED"]

#: numbers the literature published, with their source (docs/definitions.md, "Published values")
PUBLISHED = {
    "wm_reduction_mlp_fmnist": (0.179, "Ito et al., Table 1 (MLP, Fashion-MNIST), as quoted in docs/definitions.md"),
    "wm_reduction_mlp_mnist": (0.203, "Ito et al., Table 1 (MLP, MNIST), as quoted in docs/definitions.md"),
    "prototype_ste_r03": ("0.19-0.22", "an unpublished pre-lmckit prototype run (Fashion-MNIST MLP, STE started at A)"),
    "prototype_wm_r03": (0.22, "an unpublished pre-lmckit prototype run"),
    "prototype_three_ste": (0.12, "an unpublished pre-lmckit prototype run (three-model pair barrier, STE)"),
    "prototype_three_wm": (0.14, "an unpublished pre-lmckit prototype run (three-model pair barrier, WM)"),
}

R03 = "0.3"
R0 = "0"


def _read(root: Path, spec) -> dict[str, Any]:
    return read_json(stage_path(root, spec) / "result.json", "stage result", expect=dict)


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0


# --------------------------------------------------------------------------- collect
def collect_studies(plan, root: str | Path) -> dict[str, Any]:
    """``results["studies"]``: one entry per enabled study (see each ``_collect_*``)."""
    root = Path(root)
    sp = plan.studies
    out: dict[str, Any] = {}
    if sp is None:
        return out
    if sp.directions:
        runs = [_read(root, s)["variants"] for s in sp.directions]
        gs = list(sp.directions[0].gammas)
        names = ["naive", "wm"] + [f"{part}@{g:g}" for part in ("top", "tail") for g in gs]
        names += [n for n in runs[0] if n not in names]
        out["directions"] = {
            "gammas": list(sp.directions[0].gammas),
            "pairs": len(runs),
            "variants": {
                n: {
                    "part": runs[0][n]["part"],
                    "gamma": runs[0][n]["gamma"],
                    **{
                        q: stats(r[n][q] for r in runs)
                        for q in ("loss_barrier", "accuracy_barrier", "reduction", "l2_after")
                    },
                    "R0": stats(r[n]["R"][R0] for r in runs),
                    "R03": stats(r[n]["R"][R03] for r in runs),
                    "changed_vs_wm": stats(r[n].get("changed_vs_wm") for r in runs),
                    "kept_fraction": stats(r[n].get("kept_fraction") for r in runs),
                }
                for n in names
            },
        }
    if sp.dose:
        pts = []
        for s in sp.dose:
            for p in _read(root, s)["points"]:
                pts.append(
                    {
                        "fraction": p["fraction"],
                        "draw": p["draw"],
                        "loss_barrier": p["loss_barrier"],
                        "R0": p["R"][R0],
                        "R03": p["R"][R03],
                        "l2_after": p["l2_after"],
                        "changed_vs_wm": p["changed_vs_wm"],
                    }
                )
        b = [p["loss_barrier"] for p in pts]
        out["alignment_dose"] = {
            "points": pts,
            "spearman_barrier_R03": spearman(b, [p["R03"] for p in pts]),
            "spearman_barrier_l2": spearman(b, [p["l2_after"] for p in pts]),
            "fractions": list(sp.dose[0].fractions),
            "draws": sp.dose[0].draws,
        }
    if sp.weight_decay:
        rows = []
        for w in sp.weight_decay:
            e = _experiment(root, w["experiment"], False)
            conc = [_read(root, s) for s in w["spectra"]]
            M = e["methods"]
            rows.append(
                {
                    "weight_decay": w["value"],
                    "models": e["models"],
                    "naive_barrier": M["naive"]["barrier"]["test"]["loss_barrier"]["mean"]
                    if "test" in M["naive"]["barrier"]
                    else next(iter(M["naive"]["barrier"].values()))["loss_barrier"]["mean"],
                    "wm_barrier": M["weight"]["barrier"]["test"]["loss_barrier"]["mean"]
                    if "test" in M["weight"]["barrier"]
                    else next(iter(M["weight"]["barrier"].values()))["loss_barrier"]["mean"],
                    "reduction": M["weight"]["distance"]["reduction"]["mean"],
                    "R0": M["weight"]["R"][R0]["after"]["mean"],
                    "R03": M["weight"]["R"][R03]["after"]["mean"],
                    "R03_before": M["weight"]["R"][R03]["before"]["mean"],
                    "concentration": _mean(c["total"] for c in conc),
                    "gamma": conc[0]["gamma"],
                    **({"decay_factor": conc[0]["decay_factor"]} if "decay_factor" in conc[0] else {}),
                    "test_accuracy": _mean(m["test_accuracy"] for m in e["models"]),
                }
            )
        out["weight_decay"] = {"rows": rows}
    if sp.many:
        out["many_models"] = {"methods": {m: _read(root, s)["rows"] for m, s in sp.many.items()}}
    if sp.protocols:
        prot: dict[str, Any] = {}
        for name, d in sp.protocols.items():
            rows = []
            for r in d["pairs"]:
                bar = _read(root, r["barrier"])
                sp_ = "test" if "test" in bar["loss_barrier"] else bar["splits"][0]
                row = {"pair": list(r["pair"]), "loss_barrier": bar["loss_barrier"][sp_]}
                if r["analysis"] is not None:
                    an = _read(root, r["analysis"])
                    row.update(R03=an["R"][R03]["after"], R0=an["R"][R0]["after"], reduction=an["reduction"])
                if r["match"] is not None and r["match"].method == "ste":
                    mt = _read(root, r["match"])
                    row["changed_vs_wm"] = mt.get("changed_vs_wm") or 0.0
                    row["seconds"] = float(
                        read_json(stage_path(root, r["match"]) / "timing.json", "stage timing", expect=dict)["seconds"]
                    )
                rows.append(row)
            entry: dict[str, Any] = {
                "epochs": d.get("epochs", 0),
                "pairs": rows,
                "loss_barrier": stats(x["loss_barrier"] for x in rows),
            }
            if "settings" in d:
                entry["settings"] = {k: v for k, v in d["settings"].items()}
            for q in ("R03", "R0", "reduction", "changed_vs_wm", "seconds"):
                if any(q in x for x in rows):
                    entry[q] = stats(x.get(q) for x in rows)
            if d.get("three") is not None:
                t = _read(root, d["three"])
                pb = t["pair_barrier"]
                entry["three_pair_barrier"] = pb["loss_barrier"][pb["splits"][0]]
            prot[name] = entry
        out["ste_protocols"] = prot
    return out


# --------------------------------------------------------------------------- verdicts
def _claim(cid: str, figure: str, held: bool, criterion: str, text: str, numbers: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "figure": figure, "held": bool(held), "criterion": criterion, "text": text, "numbers": numbers}


def study_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per study present in ``res["studies"]``, each computed from the numbers with its criterion."""
    st = res.get("studies") or {}
    out: list[dict[str, Any]] = []
    d = st.get("directions")
    if d:
        V = d["variants"]
        nb, wb = V["naive"]["loss_barrier"]["mean"], V["wm"]["loss_barrier"]["mean"]
        g = d["gammas"][0]
        tb, lb = V[f"top@{g:g}"]["loss_barrier"]["mean"], V[f"tail@{g:g}"]["loss_barrier"]["mean"]
        near = wb + 0.25 * max(nb - wb, 0.0)
        top_ok, tail_ok = tb <= near, lb <= near
        way = (
            "the dominant directions carry LMC"
            if top_ok and not tail_ok
            else "the trailing directions carry LMC"
            if tail_ok and not top_ok
            else "either part alone suffices"
            if top_ok
            else "neither part alone gives WM's LMC"
        )
        out.append(
            _claim(
                "study-directions",
                "study_directions",
                top_ok and not tail_ok,
                f"a part 'reaches about WM's barrier' when its barrier <= WM's + 25% of (naive - WM) "
                f"(gamma = {g:g}; threshold {near:.3f})",
                f"With WM computed on the top directions (sigma >= {g:g} sigma_max) the test-loss barrier is "
                f"{tb:.3f}, on the remainder {lb:.3f}, against full WM's {wb:.3f} and naive {nb:.3f}: {way}.",
                {"naive": nb, "wm": wb, "top": tb, "tail": lb, "gamma": g},
            )
        )
    a = st.get("alignment_dose")
    if a:
        rr, rl = a["spearman_barrier_R03"], a["spearman_barrier_l2"]
        better = (
            "R(0.3) and the L2 distance predict the barrier equally well"
            if abs(abs(rr) - abs(rl)) < 1e-9
            else f"{'R(0.3)' if abs(rr) > abs(rl) else 'the L2 distance'} predicts the barrier better"
        )
        out.append(
            _claim(
                "study-dose",
                "study_dose",
                abs(rr) > abs(rl),
                "the predictor with the larger |Spearman rho| with the barrier over all (f, draw) points "
                "predicts it better ('held' = R(0.3) does)",
                f"Over {len(a['points'])} partially re-assigned WM permutations the test-loss barrier has "
                f"Spearman rho {rr:+.3f} with R(0.3) and {rl:+.3f} with the L2 distance: {better}.",
                {"rho_R03": rr, "rho_l2": rl},
            )
        )
    w = st.get("weight_decay")
    if w and len(w["rows"]) >= 2:
        rows = sorted(w["rows"], key=lambda r: r["weight_decay"])
        conc = [r["concentration"] for r in rows]
        wmb = [r["wm_barrier"] for r in rows]
        if len(rows) >= 3:
            rho = spearman(conc, wmb)
        else:  # two points: the sign of the joint change (0 when either did not move)
            prod = (conc[-1] - conc[0]) * (wmb[-1] - wmb[0])
            rho = 1.0 if prod > 0 else -1.0 if prod < 0 else 0.0
        trend = (
            "more concentrated spectra went with lower barriers"
            if rho < 0
            else "more concentrated spectra went with higher barriers"
            if rho > 0
            else "no monotone relation between spectrum concentration and the WM barrier"
        )
        lo, hi = rows[0], rows[-1]
        out.append(
            _claim(
                "study-weight-decay",
                "study_weight_decay",
                rho < 0,
                "'held' when more concentrated spectra go with lower WM barriers (Spearman rho between "
                "spectrum concentration and WM barrier over the weight-decay values < 0)",
                f"From weight decay {lo['weight_decay']:g} to {hi['weight_decay']:g} the fraction of singular "
                f"values >= {lo['gamma']:g} sigma_max went {lo['concentration']:.3f} -> {hi['concentration']:.3f}, "
                f"the WM barrier {lo['wm_barrier']:.3f} -> {hi['wm_barrier']:.3f} and R(0.3) after WM "
                f"{lo['R03']:.3f} -> {hi['R03']:.3f}; Spearman rho(concentration, WM barrier) = {rho:+.2f}: "
                f"{trend}.",
                {"rho": rho, "concentration": conc, "wm_barrier": wmb},
            )
        )
    m = st.get("many_models")
    if m:
        M = m["methods"]
        if "weight" in M and "ste" in M:
            nmax = M["weight"][-1]["n"]
            wv, sv = M["weight"][-1]["mean_pair_barrier"], M["ste"][-1]["mean_pair_barrier"]
            proto = _protocol(res)
            out.append(
                _claim(
                    "study-many-models",
                    "study_many_models",
                    wv < sv,
                    f"mean pairwise barrier among the N = {nmax} matched models: WM < STE ({proto} protocol)",
                    f"With N = {nmax} models matched to one anchor the mean pairwise test-loss barrier is "
                    f"{wv:.3f} with WM and {sv:.3f} with STE ({proto} protocol); the uniform average reaches "
                    f"{M['weight'][-1]['merged_accuracy']:.3f} (WM) and {M['ste'][-1]['merged_accuracy']:.3f} "
                    f"(STE) accuracy: claim 6 extended to N = {nmax} {'held' if wv < sv else 'did not hold'}.",
                    {"wm": wv, "ste": sv, "n": nmax},
                )
            )
    p = st.get("ste_protocols")
    if p and "wm" in p:
        wm = p["wm"]
        nb = p.get("naive", {}).get("loss_barrier", {}).get("mean")
        for name, e in p.items():
            if name in ("wm", "naive"):
                continue
            sb, rs, rw = (
                e["loss_barrier"]["mean"],
                e.get("R03", {}).get("mean", 0.0),
                wm.get("R03", {}).get("mean", 0.0),
            )
            if nb is not None:
                lmc, low = sb <= 0.2 * nb, rs <= 0.5 * rw
                out.append(
                    _claim(
                        f"5b [{name}]",
                        "study_protocols",
                        lmc and low,
                        "STE loss barrier <= 0.2 x naive and R_STE(0.3) <= 0.5 x R_WM(0.3) (as claim 5b)",
                        f"STE ({name} protocol, {e['epochs']} epoch(s)): barrier {sb:.3f} (naive {nb:.3f}), "
                        f"R(0.3) {rs:.3f} against WM's {rw:.3f}, {e.get('changed_vs_wm', {}).get('mean', 0.0):.1%} "
                        f"of units reassigned vs WM: claim 5 (STE) {'held' if lmc and low else 'did not hold'}.",
                        {"ste_barrier": sb, "naive_barrier": nb, "R_ste": rs, "R_wm": rw},
                    )
                )
            if "three_pair_barrier" in e and "three_pair_barrier" in wm:
                w3, s3 = wm["three_pair_barrier"], e["three_pair_barrier"]
                out.append(
                    _claim(
                        f"6 [{name}]",
                        "study_protocols",
                        w3 < s3,
                        "barrier between the two anchor-matched models: WM < STE (as claim 6)",
                        f"Three models, STE ({name} protocol): pair barrier {s3:.3f} against WM's {w3:.3f}: "
                        f"claim 6 (WM does better) {'held' if w3 < s3 else 'did not hold'}.",
                        {"wm_pair_barrier": w3, "ste_pair_barrier": s3},
                    )
                )
    return out


def _protocol(res: dict[str, Any]) -> str:
    return (((res.get("recipe") or {}).get("match") or {}).get("ste") or {}).get("protocol", "heldout-best")


# --------------------------------------------------------------------------- report section
def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return out + ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]


def _verdict(res: dict[str, Any], cid: str) -> list[str]:
    return [
        f"**{'held' if c['held'] else 'did not hold'}**: {c['text']} _Criterion: {c['criterion']}._"
        for c in res.get("claims", [])
        if c["id"] == cid or c["id"].startswith(cid + " [")
    ]


def write_studies(res: dict[str, Any], fig: Callable[[str, str, str, Callable[[Path], Path]], None]) -> list[str]:
    """Markdown lines of the studies section; figures are registered through ``fig(name, title, caption, draw)``."""
    st = res.get("studies") or {}
    if not st:
        return []
    md = ["", "## Studies beyond the paper", ""]
    d = st.get("directions")
    if d:
        md += [
            "### Which directions carry LMC?",
            "",
            "WM computed on the top singular components of every weight matrix (sigma_i >= gamma sigma_max) or on "
            "the remainder, applied to the full model B (test split; mean over "
            f"{d['pairs']} pair(s)):",
            "",
        ]
        md += _table(
            [
                {
                    "variant": n,
                    "kept rank": f"{v['kept_fraction']['mean']:.1%}" if v["kept_fraction"]["n"] else "-",
                    "loss barrier": f"{v['loss_barrier']['mean']:.4f}",
                    "L2 reduction": f"{v['reduction']['mean']:.1%}",
                    "R(0)": f"{v['R0']['mean']:.3f}",
                    "R(0.3)": f"{v['R03']['mean']:.3f}",
                    "units differing from WM": f"{v['changed_vs_wm']['mean']:.1%}" if v["changed_vs_wm"]["n"] else "-",
                }
                for n, v in d["variants"].items()
            ]
        )
        pub, src = PUBLISHED["wm_reduction_mlp_fmnist"]
        md += [
            "",
            f"Published WM L2 reduction: {pub:.1%} ({src}); lmckit here: "
            f"{d['variants']['wm']['reduction']['mean']:.1%}.",
            "",
        ] + _verdict(res, "study-directions")
        fig(
            "study_directions.png",
            "Study: directions that carry LMC",
            " ".join(_verdict(res, "study-directions")),
            lambda p: SF.directions(d, p),
        )
    a = st.get("alignment_dose")
    if a:
        md += [
            "",
            "### How much alignment is needed?",
            "",
            f"A fraction f of every group's units re-assigned at random after WM ({a['draws']} draws per f; f = 0 is "
            "WM, f = 1 a random permutation):",
            "",
        ]
        by_f: dict[float, list] = {}
        for p in a["points"]:
            by_f.setdefault(p["fraction"], []).append(p)
        md += _table(
            [
                {
                    "f": f"{f:g}",
                    "loss barrier": f"{_mean(x['loss_barrier'] for x in ps):.4f}",
                    "R(0)": f"{_mean(x['R0'] for x in ps):.3f}",
                    "R(0.3)": f"{_mean(x['R03'] for x in ps):.3f}",
                    "L2 distance": f"{_mean(x['l2_after'] for x in ps):.2f}",
                    "units changed": f"{_mean(x['changed_vs_wm'] for x in ps):.1%}",
                }
                for f, ps in sorted(by_f.items())
            ]
        )
        md += [""] + _verdict(res, "study-dose")
        fig("study_dose.png", "Study: alignment dose", " ".join(_verdict(res, "study-dose")), lambda p: SF.dose(a, p))
    w = st.get("weight_decay")
    if w:
        md += [
            "",
            "### Weight decay",
            "",
            "Pairs trained with each weight decay (otherwise the recipe's settings):",
            "",
        ]
        md += _table(
            [
                {
                    "weight decay": f"{r['weight_decay']:g}",
                    "test acc": f"{r['test_accuracy']:.4f}",
                    "naive barrier": f"{r['naive_barrier']:.4f}",
                    "WM barrier": f"{r['wm_barrier']:.4f}",
                    "L2 reduction": f"{r['reduction']:.1%}",
                    "R(0)": f"{r['R0']:.3f}",
                    "R(0.3)": f"{r['R03']:.3f}",
                    f"sigma >= {r['gamma']:g} sigma_max": f"{r['concentration']:.3f}",
                    "decay alone shrinks weights to": f"{r['decay_factor']:.4f}" if "decay_factor" in r else "-",
                }
                for r in w["rows"]
            ]
        )
        md += [""] + _verdict(res, "study-weight-decay")
        fig(
            "study_weight_decay.png",
            "Study: weight decay",
            " ".join(_verdict(res, "study-weight-decay")),
            lambda p: SF.weight_decay(w, p),
        )
    m = st.get("many_models")
    if m:
        md += ["", "### Many models", "", "N models matched to one anchor (MergeMany: to each other); test split:", ""]
        rows = []
        for meth, rs in m["methods"].items():
            for r in rs:
                rows.append(
                    {
                        "method": meth,
                        "N": r["n"],
                        "avg acc": f"{r['merged_accuracy']:.4f}",
                        "mean pair barrier": f"{r['mean_pair_barrier']:.4f}",
                        "R(0.3) non-anchor": f"{r['R_non_anchor'][R03]:.3f}" if r.get("R_non_anchor") else "-",
                    }
                )
        md += _table(rows) + [""] + _verdict(res, "study-many-models")
        fig(
            "study_many_models.png",
            "Study: many models",
            " ".join(_verdict(res, "study-many-models"))
            or "Merged accuracy, mean pairwise barrier and R(0.3) against the number of models.",
            lambda p: SF.many_models(m, p),
        )
    p = st.get("ste_protocols")
    if p:
        md += [
            "",
            "### STE protocols",
            "",
            "Each STE protocol on the same pairs (heldout-best: keep-best on a held-out set with identity and WM "
            "as candidates, Adam; git-re-basin: lowest minibatch midpoint loss seen, SGD 1e-2 momentum 0.9, batch "
            "1000; random-mixing: loss at lambda ~ U(0,1), final permutation, Adam 1e-3 batch 256). Three-model: "
            "barrier between the two models matched to the first seed.",
            "",
        ]
        md += _table(
            [
                {
                    "protocol": n,
                    "epochs": e.get("epochs", "-") or "-",
                    "loss barrier": f"{e['loss_barrier']['mean']:.4f} ± {e['loss_barrier']['std']:.4f}",
                    "R(0.3)": f"{e['R03']['mean']:.3f}" if "R03" in e else "-",
                    "units reassigned vs WM": f"{e['changed_vs_wm']['mean']:.1%}" if "changed_vs_wm" in e else "-",
                    "three-model pair barrier": f"{e['three_pair_barrier']:.4f}" if "three_pair_barrier" in e else "-",
                    "STE seconds/run": f"{e['seconds']['mean']:.0f}" if "seconds" in e else "-",
                }
                for n, e in p.items()
            ]
        )
        md += [
            "",
            f"Published for comparison: STE R(0.3) {PUBLISHED['prototype_ste_r03'][0]} vs WM "
            f"{PUBLISHED['prototype_wm_r03'][0]}, three-model pair barrier STE "
            f"{PUBLISHED['prototype_three_ste'][0]} vs "
            f"WM {PUBLISHED['prototype_three_wm'][0]} ({PUBLISHED['prototype_ste_r03'][1]}); the paper reports STE's R "
            "near 0 with a low two-model barrier, and a smaller three-model barrier with WM (no MLP numbers).",
            "",
        ]
        for c in res.get("claims", []):
            if c["figure"] == "study_protocols":
                md.append(
                    f"- **{'held' if c['held'] else 'did not hold'}** (claim {c['id']}): {c['text']} "
                    f"_Criterion: {c['criterion']}._"
                )
        fig(
            "study_protocols.png",
            "Study: STE protocols",
            "Barrier, R(0.3), units reassigned vs WM and the three-model "
            "pair barrier per STE protocol, WM and naive beside them.",
            lambda p_: SF.protocols(p, p_),
        )
    return md
