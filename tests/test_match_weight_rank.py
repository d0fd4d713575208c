"""Weight matching's rank-s update of cached cost terms equals the full recomputation.

A cached (entry, axis) term ``T = A^{(a)} pi(B)^{(a)T}`` of a 2-D entry is
brought up to date after its other group moved by
``T += A[:, S] (B[:, p_new[S]] - B[:, p_old[S]])^T`` instead of a full product
(``lmckit.match.weight._Problem._refresh``). These tests check the update
against the product computed afresh, and whole descents with the update forced
on every stale term against descents that never use it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lmckit.match.weight as wm
from lmckit.match import weight_matching
from lmckit.models import create_model
from lmckit.perm import apply_permutation, identity_permutation, invert_permutation, random_permutation, spec_for


def _mlp(width, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = create_model("mlp", in_channels=1, image_size=28, width=width)
    return m, {k: v.detach().to(dtype).clone() for k, v in m.state_dict().items()}


def _zoo(name, seed):
    torch.manual_seed(seed)
    m = create_model(name, in_channels=1, image_size=28)
    g = torch.Generator().manual_seed(seed + 100)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in m.state_dict().items()}
    return m, sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_update_equals_fresh_product(dtype):
    """Both axes of a hidden 2-D weight: the updated term equals the product computed afresh."""
    m, sd_a = _mlp(48, 0, dtype)
    _, sd_b = _mlp(48, 1, dtype)
    spec = spec_for(m)
    keys = wm.objective_keys(spec, sd_a)
    prob = wm._Problem(spec, sd_a, sd_b, keys, torch.device("cpu"))
    perms = {g: p.clone() for g, p in random_permutation(spec, seed=3).items()}
    rng = np.random.default_rng(0)
    checked = 0
    for g in prob.groups:
        for k, a, am in prob.mats[g]:
            h = prob._other_group(k, a)
            if h is None:
                continue
            inv_g = torch.argsort(perms[g])
            hit = prob._refresh(k, a, am, prob.permuted_b(perms), inv_g, (0,), None, perms)
            assert len(hit) == 4 and hit[3] == 0
            moved = dict(perms)
            idx = rng.choice(spec.sizes[h], size=5, replace=False)  # a 5-cycle on h's positions
            p = moved[h].clone()
            p[idx] = p[np.roll(idx, 1)]
            moved[h] = p
            before = prob.counters["cost_terms_updated"]
            new = prob._refresh(k, a, am, prob.permuted_b(moved), inv_g, (1,), hit, moved)
            assert prob.counters["cost_terms_updated"] == before + 1  # the rank-s path was taken
            fresh = prob._term(k, a, am, prob.permuted_b(moved)[k], inv_g)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(new[1].double(), fresh.double(), rtol=tol, atol=tol * float(fresh.abs().max()))
            # and it really changed: the update is not a no-op
            assert not torch.allclose(new[1].double(), prob._term(k, a, am, prob.permuted_b(perms)[k], inv_g).double())
            checked += 1
    assert checked >= 4  # fc2 and fc3, both axes


def _run(spec, sd_a, sd_b, monkeypatch, frac, **kw):
    monkeypatch.setattr(wm, "RANK_UPDATE_MAX_FRACTION", frac)
    return weight_matching(spec, sd_a, sd_b, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_descent_with_rank_updates_equals_full_recompute(monkeypatch, dtype):
    """Same objective history and permutations as recomputing every stale term in full (random MLPs)."""
    m, sd_a = _mlp(96, 0, dtype)
    _, sd_b = _mlp(96, 1, dtype)
    spec = spec_for(m)
    for seed in (0, 1):
        full = _run(spec, sd_a, sd_b, monkeypatch, -1.0, seed=seed)
        fast = _run(spec, sd_a, sd_b, monkeypatch, 1.0, seed=seed)
        assert full.extra["cost_terms_updated"] == 0
        assert fast.extra["cost_terms_updated"] > 0
        assert fast.sweeps == full.sweeps
        np.testing.assert_allclose(fast.objective, full.objective, rtol=1e-12 if dtype == torch.float64 else 1e-6)
        for g in spec.sizes:
            assert torch.equal(fast.perms[g], full.perms[g]), g


@pytest.mark.parametrize("name", ["mlp_tiny", "vit_tiny", "lstm_tiny", "resnet_tiny"])
def test_zoo_descent_with_rank_updates_equals_full_recompute(monkeypatch, name):
    """Reference: every term cached and recomputed in full when stale (the algorithm before rank-s updates).

    Against it: rank-s updates forced wherever they apply (all terms cached), and
    the defaults (small terms recomputed, rank-s updates for few moved units).
    """
    m, sd_a = _zoo(name, 0)
    _, sd_b = _zoo(name, 1)
    spec = spec_for(m)
    monkeypatch.setattr(wm, "UNCACHED_MAX_INNER", 0)
    full = _run(spec, sd_a, sd_b, monkeypatch, -1.0, seed=0)
    forced = _run(spec, sd_a, sd_b, monkeypatch, 1.0, seed=0)
    monkeypatch.undo()
    default = weight_matching(spec, sd_a, sd_b, seed=0)
    assert full.extra["cost_terms_updated"] == 0
    if name in ("mlp_tiny", "vit_tiny"):  # 2-D entries with plain groups on both axes
        assert forced.extra["cost_terms_updated"] > 0
    for res in (forced, default):
        assert res.sweeps == full.sweeps
        np.testing.assert_allclose(res.objective, full.objective, rtol=1e-6)
        for g in spec.sizes:
            assert torch.equal(res.perms[g], full.perms[g]), g


@pytest.mark.parametrize("name", ["mlp", "vit_tiny", "lstm_tiny"])
def test_planted_permutation_recovered_with_rank_updates(monkeypatch, name):
    if name == "mlp":
        m, sd = _mlp(64, 0)
    else:
        m, sd = _zoo(name, 0)
    spec = spec_for(m)
    planted = random_permutation(spec, seed=7)
    sd_b = apply_permutation(spec, planted, sd)
    monkeypatch.setattr(wm, "UNCACHED_MAX_INNER", 0)
    res = _run(spec, sd, sd_b, monkeypatch, 1.0, seed=0)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    assert np.all(np.diff(res.objective) >= 0)


def test_refresh_after_many_updates(monkeypatch):
    """After RANK_UPDATE_REFRESH updates in a row a term is recomputed in full (drift stays bounded)."""
    m, sd_a = _mlp(32, 0)
    _, sd_b = _mlp(32, 1)
    spec = spec_for(m)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    perms = identity_permutation(spec)
    g = prob.groups[1]
    k, a, am = next((k, a, am) for k, a, am in prob.mats[g] if prob._other_group(k, a) is not None)
    h = prob._other_group(k, a)
    inv_g = torch.argsort(perms[g])
    hit = prob._refresh(k, a, am, prob.permuted_b(perms), inv_g, (0,), None, perms)
    for step in range(1, wm.RANK_UPDATE_REFRESH + 2):
        p = perms[h].clone()
        p[[0, 1]] = p[[1, 0]]
        perms = dict(perms, **{h: p})
        hit = prob._refresh(k, a, am, prob.permuted_b(perms), inv_g, (step,), hit, perms)
        assert hit[3] == (step if step <= wm.RANK_UPDATE_REFRESH else 0)
    fresh = prob._term(k, a, am, prob.permuted_b(perms)[k], inv_g)
    assert torch.equal(hit[1], fresh)  # the last one was a full product


def test_lap_restores_the_cost_matrix():
    """The in-place negation around the solve leaves the caller's matrix as it was."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((50, 50))
    keep = c.copy()
    col = wm._lap(c)
    assert np.array_equal(c, keep)
    from scipy.optimize import linear_sum_assignment

    _, ref = linear_sum_assignment(keep, maximize=True)
    assert keep[np.arange(50), col].sum() == pytest.approx(keep[np.arange(50), ref].sum(), rel=1e-12)
    ro = keep.copy()
    ro.flags.writeable = False
    assert np.array_equal(wm._lap(ro), col)
