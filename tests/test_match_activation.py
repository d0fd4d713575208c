"""Activation matching: planted permutations recovered from activations, models left untouched, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmckit.errors import LmcError
from lmckit.match import activation_matching
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for


def _pair_planted(name, norm, seed=0):
    torch.manual_seed(seed)
    kw = {"in_channels": 1, "image_size": 28, "norm": norm}
    a = create_model(name, **kw)
    spec = spec_for(a)
    if norm == "batchnorm":  # non-trivial running statistics
        a.train()
        with torch.no_grad():
            a(torch.randn(64, 1, 28, 28))
    a.eval()
    planted = random_permutation(spec, seed=3)
    b = create_model(name, **kw)
    b.load_state_dict(apply_permutation(spec, planted, a.state_dict()))
    return spec, a, b, planted


CASES = [
    ("mlp_tiny", "none"),
    ("mlp_tiny", "batchnorm"),
    ("mlp_tiny", "layernorm"),
    ("vgg_tiny", "batchnorm"),
    ("vgg_tiny", "layernorm"),
    ("resnet_tiny", "batchnorm"),
    ("resnet_tiny", "layernorm"),
]


@pytest.mark.parametrize("name,norm", CASES)
@pytest.mark.parametrize("method", ["pearson", "cross_moment"])
def test_planted_permutation_recovered(synthetic, name, norm, method):
    spec, a, b, planted = _pair_planted(name, norm)
    # conv sites give one sample per pixel: a few images are plenty
    nb, bs = (2, 100) if name.startswith("mlp") else (1, 16)
    res = activation_matching(a, b, synthetic, num_batches=nb, batch_size=bs, method=method)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    assert res.method == "activation" and res.sweeps == 1
    assert res.final_objective > res.initial_objective
    if method == "pearson":
        # a unit correlates perfectly with its copy: mean matched correlation ~1 (dead units would give 0)
        per = res.extra["mean_matched_similarity"]
        assert all(v == pytest.approx(1.0, abs=1e-6) or v > 0.5 for v in per.values())


def test_dead_units_are_the_only_ties(synthetic):
    """Without a norm some ResNet units never fire: only they may be assigned differently (same function)."""
    spec, a, b, planted = _pair_planted("resnet_tiny", "none")
    res = activation_matching(a, b, synthetic, num_batches=1, batch_size=32)
    inv = invert_permutation(planted)
    # dead units of A at the stream's sites: zero variance in every sample
    acts = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, k=k: acts.setdefault(k, []).append(o.detach()))
        for k, mods in [(g, ms) for g, ms in a.hidden_modules().items()]
        for m in mods
    ]
    with torch.no_grad():
        for x, _ in synthetic.batches("train", 64, limit=64):
            a(x)
    for h in hooks:
        h.remove()
    for g in spec.sizes:
        wrong = (res.perms[g] != inv[g]).nonzero().flatten().tolist()
        if wrong:
            z = torch.cat([o.movedim(1, -1).reshape(-1, spec.sizes[g]) for o in acts[g]])
            assert all(float(z[:, i].std()) < 1e-6 for i in wrong), (g, wrong)
    # outputs agree after alignment, whatever the ties did
    b2 = create_model("resnet_tiny", in_channels=1, image_size=28, norm="none")
    b2.load_state_dict(apply_permutation(spec, res.perms, b.state_dict()))
    x, _ = synthetic.tensors("test", limit=32)
    with torch.no_grad():
        assert torch.allclose(a(x), b2(x), atol=1e-5)


def test_independent_models_improve_and_are_reproducible(synthetic):
    torch.manual_seed(0)
    a = create_model("mlp_tiny", in_channels=1, image_size=28)
    b = create_model("mlp_tiny", in_channels=1, image_size=28)
    r1 = activation_matching(a, b, synthetic, num_batches=2, batch_size=100, seed=5)
    r2 = activation_matching(a, b, synthetic, num_batches=2, batch_size=100, seed=5)
    assert r1.final_objective >= r1.initial_objective
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)
    for _g, p in r1.perms.items():
        assert sorted(p.tolist()) == list(range(16))
    assert r1.extra["samples"]["P0"] == 200


def test_sites_override_and_models_untouched(synthetic):
    spec, a, b, planted = _pair_planted("mlp_tiny", "batchnorm")
    a.train()
    b.eval()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    res = activation_matching(a, b, synthetic, num_batches=1, batch_size=100, sites={"P0": "act0", "P1": ["act1"]})
    assert a.training and not b.training  # modes restored
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # BN stats not updated
    assert not a._forward_hooks and not a.act0._forward_hooks  # hooks removed
    inv = invert_permutation(planted)
    assert all(torch.equal(res.perms[g], inv[g]) for g in spec.sizes)


def test_errors(synthetic):
    spec, a, b, _ = _pair_planted("mlp_tiny", "none")
    with pytest.raises(LmcError, match="unknown activation-matching method"):
        activation_matching(a, b, synthetic, method="cosine")
    with pytest.raises(LmcError, match="num_batches"):
        activation_matching(a, b, synthetic, num_batches=0)
    with pytest.raises(LmcError, match="no activation site for permutation groups"):
        activation_matching(a, b, synthetic, sites={"P0": "act0"})
    with pytest.raises(LmcError, match="expected 16 units"):
        activation_matching(a, b, synthetic, sites={"P0": "act0", "P1": "fc2"})
    other = create_model("mlp_tiny", in_channels=1, image_size=28, width=8)
    with pytest.raises(LmcError, match="model B"):
        activation_matching(a, other, synthetic)
    with torch.no_grad():
        b.fc0.weight[0, 0] = float("nan")
    with pytest.raises(LmcError, match="NaN"):
        activation_matching(a, b, synthetic)


def test_wrong_dataset_shape_is_an_lmc_error(synthetic_rgb):
    _, a, b, _ = _pair_planted("mlp_tiny", "none")
    with pytest.raises(LmcError, match="cannot run on dataset"):
        activation_matching(a, b, synthetic_rgb, num_batches=1, batch_size=10)


def test_correlation_matrix_by_hand():
    """Pearson similarity from accumulated sums equals numpy's corrcoef on the same samples."""
    from lmckit.match.activation import _similarity

    g = torch.Generator().manual_seed(0)
    za, zb = (
        torch.randn(300, 4, generator=g, dtype=torch.float64),
        torch.randn(300, 4, generator=g, dtype=torch.float64),
    )
    zb[:, 2] = 2 * za[:, 1] + 1
    s = {
        "n": 300,
        "sa": za.sum(0),
        "sb": zb.sum(0),
        "saa": (za * za).sum(0),
        "sbb": (zb * zb).sum(0),
        "sab": za.t() @ zb,
    }
    m = _similarity(s, "pearson", 0.0).numpy()
    ref = np.corrcoef(za.numpy().T, zb.numpy().T)[:4, 4:]
    np.testing.assert_allclose(m, ref, atol=1e-10)
    assert m[1, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(_similarity(s, "cross_moment", 0.0).numpy(), (za.t() @ zb).numpy() / 300)


def test_traced_model_sites(synthetic):
    """A non-zoo model: spec and activation sites come from fx tracing; planted truth recovered."""
    pytest.importorskip("lmckit.perm.trace")
    from tests.helpers.odd_models import ResidualMLP

    torch.manual_seed(0)
    a = ResidualMLP(in_features=784)
    x, _ = synthetic.tensors("train", limit=2)
    spec = spec_for(a, x)
    planted = random_permutation(spec, seed=4)
    b = ResidualMLP(in_features=784)
    b.load_state_dict(apply_permutation(spec, planted, a.state_dict()))
    res = activation_matching(a, b, synthetic, num_batches=2, batch_size=100)
    inv = invert_permutation(planted)
    assert set(res.perms) == set(spec.sizes) and len(spec.sizes) == 3
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
