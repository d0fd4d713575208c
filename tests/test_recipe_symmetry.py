"""Issue 29: the recipe key ``match.symmetry`` (symmetry classes side by side in one recipe).

Refusals at check time naming the key; the default plans nothing new (same stage hashes, byte-identical
results.json); end to end on two tiny ViTs (no norm, LayerNorm) on the synthetic dataset: signed and orthogonal rows
on folded models whose path ends are the models' own losses and whose L2 after matching is at most that of
permutation WM on the same (folded) weights.
"""

from __future__ import annotations

import json

import pytest

from lmckit.cli import main
from lmckit.errors import LmcError
from lmckit.pipeline.build import build_plan
from lmckit.pipeline.executor import plan as order
from lmckit.pipeline.recipe import load_recipe, recipe_to_dict
from lmckit.pipeline.stages import stage_hash
from lmckit.pipeline.symmetry import SymmetryStage
from lmckit.reproduce import reproduce

ORTH = 'match.symmetry=["permutation", "orthogonal"]'


@pytest.mark.parametrize(
    "value, words",
    [
        ('["permutation", "invertible"]', "no exact matching step"),
        ('["permutation", "orthogonal", "orthogonal"]', "more than once"),
        ('["permutation", "affine"]', "is not one of permutation, signed, orthogonal"),
        ('["orthogonal"]', "leaves out 'permutation'"),
        ("[]", "is empty"),
        ('"orthogonal"', "must be a list"),
    ],
)
def test_bad_classes_are_refused_naming_the_key(value, words, capsys):
    with pytest.raises(LmcError) as e:
        load_recipe("tiny", [f"match.symmetry={value}"])
    assert "match.symmetry" in e.value.message and words in e.value.message
    assert main(["reproduce", "--recipe", "tiny", "--dry-run", "--set", f"match.symmetry={value}"]) == 2
    assert "match.symmetry" in capsys.readouterr().err


def test_a_class_needs_a_method_that_aligns_under_it():
    with pytest.raises(LmcError, match=r"match.symmetry .* needs weight or activation in match.methods"):
        load_recipe("tiny", [ORTH, 'match.methods=["naive", "ste"]'])


def test_default_plans_no_symmetry_stage_and_keeps_every_hash():
    default = build_plan(load_recipe("tiny"))
    explicit = build_plan(load_recipe("tiny", ['match.symmetry=["permutation"]']))
    orth = build_plan(load_recipe("tiny", [ORTH]))
    assert default.symmetry == [] and explicit.symmetry == [] and not default.notes
    assert "symmetry" not in recipe_to_dict(load_recipe("tiny"))["match"]
    assert recipe_to_dict(load_recipe("tiny", ['match.symmetry=["permutation"]'])) == recipe_to_dict(
        load_recipe("tiny")
    )
    h = [stage_hash(s) for s in order(default.targets())]
    assert h == [stage_hash(s) for s in order(explicit.targets())]
    added = [s for s in order(orth.targets()) if stage_hash(s) not in set(h)]
    assert set(h) <= {stage_hash(s) for s in order(orth.targets())}
    assert added and all(isinstance(s, SymmetryStage) for s in added)
    # the MLP's hidden units behind ReLU admit only permutations: said in a note
    assert any("no group of mlp_tiny admits orthogonal" in n for n in orth.notes)


def test_shipped_recipe_plans_the_folded_baseline_for_layernorm_only():
    r = load_recipe("vit-symmetry")
    assert r.match.symmetry == ("permutation", "orthogonal") and recipe_to_dict(r)["match"]["symmetry"]
    p = build_plan(r)
    rows = {(x.label, x.method, x.symmetry) for x in p.symmetry}
    for m in ("weight", "activation"):
        assert ("vit no norm", m, "orthogonal") in rows and ("vit layernorm", m, "orthogonal") in rows
        assert ("vit layernorm", m, "permutation") in rows and ("vit no norm", m, "permutation") not in rows
    assert not p.notes


