"""Recipes: validation, --set overrides, shipped recipes, and the stage graph built from them."""

from __future__ import annotations

import pytest

from lmckit.errors import LmcError
from lmckit.pipeline.build import build_plan
from lmckit.pipeline.executor import plan as order
from lmckit.pipeline.recipe import apply_overrides, load_recipe, parse_recipe, recipe_names, recipe_to_dict
from lmckit.pipeline.stages import stage_hash
from lmckit.pipeline.tasks import MatchStage, TrainStage

SHIPPED = {
    "quick",
    "tiny",
    "fashion-mnist-mlp",
    "fashion-mnist-cnn",
    "mnist-mlp",
    "cifar10-vgg11",
    "cifar10-resnet20",
    "width-sweep",
}


def test_shipped_recipes_parse_build_and_round_trip():
    assert SHIPPED <= set(recipe_names())
    for name in SHIPPED:
        r = load_recipe(name)
        assert r.name == name and r.description
        assert parse_recipe(recipe_to_dict(r)) == r
        p = build_plan(r)
        assert order(p.targets()) and not p.notes
    q = load_recipe("quick")
    assert q.data.dataset == "fashion-mnist" and dict(q.models[0].options) == {"depth": 3, "width": 512}
    assert set(q.match.methods) == {"naive", "weight", "activation", "ste", "sinkhorn"} and q.three_models.enabled
    assert len(q.train.seeds) >= 3 and q.analysis.taylor and q.analysis.projections and q.analysis.rank


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"trian": {}}, r"unknown key 'trian'.*did you mean 'train'"),
        ({"match": {"serches": 2}}, r"unknown key 'match.serches'.*searches"),
        ({"match": {"searches": -1}}, r"match.searches must be at least 1"),
        ({"match": {"searches": 2.5}}, r"match.searches must be an integer"),
        ({"match": {"searches": True}}, r"match.searches must be an integer"),
        ({"barrier": {"limit": -3}}, r"barrier.limit must be at least 0"),
        ({"analysis": {"gammas": [0.0, 1.5]}}, r"analysis.gammas\[1\] must be at most 1"),
        ({"match": {"methods": ["wieght"]}}, r"match.methods\[0\] = 'wieght'.*did you mean 'weight'"),
        ({"match": {"methods": "weight"}}, r"match.methods must be a list"),
        ({"models": [{"name": "mlpp"}]}, r"models.0.name: unknown model 'mlpp'"),
        ({"models": [{"norm": "batchnrom"}]}, r"models.0.norm.*did you mean 'batchnorm'"),
        ({"models": [{"options": 3}]}, r"models.0.options must be a table"),
        ({"data": {"dataset": "fashion-mnsit"}}, r"data.dataset.*did you mean 'fashion-mnist'"),
        ({"train": {"seeds": [1]}}, r"at least two seeds"),
        ({"train": {"seeds": [1, 1]}}, r"duplicates"),
        ({"train": {"seeds": [0, 1]}, "three_models": {"models": 3}}, r"three_models.models = 3 needs"),
        ({"models": []}, r"models is empty"),
    ],
)
def test_validation_errors_name_the_key(raw, match):
    with pytest.raises(LmcError, match=match):
        parse_recipe(raw, "r.toml")


def test_set_overrides_are_toml_literals():
    raw = {"models": [{"name": "mlp"}], "train": {"seeds": [0, 1]}}
    out = apply_overrides(
        raw,
        [
            "train.seeds=[3, 4, 5]",
            "models.0.width_mult=2",
            "data.dataset=mnist",
            "match.ste.lr=1e-2",
            "three_models.enabled=false",
            'models.0.label="a b"',
        ],
    )
    assert raw["train"]["seeds"] == [0, 1]  # the input is not modified
    assert out["train"]["seeds"] == [3, 4, 5] and out["models"][0]["width_mult"] == 2
    assert out["data"]["dataset"] == "mnist" and out["match"]["ste"]["lr"] == 0.01
    assert out["three_models"]["enabled"] is False and out["models"][0]["label"] == "a b"
    r = parse_recipe(out)
    assert r.models[0].width_mult == 2.0 and isinstance(r.models[0].width_mult, float)
    with pytest.raises(LmcError, match="not key=value"):
        apply_overrides(raw, ["train.seeds"])
    with pytest.raises(LmcError, match="not an index"):
        apply_overrides(raw, ["models.3.name=x"])
    with pytest.raises(LmcError, match="is a value, not a table"):
        apply_overrides(raw, ["train.seeds.0.x=1"])


