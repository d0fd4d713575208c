"""The outside check's glue (benchmarks/outside_check_ste_mm.py): parameter names, permutation names, output check.

The check itself runs the STE-MM authors' code (github e5-a/STE-MM) and is never run by the test suite.
The test that loads their ``Net`` skips unless the reference code (``LMCKIT_STE_MM_REF``, default
/work/ref/STE-MM) and torchopt (which their ``ste`` imports) are present; the others need only lmckit.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmckit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("LMCKIT_STE_MM_REF", "/work/ref/STE-MM"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def oc():
    return _load("outside_check_ste_mm", ROOT / "benchmarks" / "outside_check_ste_mm.py")


def test_names_round_trip(oc):
    torch.manual_seed(0)
    sd = create_model("mlp", depth=3, width=32).state_dict()
    mapped = oc.lmckit_to_authors(sd)
    assert sorted(mapped) == sorted(f"layer{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    back = oc.authors_to_lmckit(mapped)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


def test_names_refuse_norm_layers(oc):
    sd = create_model("mlp", depth=2, width=8, norm="layernorm").state_dict()
    with pytest.raises(oc.CheckError, match="no counterpart"):
        oc.lmckit_to_authors(sd)
    with pytest.raises(oc.CheckError, match="no lmckit counterpart"):
        oc.authors_to_lmckit({"flatten.weight": torch.zeros(1)})


def test_perm_groups_follow_the_rows(oc):
    ps = SimpleNamespace(
        perm_to_axes={
            "P_0": [("layer2.weight", 0), ("layer2.bias", 0), ("layer3.weight", 1)],
            "P_1": [("layer0.weight", 0), ("layer0.bias", 0), ("layer1.weight", 1)],
        }
    )
    assert oc.authors_perm_groups(ps) == {"P_0": "P2", "P_1": "P0"}
    with pytest.raises(oc.CheckError, match="exactly one layer"):
        oc.authors_perm_groups(SimpleNamespace(perm_to_axes={"P_0": [("layer1.weight", 1)]}))


def test_verdict_rule(oc):
    a, b = oc.stats([1.0, 2.0, 3.0]), oc.stats([2.5, 2.5, 2.5])  # std 1 and 0: |2 - 2.5| <= 1
    assert oc.agree(a, b) is True
    assert oc.agree(a, oc.stats([3.5, 3.5, 3.5])) is False  # |2 - 3.5| > 1
    assert oc.agree(oc.stats([1.0]), b) is None  # one pair: no spread


@pytest.mark.skipif(not (REF / "srcs" / "networks" / "mlp.py").exists(), reason=f"no STE-MM reference code at {REF}")
def test_authors_net_gives_lmckit_outputs(oc):
    pytest.importorskip("torchopt", reason="torchopt (imported by the authors' ste) is not installed here")
    net_mod = _load("ste_mm_networks_mlp", REF / "srcs" / "networks" / "mlp.py")
    torch.manual_seed(1)
    model = create_model("mlp", depth=3, width=512).eval()
    net = oc.load_authors_net(model.state_dict(), net_mod.Net)
    x = torch.rand(64, 1, 28, 28)
    assert oc.check_same_outputs(model, net, x) == 0.0
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
        net.layer1.weight[0, 0] += 1.0  # a wrong weight anywhere must be caught
    with pytest.raises(oc.CheckError, match="disagree"):
        oc.check_same_outputs(model, net, x)