RECIPE = """
name = "sym-tiny"
description = "two tiny ViTs, permutation vs orthogonal"
[data]
dataset = "synthetic"
[[models]]
name = "vit"
label = "vit plain"
options = {{ width = 8, depth = 1, heads = 2 }}
[[models]]
name = "vit"
label = "vit ln"
norm = "layernorm"
options = {{ width = 8, depth = 1, heads = 2 }}
[train]
preset = "tiny"
seeds = [0, 1]
overrides = {{ epochs = 1 }}
[match]
methods = ["naive", "weight", "activation"]
searches = 1
max_iter = 10
am_samples = 200
{symmetry}
[barrier]
lambdas = 3
limit = 200
[analysis]
spectra = false
projections = false
rank = false
taylor = false
[three_models]
enabled = false
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("symrecipe")
    plain, sym = root / "plain.toml", root / "sym.toml"
    plain.write_text(RECIPE.format(symmetry=""))
    sym.write_text(RECIPE.format(symmetry='symmetry = ["permutation", "signed", "orthogonal"]'))
    first = reproduce(str(plain), out=root / "plain1", cache=root / "cache")
    second = reproduce(str(sym), out=root / "sym", cache=root / "cache")
    third = reproduce(str(plain), out=root / "plain2", cache=root / "cache")
    return root, first, second, third


def test_default_results_are_byte_identical_and_without_symmetry_rows(runs):
    root, first, second, third = runs
    a, b = (root / "plain1" / "results.json").read_bytes(), (root / "plain2" / "results.json").read_bytes()
    assert a == b and '"symmetry"' not in a.decode()
    assert "Symmetry classes" not in (root / "plain1" / "report.md").read_text()
    # the symmetry run reused every stage of the default one and ran symmetry stages only
    ran = [o for o in second.summary.outcomes if o.status == "ran"]
    assert ran and all(o.kind == "symmetry" for o in ran)
    assert all(o.status == "cached" for o in third.summary.outcomes)


def test_orthogonal_rows_on_the_folded_path(runs):
    root = runs[0]
    res = json.loads((root / "sym" / "results.json").read_text())
    sym = res["symmetry"]
    assert sym["classes"] == ["permutation", "signed", "orthogonal"] and sym["splits"] == ["train", "test"]
    rows = sym["rows"]
    key = {(r["model"], r["method"], r["symmetry"], r["parameterisation"]): r for r in rows}
    for model in ("vit plain", "vit ln"):
        for method in ("weight", "activation"):
            orth = key[(model, method, "orthogonal", "folded")]
            assert orth["group_classes"].get("orthogonal", 0) > 0 and orth["pair"] == [0, 1]
            assert {"l2_before", "l2_after", "relative_l2_after", "R"} <= set(orth)
            assert set(orth["R"]) == {"0", "0.3"}
            assert key[(model, method, "signed", "folded")]["group_classes"].get("signed", 0) > 0  # the heads
            assert key[(model, method, "permutation", "raw")]["same_as_folded"] == (model == "vit plain")
    assert key[("vit ln", "weight", "orthogonal", "folded")]["folded"]  # LayerNorms were folded
    assert not key[("vit plain", "weight", "orthogonal", "folded")]["folded"]
    # the folded path's ends are the two models' own losses (folding and the transform keep the function):
    # the recipe's naive path (raw models) ends at the same losses
    for e in res["experiments"]:
        naive = e["methods"]["naive"]["curves"]
        for r in (r for r in rows if r["model"] == e["label"]):
            for sp in ("train", "test"):
                ends = r["endpoint_loss"][sp]
                assert ends[0] == pytest.approx(naive[sp]["loss_mean"][0], rel=1e-4, abs=1e-5)
                assert ends[1] == pytest.approx(naive[sp]["loss_mean"][-1], rel=1e-4, abs=1e-5)
    # orthogonal WM starts from permutation WM's optimum on the same weights: its L2 is at most that
    for model, base in (("vit plain", "raw"), ("vit ln", "folded")):
        perm = key[(model, "weight", "permutation", base)]["l2_after"]
        assert key[(model, "weight", "orthogonal", "folded")]["l2_after"] <= perm + 1e-9
        assert key[(model, "weight", "orthogonal", "folded")]["relative_l2_after"] < 1.0
    summary = {(s["model"], s["method"], s["symmetry"], s["parameterisation"]) for s in sym["summary"]}
    assert summary == set(key)
    md = (root / "sym" / "report.md").read_text()
    assert "## Symmetry classes side by side" in md
    assert "| vit ln | WM | orthogonal | folded | 1 |" in md and "| vit plain | WM | permutation | raw (= folded" in md
    stage_dirs = list((root / "cache" / "symmetry").iterdir())
    assert any((d / "transform.safetensors").is_file() for d in stage_dirs)


def test_a_stage_transform_file_gives_the_same_barrier_with_lmckit_barrier(runs, capsys):
    """``transform.safetensors`` applies to folded B: ``lmckit barrier A B --perm`` measures the stage's path."""
    from lmckit.pipeline.stages import stage_path

    root, _, second, _ = runs
    cache = root / "cache"
    entry = next(
        x for x in second.plan.symmetry if x.label == "vit ln" and x.method == "weight" and x.symmetry == "orthogonal"
    )
    row = _read_stage(cache, entry.stage)
    capsys.readouterr()
    argv = ["barrier", str(stage_path(cache, entry.stage.a)), str(stage_path(cache, entry.stage.b))]
    argv += ["--perm", str(stage_path(cache, entry.stage) / "transform.safetensors"), "--points", "3"]
    assert main(argv + ["--limit", "200", "--split", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss_barrier"] == pytest.approx(row["barrier"]["loss_barrier"]["test"], rel=1e-5, abs=1e-6)


def _read_stage(cache, stage):
    from lmckit.pipeline.stages import stage_path

    return json.loads((stage_path(cache, stage) / "result.json").read_text())
