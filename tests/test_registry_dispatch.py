"""Dispatch through the matching registry: recipes, pipeline stages, merge, CLI flags, report legends.

Adding a method must need no edit outside its module: these tests register or name ``sinkhorn`` (or a
throw-away method) and check that recipes, stages, ``merge.align_models``, the CLI and the report's
legends pick it up, and that the legacy stage options still map onto the registry's options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.errors import LmcError
from lmckit.evaluate import module_mode
from lmckit.match import registry
from lmckit.match.registry import MethodOptions, check_scheme, get_method, mergemany_method, register_method
from lmckit.merge import align_models
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for
from lmckit.pipeline.build import build_plan
from lmckit.pipeline.recipe import load_recipe
from lmckit.pipeline.tasks import MatchStage, stage_match_options

FAST = ["steps=60", "iters=10", "check_every=20"]


# --------------------------------------------------------------------------- recipes and the stage plan
def test_recipe_names_a_registry_method_with_no_other_edit():
    r = load_recipe(
        "tiny",
        ['match.methods=["naive", "weight", "sinkhorn"]', 'three_models.methods=["weight", "sinkhorn"]'],
    )
    plan = build_plan(r)
    matches = [s for e in plan.experiments for s in e.matches.values()]
    sk = [m for m in matches if m.method == "sinkhorn"]
    assert sk and all(isinstance(m, MatchStage) and m.options == () for m in sk)
    assert len(sk) == len(r.pairs())  # one search: match.searches repeats weight matching only
    assert sum(m.method == "weight" for m in matches) == len(r.pairs()) * r.match.searches
    three = plan.three["sinkhorn"]
    assert [m.method for m in three.matches[1:]] == ["sinkhorn", "sinkhorn"]


def test_recipe_match_options_reach_that_methods_stages_only():
    base = ['match.methods=["naive", "weight", "ste", "sinkhorn"]', 'three_models.methods=["weight", "sinkhorn"]']
    plain = build_plan(load_recipe("tiny", base))
    r = load_recipe("tiny", base + ["match.options.sinkhorn.steps=40", 'match.options.sinkhorn.loss="midpoint"'])
    plan = build_plan(r)

    def stages(p, method):
        return [s for e in p.experiments for s in e.matches.values() if s.method == method]

    sk = stages(plan, "sinkhorn")
    assert sk and all(m.options == (("loss", "midpoint"), ("steps", 40)) for m in sk)
    assert all(m.options == (("loss", "midpoint"), ("steps", 40)) for m in plan.three["sinkhorn"].matches[1:])
    opts = stage_match_options("sinkhorn", dict(sk[0].options))
    assert (opts.steps, opts.loss) == (40, "midpoint")
    for method in ("weight", "ste"):  # other methods' stages (and so their hashes) are untouched
        assert stages(plan, method) == stages(plain, method)


@pytest.mark.parametrize(
    "override,message",
    [
        ("match.options.sinkhron.steps=3", "no matching method 'sinkhron'"),
        ("match.options.naive.steps=3", "no matching method 'naive'"),
        ("match.options.weight.max_iter=3", "set by the \\[match\\] table"),
        ("match.options.sinkhorn.stepz=3", "match.options.sinkhorn: method 'sinkhorn' has no option 'stepz'"),
        ("match.options.sinkhorn.steps=0", "match.options.sinkhorn: option steps must be at least 1"),
        ("match.options.sinkhorn=3", "must be a table"),
        ("match.options.sinkhorn.steps=1000000000000", "option steps must be at most 100,000"),
    ],
)
def test_recipe_match_options_are_validated_by_the_registry(override, message):
    with pytest.raises(LmcError, match=message):
        load_recipe("tiny", [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ('match.methods=["naive", "bogus"]', "sinkhorn"),  # the error lists the registry's methods
        ('three_models.methods=["naive"]', "is not one of"),  # naive is no anchor method
    ],
)
def test_recipe_rejects_unknown_methods_listing_the_registry(override, message):
    with pytest.raises(LmcError, match=message):
        load_recipe("tiny", [override])


def test_legacy_stage_options_map_onto_registry_options(tmp_path):
    am = stage_match_options("activation", {"samples": 1200})
    assert (am.num_batches, am.batch_size) == (3, 500)
    assert stage_match_options("activation", {"samples": 300}).batch_size == 300
    ste = stage_match_options(
        "ste", {"epochs": 2, "lr": 0.01, "batch_size": 64, "max_iter": 7, "train_limit": 0}, tmp_path
    )
    assert (ste.epochs, ste.lr, ste.batch_size, ste.wm_max_iter, ste.train_limit) == (2, 0.01, 64, 7, None)
    assert ste.state_dir == str(tmp_path / "ste")
    assert stage_match_options("ste", {"train_limit": 500}).train_limit == 500
    assert stage_match_options("weight", {"max_iter": 20}).max_iter == 20
    assert stage_match_options("sinkhorn", {"steps": 5}).steps == 5
    with pytest.raises(LmcError, match="no option"):
        stage_match_options("weight", {"steps": 5})


# --------------------------------------------------------------------------- multi-model schemes
def test_mergemany_is_checked_once_from_the_registry():
    assert mergemany_method() == "weight"
    assert check_scheme("weight", "mergemany").name == "weight"
    for m in ("activation", "ste", "sinkhorn"):
        assert check_scheme(m, "anchor").name == m
        with pytest.raises(LmcError, match="MergeMany .* not defined for"):
            check_scheme(m, "mergemany")
    with pytest.raises(LmcError, match="unknown multi-model scheme"):
        check_scheme("weight", "everything")


def test_align_models_runs_any_registry_method_against_the_anchor():
    torch.manual_seed(0)
    m = create_model("mlp_tiny")
    spec = spec_for(m)
    sd = m.state_dict()
    planted = [random_permutation(spec, seed=s) for s in (3, 4)]
    states = [sd] + [apply_permutation(spec, p, sd) for p in planted]
    opts = get_method("sinkhorn").options({k: v for k, v in (x.split("=") for x in FAST)})
    res = align_models(m, states, "sinkhorn", "anchor", spec=spec, options=opts, progress=False)
    for p, perms in zip(planted, res.perms[1:]):
        inv = invert_permutation(p)
        assert all(torch.equal(perms[g], inv[g]) for g in spec.sizes)
    with pytest.raises(LmcError, match="MergeMany"):
        align_models(m, states, "sinkhorn", "mergemany", spec=spec)


# --------------------------------------------------------------------------- CLI flags -> options
@pytest.fixture()
def three_ckpts(tmp_path):
    torch.manual_seed(0)
    m = create_model("mlp_tiny")
    spec = spec_for(m)
    sd = m.state_dict()
    planted = random_permutation(spec, seed=5)
    a = save_model(tmp_path / "a.safetensors", m, sd, dataset="synthetic")
    b = save_model(tmp_path / "b.safetensors", m, apply_permutation(spec, planted, sd), dataset="synthetic")
    return spec, planted, str(a), str(b)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "activation", "--restarts", "2"], "--restarts applies to --method weight only"),
        (["--method", "sinkhorn", "--ste-protocol", "git-re-basin"], "--ste-protocol applies to --method ste only"),
        (["--method", "weight", "--option", "max_iter=0"], "max_iter must be positive"),
    ],
)
def test_cli_flags_apply_to_the_methods_with_that_option(three_ckpts, tmp_path, capsys, argv, message):
    _, _, a, b = three_ckpts
    assert main(["match", a, b, *argv, "--out", str(tmp_path / "p.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_cli_option_sets_weight_matching_too(three_ckpts, tmp_path, capsys):
    spec, planted, a, b = three_ckpts
    out = tmp_path / "p.json"
    assert main(["match", a, b, "--option", "max_iter=3", "--restarts", "2", "--out", str(out), "--json"]) == 0
    raw = json.loads(out.read_text())
    assert (raw["max_iter"], raw["restarts"]) == (3, 2)
    assert json.loads(capsys.readouterr().out)["l2_after"] == pytest.approx(0.0, abs=1e-6)


def test_cli_merge_with_a_registry_method(three_ckpts, tmp_path, capsys):
    _, _, a, b = three_ckpts
    out = tmp_path / "m"
    opts = [x for kv in FAST for x in ("--option", kv)]
    argv = ["merge", a, b, a, "--method", "sinkhorn", *opts, "--points", "3", "--no-curve", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "sinkhorn" and d["options"]["steps"] == 60
    assert all(b["loss_barrier"] == pytest.approx(0.0, abs=1e-4) for b in d["pairwise_barriers"])


# --------------------------------------------------------------------------- report legends
def test_report_legends_read_the_registry():
    from lmckit.report.figures import METHOD_COLOR, METHOD_LABEL, METHOD_STYLE

    assert [METHOD_LABEL[m] for m in ("naive", "weight", "activation", "ste", "merge_many")] == [
        "naive",
        "WM",
        "AM",
        "STE",
        "MergeMany",
    ]

    @dataclass(frozen=True)
    class NoOptions(MethodOptions):
        pass

    register_method(
        "throwaway", description="x", reference="x", needs_data=False, options=NoOptions, objective="x", label="TA"
    )(lambda *a, **k: None)
    try:
        assert METHOD_LABEL["throwaway"] == "TA" and "throwaway" in list(METHOD_LABEL)
        assert METHOD_COLOR["throwaway"] not in (METHOD_COLOR[m] for m in ("naive", "weight", "activation", "ste"))
        assert METHOD_STYLE["throwaway"]
    finally:
        del registry._REGISTRY["throwaway"]
    assert "throwaway" not in list(METHOD_LABEL)


# --------------------------------------------------------------------------- modes
def test_module_mode_restores_each_submodules_mode_even_on_error():
    m = create_model("mlp_tiny")
    m.train()
    first = next(iter(m.children()))
    first.eval()  # a mixed state: one child in eval mode, the rest in train mode
    before = [x.training for x in m.modules()]
    with pytest.raises(RuntimeError), module_mode(m):
        assert not any(x.training for x in m.modules())
        raise RuntimeError("boom")
    assert [x.training for x in m.modules()] == before
    with module_mode(m, train=True):
        assert all(x.training for x in m.modules())
    assert [x.training for x in m.modules()] == before


def test_recipe_match_options_for_a_method_nothing_runs_are_refused_and_dumped_as_tables():
    with pytest.raises(LmcError, match="match.options.sinkhorn is set, but no part of the recipe runs sinkhorn"):
        load_recipe("tiny", ["match.options.sinkhorn.steps=3"])
    from lmckit.pipeline.recipe import recipe_to_dict

    r = load_recipe("tiny", ['three_models.methods=["weight", "sinkhorn"]', "match.options.sinkhorn.steps=3"])
    assert recipe_to_dict(r)["match"]["options"] == {"sinkhorn": {"steps": 3}}
    assert recipe_to_dict(load_recipe("tiny"))["match"]["options"] == {}


@pytest.mark.parametrize(
    "method,values,message",
    [
        ("weight", {"restarts": 20_000}, "option restarts must be at most 10,000"),
        ("weight", {"max_iter": 100_000_000}, "option max_iter must be at most 100,000"),
        ("activation", {"batch_size": 10**7}, "option batch_size must be at most 1,000,000"),
        ("ste", {"epochs": 10**6}, "option epochs must be at most 100,000"),
        ("sinkhorn", {"steps": 99_999_999_999}, "option steps must be at most 100,000"),
        ("sinkhorn", {"iters": 10**6}, "option iters must be at most 100,000"),
    ],
)
def test_method_options_obey_the_documented_bounds_of_the_cli_flags(method, values, message):
    with pytest.raises(LmcError, match=message):
        get_method(method).options(values)
    get_method(method).options({k: 1 for k in values})  # in range: accepted


def test_cli_option_beyond_a_bound_exits_2_before_any_work(three_ckpts, tmp_path, capsys):
    _, _, a, b = three_ckpts
    rc = main(["match", a, b, "--option", "restarts=20000", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "at most 10,000" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_a_method_that_cannot_align_a_recipes_model_is_refused_when_planned(tmp_path):
    """Sinkhorn refuses attention heads: at planning (dry run included), before any model trains."""
    from lmckit.pipeline.reproduce import prepare

    vit = ["models.0.name=vit", "models.0.options={width=8,depth=1,heads=2}", "width_sweep.enabled=false"]
    with pytest.raises(LmcError, match="sinkhorn cannot align model 'vit'.*head structure") as e:
        prepare("tiny", vit + ['match.methods=["naive","weight","sinkhorn"]'])
    assert "remove sinkhorn from match.methods" in e.value.hint
    with pytest.raises(LmcError, match="sinkhorn cannot align model 'vit'"):  # in the three-model stage only
        prepare("tiny", vit + ['three_models.methods=["weight","sinkhorn"]'])
    prepare("tiny", vit)  # the same model with methods that honour heads plans fine
    prepare("tiny", ['match.methods=["naive","weight","sinkhorn"]'])  # an MLP: Sinkhorn plans fine
    rc = main(
        ["reproduce", "--recipe", "tiny", "--dry-run", "--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c")]
        + [a for s in vit + ['match.methods=["naive","weight","sinkhorn"]'] for a in ("--set", s)]
    )
    assert rc == 2 and not (tmp_path / "c").exists()
