"""The report's ``paper`` section (issue 30): claims per model entry and STE protocol, judged on per-pair margins.

The results tree here is written by hand, so every margin, interval and verdict is checked against a hand
computation; the recipe key that switches the section on stays out of every other report's results.json.
"""

from __future__ import annotations

import math

import pytest

from lmckit.pipeline.recipe import load_recipe, parse_recipe, recipe_to_dict
from lmckit.report.paper import collect_paper, write_paper
from lmckit.report.results import stats


def _s(vals):
    return stats(vals, "model pairs")


def _experiment(label, naive, wm, red, ste, r_w0, r_w3, r_b0, r_b3, r_a3, r_s3, tay=None):
    methods = {
        "naive": {"barrier": {"test": {"loss_barrier": _s(naive)}}},
        "weight": {
            "barrier": {"test": {"loss_barrier": _s(wm)}},
            "distance": {"reduction": _s(red)},
            "R": {"0": {"after": _s(r_w0), "before": _s(r_b0)}, "0.3": {"after": _s(r_w3), "before": _s(r_b3)}},
        },
        "activation": {"R": {"0.3": {"after": _s(r_a3)}}},
        "ste": {"barrier": {"test": {"loss_barrier": _s(ste)}}, "R": {"0.3": {"after": _s(r_s3)}}},
    }
    if tay:
        methods["weight"]["taylor"] = {"taylor_midpoint": _s(tay[0]), "measured_midpoint": _s(tay[1])}
    return {"label": label, "pairs": [[0, 1], [2, 3], [4, 5]], "methods": methods}


def _res():
    e0 = _experiment(
        "authors",
        naive=[1.0, 2.0, 3.0],
        wm=[0.1, 0.2, 0.9],  # margins wm - 0.2 naive: -0.1, -0.2, 0.3 -> mean 0
        red=[0.15, 0.18, 0.21],
        ste=[0.05, 0.05, 0.05],
        r_w0=[0.10, 0.10, 0.10],
        r_w3=[0.40, 0.40, 0.40],
        r_b0=[0.05, 0.05, 0.05],
        r_b3=[0.0, 0.0, 0.0],
        r_a3=[0.30, 0.30, 0.70],
        r_s3=[0.10, 0.10, 0.10],
        tay=([0.01, 0.02, 0.03], [0.10, 0.10, 0.10]),
    )
    many = {
        "weight": [
            {"n": 2, "merged_loss": 0.5, "merged_accuracy": 0.8, "pair_barriers": [0.1], "mean_pair_barrier": 0.1},
            {
                "n": 4,
                "merged_loss": 0.9,
                "merged_accuracy": 0.7,
                # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): non-anchor ones are the last three
                "pair_barriers": [0.1, 0.1, 0.1, 0.2, 0.3, 0.4],
                "mean_pair_barrier": 0.2,
            },
        ],
        "ste[random-mixing]": [
            {"n": 2, "merged_loss": 0.4, "merged_accuracy": 0.8, "pair_barriers": [0.05], "mean_pair_barrier": 0.05},
            {
                "n": 4,
                "merged_loss": 1.2,
                "merged_accuracy": 0.6,
                "pair_barriers": [0.05, 0.05, 0.05, 0.3, 0.5, 0.7],
                "mean_pair_barrier": 0.275,
            },
        ],
    }
    prot = {
        "naive": {"pairs": [{"loss_barrier": 1.0}, {"loss_barrier": 1.0}, {"loss_barrier": 1.0}]},
        "wm": {"pairs": [{"loss_barrier": 0.1, "R03": 0.4}] * 3},
        "random-mixing": {"epochs": 1, "pairs": [{"loss_barrier": 0.3, "R03": 0.1}] * 3},
    }
    return {
        "recipe": {"match": {"ste": {"protocol": "heldout-best"}}},
        "experiments": [e0],
        "claims": [],
        "studies": {"many_models": {"methods": many}, "ste_protocols": prot},
    }


def _claim(p, cid, setting_part=""):
    out = [c for c in p["claims"] if c["claim"] == cid and setting_part in c["setting"]]
    assert len(out) == 1, (cid, setting_part, [c["setting"] for c in p["claims"]])
    return out[0]


