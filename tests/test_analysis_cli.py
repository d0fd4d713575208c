"""``lmckit analyze`` end to end on tiny checkpoints with a planted permutation."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, save_perms, spec_for


@pytest.fixture()
def pair(tmp_path):
    torch.manual_seed(0)
    m = create_model("mlp_tiny")
    spec = spec_for(m)
    pi = random_permutation(spec, 2)
    sd_b = apply_permutation(spec, pi, m.state_dict())
    a = save_model(tmp_path / "a.safetensors", m, dataset="synthetic")
    b = save_model(tmp_path / "b.safetensors", m, state=sd_b, dataset="synthetic")
    p = save_perms(tmp_path / "perm.json", invert_permutation(pi))
    return tmp_path, a, b, p


def test_analyze_json_and_plots(pair, capsys):
    tmp, a, b, p = pair
    rc = main(
        [
            "analyze",
            str(a),
            str(b),
            "--perm",
            str(p),
            "--json",
            "--plot",
            str(tmp / "plots"),
            "--taylor",
            "--taylor-samples",
            "200",
            "--rank-fractions",
            "0.25",
            "1",
            "--limit",
            "200",
            "--projection-batches",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["l2_before"] > 0.5 and out["l2_after"] == pytest.approx(0.0, abs=1e-6)
    assert set(out["R"]) == {"0", "0.3"}
    assert out["R"]["0.3"]["after"] == pytest.approx(1.0, abs=1e-6) and out["R"]["0"]["before"] < 0.5
    names = [r["name"] for r in out["per_layer"]]
    assert names == ["fc0", "fc1", "fc2"]
    assert all({"shape", "l2_before", "l2_after", "R", "kept"} <= set(r) for r in out["per_layer"])
    # B is A permuted: the midpoint after un-permuting is A itself, so both barriers vanish.
    assert out["measured_midpoint"] == pytest.approx(0.0, abs=1e-5)
    assert out["taylor_midpoint"] == pytest.approx(0.0, abs=1e-5)
    sweep = out["rank_sweep"]
    assert set(sweep) == {"A", "midpoint"} and [r["kind"] for r in sweep["A"]] == [
        "full",
        "gamma",
        "fraction",
        "fraction",
    ]
    assert sweep["midpoint"][0]["acc"] == sweep["A"][0]["acc"]
    assert [r["name"] for r in out["input_projections"]] == names
    pngs = {p.name for p in (tmp / "plots").glob("*.png")}
    assert pngs == {
        "spectra.png",
        "R_bars.png",
        "per_index_alignment.png",
        "cross_alignment.png",
        "input_projections.png",
        "rank_sweep.png",
    }
    assert all((tmp / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_analyze_readable_without_perm(pair, capsys):
    _, a, b, _ = pair
    assert main(["analyze", str(a), str(b), "--no-data", "--gamma", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "R(gamma=0.5)" in text and "no permutation given" in text and "fc1" in text


def test_analyze_errors(pair, tmp_path, capsys):
    _, a, b, _ = pair
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"format": "lmckit.permutation", "version": 1, "perms": {"P0": [0, 1], "P1": list(range(16))}})
    )
    assert main(["analyze", str(a), str(b), "--perm", str(bad), "--no-data"]) == 2
    assert "P0" in capsys.readouterr().err
    other = save_model(tmp_path / "c.safetensors", create_model("mlp_tiny", width=8))
    assert main(["analyze", str(a), str(other), "--no-data"]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["analyze", str(a), str(b), "--gamma", "1.5", "--no-data"]) == 2
    assert main(["analyze", str(a), str(b), "--dataset", "synthetic-rgb"]) == 2
    assert "expect" in capsys.readouterr().err
