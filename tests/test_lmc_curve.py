"""Barrier curves, BN reset, REPAIR, plane landscapes and plots on tiny models (synthetic data)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmckit.errors import LmcError
from lmckit.evaluate import evaluate
from lmckit.lmc import (
    Repairer,
    barrier_curve,
    interpolate_states,
    mix_states,
    repair_sites,
    reset_bn_stats,
    site_stats,
    state_vector,
    training_batches,
)
from lmckit.lmc.landscape import plane_basis, plane_landscape
from lmckit.lmc.plot import plot_curves, plot_landscape
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for


def _train(dataset, seed: int, steps: int = 40, **kw) -> nn.Module:
    """A few Adam steps: enough for the tiny MLP to fit the synthetic task."""
    torch.manual_seed(seed)
    model = create_model("mlp_tiny", **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for x, y in dataset.batches("train", 50, shuffle=True, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


@pytest.fixture(scope="module")
def pair(synthetic):
    return _train(synthetic, 0), _train(synthetic, 1)


@pytest.fixture(scope="module")
def bn_pair(synthetic):
    return _train(synthetic, 0, norm="batchnorm"), _train(synthetic, 1, norm="batchnorm")


def _sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


FAST = dict(progress=False, limit=300, bn_batches=2, bn_batch_size=200)


# --------------------------------------------------------------------------- curves
def test_curve_equals_direct_computation(pair, synthetic):
    """Loss along the path computed by hand with explicit (1-l) W_a + l W_b matrices."""
    a, b = pair
    sa, sb = _sd(a), _sd(b)
    x, y = synthetic.tensors("test", limit=300)
    lams = [0.0, 0.2, 0.5, 0.7, 1.0]
    direct = []
    for lam in lams:
        h = x.flatten(1)
        for i in range(3):
            w = (1 - lam) * sa[f"fc{i}.weight"] + lam * sb[f"fc{i}.weight"]
            bias = (1 - lam) * sa[f"fc{i}.bias"] + lam * sb[f"fc{i}.bias"]
            h = h @ w.T + bias
            if i < 2:
                h = torch.relu(h)
        direct.append(float(F.cross_entropy(h, y)))
    r = barrier_curve(a, sa, sb, synthetic, lambdas=lams, bn_reset="off", batch_size=128, **FAST)
    c = r["test"]
    assert c.loss == pytest.approx(direct, rel=1e-5, abs=1e-6)
    expect = max(direct[i] - ((1 - lam) * direct[0] + lam * direct[-1]) for i, lam in enumerate(lams))
    assert c.loss_barrier == pytest.approx(max(expect, 0.0), rel=1e-5, abs=1e-6)
    assert c.loss_barrier > 0.01  # independently trained: a real barrier
    assert c.midpoint_loss == pytest.approx(direct[2], rel=1e-5)
    assert c.endpoint_loss == pytest.approx((direct[0], direct[-1]), rel=1e-5)
    assert c.endpoint_accuracy[0] == evaluate(a, synthetic, "test", limit=300)[1]


def test_curve_defaults_dict_and_model_restored(pair, synthetic):
    a, b = pair
    before = _sd(a)
    # passing the workspace's own state dict must not corrupt it
    r = barrier_curve(a, a.state_dict(), b.state_dict(), synthetic, splits=("train", "test"), points=4, **FAST)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert r.lambdas == [0.0, 1 / 3, 0.5, 2 / 3, 1.0]
    assert r.bn_reset is False
    d = r.to_dict()
    assert set(d["loss"]) == {"train", "test"} and len(d["loss"]["test"]) == 5
    assert d["endpoint_loss"]["test"][0] == pytest.approx(evaluate(a, synthetic, "test", limit=300)[0], rel=1e-6)
    d1 = barrier_curve(a, _sd(a), _sd(b), synthetic, points=3, **FAST).to_dict(collapse=True)
    assert isinstance(d1["loss_barrier"], float) and d1["splits"] == ["test"]


def test_self_interpolation_is_flat(pair, bn_pair, synthetic):
    a = pair[0]
    r = barrier_curve(a, _sd(a), _sd(a), synthetic, points=5, **FAST)["test"]
    assert r.loss_barrier < 1e-5 and r.accuracy_barrier < 1e-9
    m = bn_pair[0]
    r = barrier_curve(m, _sd(m), _sd(m), synthetic, points=5, bn_reset="on", **FAST)["test"]
    assert r.loss_barrier < 1e-5 and r.accuracy_barrier < 1e-9


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_planted_permutation_barrier_vanishes(pair, bn_pair, synthetic, norm):
    a = pair[0] if norm == "none" else bn_pair[0]
    spec = spec_for(a)
    perm = random_permutation(spec, seed=3)
    sb = apply_permutation(spec, perm, _sd(a))  # the same function, units shuffled
    naive = barrier_curve(a, _sd(a), sb, synthetic, points=5, **FAST)["test"]
    assert naive.loss_barrier > 0.05
    fixed = apply_permutation(spec, invert_permutation(perm), sb)
    r = barrier_curve(a, _sd(a), fixed, synthetic, points=5, **FAST)["test"]
    assert r.loss_barrier < 1e-6 and r.accuracy_barrier == 0.0
    try:
        from lmckit.match import weight_matching
    except ImportError:
        return
    res = weight_matching(spec, _sd(a), sb, seed=0)
    r = barrier_curve(a, _sd(a), apply_permutation(spec, res.perms, sb), synthetic, points=5, **FAST)["test"]
    assert r.loss_barrier < 1e-5


def test_weight_matching_lowers_the_barrier(pair, synthetic):
    match = pytest.importorskip("lmckit.match")
    a, b = pair
    spec = spec_for(a)
    naive = barrier_curve(a, _sd(a), _sd(b), synthetic, points=5, **FAST)["test"]
    res = match.weight_matching(spec, _sd(a), _sd(b), seed=0)
    wm = barrier_curve(a, _sd(a), apply_permutation(spec, res.perms, _sd(b)), synthetic, points=5, **FAST)["test"]
    assert wm.loss_barrier < naive.loss_barrier


def test_curve_errors(pair, synthetic):
    a, b = pair
    with pytest.raises(LmcError, match="no 'val' split"):
        barrier_curve(a, _sd(a), _sd(b), synthetic, splits=("val",), **FAST)
    with pytest.raises(LmcError, match="no BatchNorm"):
        barrier_curve(a, _sd(a), _sd(b), synthetic, bn_reset="on", **FAST)
    with pytest.raises(LmcError, match="unknown bn_reset"):
        barrier_curve(a, _sd(a), _sd(b), synthetic, bn_reset="sometimes", **FAST)
    with pytest.raises(LmcError, match="points"):
        barrier_curve(a, _sd(a), _sd(b), synthetic, points=1, **FAST)


# --------------------------------------------------------------------------- BN reset
def test_bn_reset_computes_exact_cumulative_stats(bn_pair, synthetic):
    m = bn_pair[0]
    sd0 = _sd(m)
    batches = training_batches(synthetic, num_batches=3, batch_size=100, seed=5)
    batches2 = training_batches(synthetic, num_batches=3, batch_size=100, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(batches, batches2))  # seeded: the same images
    with torch.no_grad():
        z = [m.fc0(x.flatten(1)) for x in batches]
    mean = torch.stack([t.mean(0) for t in z]).mean(0)
    var = torch.stack([t.var(0, unbiased=True) for t in z]).mean(0)
    m.train(False)
    reset_bn_stats(m, batches=batches)
    try:
        assert not torch.allclose(m.norm0.running_mean, sd0["norm0.running_mean"], atol=1e-4)
        torch.testing.assert_close(m.norm0.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.norm0.running_var, var, rtol=1e-4, atol=1e-5)
        assert int(m.norm0.num_batches_tracked) == 3
        assert m.norm0.momentum == 0.1 and not m.training and not m.norm0.training
    finally:
        m.load_state_dict(sd0)


def test_bn_reset_repairs_corrupted_statistics(bn_pair, synthetic):
    m = bn_pair[0]
    sd0 = _sd(m)
    _, acc0 = evaluate(m, synthetic, "test")
    try:
        with torch.no_grad():
            for bn in (m.norm0, m.norm1):
                bn.running_mean += 3.0
                bn.running_var *= 50.0
        _, bad = evaluate(m, synthetic, "test")
        reset_bn_stats(m, synthetic, num_batches=4, batch_size=250)
        _, good = evaluate(m, synthetic, "test")
    finally:
        m.load_state_dict(sd0)
    assert bad < acc0 - 0.3
    assert good > acc0 - 0.05


def test_bn_reset_lowers_the_naive_midpoint_loss(bn_pair, synthetic):
    a, b = bn_pair
    off = barrier_curve(a, _sd(a), _sd(b), synthetic, points=3, bn_reset="off", **FAST)
    on = barrier_curve(a, _sd(a), _sd(b), synthetic, points=3, bn_reset="auto", **FAST)
    assert on.bn_reset is True and off.bn_reset is False
    assert on["test"].midpoint_loss < off["test"].midpoint_loss


# --------------------------------------------------------------------------- REPAIR
@pytest.mark.parametrize("name", ["mlp_plain", "mlp_bn", "vgg_tiny", "resnet_tiny"])
def test_repair_matches_interpolated_statistics(name, pair, bn_pair, synthetic, synthetic_rgb):
    if name == "mlp_plain":
        a, b, ds = pair[0], pair[1], synthetic
    elif name == "mlp_bn":
        a, b, ds = bn_pair[0], bn_pair[1], synthetic
    else:
        torch.manual_seed(0)
        a, b = create_model(name), create_model(name)
        ds = synthetic_rgb
    sa, sb = _sd(a), _sd(b)
    work = create_model(a.lmckit_config["name"], **{k: v for k, v in a.lmckit_config.items() if k != "name"})
    batches = training_batches(ds, num_batches=2, batch_size=64 if name.startswith("mlp") else 16, seed=0)
    rep = Repairer(work, [sa, sb], batches, eps=0.0)
    lam = 0.4
    fixed = rep(interpolate_states(sa, sb, lam), lam)
    target = rep.target(lam)
    work.load_state_dict(fixed)
    got = site_stats(work, batches, rep.sites)
    assert len(rep.sites) >= 2
    for site, (mu, sd) in got.items():
        t_mu, t_sd = target[site]
        live = t_sd > 1e-3
        torch.testing.assert_close(mu[live], t_mu[live], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(sd[live], t_sd[live], rtol=1e-3, atol=1e-4)
    # the target really is the interpolation of the endpoints' own statistics
    work.load_state_dict(sa)
    mu_a, sd_a = site_stats(work, batches, rep.sites[:1])[rep.sites[0][0]]
    mu_b, sd_b = rep.stats[1][rep.sites[0][0]]
    torch.testing.assert_close(target[rep.sites[0][0]][1], 0.6 * sd_a + 0.4 * sd_b)
    torch.testing.assert_close(target[rep.sites[0][0]][0], 0.6 * mu_a + 0.4 * mu_b)


def test_repair_of_identical_endpoints_changes_nothing(pair, synthetic):
    a = pair[0]
    batches = training_batches(synthetic, num_batches=2, batch_size=100)
    work = create_model("mlp_tiny")
    rep = Repairer(work, [_sd(a), _sd(a)], batches, eps=0.0)
    out = rep(_sd(a), 0.5)
    for k, v in _sd(a).items():
        torch.testing.assert_close(out[k], v, rtol=1e-4, atol=1e-5)


def test_repair_lowers_the_naive_midpoint_loss(pair, synthetic):
    a, b = pair
    off = barrier_curve(a, _sd(a), _sd(b), synthetic, points=3, bn_reset="off", **FAST)["test"]
    rep = barrier_curve(a, _sd(a), _sd(b), synthetic, points=3, bn_reset="repair", **FAST)
    assert rep.bn_reset == "repair"
    assert rep["test"].midpoint_loss < off.midpoint_loss
    assert rep["test"].endpoint_loss == off.endpoint_loss  # ends untouched


def test_repair_unsupported_architecture_raises():
    m = create_model("mlp_tiny")
    m.fc0 = nn.Linear(784, 16, bias=False)
    with pytest.raises(LmcError, match="REPAIR is not supported for MLP.*fc0"):
        repair_sites(m)
    ln = create_model("mlp_tiny", norm="layernorm")
    ln.norm0 = nn.LayerNorm(16, elementwise_affine=False)
    with pytest.raises(LmcError, match="no per-unit affine"):
        repair_sites(ln)
    assert [n for n, _ in repair_sites(create_model("mlp_tiny", norm="layernorm"))] == ["norm0", "norm1"]


# --------------------------------------------------------------------------- landscape and plots
def test_plane_basis_geometry(pair):
    a, b = _sd(pair[0]), _sd(pair[1])
    torch.manual_seed(7)
    c = _sd(create_model("mlp_tiny"))
    pb = plane_basis(a, b, c)
    assert abs(float(pb.e1 @ pb.e2)) < 1e-10 and abs(float(pb.e1.norm()) - 1) < 1e-12
    va, vb, vc = state_vector(a), state_vector(b), state_vector(c)
    (ax, ay), (bx, by), (cx, cy) = pb.coords
    assert (ax, ay, by) == (0.0, 0.0, 0.0)
    assert bx == pytest.approx(float((vb - va).norm()))
    assert (cx**2 + cy**2) ** 0.5 == pytest.approx(float((vc - va).norm()))
    assert ((cx - bx) ** 2 + cy**2) ** 0.5 == pytest.approx(float((vc - vb).norm()))
    # a plane point rebuilt from barycentric weights lies at a + x e1 + y e2
    x, y = 0.3 * bx - 0.2, 1.4 * cy
    w = pb.weights(x, y)
    assert sum(w) == pytest.approx(1.0)
    got = state_vector(mix_states([a, b, c], w))
    torch.testing.assert_close(got, va + x * pb.e1 + y * pb.e2, rtol=1e-5, atol=1e-5)
    for k, vert in enumerate(pb.coords):
        assert pb.weights(*vert) == pytest.approx(tuple(1.0 if i == k else 0.0 for i in range(3)), abs=1e-9)
    with pytest.raises(LmcError, match="collinear"):
        plane_basis(a, b, interpolate_states(a, b, 0.3))


def test_plane_landscape_and_plots(pair, synthetic, tmp_path):
    a, b = pair
    c = _train(synthetic, 2, steps=20)
    res = plane_landscape(
        a,
        _sd(a),
        _sd(b),
        _sd(c),
        synthetic,
        grid=4,
        margin=0.1,
        **{k: v for k, v in FAST.items() if k != "bn_batches" and k != "bn_batch_size"},
    )
    assert len(res.xs) == 4 and len(res.loss) == 4 and len(res.loss[0]) == 4
    assert res.xs[0] < 0.0 < res.models["B"][0] < res.xs[-1]
    i, j = 2, 1
    w = res.weights[i][j]
    probe = create_model("mlp_tiny")
    probe.load_state_dict(mix_states([_sd(a), _sd(b), _sd(c)], w))
    loss, acc = evaluate(probe, synthetic, "test", limit=300)
    assert res.loss[i][j] == pytest.approx(loss, rel=1e-5) and res.accuracy[i][j] == acc
    d = res.to_dict()
    assert set(d["models"]) == {"A", "B", "C"} and d["split"] == "test"
    p = plot_landscape(res, tmp_path / "plane.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    naive = barrier_curve(a, _sd(a), _sd(b), synthetic, points=5, **FAST)
    wm = barrier_curve(a, _sd(a), _sd(a), synthetic, points=5, **FAST)
    q = plot_curves({"naive": naive, "self": wm}, tmp_path / "sub" / "curves.png")
    assert q.read_bytes()[:4] == b"\x89PNG" and q.stat().st_size > 5000
    with pytest.raises(LmcError, match="no 'train' split"):
        plot_curves({"naive": naive}, tmp_path / "x.png", split="train")
