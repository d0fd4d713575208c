"""Issue 12 part 1: the recipes ``vit-fmnist`` and ``lstm-fmnist`` end to end on tiny models, and their layer kinds.

The tiny variants are the shipped recipes with ``--set`` overrides only (synthetic data, a ViT of
width 8 / an LSTM of 2 x 6 units, toy evaluation sizes), so every stage the real recipes plan runs.
"""

from __future__ import annotations

import json
import math

import pytest

from lmckit.pipeline.recipe import load_recipe
from lmckit.report.architectures import kind_of_row, layer_kind, layer_label, r_by_kind
from lmckit.report.results import _with_split_matrices
from lmckit.reproduce import reproduce

TINY = [
    "data.dataset=synthetic",
    "train.preset=tiny",
    "train.overrides.epochs=1",
    "match.searches=2",
    "match.max_iter=10",
    "match.am_samples=200",
    "match.ste.epochs=1",
    "match.ste.train_limit=200",
    "barrier.lambdas=3",
    "barrier.limit=200",
    "analysis.taylor_samples=100",
    "analysis.projection_samples=100",
    "analysis.eval_limit=200",
    "three_models.grid=3",
]
VIT = TINY + ["models.0.options={width = 8, depth = 1, heads = 2}", "width_sweep.widths=[1.0, 2.0]"]
LSTM = TINY + ["models.0.options={width = 6, depth = 2}", "train.seeds=[0, 1, 2]"]


def _run(tmp_path_factory, recipe: str, sets: list[str]):
    root = tmp_path_factory.mktemp(recipe)
    res = reproduce(recipe, out=root / "report", cache=root / "cache", sets=sets)
    return root, res, json.loads((root / "report" / "results.json").read_text())


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _run(tmp_path_factory, "vit-fmnist", VIT)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    return _run(tmp_path_factory, "lstm-fmnist", LSTM)


