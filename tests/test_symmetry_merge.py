"""Merging and several-model matching under a symmetry class (issue 29): anchor and MergeMany over transforms."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.cli import main
from lmckit.match.symmetric_many import match_many_sym
from lmckit.perm import spec_for
from lmckit.perm.symmetry import apply_transform, derive_symmetry, random_transform

from .test_match_symmetric import _vit


@pytest.fixture(scope="module")
def planted():
    """Model 0 and two random orthogonal transforms of it (every model the same function)."""
    a = _vit("layernorm", 0)
    spec = spec_for(a)
    sd = {k: v.double() for k, v in a.state_dict().items()}
    sym = derive_symmetry(spec, sd, "orthogonal", model=a)
    return a, spec, [sd] + [apply_transform(spec, sym, random_transform(spec, sym, s), sd) for s in (3, 4)]


@pytest.mark.parametrize("multi", ["anchor", "mergemany"])
def test_planted_transforms_are_recovered_in_model_0s_frame(planted, multi):
    a, spec, states = planted
    res = match_many_sym(spec, states, "orthogonal", model=a, multi=multi)
    assert res.converged and torch.equal(res.transforms[0]["patch"], torch.eye(16, dtype=torch.float64))
    for al in res.aligned[1:]:  # every model mapped exactly onto model 0
        num = sum(float((states[0][k] - al[k]).pow(2).sum()) for k in states[0] if states[0][k].is_floating_point())
        den = sum(float(v.pow(2).sum()) for v in states[0].values() if v.is_floating_point())
        assert (num / den) ** 0.5 < 1e-6  # the bar for planted transforms
    assert all(p["relative_l2_after"] < 1e-6 for p in res.per_model)


def test_mergemany_raises_the_pairwise_objective_and_keeps_each_function():
    models = [_vit("layernorm", s) for s in range(3)]
    spec = spec_for(models[0])
    states = [{k: v.double() for k, v in m.state_dict().items()} for m in models]
    res = match_many_sym(spec, states, "orthogonal", model=models[0], multi="mergemany", passes=6)
    obj = res.objective
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(obj, obj[1:])) and obj[-1] > obj[1] > obj[0]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    for m, al in zip(models, res.aligned):  # the transform (in model 0's frame) keeps each model's function
        ref = m.double().eval()(x)
        t = _vit("layernorm", 9).double().eval()
        t.load_state_dict(al)
        assert torch.allclose(t(x), ref, atol=1e-9, rtol=1e-9)


def test_merge_cli_orthogonal_writes_transform_files_that_barrier_reads(tmp_path, capsys):
    from lmckit.checkpoint import save_model

    paths = [str(save_model(tmp_path / f"m{i}.safetensors", _vit("layernorm", i))) for i in range(3)]
    base = ["--dataset", "synthetic", "--points", "3", "--no-curve", "--max-iter", "60", "--json"]
    out = tmp_path / "merged"
    assert main(["merge", *paths, "--symmetry", "orthogonal", "--out", str(out), *base]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["symmetry"] == "orthogonal" and rep["parameterisation"] == "folded"
    assert rep["alignment"]["classes"]["patch"] == "orthogonal" and len(rep["transform_files"]) == 3
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "merge.json",
        "merged.safetensors",
        "transform_0.safetensors",
        "transform_1.safetensors",
        "transform_2.safetensors",
    ]
    # the anchor barrier 0-1 of merge equals `lmckit barrier m0 m1 --perm transform_1.safetensors`
    args = ["barrier", paths[0], paths[1], "--perm", str(out / "transform_1.safetensors"), "--dataset", "synthetic"]
    assert main([*args, "--points", "3", "--json"]) == 0
    curve = json.loads(capsys.readouterr().out)
    anchor = next(b for b in rep["anchor_barriers"] if b["models"] == [0, 1])
    assert curve["loss_barrier"] == pytest.approx(anchor["loss_barrier"], rel=1e-4, abs=1e-6)
    # the permutation merge of the same models: a smaller class, a higher anchor barrier sum is not
    # guaranteed, but the default output keeps its perm files and has no symmetry keys
    plain = tmp_path / "plain"
    assert main(["merge", *paths, "--out", str(plain), *base]) == 0
    rep2 = json.loads(capsys.readouterr().out)
    assert "symmetry" not in rep2 and len(rep2["perm_files"]) == 3 and (plain / "perm_2.json").is_file()
    # the folder reused by a two-model orthogonal merge: the earlier run's perm files go, only 0 and 1 remain
    assert main(["merge", *paths[:2], "--symmetry", "orthogonal", "--out", str(plain), *base]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in plain.iterdir() if p.name.startswith(("perm_", "transform_")))
    assert names == ["transform_0.safetensors", "transform_1.safetensors"]
    # mergemany under the class
    mm = tmp_path / "mm"
    assert main(["merge", *paths, "--symmetry", "orthogonal", "--multi", "mergemany", "--out", str(mm), *base]) == 0
    rep3 = json.loads(capsys.readouterr().out)
    assert (
        rep3["multi"] == "mergemany" and rep3["alignment"]["objective_after"] >= rep3["alignment"]["objective_before"]
    )


def test_merge_cli_symmetry_refusals(tmp_path, capsys):
    from lmckit.checkpoint import save_model

    paths = [str(save_model(tmp_path / f"m{i}.safetensors", _vit("none", i))) for i in range(2)]
    args = ["merge", *paths, "--dataset", "synthetic", "--out", str(tmp_path / "o")]
    assert main([*args, "--symmetry", "orthogonal", "--method", "activation"]) == 2
    assert "aligns by weight matching, not activation" in capsys.readouterr().err
    assert main([*args, "--symmetry", "invertible"]) == 2
    capsys.readouterr()
    assert main([*args, "--symmetry", "orthogonal", "--restarts", "3"]) == 2
    assert "--restarts is not used under --symmetry orthogonal" in capsys.readouterr().err
    t = str(tmp_path / "t.safetensors")
    assert main(["match", *paths, "--symmetry", "orthogonal", "--restarts", "2", "--out", t]) == 2
    assert "--restarts is not used" in capsys.readouterr().err and not (tmp_path / "t.safetensors").exists()
    assert not (tmp_path / "o").exists()