def test_margins_intervals_and_verdicts_match_hand_computation():
    p = collect_paper(_res())
    c1 = _claim(p, "1")
    m = c1["conditions"][0]["margin"]
    assert m["values"] == pytest.approx([-0.1, -0.2, 0.3]) and m["mean"] == pytest.approx(0.0, abs=1e-12)
    assert c1["conditions"][0]["held"]  # mean 0 <= 0: the criterion's '<=' holds at equality
    assert c1["conditions"][0]["decided"] == "within noise"  # the interval spans 0
    red = c1["conditions"][1]["margin"]
    assert red["mean"] == pytest.approx(0.18 - 0.3)
    lo, hi = red["ci95"]
    half = 4.302652729911275 * 0.03 / math.sqrt(3)  # t_{0.975, 2} x sample std / sqrt(n)
    assert (lo, hi) == pytest.approx((-0.12 - half, -0.12 + half))
    assert c1["conditions"][1]["decided"] == "held" and c1["held"]
    # claim 2: |T - M| - 0.5 |M| = 0.09 - 0.05, 0.08 - 0.05, 0.07 - 0.05
    c2 = _claim(p, "2")
    assert c2["conditions"][0]["margin"]["values"] == pytest.approx([0.04, 0.03, 0.02]) and c2["held"]
    # claim 3: rise(0.3) - 2 rise(0) = 0.4 - 2 x 0.05 = 0.3 on every pair: n = 3, std 0, decided
    c3 = _claim(p, "3")
    assert c3["conditions"][0]["margin"]["values"] == pytest.approx([0.3] * 3)
    assert c3["conditions"][0]["decided"] == "held"
    # claim 5a: |0.3 - 0.4| - 0.2 = -0.1, -0.1; |0.7 - 0.4| - 0.2 = 0.1 -> mean -1/30: held, within noise
    c5a = _claim(p, "5a")
    assert c5a["conditions"][0]["margin"]["mean"] == pytest.approx(-0.1 / 3) and c5a["held"]
    # claim 5b of the main experiment: 0.05 - 0.2 naive < 0 on every pair; R 0.1 - 0.2 < 0: held
    assert _claim(p, "5b", "main experiment")["held"]
    # claim 5b of the random-mixing protocol: barrier 0.3 - 0.2 = 0.1 > 0 on every pair: failed
    rm = _claim(p, "5b", "random-mixing")
    assert not rm["held"] and rm["conditions"][0]["margin"]["mean"] == pytest.approx(0.1)
    assert rm["conditions"][1]["held"]  # its R condition held (0.1 <= 0.2)


def test_claim_6_both_ways_on_non_anchor_pairs_and_the_merge():
    p = collect_paper(_res())
    c6 = _claim(p, "6", "random-mixing")
    # non-anchor pairs (1,2) (1,3) (2,3): STE - WM = 0.1, 0.2, 0.3 > 0: WM better, held
    assert c6["conditions"][0]["margin"]["values"] == pytest.approx([0.1, 0.2, 0.3]) and c6["held"]
    merge = _claim(p, "6-merge", "random-mixing")
    assert merge["conditions"][0]["margin"]["mean"] == pytest.approx(0.3) and merge["held"]
    assert "N = 4 of [2, 4]" in merge["note"]  # at N = 2 STE's merge had the lower loss
    t = p["many_models"]
    assert "non_anchor_pair_barrier" not in t["weight"][0]
    assert t["weight"][1]["non_anchor_pair_barrier"]["mean"] == pytest.approx(0.3)
    md = "\n".join(write_paper({"paper": p}))
    assert "| 6 | authors, ste random-mixing, N = 4 | **held** |" in md


def test_reduction_beside_the_paper_and_the_markdown():
    p = collect_paper(_res())
    assert p["reduction"][0]["reduction"]["mean"] == pytest.approx(0.18) and p["reduction"][0]["paper"] == 0.179
    md = "\n".join(write_paper({"paper": p}))
    assert "| authors | 18.0% ± 3.0% [" in md and "| 17.9% |" in md
    assert write_paper({}) == []


def test_paper_key_is_off_by_default_and_absent_from_other_results():
    for name in ("tiny", "quick"):
        d = recipe_to_dict(load_recipe(name))
        assert "paper" not in d and "ste_protocols" not in d["studies"]["many_models"]
    r = load_recipe("paper")
    assert r.paper.enabled and recipe_to_dict(r)["paper"] == {"enabled": True}


def test_many_models_protocols_must_be_run_by_the_protocols_study():
    from lmckit.errors import LmcError

    raw = {
        "train": {"seeds": [0, 1, 2, 3]},
        "three_models": {"enabled": False},
        "studies": {"many_models": {"enabled": True, "counts": [2, 3], "ste_protocols": ["random-mixing"]}},
    }
    with pytest.raises(LmcError, match="studies.many_models.ste_protocols names random-mixing"):
        parse_recipe(raw)


def test_paper_recipe_plan_trains_the_authors_recipe_and_the_held_out_choice():
    from lmckit.errors import LmcError
    from lmckit.pipeline.build import build_plan

    plan = build_plan(load_recipe("paper"))
    a, h = plan.experiments
    assert a.pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)] and h.pairs == [(0, 1), (2, 3), (4, 5)]
    assert sorted(h.trains) == [0, 1, 2, 3, 4, 5]
    ca, ch = a.trains[0].train_config(), h.trains[0].train_config()
    assert (ca.preprocess, ca.keep_epoch, ca.val_size) == ("scale01", "best-test", 0)
    assert (ch.preprocess, ch.keep_epoch, ch.val_size) == ("scale01", "best-val", 5000)
    # the authors' MLP recipe (e5-a/STE-MM scripts/run_train.sh, case mlp)
    assert (ca.optimizer, ca.lr, ca.batch_size, ca.epochs, ca.weight_decay, ca.schedule) == (
        "adam",
        1e-3,
        500,
        5,
        0.0,
        "constant",
    )
    assert max(plan.studies.many["weight"].counts) >= 6
    assert {"ste[ste-mm-random]", "ste-mm", "c2m3", "pairwise", "merge_many"} <= set(plan.studies.many)
    assert {"ste-mm-random", "ste-mm-midpoint", "heldout-best"} <= set(plan.studies.protocols)
    raw = {"train": {"seeds": [0, 1]}, "models": [{"seeds": [0, 1]}], "three_models": {"enabled": False}}
    with pytest.raises(LmcError, match="models.0.seeds is set"):
        parse_recipe(raw)
