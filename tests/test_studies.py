"""The studies beyond the paper (issue 12) end to end on the tiny recipe, their invariants, and the library parts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.pipeline.recipe import load_recipe, recipe_names
from lmckit.pipeline.stages import read_output
from lmckit.reproduce import reproduce

STUDY_SETS = [
    "studies.directions.enabled=true",
    "studies.directions.gammas=[0.3, 0.0]",
    "studies.alignment_dose.enabled=true",
    "studies.alignment_dose.fractions=[0.0, 0.5, 1.0]",
    "studies.alignment_dose.draws=2",
    "studies.weight_decay.enabled=true",
    "studies.weight_decay.values=[0.0, 0.01]",
    "studies.many_models.enabled=true",
    "studies.many_models.counts=[2, 3]",
    "studies.ste_protocols.enabled=true",
    "studies.ste_protocols.pairs=1",
    "studies.ste_protocols.epochs=[1, 2, 1]",
    "studies.ste_protocols.train_limit=400",
    "match.ste.train_limit=400",
    "three_models.enabled=false",
    "width_sweep.enabled=false",
    "analysis.taylor=false",
    "analysis.projections=false",
    "analysis.rank=false",
    "analysis.spectra=false",
]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    res = reproduce("tiny", out=root / "report", cache=root / "cache", sets=STUDY_SETS)
    return root, res


def _finite(obj, where="studies"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def test_every_study_reports_finite_numbers_a_figure_and_a_verdict(studies):
    root, res = studies
    st = json.loads((root / "report" / "results.json").read_text())["studies"]
    assert set(st) == {"directions", "alignment_dose", "weight_decay", "many_models", "ste_protocols"}
    _finite(st)
    for fig in ("study_directions", "study_dose", "study_weight_decay", "study_many_models", "study_protocols"):
        assert (root / "report" / f"{fig}.png").stat().st_size > 1000
    md = (root / "report" / "report.md").read_text()
    ids = {c["id"] for c in res.results["claims"]}
    for cid in (
        "study-directions",
        "study-dose",
        "study-weight-decay",
        "study-many-models",
        "5b [git-re-basin]",
        "6 [random-mixing]",
        "5b [heldout-best]",
    ):
        assert cid in ids
    for c in res.results["claims"]:
        assert c["criterion"] and c["text"] in md
    assert "## Studies beyond the paper" in md and "17.9%" in md  # the published WM reduction beside lmckit's
    assert "STE protocol: **heldout-best** (1 epoch(s)" in md
    five_b = next(c for c in res.results["claims"] if c["id"] == "5b")
    assert "heldout-best protocol" in five_b["text"] and "heldout-best protocol" in five_b["criterion"]


def test_weight_decay_rows_trained_with_adamw(studies):
    root, res = studies
    rows = {r["weight_decay"]: r for r in res.results["studies"]["weight_decay"]["rows"]}
    assert set(rows) == {0.0, 0.01}
    steps = read_output(root / "cache", res.plan.studies.weight_decay[1]["spectra"][0])["steps"]
    assert rows[0.0]["decay_factor"] == 1.0
    assert rows[0.01]["decay_factor"] == pytest.approx((1 - 1e-2 * 1e-2) ** steps)  # tiny preset: lr 1e-2
    for w in res.plan.studies.weight_decay:
        cfg = w["experiment"].trains[0].train_config()
        assert (cfg.optimizer, cfg.weight_decay) == ("adamw", w["value"])


def test_directions_invariant_top_at_gamma_0_is_full_wm(studies):
    _, res = studies
    V = res.results["studies"]["directions"]["variants"]
    top0, wm = V["top@0"], V["wm"]
    assert top0["changed_vs_wm"]["mean"] == 0.0  # the same permutation as plain WM
    assert top0["loss_barrier"]["mean"] == pytest.approx(wm["loss_barrier"]["mean"], abs=1e-9)
    assert top0["kept_fraction"]["mean"] == 1.0
    assert V["top@0.3"]["kept_fraction"]["mean"] < 1.0
    assert V["naive"]["reduction"]["mean"] == 0.0


def test_dose_invariants(studies):
    root, res = studies
    d = res.results["studies"]["alignment_dose"]
    wm_bar = next(b for (p, m, s), b in res.plan.experiments[0].barriers.items() if m == "weight")
    wm_test = read_output(root / "cache", wm_bar)["loss_barrier"]["test"]
    f0 = [p for p in d["points"] if p["fraction"] == 0.0]
    f1 = [p for p in d["points"] if p["fraction"] == 1.0]
    for p in f0:  # f = 0 is WM: the same barrier as WM's own barrier stage, nothing changed
        assert p["loss_barrier"] == pytest.approx(wm_test, abs=1e-9) and p["changed_vs_wm"] == 0.0
    naive_r = res.results["studies"]["directions"]["variants"]["naive"]["R03"]["mean"]
    wm_r = res.results["studies"]["directions"]["variants"]["wm"]["R03"]["mean"]
    for p in f1:  # f = 1 is a random permutation: R(0.3) near the naive (un-permuted) value, far below WM's
        assert abs(p["R03"] - naive_r) < 0.5 * abs(wm_r - naive_r) + 0.05
        assert p["changed_vs_wm"] > 0.5
    assert -1.0 <= d["spearman_barrier_R03"] <= 1.0


def test_protocols_ran_with_their_settings(studies):
    root, res = studies
    sp = res.plan.studies
    for proto in ("heldout-best", "git-re-basin", "random-mixing"):
        mt = sp.protocols[proto]["pairs"][0]["match"]
        out = read_output(root / "cache", mt)
        assert out["protocol"] == proto
        opt = dict(mt.options)
        assert opt.get("protocol", "heldout-best") == proto
    grb = dict(sp.protocols["git-re-basin"]["pairs"][0]["match"].options)
    assert (grb["lr"], grb["batch_size"], grb["epochs"]) == (1e-2, 1000, 2)
    rows = res.results["studies"]["many_models"]["methods"]
    assert set(rows) == {"weight", "activation", "ste", "merge_many"}
    assert [r["n"] for r in rows["weight"]] == [2, 3] and rows["weight"][0]["R_non_anchor"] is None


def test_rerun_is_cached(studies):
    root, _ = studies
    res = reproduce("tiny", out=root / "report2", cache=root / "cache", sets=STUDY_SETS)
    assert not res.summary.ran


def test_default_protocol_keeps_old_ste_hashes():
    from lmckit.pipeline.build import _match_options

    r = load_recipe("quick")
    assert "protocol" not in dict(_match_options(r, "ste"))
    r2 = load_recipe("quick", ["match.ste.protocol=random-mixing"])
    assert dict(_match_options(r2, "ste"))["protocol"] == "random-mixing"


def test_study_recipes_ship_and_validate():
    for n in ("studies", "directions", "alignment-dose", "weight-decay", "many-models", "ste-protocols"):
        assert n in recipe_names()
        load_recipe(n)
    # in the studies recipe the many-models STE (match.ste) and the heldout-best protocol share their match stages
    from lmckit.pipeline.build import build_plan

    sp = build_plan(load_recipe("studies")).studies
    assert sp.many["ste"].matches[1] == sp.protocols["heldout-best"]["pairs"][0]["match"]
    assert sp.many["ste"].matches[2] == sp.protocols["heldout-best"]["three"].matches[2]
    with pytest.raises(LmcError, match="one epoch count per protocol"):
        load_recipe("ste-protocols", ["studies.ste_protocols.epochs=[1]"])
    with pytest.raises(LmcError, match="needs 7 train.seeds"):
        load_recipe("many-models", ["studies.many_models.counts=[2, 7]"])
    with pytest.raises(LmcError, match="did you mean"):
        load_recipe("quick", ["match.ste.protocol=git-rebasin"])


def test_reassign_fraction_extremes_and_counts():
    from lmckit.studies import reassign_fraction

    perms = {"a": torch.arange(100), "b": torch.randperm(40, generator=torch.Generator().manual_seed(0))}
    g = torch.Generator().manual_seed(1)
    same = reassign_fraction(perms, 0.0, g)
    assert all(torch.equal(same[k], perms[k]) for k in perms)
    half = reassign_fraction(perms, 0.5, torch.Generator().manual_seed(2))
    for k, p in half.items():
        assert sorted(p.tolist()) == sorted(perms[k].tolist())  # still a permutation
        assert int((p != perms[k]).sum()) <= round(0.5 * p.numel())
    full = reassign_fraction(perms, 1.0, torch.Generator().manual_seed(3))
    assert int((full["a"] != perms["a"]).sum()) > 80
    with pytest.raises(LmcError):
        reassign_fraction(perms, 1.5, g)


def test_split_directions_sum_to_the_weights_and_concentration(synthetic):
    from lmckit.models import create_model
    from lmckit.perm import spec_for
    from lmckit.studies import spectrum_concentration, split_directions

    model = create_model("mlp_tiny", in_channels=1, image_size=28, num_classes=10)
    sd = model.state_dict()
    spec = spec_for(model)
    top, tail, kept = split_directions(spec, sd, 0.3)
    for k, v in sd.items():
        assert torch.allclose(top[k] + tail[k], v, atol=1e-5) if k.endswith("weight") else torch.equal(top[k], v)
    w = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))  # hand computed: sigma >= 0.3 * 4 keeps 4 and 2
    from lmckit.analysis.svd import kept_count, layer_svd

    assert kept_count(layer_svd(w)[1], 0.3) == 2
    c = spectrum_concentration(spec, sd, 0.0)
    assert c["total"] == 1.0 and all(0 < v <= 1 for v in spectrum_concentration(spec, sd, 0.3)["per_layer"].values())
    assert any(v["kept"] < v["rank"] for v in kept.values())


def test_match_cli_ste_protocol(tmp_path, synthetic):
    from lmckit.cli import main

    ckpts = []
    for s in (0, 1):
        rc = main(["train", "--preset", "tiny", "--seed", str(s), "--out", str(tmp_path / "runs"), "--json"])
        assert rc == 0
    runs = sorted(p for p in (tmp_path / "runs").rglob("config.json"))
    ckpts = [str(p.parent) for p in runs][:2]
    out = tmp_path / "p.json"
    rc = main(
        [
            "match",
            *ckpts,
            "--method",
            "ste",
            "--ste-protocol",
            "random-mixing",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    raw = json.loads(out.read_text())
    assert raw["ste_protocol"] == "random-mixing" and raw["ste_preset"] == "adam"


def _v(x):
    return {"mean": x, "std": 0.0, "n": 1, "values": [x]}


def test_verdicts_follow_the_numbers():
    from lmckit.report.studies import study_claims

    def directions(top, tail):
        V = {
            "naive": {"loss_barrier": _v(1.0)},
            "wm": {"loss_barrier": _v(0.1)},
            "top@0.3": {"loss_barrier": _v(top)},
            "tail@0.3": {"loss_barrier": _v(tail)},
        }
        return study_claims({"studies": {"directions": {"gammas": [0.3], "variants": V}}})[0]

    c = directions(0.2, 0.9)  # threshold 0.1 + 0.25 * 0.9 = 0.325
    assert c["held"] and "dominant directions carry LMC" in c["text"] and "0.325" in c["criterion"]
    c = directions(0.9, 0.2)
    assert not c["held"] and "trailing directions" in c["text"]
    assert "neither" in directions(0.5, 0.5)["text"] and "either part" in directions(0.2, 0.2)["text"]

    def dose(rr, rl):
        return study_claims(
            {"studies": {"alignment_dose": {"points": [], "spearman_barrier_R03": rr, "spearman_barrier_l2": rl}}}
        )[0]

    assert dose(-0.9, 0.5)["held"] and "R(0.3) predicts" in dose(-0.9, 0.5)["text"]
    assert not dose(-0.3, 0.8)["held"] and "L2 distance predicts" in dose(-0.3, 0.8)["text"]
    assert "equally well" in dose(-1.0, 1.0)["text"]

    def wd(conc, bars):
        rows = [
            {"weight_decay": float(i), "concentration": c, "wm_barrier": b, "gamma": 0.3, "R03": 0.2}
            for i, (c, b) in enumerate(zip(conc, bars))
        ]
        return study_claims({"studies": {"weight_decay": {"rows": rows}}})[0]

    assert wd([0.1, 0.2, 0.3], [0.5, 0.3, 0.1])["held"]
    assert not wd([0.1, 0.2, 0.3], [0.1, 0.3, 0.5])["held"]
    flat = wd([0.2, 0.2], [0.1, 0.1])
    assert not flat["held"] and "no monotone relation" in flat["text"]
