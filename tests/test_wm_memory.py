"""Weight matching's memory measures (issue 15's budget) leave its result unchanged.

* the byte cap on cached cost data (``weight_matching(cache_bytes=...)``, an
  LRU :class:`lmckit.match.weight._CostCache`): a descent whose cache is
  forced to evict at every step returns the permutations of an uncapped one;
* only the entries some cost term reads permuted are kept permuted
  (``_Problem.bp_keys``), and the objective computed from them is the same
  float64 sum as from a whole permuted B;
* the float64 blocks computed in place give bit-identical sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmckit.match.weight as wm
from lmckit.errors import LmcError
from lmckit.match import weight_matching
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for


def _pair(name, **kw):
    sds = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model(name, in_channels=1, image_size=28, **kw)
        g = torch.Generator().manual_seed(seed + 100)
        sds.append(
            {
                k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                for k, v in m.state_dict().items()
            }
        )
    return spec_for(m), sds[0], sds[1]


# --------------------------------------------------------------------------- the LRU cache
def test_cost_cache_evicts_least_recently_used_within_cap():
    t = torch.zeros(4, dtype=torch.float64)  # 32 bytes
    c = wm._CostCache(cap=100)
    c["a"] = [t.clone(), {}, 0]
    c["b"] = (0, t.clone())
    c["c"] = (0, t.clone())
    assert c.held == 96 and c.evictions == 0
    assert c.get("a") is not None  # a is now the most recently used
    c["d"] = (0, t.clone())  # 128 > 100: the least recently used (b) goes
    assert list(c) == ["c", "a", "d"] and c.held == 96 and c.evictions == 1
    c["c"] = (1, torch.zeros(2, dtype=torch.float64))  # replacing an entry re-counts its bytes
    assert c.held == 80 and c["c"][0] == 1
    assert c.pop("a")[2] == 0 and c.held == 48
    assert c.pop("zz", None) is None
    big = wm._CostCache(cap=10)
    big["x"] = (0, t.clone())  # larger than the cap alone: kept (the entry just stored is never evicted)
    big["y"] = (0, t.clone())
    assert list(big) == ["y"] and big.peak == 32  # the peak of what the cache keeps (after its evictions)
    assert c.get("missing", 5) == 5


# --------------------------------------------------------------------------- capped descents
@pytest.mark.parametrize(
    "name,kw",
    [("mlp", {"width": 64}), ("vit_tiny", {}), ("resnet_tiny", {}), ("lstm_tiny", {})],
)
def test_capped_cache_gives_the_uncapped_result(name, kw):
    """A cap of one byte (every other cached term and sum evicted whenever one is stored) changes nothing.

    Covers running sums with rank-s updates (MLP, ViT), block axes and head
    structures (ViT), cached conv-kernel terms (ResNet) and quadratic entries
    (LSTM). Evicted data is rebuilt from scratch, so only float rounding may
    differ (float32 products summed in float64): same permutations, same sweeps, objectives within 1e-7.
    """
    spec, sd_a, sd_b = _pair(name, **kw)
    free = weight_matching(spec, sd_a, sd_b, seed=0, cache_bytes=10**12)
    capped = weight_matching(spec, sd_a, sd_b, seed=0, cache_bytes=1)
    assert free.extra["cost_cache_evictions"] == 0
    assert capped.extra["cost_cache_evictions"] > 0
    assert capped.extra["cost_cache_cap_bytes"] == 1
    assert capped.sweeps == free.sweeps
    np.testing.assert_allclose(capped.objective, free.objective, rtol=1e-7)
    for g in spec.sizes:
        assert torch.equal(capped.perms[g], free.perms[g]), g
    # the rebuilds were real: more full products than the uncapped run needed
    assert capped.extra["cost_terms_recomputed"] > free.extra["cost_terms_recomputed"]


def test_capped_cache_held_bytes_stay_under_the_cap():
    """With a cap that holds about one cost sum, the cache never holds more than the cap plus one entry."""
    spec, sd_a, sd_b = _pair("mlp", width=64)
    one_sum = 8 * 64 * 64
    res = weight_matching(spec, sd_a, sd_b, seed=0, cache_bytes=one_sum + 100)
    assert res.extra["cost_cache_evictions"] > 0
    assert res.extra["cost_cache_peak_bytes"] <= one_sum + 100


def test_planted_permutation_recovered_with_a_tiny_cap():
    spec, sd_a, _ = _pair("vit_tiny")
    planted = random_permutation(spec, seed=7)
    sd_b = apply_permutation(spec, planted, sd_a)
    res = weight_matching(spec, sd_a, sd_b, seed=0, cache_bytes=0)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    assert np.all(np.diff(res.objective) >= 0)


def test_default_cap_from_the_budget_and_bad_cap():
    """Default cap: 2 (A + B bytes) + the largest float64 cost matrix - the permuted entries held."""
    spec, sd_a, sd_b = _pair("mlp", width=32)
    res = weight_matching(spec, sd_a, sd_b, seed=0)
    keys = wm.objective_keys(spec, sd_a)
    m = sum(sd[k].numel() * 4 for sd in (sd_a, sd_b) for k in keys)
    assert res.extra["cost_cache_cap_bytes"] == 2 * m + 8 * 32 * 32  # an MLP keeps no permuted entry
    assert res.extra["cost_cache_evictions"] == 0  # never binding on a plain MLP
    for bad in (-1, float("nan"), 1.5, True, "1000", float("-inf")):
        with pytest.raises(LmcError, match="cache_bytes"):
            weight_matching(spec, sd_a, sd_b, cache_bytes=bad)
    unc = weight_matching(spec, sd_a, sd_b, seed=0, cache_bytes=float("inf"))  # no cap
    assert all(torch.equal(unc.perms[g], res.perms[g]) for g in res.perms)


# --------------------------------------------------------------------------- permuted entries
def test_only_entries_read_permuted_are_kept_permuted():
    spec, sd_a, sd_b = _pair("mlp", width=16)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    assert prob.bp_keys == [] and not prob.needs_bp
    spec, sd_a, sd_b = _pair("vit_tiny")
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    assert prob.bp_keys and set(prob.bp_keys) < set(prob.keys)  # the fused in_proj (block axes), not all of B
    assert all("in_proj" in k for k in prob.bp_keys)


@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny", "lstm_tiny"])
def test_objective_from_partial_permuted_b_is_bit_identical(name):
    """``objective_of(perms, bp)`` with ``bp`` for some entries is the very float64 sum over a whole permuted B."""
    spec, sd_a, sd_b = _pair(name)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    perms = random_permutation(spec, seed=3)
    whole = prob.objective(prob.permuted_b(perms))
    assert prob.objective_of(perms, prob.permuted_b(perms, prob.bp_keys)) == whole
    assert prob.objective_of(perms, {}) == whole


def test_float64_blocks_in_place_are_bit_identical():
    """The in-place float64 products give the same sums as products of two float64 copies."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 2000, generator=g), torch.randn(300, 2000, generator=g)
    assert float(torch.sum(wm._sq64(a))) == float(torch.sum(a.double() ** 2))
    x = a.to(torch.float64, copy=True)
    assert float(torch.sum(x.mul_(b))) == float(torch.sum(a.double() * b.double()))
    a64 = a.double()
    before = a64.clone()
    wm._sq64(a64)  # a float64 input is copied, never squared in place
    assert torch.equal(a64, before)
    ref = sum(float(torch.sum(a[i : i + 262].double() ** 2)) for i in range(0, 300, 262)) ** 0.5
    assert wm._norm64(a) == ref
