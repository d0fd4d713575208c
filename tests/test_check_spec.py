"""`lmckit check-spec`, run in-process."""

from __future__ import annotations

import json

from lmckit.cli import main
from lmckit.models import create_model


def test_check_spec_model_name_text(capsys):
    assert main(["check-spec", "resnet_tiny", "--image-size", "8", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "function preserved" in out
    assert "6 groups, 56 units" in out  # resnet_tiny at width 1/4: 4 + 4 + 8 + 8 + 16 + 16
    assert "train mode" in out and "eval mode" in out and "running-stats" in out


def test_check_spec_json_and_options(capsys):
    assert main(["check-spec", "mlp", "--width-mult", "0.125", "--norm", "batchnorm", "--traced", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True and rep["spec_source"] == "traced"
    assert rep["groups"] == {"fc0": 64, "fc1": 64, "fc2": 64}
    cov = rep["coverage"]
    # every entry but the output bias and three num_batches_tracked counters is permuted
    assert cov["entries"] == 4 * 2 + 3 * 5 and cov["entries_permuted"] == cov["entries"] - 4
    assert max(rep["train_diff"], rep["eval_diff"], rep["stats_diff"]) < 1e-10


def test_check_spec_checkpoint(tmp_path, capsys):
    from lmckit.checkpoint import save_model

    model = create_model("vgg_tiny", in_channels=1, image_size=12)
    f = save_model(tmp_path / "m.safetensors", model)
    assert main(["check-spec", str(f), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["kind"] == "checkpoint" and rep["coverage"]["groups"] == 3
    assert main(["check-spec", str(f), "--norm", "none"]) == 2
    assert "apply to model names" in capsys.readouterr().err


def test_check_spec_unknown_model_exits_2(capsys):
    assert main(["check-spec", "resnet2O"]) == 2
    err = capsys.readouterr().err
    assert "neither a registered model" in err and "did you mean" in err


def test_check_spec_exits_1_when_the_spec_breaks_the_function(monkeypatch, capsys):
    from lmckit.models.mlp import MLP

    def broken(self, b):
        for i in range(self.depth):
            g = b.group(f"P{i}", self.width)
            b.out_axis(f"fc{i}", g)
            b.out_axis(f"norm{i}", g)
            if i > 0:  # forgets that fc1's inputs follow P0
                b.in_axis(f"fc{i + 1}", g)

    monkeypatch.setattr(MLP, "permutation_rules", broken)
    assert main(["check-spec", "mlp_tiny"]) == 1
    out = capsys.readouterr().out
    assert "FUNCTION CHANGED" in out and "P0" in out
    assert main(["check-spec", "mlp_tiny", "--traced"]) == 0  # tracing does not use the broken rule
