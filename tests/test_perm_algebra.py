"""Permutation algebra and zoo-model specs: planted truth, asserted."""

from __future__ import annotations

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.models import create_model, list_models
from lmckit.models.registry import PROVIDERS
from lmckit.perm import (
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
    spec_for,
    validate_perms,
)

#: the image zoo (models a higher layer provides, hf-gpt2, have their own tier: tests/test_hf_gpt2_zoo.py)
IMAGE_ZOO = [n for n in list_models() if n not in PROVIDERS]


def _model(name, norm, channels=1, size=28):
    torch.manual_seed(0)
    kw = {"in_channels": channels, "image_size": size, "norm": norm}
    if not name.endswith("tiny") and name != "mlp":
        kw["width_mult"] = 0.125
    return create_model(name, **kw)


@pytest.mark.parametrize("name", IMAGE_ZOO)
@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
def test_zoo_permutation_preserves_function(name, norm):
    m = _model(name, norm)
    spec = spec_for(m)
    assert spec.coverage()["units"] > 0
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 1, 28, 28))  # non-trivial BN running stats
    m.eval()
    x = torch.randn(8, 1, 28, 28)
    y = m(x)
    perms = random_permutation(spec, seed=3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    m2 = _model(name, norm)
    m2.load_state_dict(apply_permutation(spec, perms, m.state_dict()))
    m2.eval()
    y2 = m2(x)
    assert (y2 - y).abs().max() <= 1e-5 * y.abs().max()
    # and the permuted weights really differ (the check can fail)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert any(not torch.equal(sd[k], sd2[k]) for k in sd if sd[k].is_floating_point())


def test_invert_and_compose():
    spec = spec_for(_model("mlp_tiny", "batchnorm"))
    sd = _model("mlp_tiny", "batchnorm").state_dict()
    p, q = random_permutation(spec, 1), random_permutation(spec, 2)
    back = apply_permutation(spec, invert_permutation(p), apply_permutation(spec, p, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    two = apply_permutation(spec, q, apply_permutation(spec, p, sd))
    one = apply_permutation(spec, compose_permutations(p, q), sd)
    assert all(torch.equal(two[k], one[k]) for k in sd)
    ident = identity_permutation(spec)
    assert all(torch.equal(compose_permutations(p, invert_permutation(p))[g], ident[g]) for g in p)


def test_apply_does_not_modify_input():
    m = _model("mlp_tiny", "none")
    spec = spec_for(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    apply_permutation(spec, random_permutation(spec, 0), sd)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"P0": list(range(16))}, "missing groups"),
        ({"P0": list(range(16)), "P1": list(range(16)), "X": [0]}, "unknown groups"),
        ({"P0": list(range(15)), "P1": list(range(16))}, "has 15 entries"),
        ({"P0": [0] * 16, "P1": list(range(16))}, "duplicated"),
        ({"P0": list(range(1, 17)), "P1": list(range(16))}, "outside"),
        ({"P0": [0.5] * 16, "P1": list(range(16))}, "non-integer"),
    ],
)
def test_validate_rejects_non_permutations(bad, msg):
    spec = spec_for(_model("mlp_tiny", "none"))
    with pytest.raises(LmcError, match=msg):
        validate_perms(spec, bad)


def test_check_state_mismatch():
    spec = spec_for(_model("mlp_tiny", "none"))
    other = create_model("mlp_tiny", width=8).state_dict()
    with pytest.raises(LmcError, match="shape"):
        spec.check_state(other)
    with pytest.raises(LmcError, match="missing"):
        spec.check_state({k: v for k, v in _model("mlp_tiny", "none").state_dict().items() if "fc0" not in k})
