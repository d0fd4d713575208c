"""Sinkhorn re-basin and the method registry: planted permutations, the operator, options, CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.errors import LmcError
from lmckit.match.registry import MethodOptions, get_method, list_methods, register_method
from lmckit.match.sinkhorn import SinkhornOptions, sinkhorn_log, sinkhorn_matching, soft_apply
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, load_perms, random_permutation, spec_for

FAST = {"steps": 60, "iters": 10, "check_every": 20}


def _pair(name: str, norm: str = "none", seed: int = 1, planted_seed: int = 5):
    torch.manual_seed(0)
    m = create_model(name, in_channels=1, image_size=28, norm=norm)
    spec = spec_for(m)
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in m.state_dict().items()
    }
    sd = {k: (v.abs() if "running_var" in k else v) for k, v in sd.items()}
    planted = random_permutation(spec, seed=planted_seed)
    return m, spec, sd, planted, apply_permutation(spec, planted, sd)


# --------------------------------------------------------------------------- the operator
def test_sinkhorn_operator_is_doubly_stochastic_and_sharpens_with_temperature():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    s = sinkhorn_log(m, 1.0, 200).exp()
    assert torch.allclose(s.sum(0), torch.ones(7, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(s.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-8)
    cold = sinkhorn_log(m, 0.01, 500).exp()
    # at low temperature the matrix is (nearly) the permutation of the best assignment
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(m.numpy(), maximize=True)
    assert torch.allclose(cold, torch.eye(7, dtype=torch.float64)[torch.from_numpy(col)], atol=1e-2)


def test_soft_apply_with_one_hot_matrices_is_apply_permutation():
    _, spec, sd, planted, sd_b = _pair("resnet_tiny", "batchnorm")
    onehot = {g: torch.eye(len(p))[p] for g, p in planted.items()}
    keys = [k for k, v in sd.items() if v.is_floating_point()]
    soft = soft_apply(spec, onehot, sd, keys)
    for k in keys:
        assert torch.allclose(soft[k], sd_b[k], atol=1e-6), k


# --------------------------------------------------------------------------- planted permutations
@pytest.mark.parametrize(
    "name,norm",
    [("mlp_tiny", "none"), ("mlp_tiny", "layernorm"), ("vgg_tiny", "batchnorm"), ("resnet_tiny", "batchnorm")],
)
def test_planted_permutation_recovered_exactly(name, norm):
    _, spec, sd, planted, sd_b = _pair(name, norm)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted.values())
    res = sinkhorn_matching(spec, sd, sd_b, options=SinkhornOptions(**FAST), seed=0)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
        assert torch.equal(torch.sort(res.perms[g]).values, torch.arange(spec.sizes[g]))  # a valid permutation
    back = apply_permutation(spec, res.perms, sd_b)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert res.method == "sinkhorn" and res.final_objective > res.initial_objective
    assert res.converged and res.extra["hard_changes"][-1] == 0


def test_unrelated_models_give_valid_permutations_and_are_deterministic():
    _, spec, sd, _, _ = _pair("mlp_tiny", seed=1)
    _, _, other, _, _ = _pair("mlp_tiny", seed=2)
    opts = SinkhornOptions(steps=30, iters=5, check_every=10)
    r1 = sinkhorn_matching(spec, sd, other, options=opts, seed=3)
    r2 = sinkhorn_matching(spec, sd, other, options=opts, seed=3)
    for g, n in spec.sizes.items():
        assert torch.equal(torch.sort(r1.perms[g]).values, torch.arange(n))
        assert torch.equal(r1.perms[g], r2.perms[g])
    assert r1.extra["loss_history"] == r2.extra["loss_history"]
    # the relaxed weight distance decreases under Adam
    assert r1.extra["loss_history"][-1] < r1.extra["loss_history"][0]


def test_midpoint_loss_on_data_runs_and_is_deterministic(synthetic):
    m, spec, sd, _, _ = _pair("mlp_tiny", seed=1)
    _, _, other, _, _ = _pair("mlp_tiny", seed=2)
    method = get_method("sinkhorn")
    opts = method.options(loss="midpoint", steps=6, iters=5, check_every=3, batch_size=32, train_limit=64)
    assert method.requires_data(opts) and not method.requires_data(method.options())
    with pytest.raises(LmcError, match="needs data"):
        method.match(spec, sd, other, model=m, options=opts)
    r1 = method.match(spec, sd, other, model=m, dataset=synthetic, options=opts, seed=1)
    r2 = method.match(spec, sd, other, model=m, dataset=synthetic, options=opts, seed=1)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in spec.sizes)
    assert r1.extra["loss_history"] == r2.extra["loss_history"] and len(r1.extra["loss_history"]) == 2


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"tau": 0.0},
        {"tau": float("nan")},
        {"lr": -1.0},
        {"iters": 0},
        {"loss": "bogus"},
        {"init": "random"},
        {"noise": -0.1},
        {"train_limit": 0},
    ],
)
def test_bad_options_raise_lmc_error(bad):
    with pytest.raises(LmcError):
        SinkhornOptions(**bad)


def test_options_from_strings_convert_and_reject_unknown_names():
    method = get_method("sinkhorn")
    opts = method.options({"steps": "12", "tau": "0.5", "train_limit": "none", "loss": "distance"})
    assert opts.steps == 12 and opts.tau == 0.5 and opts.train_limit is None
    with pytest.raises(LmcError, match="no option 'stepz'"):
        method.options(stepz=3)
    with pytest.raises(LmcError, match="must be int"):
        method.options(steps="many")
    with pytest.raises(LmcError, match="must be int"):
        method.options(steps=2.5)
    assert get_method("weight").options(include_buffers="yes").include_buffers is True


@pytest.mark.parametrize("name, what", [("vit_tiny", "head structure"), ("lstm_tiny", "block axis")])
def test_specs_with_heads_or_block_axes_are_refused(name, what):
    # Attention heads and block axes (LSTM gate blocks, cat, flatten) are not modelled by the relaxation:
    # a free Sinkhorn permutation would change the function, so the method must refuse.
    m = create_model(name)
    spec = spec_for(m)
    sd = m.state_dict()
    with pytest.raises(LmcError, match=what):
        sinkhorn_matching(spec, sd, sd, options=SinkhornOptions(**FAST))


def test_unstructured_spec_is_not_refused():
    _, spec, sd, planted, sd_b = _pair("mlp_tiny")
    assert not spec.heads
    res = sinkhorn_matching(spec, sd, sd_b, options=SinkhornOptions(**FAST))
    assert torch.equal(res.perms["P0"], invert_permutation(planted)["P0"])


def test_mismatched_state_dicts_raise_lmc_error():
    _, spec, sd, _, sd_b = _pair("mlp_tiny")
    sd_b = dict(sd_b)
    sd_b.pop(next(iter(sd_b)))
    with pytest.raises(LmcError):
        sinkhorn_matching(spec, sd, sd_b, options=SinkhornOptions(**FAST))


# --------------------------------------------------------------------------- registry
def test_registry_lists_the_methods_with_references():
    names = list_methods()
    assert names[:4] == ["weight", "activation", "ste", "sinkhorn"]
    for n in names:
        d = get_method(n).to_dict()
        assert d["description"] and d["reference"] and d["objective"] and isinstance(d["options"], list)
    assert get_method("weight").supports("mergemany") and not get_method("sinkhorn").supports("mergemany")
    assert get_method("ste").needs_data and not get_method("sinkhorn").needs_data
    with pytest.raises(LmcError, match="known methods: weight"):
        get_method("bogus")


def test_weight_through_the_registry_equals_weight_matching():
    from lmckit.match import weight_matching

    _, spec, sd, _, _ = _pair("vgg_tiny", "batchnorm", seed=1)
    _, _, other, _, _ = _pair("vgg_tiny", "batchnorm", seed=2)
    direct = weight_matching(spec, sd, other, seed=4, max_iter=7, restarts=2)
    via = get_method("weight").match(spec, sd, other, options={"max_iter": 7, "restarts": 2}, seed=4)
    assert all(torch.equal(direct.perms[g], via.perms[g]) for g in spec.sizes)
    assert direct.objective == via.objective


def test_activation_through_the_registry(synthetic):
    m, spec, sd, planted, sd_b = _pair("mlp_tiny", seed=1)
    res = get_method("activation").match(
        spec, sd, sd_b, model=m, dataset=synthetic, options={"num_batches": 2, "batch_size": 64}
    )
    inv = invert_permutation(planted)
    assert all(torch.equal(res.perms[g], inv[g]) for g in spec.sizes)
    with pytest.raises(LmcError, match="needs a model"):
        get_method("activation").match(spec, sd, sd_b, dataset=synthetic)


def test_register_rejects_duplicates_and_bad_declarations():
    @dataclass(frozen=True)
    class NoOptions(MethodOptions):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("weight", description="x", reference="x", needs_data=False, options=NoOptions, objective="x")(
            lambda *a, **k: None
        )
    with pytest.raises(ValueError, match="scheme"):
        register_method(
            "new",
            description="x",
            reference="x",
            needs_data=False,
            options=NoOptions,
            objective="x",
            multi=("everything",),
        )
    assert "new" not in list_methods()


# --------------------------------------------------------------------------- CLI
@pytest.fixture()
def checkpoints(tmp_path):
    m, spec, sd, planted, sd_b = _pair("mlp_tiny", "batchnorm")
    a = save_model(tmp_path / "a.safetensors", m, sd, dataset="synthetic")
    b = save_model(tmp_path / "b.safetensors", m, sd_b, dataset="synthetic")
    return spec, planted, str(a), str(b)


def test_cli_match_sinkhorn_writes_the_planted_inverse(checkpoints, tmp_path, capsys):
    spec, planted, a, b = checkpoints
    out = tmp_path / "p.json"
    opts = [x for k, v in FAST.items() for x in ("--option", f"{k}={v}")]
    assert main(["match", a, b, "--method", "sinkhorn", *opts, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "sinkhorn" and summary["l2_after"] == pytest.approx(0.0, abs=1e-6)
    perms = load_perms(out, spec)
    inv = invert_permutation(planted)
    assert all(torch.equal(perms[g], inv[g]) for g in spec.sizes)
    raw = json.loads(out.read_text())
    assert raw["options"]["steps"] == FAST["steps"] and raw["dataset"] is None


def test_cli_match_sinkhorn_anchor(checkpoints, tmp_path, capsys):
    _, _, a, b = checkpoints
    out = tmp_path / "multi"
    assert (
        main(
            [
                "match",
                a,
                b,
                a,
                "--multi",
                "anchor",
                "--method",
                "sinkhorn",
                "--option",
                "steps=20",
                "--option",
                "iters=5",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "anchor-sinkhorn" and len(summary["models"]) == 3
    assert summary["models"][2]["l2_to_reference_after"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "sinkhorn", "--option", "steps=0"], "steps must be at least 1"),
        (["--method", "sinkhorn", "--option", "steps"], "not KEY=VALUE"),
        (["--method", "sinkhorn", "--option", "bogus=1"], "no option 'bogus'"),
        (["--method", "weight", "--option", "steps=3"], "method 'weight' has no option 'steps'"),
        (["--method", "weight", "--epochs", "2"], "--epochs applies to --method ste only"),
    ],
)
def test_cli_bad_options_exit_2(checkpoints, tmp_path, capsys, argv, message):
    _, _, a, b = checkpoints
    assert main(["match", a, b, *argv, "--out", str(tmp_path / "p.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_cli_mergemany_refused_for_sinkhorn(checkpoints, tmp_path, capsys):
    _, _, a, b = checkpoints
    assert main(["match", a, b, a, "--multi", "mergemany", "--method", "sinkhorn", "--out", str(tmp_path / "m")]) == 2
    assert "not defined for sinkhorn" in capsys.readouterr().err


def test_cli_methods_lists_references(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for word in ("weight:", "activation:", "ste:", "sinkhorn:", "Pena", "Ainsworth", "reference:"):
        assert word in text
    assert main(["methods", "sinkhorn", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == ["sinkhorn"] and "CVPR 2023" in entries[0]["reference"]
    assert main(["methods", "bogus"]) == 2
