"""`--symmetry` on check-spec, match, barrier and `lmckit methods` (issue 29), run in-process."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from lmckit.checkpoint import save_model
    from lmckit.models import create_model

    d = tmp_path_factory.mktemp("sym")
    out = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("vit_tiny")
        with torch.no_grad():  # non-trivial LayerNorm gains so folding matters
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out.append(save_model(d / f"m{s}.safetensors", m))
    return d, out


def test_check_spec_symmetry_cli(capsys):
    assert main(["check-spec", "vit_tiny", "--symmetry", "orthogonal"]) == 0
    out = capsys.readouterr().out
    assert "patch: orthogonal, fixing the all-ones direction" in out and "function preserved" in out
    assert "blocks.0.fc1: permutation; limited by GELU 'blocks.0.act'" in out
    assert main(["check-spec", "lstm", "--width-mult", "0.125", "--symmetry", "orthogonal", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert not rep["ok"] and "LSTM 'lstm'" in rep["refusal"] and rep["train_diff"] is None  # never measured


def test_match_barrier_with_a_transform_file(pair, capsys):
    d, (a, b) = pair
    t = d / "t.safetensors"
    assert main(["match", str(a), str(b), "--symmetry", "orthogonal", "--out", str(t), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["classes"]["patch"] == "orthogonal" and rep["classes"]["blocks.0.fc1"] == "permutation"
    assert rep["relative_l2_after"] < rep["relative_l2_before"] and len(rep["folded"]) == 3
    from safetensors import safe_open

    with safe_open(str(t), "pt") as f:
        head = json.loads(f.metadata()["lmckit_transform"])
        assert f.get_tensor("patch").shape == (8, 8) and f.get_tensor("blocks.0.fc1").dtype == torch.int64
    assert head["format"] == "lmckit.transform" and head["symmetry"] == "orthogonal"
    args = ["barrier", str(a), str(b), "--perm", str(t), "--dataset", "synthetic", "--points", "3", "--json"]
    assert main(args) == 0
    curve = json.loads(capsys.readouterr().out)
    assert curve["symmetry"] == "orthogonal" and curve["parameterisation"] == "folded"
    # folding and an orthogonal map keep each endpoint's function: the endpoints match the raw models'
    assert main(args[:3] + args[5:]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert curve["loss"][0] == pytest.approx(raw["loss"][0], rel=1e-5)
    assert curve["loss"][-1] == pytest.approx(raw["loss"][-1], rel=1e-5)
    # the file is refused for other models (the swapped pair), as perm files are
    assert main(["barrier", str(b), str(a), "--perm", str(t), "--dataset", "synthetic", "--points", "3"]) == 2
    assert "was computed for other models" in capsys.readouterr().err


def test_match_symmetry_refusals(pair, capsys):
    d, (a, b) = pair
    base = ["match", str(a), str(b), "--symmetry", "orthogonal"]
    assert main(base + ["--out", str(d / "x.json")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(base + ["--method", "ste", "--out", str(d / "x.safetensors")]) == 2
    assert "supports the permutation class only" in capsys.readouterr().err
    assert main(["match", str(a), str(b), "--symmetry", "invertible", "--out", str(d / "x.safetensors")]) == 2
    assert "no exact step for invertible" in capsys.readouterr().err


def test_a_tampered_transform_file_is_refused(pair, tmp_path, capsys):
    d, (a, b) = pair
    t = d / "t2.safetensors"
    assert main(["match", str(a), str(b), "--symmetry", "orthogonal", "--out", str(t), "--json"]) == 0
    capsys.readouterr()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(t), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(t))
    tensors["patch"] = tensors["patch"] * 1.01  # no longer orthogonal
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert main(["barrier", str(a), str(b), "--perm", str(bad), "--dataset", "synthetic", "--points", "3"]) == 2
    assert "group 'patch' is not orthogonal" in capsys.readouterr().err
    # an orthogonal map that does not fix the all-ones direction, with the header saying it need not (as in a
    # file computed for a model without LayerNorm): the model's LayerNorm stream decides, even with --force-perm
    import json as _json

    from lmckit.perm.symmetry import sample

    head = _json.loads(meta["lmckit_transform"])
    head["groups"]["patch"]["fix_ones"] = False
    tensors = load_file(str(t))
    tensors["patch"] = sample("orthogonal", tensors["patch"].shape[0], torch.Generator().manual_seed(0)).contiguous()
    save_file(tensors, str(bad), metadata={**meta, "lmckit_transform": _json.dumps(head)})
    args = ["barrier", str(a), str(b), "--perm", str(bad), "--dataset", "synthetic", "--points", "3"]
    for extra in ([], ["--force-perm"]):
        assert main(args + extra) == 2
        assert "does not fix the all-ones direction" in capsys.readouterr().err


def test_methods_lists_symmetries(capsys):
    assert main(["methods", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["weight"]["symmetries"] == ["permutation", "signed", "orthogonal"]
    assert entries["ste"]["symmetries"] == ["permutation"]
