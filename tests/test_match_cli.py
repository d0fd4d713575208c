"""`lmckit match` end to end (in process): perm files, summaries, multi-model folders, user errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, load_perms, random_permutation, spec_for


@pytest.fixture()
def family(tmp_path):
    """Checkpoint A, two planted permutations of it (B, C), and an independent D."""
    torch.manual_seed(0)
    m = create_model("mlp_tiny", norm="batchnorm")
    spec = spec_for(m)
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    sd = {k: (v.abs() if "running_var" in k else v) for k, v in sd.items()}
    planted = {"B": random_permutation(spec, 5), "C": random_permutation(spec, 6)}
    paths = {"A": save_model(tmp_path / "a.safetensors", m, sd)}
    for name, p in planted.items():
        paths[name] = save_model(tmp_path / f"{name.lower()}.safetensors", m, apply_permutation(spec, p, sd))
    torch.manual_seed(9)
    d = create_model("mlp_tiny", norm="batchnorm")
    paths["D"] = save_model(tmp_path / "d.safetensors", d, dataset="synthetic")
    return spec, sd, planted, {k: str(v) for k, v in paths.items()}


def test_weight_match_json_and_perm_file(family, tmp_path, capsys):
    spec, sd, planted, paths = family
    out = tmp_path / "perm.json"
    assert main(["match", paths["A"], paths["B"], "--out", str(out), "--json", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("objective", "l2_before", "l2_after", "sweeps", "seconds"):
        assert key in summary
    assert summary["l2_before"] > 1 and summary["l2_after"] == 0.0
    assert summary["coverage"]["groups"] == 2
    perms = load_perms(out, spec)
    inv = invert_permutation(planted["B"])
    assert all(torch.equal(perms[g], inv[g]) for g in spec.sizes)
    raw = json.loads(out.read_text())
    assert raw["method"] == "weight" and raw["seed"] == 3
    assert raw["model_a"] == paths["A"] and raw["model_b"] == paths["B"]


def test_weight_match_text_summary(family, tmp_path, capsys):
    _, _, _, paths = family
    assert main(["match", paths["A"], paths["D"], "--out", str(tmp_path / "p.json"), "--restarts", "2"]) == 0
    text = capsys.readouterr().out
    for word in ("objective:", "L2 distance:", "sweeps:", "seconds:", "spec:", "wrote"):
        assert word in text


def test_activation_match_uses_recorded_dataset(family, tmp_path, capsys):
    _, sd, _, paths = family
    out = tmp_path / "am.json"
    # D records dataset "synthetic" in its metadata: no --dataset needed
    assert (
        main(
            [
                "match",
                paths["D"],
                paths["A"],
                "--method",
                "activation",
                "--num-batches",
                "1",
                "--batch-size",
                "64",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "activation" and summary["sweeps"] == 1
    raw = json.loads(out.read_text())
    assert raw["dataset"] == "synthetic" and raw["similarity"] == "pearson"


def test_activation_match_recovers_planted_with_dataset_flag(family, tmp_path, capsys):
    spec, _, planted, paths = family
    out = tmp_path / "am.json"
    assert (
        main(
            [
                "match",
                paths["A"],
                paths["B"],
                "--method",
                "activation",
                "--dataset",
                "synthetic",
                "--num-batches",
                "2",
                "--batch-size",
                "100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    perms = load_perms(out, spec)
    inv = invert_permutation(planted["B"])
    assert all(torch.equal(perms[g], inv[g]) for g in spec.sizes)


def test_activation_without_dataset_is_exit_2(family, tmp_path, capsys):
    _, _, _, paths = family
    code = main(["match", paths["A"], paths["B"], "--method", "activation", "--out", str(tmp_path / "x.json")])
    assert code == 2
    assert "--dataset" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("multi", ["anchor", "mergemany"])
def test_multi_writes_one_perm_per_model(family, tmp_path, capsys, multi):
    spec, sd, planted, paths = family
    out = tmp_path / f"multi_{multi}"
    assert main(["match", paths["A"], paths["B"], paths["C"], "--multi", multi, "--out", str(out), "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] in ("anchor-weight", "mergemany") and len(summary["models"]) == 3
    for i, name in enumerate("ABC"):
        perms = load_perms(out / f"perm_{i}.json", spec)
        state = sd if name == "A" else apply_permutation(spec, planted[name], sd)
        aligned = apply_permutation(spec, perms, state)
        assert all(torch.equal(aligned[k], sd[k]) for k in sd)
        assert summary["models"][i]["l2_to_reference_after"] == 0.0


def test_user_errors_exit_2(family, tmp_path, capsys):
    _, _, _, paths = family
    out = str(tmp_path / "p.json")
    assert main(["match", paths["A"], paths["B"], paths["C"], "--out", out]) == 2
    assert "--multi" in capsys.readouterr().err
    assert main(["match", paths["A"], str(tmp_path / "missing.safetensors"), "--out", out]) == 2
    assert main(["match", paths["A"], paths["B"], "--max-iter", "0", "--out", out]) == 2
    assert (
        main(
            [
                "match",
                paths["A"],
                paths["B"],
                paths["C"],
                "--multi",
                "mergemany",
                "--method",
                "activation",
                "--out",
                out,
            ]
        )
        == 2
    )
    torch.manual_seed(0)
    other = save_model(tmp_path / "wide.safetensors", create_model("mlp_tiny", norm="batchnorm", width=20))
    assert main(["match", paths["A"], str(other), "--out", out]) == 2
    assert "different models" in capsys.readouterr().err
    # a NaN checkpoint: store refuses it (or WM does) with exit 2, never a traceback
    m = create_model("mlp_tiny", norm="batchnorm")
    sd = m.state_dict()
    sd["fc1.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    try:
        save_model(bad, m, sd)
    except Exception:
        return
    assert main(["match", paths["A"], str(bad), "--out", out]) == 2
