"""``--arch module:callable``: users' own architectures on plain safetensors state dicts, and check-spec's exit
codes."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from lmckit.cli import main

MODULE = textwrap.dedent('''
    import torch, torch.nn as nn

    class Net(nn.Module):
        """Tokens -> Linear -> MultiheadAttention block -> mean -> head (images flattened into 4 tokens of 196)."""
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(196, 8)
            self.ln = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 10)
            self.example_input = torch.zeros(2, 1, 28, 28)

        def forward(self, x):
            t = self.embed(x.reshape(x.shape[0], 4, 196))
            y = self.ln(t)
            t = t + self.attn(y, y, y, need_weights=False)[0]
            return self.head(t.mean(1))

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.example_input = torch.zeros(2, 3, 8)

        def forward(self, x):
            return self.enc(x).sum(1)

    def build():
        return Net()

    def not_a_module():
        return 3
''')


@pytest.fixture
def arch(tmp_path, monkeypatch):
    (tmp_path / "user_arch_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_arch_mod", None)
    import user_arch_mod

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sd = user_arch_mod.Net().state_dict()
        p = tmp_path / f"m{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    return paths, tmp_path


def test_check_spec_and_match_on_a_user_architecture(arch, capsys):
    (a, b), tmp = arch
    assert main(["check-spec", a, "--arch", "user_arch_mod:build", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["coverage"]["heads"] == {"attn": {"heads": 2, "groups": ["attn.qk", "attn.vo"]}}
    out = tmp / "wm.json"
    assert (
        main(["match", a, b, "--arch", "user_arch_mod:build", "--method", "weight", "--out", str(out), "--json"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["l2_after"] < res["l2_before"]
    perms = json.loads(out.read_text())["perms"]
    assert set(perms) == {"embed", "attn.qk", "attn.vo"}


def test_check_spec_exit_2_when_nothing_is_permuted(arch, capsys):
    assert main(["check-spec", "-", "--arch", "user_arch_mod:Opaque"]) == 2
    out = capsys.readouterr().out
    assert "NO UNITS PERMUTED" in out and "TransformerEncoderLayer" in out


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("user_arch_mod", "MODULE:CALLABLE"),
        ("no_such_mod_xyz:build", "cannot import"),
        ("user_arch_mod:missing", "no callable"),
        ("user_arch_mod:not_a_module", "not an nn.Module"),
    ],
)
def test_bad_arch_is_a_clear_error(arch, capsys, spec, needle):
    (a, b), _ = arch
    assert main(["check-spec", a, "--arch", spec]) == 2
    assert needle in capsys.readouterr().err
