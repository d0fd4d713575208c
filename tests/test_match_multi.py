"""Multi-model matching: anchor matching and MergeMany recover planted permutations; MergeMany is monotone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmckit.errors import LmcError
from lmckit.match import anchor_matching, merge_many, weight_matching
from lmckit.match.multi import pairwise_inner_sum
from lmckit.match.weight import objective_keys
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for


def _planted_family(name="resnet_tiny", n=3):
    torch.manual_seed(0)
    m = create_model(name, in_channels=1, image_size=28)
    spec = spec_for(m)
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    planted = [None] + [random_permutation(spec, seed=10 + i) for i in range(1, n)]
    states = [sd] + [apply_permutation(spec, p, sd) for p in planted[1:]]
    return spec, states, planted


def _independent(name="mlp_tiny", n=4):
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(create_model(name, in_channels=1, image_size=28).state_dict())
    return spec_for(create_model(name, in_channels=1, image_size=28)), out


def test_anchor_matching_recovers_planted():
    spec, states, planted = _planted_family()
    res = anchor_matching(spec, states, anchor=0)
    assert all(torch.equal(p, torch.arange(len(p))) for p in res.perms[0].values())
    for i in (1, 2):
        inv = invert_permutation(planted[i])
        assert all(torch.equal(res.perms[i][g], inv[g]) for g in spec.sizes)
    assert res.pairwise[0] is None and res.objective[1] > res.objective[0]


def test_anchor_other_index_and_custom_matcher():
    spec, states, planted = _planted_family(n=3)
    res = anchor_matching(spec, states, anchor=2)
    for i in range(3):
        aligned = apply_permutation(spec, res.perms[i], states[i])
        assert all(torch.equal(aligned[k], states[2][k]) for k in states[2])
    calls = []

    def matcher(i, ref, sd):
        calls.append(i)
        return weight_matching(spec, ref, sd, seed=i)

    res2 = anchor_matching(spec, states, matcher=matcher, method="custom")
    assert calls == [1, 2] and res2.method == "anchor-custom"


def test_merge_many_aligns_planted_family_to_model_0():
    spec, states, planted = _planted_family(n=4)
    res = merge_many(spec, states, seed=0)
    assert res.converged
    assert all(torch.equal(p, torch.arange(len(p))) for p in res.perms[0].values())
    for i in range(4):
        aligned = apply_permutation(spec, res.perms[i], states[i])
        assert all(torch.equal(aligned[k], states[0][k]) for k in states[0]), i


def test_merge_many_objective_monotone_on_independent_models():
    spec, states = _independent()
    res = merge_many(spec, states, seed=3)
    obj = np.array(res.objective)
    assert res.converged and len(obj) == res.passes + 1
    assert np.all(np.diff(obj) >= -1e-9 * abs(obj).max())
    assert obj[-1] > obj[0]
    keys = objective_keys(spec, states[0])
    aligned = [apply_permutation(spec, p, s) for p, s in zip(res.perms, states)]
    # normalising to model 0 leaves the pairwise sum unchanged
    assert pairwise_inner_sum(aligned, keys) == pytest.approx(obj[-1], rel=1e-9)
    # a fixed point: matching any model to the mean of the others changes nothing
    for i in range(len(states)):
        others = [aligned[j] for j in range(len(states)) if j != i]
        target = {
            k: torch.stack([o[k] for o in others]).mean(0) if v.is_floating_point() else v for k, v in others[0].items()
        }
        r = weight_matching(spec, target, aligned[i], seed=i)
        assert all(torch.equal(p, torch.arange(len(p))) for p in r.perms.values()), i


def test_pairwise_inner_sum_by_hand():
    a, b, c = ({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([0.5, 0.5])})
    assert pairwise_inner_sum([a, b, c], ["w"]) == pytest.approx((3 - 2) + (0.5 + 1) + (1.5 - 0.5))


def test_multi_errors():
    spec, states = _independent(n=2)
    with pytest.raises(LmcError, match="at least 2"):
        merge_many(spec, states[:1])
    with pytest.raises(LmcError, match="out of range"):
        anchor_matching(spec, states, anchor=5)
    with pytest.raises(LmcError, match="matcher"):
        anchor_matching(spec, states, method="activation")
    bad = dict(states[1])
    bad["fc0.weight"] = bad["fc0.weight"].clone()
    bad["fc0.weight"][0, 0] = float("nan")
    with pytest.raises(LmcError, match="model 1"):
        merge_many(spec, [states[0], bad])
