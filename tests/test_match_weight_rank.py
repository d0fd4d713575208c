"""Weight matching's rank-s update of cached cost terms equals the full recomputation.

A cached (entry, axis) term ``T = A^{(a)} pi(B)^{(a)T}`` of a 2-D entry is
brought up to date after its other group moved by
``T += A[:, S] (B[:, p_new[S]] - B[:, p_old[S]])^T`` instead of a full product
(``lmckit.match.weight._Problem.cost_original``). These tests check the update
against the product computed afresh, and whole descents with the update forced
on every stale term against descents that never use it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmckit.match.weight as wm
import lmckit.match.weight_problem as wp  # where the cost computation reads its settings
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
    sd = {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in m.state_dict().items()
    }
    return m, sd


def _cycle(p, idx):
    p = p.clone()
    p[idx] = p[np.roll(idx, 1)]
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_update_equals_fresh_product(dtype):
    """After a neighbour moves a few units, the updated cost equals the one computed afresh (every hidden group)."""
    m, sd_a = _mlp(48, 0, dtype)
    _, sd_b = _mlp(48, 1, dtype)
    spec = spec_for(m)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    rng = np.random.default_rng(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    checked = 0
    for g in prob.groups:
        _, upd, _ = prob._plan(g)
        for h in {t[3] for t in upd}:
            perms = {x: p.clone() for x, p in random_permutation(spec, seed=3).items()}
            stamps = {x: 0 for x in spec.sizes}
            inv_g = torch.argsort(perms[g])
            cache: dict = {}
            before, _ = prob.cost_original(g, prob.permuted_b(perms), inv_g, stamps, cache, perms)
            before = before.clone()
            perms[h] = _cycle(perms[h], rng.choice(spec.sizes[h], size=5, replace=False))
            stamps[h] += 1
            n_upd = prob.counters["cost_terms_updated"]
            bp = prob.permuted_b(perms)
            after, _ = prob.cost_original(g, bp, inv_g, stamps, cache, perms)
            assert prob.counters["cost_terms_updated"] > n_upd  # the rank-s path was taken
            fresh, _ = prob.cost_original(g, bp, inv_g, stamps, {}, perms)
            full = prob.cost_full(g, bp)[0][:, inv_g]  # the independent product of every term
            for ref in (fresh, full):
                torch.testing.assert_close(after, ref, rtol=tol, atol=tol * float(ref.abs().max()))
            assert not torch.allclose(after, before)  # the move changed the cost: the update is not a no-op
            checked += 1
    assert checked >= 4  # h1 <- h2, h2 <- h1, h2 <- h3, h3 <- h2


def _run(spec, sd_a, sd_b, monkeypatch, frac, **kw):
    monkeypatch.setattr(wp, "RANK_UPDATE_MAX_FRACTION", frac)
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
    monkeypatch.setattr(wp, "UNCACHED_MAX_INNER", 0)
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
    monkeypatch.setattr(wp, "UNCACHED_MAX_INNER", 0)
    res = _run(spec, sd, sd_b, monkeypatch, 1.0, seed=0)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    assert np.all(np.diff(res.objective) >= 0)


def test_sum_rebuilt_after_many_updates():
    """After RANK_UPDATE_REFRESH rank-s updates a group's cost sum is rebuilt from scratch (drift stays bounded)."""
    m, sd_a = _mlp(32, 0)
    _, sd_b = _mlp(32, 1)
    spec = spec_for(m)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    perms = identity_permutation(spec)
    stamps = {x: 0 for x in spec.sizes}
    g = prob.groups[1]
    h = prob._plan(g)[1][0][3]
    inv_g = torch.argsort(perms[g])
    cache: dict = {}
    prob.cost_original(g, prob.permuted_b(perms), inv_g, stamps, cache, perms)
    for step in range(1, wm.RANK_UPDATE_REFRESH + 2):
        perms = dict(perms, **{h: _cycle(perms[h], np.array([0, 1]))})
        stamps[h] += 1
        rebuilt = prob.counters["cost_terms_recomputed"]
        c, _ = prob.cost_original(g, prob.permuted_b(perms), inv_g, stamps, cache, perms)
        assert cache[(g, "sum")][2] == (step if step <= wm.RANK_UPDATE_REFRESH else 0)
        assert (prob.counters["cost_terms_recomputed"] > rebuilt) == (step > wm.RANK_UPDATE_REFRESH)
    fresh, _ = prob.cost_original(g, prob.permuted_b(perms), inv_g, stamps, {}, perms)
    assert torch.equal(c, fresh)  # the last one was a rebuild


def test_lap_restores_the_cost_matrix():
    """The in-place negation around the solve leaves the caller's matrix as it was."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((50, 50))
    keep = c.copy()
    col = wm._lap(c, inplace=True)
    assert np.array_equal(c, keep)
    from scipy.optimize import linear_sum_assignment

    _, ref = linear_sum_assignment(keep, maximize=True)
    assert keep[np.arange(50), col].sum() == pytest.approx(keep[np.arange(50), ref].sum(), rel=1e-12)
    ro = keep.copy()
    ro.flags.writeable = False
    assert np.array_equal(wm._lap(ro, inplace=True), col)
    assert np.array_equal(wm._lap(keep), col)


@pytest.mark.parametrize("name", ["mlp", "resnet_tiny", "lstm_tiny"])
def test_objective_without_permuted_copy(name):
    """``objective_of`` (one entry at a time) equals the objective of the fully permuted B; B is kept only when
    needed."""
    m, sd_a = _mlp(40, 0) if name == "mlp" else _zoo(name, 0)
    _, sd_b = _mlp(40, 1) if name == "mlp" else _zoo(name, 1)
    spec = spec_for(m)
    prob = wm._Problem(spec, sd_a, sd_b, wm.objective_keys(spec, sd_a), torch.device("cpu"))
    assert prob.needs_bp == (name != "mlp")  # conv kernels / LSTM gate blocks need the permuted B
    perms = random_permutation(spec, seed=2)
    ref = sum(float((sd_a[k].double() * v.double()).sum()) for k, v in prob.permuted_b(perms).items())
    assert prob.objective_of(perms) == pytest.approx(ref, rel=1e-12)
    assert prob.objective(prob.permuted_b(perms)) == pytest.approx(ref, rel=1e-12)
