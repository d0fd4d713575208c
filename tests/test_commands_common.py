"""The shared checkpoint loader of the CLI commands: one architecture check for barrier, match, merge, analyze."""

from __future__ import annotations

import pytest
import torch

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.commands.common import architecture_difference, load_checkpoints, model_config_with_defaults
from lmckit.errors import LmcError
from lmckit.models import create_model


def _save(path, seed=0, **kw):
    torch.manual_seed(seed)
    return save_model(path, create_model("mlp_tiny", **kw), dataset="synthetic")


def test_defaults_are_spelled_out():
    full = model_config_with_defaults({"name": "mlp_tiny"})
    assert full["norm"] == "none" and full["width_mult"] == 1.0 and full["activation"] == "relu" and full["width"] == 16
    assert architecture_difference({"name": "mlp_tiny"}, {"name": "mlp_tiny", "norm": "none", "width_mult": 1}) == {}
    assert architecture_difference({"name": "mlp_tiny"}, {"name": "mlp_tiny", "activation": "tanh"}) == {
        "activation": ("relu", "tanh")
    }
    # an unknown name is compared as it is (nothing is built)
    assert "name" in architecture_difference({"name": "mlp_tiny"}, {"name": "os.system"})


def test_spelled_out_defaults_load_as_one_architecture(tmp_path):
    a = _save(tmp_path / "a.safetensors", 0)
    b = _save(tmp_path / "b.safetensors", 1, norm="none", width_mult=1.0)
    states, infos, model, spec = load_checkpoints([a, b])
    assert len(states) == 2 and infos[1]["model"]["norm"] == "none"
    assert torch.equal(model.state_dict()["fc0.weight"], states[0]["fc0.weight"])
    assert set(spec.axes) == set(states[1])


@pytest.mark.parametrize("command", ["barrier", "match", "analyze"])
def test_same_shapes_other_activation_is_refused(tmp_path, capsys, command, monkeypatch):
    """Same tensor shapes are not enough: a tanh MLP is not a ReLU MLP."""
    monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
    a = _save(tmp_path / "a.safetensors", 0)
    t = _save(tmp_path / "t.safetensors", 1, activation="tanh")
    with pytest.raises(LmcError, match=r"t\.safetensors are different models.*'activation': 'relu'.*'tanh'"):
        load_checkpoints([a, t])
    tail = {"barrier": ["--points", "3"], "match": ["--out", str(tmp_path / "p.json")], "analyze": ["--no-data"]}[
        command
    ]
    assert main([command, str(a), str(t), *tail]) == 2
    assert "different models" in capsys.readouterr().err
    b = _save(tmp_path / "b.safetensors", 1, norm="none")
    tail = {
        "barrier": ["--points", "3", "--limit", "50"],
        "match": ["--out", str(tmp_path / "p.json")],
        "analyze": ["--no-data"],
    }[command]
    assert main([command, str(a), str(b), *tail]) == 0