def test_unknown_recipe_name_and_file(tmp_path):
    with pytest.raises(LmcError, match="unknown recipe 'quik'.*did you mean 'quick'"):
        load_recipe("quik")
    with pytest.raises(LmcError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.toml"))
    f = tmp_path / "mine.toml"
    f.write_text(
        'name = "mine"\n[train]\nseeds = [5, 6]\npreset = "tiny"\n[data]\ndataset = "synthetic"\n'
        '[[models]]\nname = "mlp_tiny"\n[three_models]\nenabled = false\n'
    )
    r = load_recipe(str(f), ["match.searches=4"])
    assert r.name == "mine" and r.train.seeds == (5, 6) and r.match.searches == 4 and r.pairs() == [(5, 6)]
    f.write_text("import os\n")
    with pytest.raises(LmcError, match="not valid TOML"):
        load_recipe(str(f))


def test_pairs():
    r = parse_recipe({"train": {"seeds": [0, 1, 2, 3, 4]}})
    assert r.pairs() == [(0, 1), (2, 3)]
    r = parse_recipe({"train": {"seeds": [0, 1, 2]}, "match": {"pairs": "all"}})
    assert r.pairs() == [(0, 1), (0, 2), (1, 2)]


def test_graph_shares_stages_and_isolates_method_options():
    r = load_recipe("tiny")
    p = build_plan(r)
    e = p.experiments[0]
    # three-model WM/STE reuse the pair experiment's matches to the anchor
    assert (
        p.three["weight"].matches[1] is e.matches[((0, 1), "weight", 0)]
        or p.three["weight"].matches[1] == e.matches[((0, 1), "weight", 0)]
    )
    # the width sweep at the recipe's own width is the main experiment (same stages, not recomputed)
    w1 = next(x for x in p.width if x.width_mult == 1.0)
    assert w1.trains[0] == e.trains[0] and w1.barriers[((0, 1), "weight", 0)] == e.barriers[((0, 1), "weight", 0)]
    # changing an STE setting changes STE stages only
    p2 = build_plan(load_recipe("tiny", ["match.ste.epochs=3"]))
    h1 = {stage_hash(s) for s in order(p.targets())}
    h2 = {stage_hash(s) for s in order(p2.targets())}
    changed = [s for s in order(p2.targets()) if stage_hash(s) not in h1]
    assert changed and all((isinstance(s, MatchStage) and s.method == "ste") or "ste" in s.label() for s in changed)
    assert len(h1 - h2) == len(changed)


def test_pinned_stage_hashes():
    # The quick recipe's first model and WM match. These change when any default of the
    # training config, the stage specs or the store schema changes: update them knowingly,
    # since old cached results will no longer be reused.
    p = build_plan(load_recipe("quick"))
    e = p.experiments[0]
    t0 = e.trains[0]
    assert isinstance(t0, TrainStage)
    cfg = dict(t0.config)
    assert cfg["model"] == "mlp" and cfg["epochs"] == 5 and cfg["lr"] == 0.001 and cfg["batch_size"] == 500
    assert stage_hash(t0) == PINNED["train0"]
    assert stage_hash(e.matches[((0, 1), "weight", 0)]) == PINNED["wm01"]


PINNED = {"train0": "d1aee283ec520172", "wm01": "63cb11f6c94e8eb5"}


def test_ste_projection_approximations_enter_the_stage_options_only_when_set():
    """Defaults leave the STE stages' options (and so their hashes) as before; set values are hashed."""

    def ste_stages(sets=()):
        p = build_plan(load_recipe("tiny", sets))
        return {s for s in order(p.targets()) if isinstance(s, MatchStage) and s.method == "ste"}

    plain = ste_stages()
    assert plain and all(not any(k.startswith("project_") for k, _ in s.options) for s in plain)
    approx = ste_stages(["match.ste.project_sweeps=1", "match.ste.project_every=2"])
    assert len(approx) == len(plain) and not approx & plain
    assert all(dict(s.options)["project_sweeps"] == 1 and dict(s.options)["project_every"] == 2 for s in approx)
    for bad in ("match.ste.project_sweeps=-1", "match.ste.project_every=0"):
        with pytest.raises(LmcError, match="project_"):
            load_recipe("tiny", [bad])