def _finite(obj, where="results"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def _check_invariants(res: dict) -> None:
    _finite(res)
    e = res["experiments"][0]
    m = e["methods"]
    assert set(m) == {"naive", "weight", "activation", "ste"}
    for sp in ("train", "test"):
        ends = {k: (v["curves"][sp]["loss_mean"][0], v["curves"][sp]["loss_mean"][-1]) for k, v in m.items()}
        # every method interpolates from the same model A to a permutation of the same model B:
        # a permutation does not change the function, so both ends agree across methods
        for k, (a, b) in ends.items():
            assert a == pytest.approx(ends["naive"][0], rel=1e-5, abs=1e-6), (sp, k)
            assert b == pytest.approx(ends["naive"][1], rel=1e-4, abs=1e-5), (sp, k)
        for v in m.values():
            assert v["barrier"][sp]["loss_barrier"]["mean"] >= -1e-6  # max over the path minus the ends' line
    # naive is the identity permutation: R and the distance do not move
    for g, r in m["naive"]["R"].items():
        assert r["after"]["mean"] == pytest.approx(r["before"]["mean"], abs=1e-9), g
    assert m["naive"]["distance"]["reduction"]["mean"] == pytest.approx(0.0, abs=1e-9)
    for k in ("weight", "activation", "ste"):
        assert m[k]["distance"]["l2_before"]["mean"] == pytest.approx(m["naive"]["distance"]["l2_before"]["mean"])
    # every matrix R was measured on has a row of its own in the per-layer tables
    for t in e["layers"]:
        rows = {r["layer"]: r for r in t["rows"]}
        assert set(e["R_per_layer"]) <= set(rows)
        for name, r in rows.items():
            assert r.get("kind", "") == layer_kind(name)
    # R by kind is the plain mean of the per-layer rows
    byk = res["architectures"][0]["R_by_kind"]
    for k in byk:
        kind = k["kind"]
        vals = [
            r["R"]["0.3"]["after"]
            for t in e["layers"]
            if t["method"] == "weight"
            for r in t["rows"]
            if "R" in r and kind_of_row(r["layer"]) == kind
        ]
        assert k["R"]["0.3"]["weight"] == pytest.approx(sum(vals) / len(vals))
    ids = {c["id"] for c in res["claims"]}
    assert {"1", "2", "3", "4", "5a", "5b", "6"} <= ids


def test_vit_recipe_end_to_end_reports_attention_kinds(vit_run):
    root, out, res = vit_run
    _check_invariants(res)
    e = res["experiments"][0]
    kinds = {layer_kind(n) for n in e["R_per_layer"]}
    assert {"W_Q", "W_K", "W_V", "W_O"} <= kinds
    arch = res["architectures"][0]
    assert arch["heads"] == {"blocks.0.attn": 2} and arch["epochs"] == 1
    order = [k["kind"] for k in arch["R_by_kind"]]
    assert order == ["patch", "W_Q", "W_K", "W_V", "W_O", "fc1", "fc2", "head"]  # network order
    ws = res["width_sweep"]
    assert [w["width_mult"] for w in ws] == [1.0, 2.0]
    # width 1.0 of the sweep reuses the main models: the same barrier
    assert ws[0]["methods"]["weight"]["barrier"]["test"]["loss_barrier"]["mean"] == pytest.approx(
        e["methods"]["weight"]["barrier"]["test"]["loss_barrier"]["mean"]
    )
    md = (root / "report" / "report.md").read_text()
    assert "## Layer kinds and model size" in md and "| blocks.0.attn W_Q |" in md and "| W_O |" in md
    assert "512 units per layer" in md  # the size is set against the paper's
    for fig in ("spectra", "per_index", "width_sweep", "three_models"):
        assert (root / "report" / f"{fig}.png").stat().st_size > 1000
    # cached and resumable: the same command finds every stage of the plan complete
    again = reproduce("vit-fmnist", out=root / "report2", cache=root / "cache", sets=VIT, dry=True)
    assert again.entries and all(x.cached for x in again.entries)


def test_lstm_recipe_end_to_end_reports_gate_kinds(lstm_run):
    root, out, res = lstm_run
    _check_invariants(res)
    kinds = {layer_kind(n) for n in res["experiments"][0]["R_per_layer"]}
    gates = {f"W_{g} ({w})" for g in "ifgo" for w in ("input", "hidden")}
    assert kinds - {""} == gates
    arch = res["architectures"][0]
    assert arch["groups"] == {"lstm.l0": 6, "lstm.l1": 6} and arch["heads"] == {}
    assert {k["kind"]: k["matrices"] for k in arch["R_by_kind"] if k["kind"] != "head"} == {g: 2 for g in gates}
    md = (root / "report" / "report.md").read_text()
    assert "| lstm l1 W_f (hidden) |" in md and "| W_g (input) | 2 |" in md


def test_shipped_arch_recipes_parse_and_plan_every_analysis():
    for name, model in (("vit-fmnist", "vit"), ("lstm-fmnist", "lstm")):
        r = load_recipe(name)
        assert r.models[0].name == model and r.train.preset == name
        assert set(r.match.methods) == {"naive", "weight", "activation", "ste"}
        assert r.barrier.splits == ("train", "test") and r.three_models.enabled
        a = r.analysis
        assert a.enabled and a.spectra and a.alignment and a.taylor and a.projections and a.rank
        assert a.gammas == (0.0, 0.3)
    assert load_recipe("vit-fmnist").width_sweep.enabled


@pytest.mark.parametrize(
    "name, kind, label",
    [
        ("blocks.0.attn.in_proj_weight:q", "W_Q", "blocks.0.attn W_Q"),
        ("blocks.3.attn.in_proj_weight:k", "W_K", "blocks.3.attn W_K"),
        ("blocks.0.attn.in_proj_weight:v", "W_V", "blocks.0.attn W_V"),
        ("blocks.0.attn.out_proj", "W_O", "blocks.0.attn W_O"),
        ("lstm.weight_ih_l0:i", "W_i (input)", "lstm l0 W_i (input)"),
        ("lstm.weight_hh_l1:g", "W_g (hidden)", "lstm l1 W_g (hidden)"),
        ("gru.weight_hh_l0:z", "W_z (hidden)", "gru l0 W_z (hidden)"),
        ("fc1", "", "fc1"),
        ("blocks.0.fc2", "", "blocks.0.fc2"),
        ("", "", "(top-level parameters)"),
    ],
)
def test_layer_kind_and_label(name, kind, label):
    assert layer_kind(name) == kind
    assert layer_label(name) == label


def test_split_matrices_follow_their_module_in_network_order():
    modules = ["", "patch", "blocks.0.attn", "blocks.0.attn.out_proj", "blocks.0.fc1", "head"]
    matrices = [
        "patch",
        "blocks.0.attn.in_proj_weight:q",
        "blocks.0.attn.in_proj_weight:k",
        "blocks.0.attn.in_proj_weight:v",
        "blocks.0.attn.out_proj",
        "blocks.0.fc1",
        "head",
        "other:x",
    ]
    assert _with_split_matrices(modules, matrices) == [
        "",
        "patch",
        "blocks.0.attn",
        "blocks.0.attn.in_proj_weight:q",
        "blocks.0.attn.in_proj_weight:k",
        "blocks.0.attn.in_proj_weight:v",
        "blocks.0.attn.out_proj",
        "blocks.0.fc1",
        "head",
        "other:x",
    ]


def test_r_by_kind_averages_matrices_and_pairs_by_hand():
    def row(layer, before, after):
        return {"layer": layer, "R": {"0.3": {"before": before, "after": after}}}

    exp = {
        "layers": [
            {"pair": [0, 1], "method": "weight", "rows": [row("a.fc1", 0.1, 0.5), row("b.fc1", 0.3, 0.7)]},
            {"pair": [2, 3], "method": "weight", "rows": [row("a.fc1", 0.2, 0.9), {"layer": "lstm"}]},
            {"pair": [0, 1], "method": "ste", "rows": [row("a.fc1", 0.1, 0.4)]},
        ]
    }
    got = r_by_kind(exp)
    assert [k["kind"] for k in got] == ["fc1"] and got[0]["matrices"] == 2
    r = got[0]["R"]["0.3"]
    assert r["before"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)  # one value per (pair, matrix), not per method
    assert r["weight"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert r["ste"] == pytest.approx(0.4)


def test_taylor_on_a_vit_matches_the_second_difference_of_the_loss():
    """Delta^T H Delta through attention (double backward needs the math SDPA kernel) = finite difference."""
    import torch
    import torch.nn.functional as F

    from lmckit.analysis.taylor import taylor_midpoint
    from lmckit.data import load_dataset
    from lmckit.models import create_model

    ds = load_dataset("synthetic")
    torch.manual_seed(0)
    model = create_model("vit_tiny", in_channels=1, image_size=28, num_classes=10).double()
    sd_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model("vit_tiny", in_channels=1, image_size=28, num_classes=10).double().state_dict()
    n = ds.size("test")
    out = taylor_midpoint(model, None, sd_a, sd_b, ds, num_samples=n, split="test", batch_size=n)
    x, y = ds.on_device("test")
    x = ds.normalize(x).double()
    mid = {k: (a + sd_b[k]) / 2 for k, a in sd_a.items()}
    delta = {k: sd_a[k] - sd_b[k] for k in sd_a}

    def loss(t: float) -> float:
        state = {k: mid[k] + t * delta[k] for k in mid}
        with torch.no_grad():
            return float(F.cross_entropy(torch.func.functional_call(model.eval(), state, (x,)), y))

    eps = 1e-3
    fd = (loss(eps) - 2 * loss(0.0) + loss(-eps)) / eps**2
    assert math.isfinite(out["dHd"]) and out["dHd"] == pytest.approx(fd, rel=1e-4)
    assert out["taylor_midpoint"] == pytest.approx(-fd / 8, rel=1e-4)
