"""Analyses with planted truth: permuted copies, random matrices, hand-computed R, quadratic Taylor,
full-rank truncation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmckit.analysis import (
    distances,
    inner_product_identity,
    input_projections,
    layers_of,
    matrix_alignment,
    rank_sweep,
    svd_alignment,
    taylor_midpoint,
    truncate_state,
)
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for


def _model(name: str, seed: int, **kw):
    torch.manual_seed(seed)
    m = create_model(name, **kw)
    # Spread the BN/LN affine and running stats away from 1/0 so they count in the checks.
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if k.endswith(("running_mean", "running_var")) or (v.dim() == 1 and k.startswith(("norm", "bn"))):
                v.copy_(torch.rand_like(v) + 0.5)
    return m


MODELS = [
    ("mlp_tiny", {}),
    ("vgg_tiny", {"in_channels": 1, "image_size": 28, "norm": "batchnorm"}),
    ("resnet_tiny", {"in_channels": 1, "image_size": 28}),
]


@pytest.mark.parametrize("name,kw", MODELS)
def test_permuted_copy_gives_R_one_and_zero_distance(name, kw):
    m = _model(name, 0, **kw)
    spec, sd = spec_for(m), m.state_dict()
    pi = random_permutation(spec, seed=5)
    sd_b = apply_permutation(spec, pi, sd)
    before = {k: v.clone() for k, v in sd_b.items()}
    inv = invert_permutation(pi)
    d = distances(spec, sd, sd_b, inv)
    assert d["l2_before"] > 0.1 and d["l2_after"] == pytest.approx(0.0, abs=1e-6)
    assert d["reduction"] == pytest.approx(1.0)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in d["entries"])
    res = svd_alignment(spec, sd, sd_b, inv, gammas=(0.0, 0.3))
    for g in ("0", "0.3"):
        assert res.R[g]["after"] == pytest.approx(1.0, abs=1e-6)
        assert res.R[g]["before"] < 0.6
    for la in res.layers:
        ka, kb = la.kept["0.3"]
        assert ka == kb and la.R_sum["0.3"]["after"] == pytest.approx(ka, abs=1e-5)
        assert torch.allclose(la.per_index["after"], torch.ones_like(la.per_index["after"]), atol=1e-4)
        assert torch.equal(la.sigma_a, la.sigma_b) or torch.allclose(la.sigma_a, la.sigma_b, atol=1e-5)
    assert all(torch.equal(before[k], sd_b[k]) for k in sd_b)  # inputs untouched


def test_layers_follow_spec():
    m = _model("resnet_tiny", 0, in_channels=1, image_size=28)
    spec = spec_for(m)
    ls = {la.key: la for la in layers_of(spec, m.state_dict())}
    assert "bn1.weight" not in ls and "conv1.weight" in ls
    assert (
        ls["conv1.weight"].in_group is None and ls["conv1.weight"].out_group == "S0" and ls["conv1.weight"].kernel == 9
    )
    assert [la.key for la in ls.values() if la.is_output] == ["head.weight"]


def test_random_matrices_give_R_near_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    for gamma in (0.0, 0.3):
        r, ka, kb = matrix_alignment(a, b, gamma)
        assert abs(r / min(ka, kb)) < 0.1
    r, ka, _ = matrix_alignment(a, a, 0.3)
    assert r == pytest.approx(ka, rel=1e-6)  # identical matrices: R_l = number of kept indices


def test_hand_computed_R_2x2():
    # W_a = diag(2, 0.5): U_a = V_a = I.  W_b = R(theta) diag(3, 0.1) R(phi)^T, theta = 30deg, phi = 90deg:
    # u^b = columns of R(theta), v^b = columns of R(phi). C_ij = (e_i . u^b_j)(e_i . v^b_j):
    #   C = [[c_t c_p, s_t s_p], [s_t s_p, c_t c_p]] = [[0, 1/2], [1/2, 0]].
    # gamma=0 keeps both in each: R = sum(C)/2 = 1/2.  gamma=0.3 keeps index 0 only in each: R = C_00 = 0.
    def rot(t):
        return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)

    wa = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    wb = rot(math.pi / 6) @ torch.diag(torch.tensor([3.0, 0.1], dtype=torch.float64)) @ rot(math.pi / 2).T
    r0, ka, kb = matrix_alignment(wa, wb, 0.0)
    assert (ka, kb) == (2, 2) and r0 / 2 == pytest.approx(0.5, abs=1e-12)
    r3, ka, kb = matrix_alignment(wa, wb, 0.3)
    assert (ka, kb) == (1, 1) and r3 == pytest.approx(0.0, abs=1e-12)
    lhs, rhs = inner_product_identity(wa, wb)
    assert lhs == pytest.approx(rhs, abs=1e-12)


def test_inner_product_identity_random_and_conv():
    g = torch.Generator().manual_seed(1)
    for shape in ((40, 25), (25, 40), (8, 5, 3, 3)):
        a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        p, q = torch.randperm(shape[0], generator=g), torch.randperm(shape[1], generator=g)
        bp = b.index_select(0, p).index_select(1, q)
        lhs, rhs = inner_product_identity(a, bp)
        assert lhs == pytest.approx(rhs, rel=1e-4)
        assert lhs == pytest.approx(float((a.double() * bp.double()).sum()), rel=1e-9)


def test_inner_product_identity_on_trained_layer(synthetic):
    m = _model("mlp_tiny", 0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for x, y in synthetic.batches("train", 200, shuffle=True, generator=torch.Generator().manual_seed(0)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    w = m.state_dict()["fc1.weight"]
    b = _model("mlp_tiny", 1).state_dict()["fc1.weight"]
    lhs, rhs = inner_product_identity(w, b)
    assert lhs == pytest.approx(rhs, rel=1e-4)


def test_R_invariant_to_common_permutation():
    spec_m = _model("vgg_tiny", 0, in_channels=1, image_size=28, norm="none")
    spec = spec_for(spec_m)
    sd_a, sd_b = spec_m.state_dict(), _model("vgg_tiny", 1, in_channels=1, image_size=28, norm="none").state_dict()
    sigma = random_permutation(spec, 3)
    pi = random_permutation(spec, 4)
    r1 = svd_alignment(spec, sd_a, sd_b, pi)
    # theta_a -> sigma(theta_a), pi(theta_b) -> sigma(pi(theta_b)): the permutation of b becomes sigma o pi.
    from lmckit.perm import compose_permutations

    r2 = svd_alignment(spec, apply_permutation(spec, sigma, sd_a), sd_b, compose_permutations(pi, sigma))
    r3 = svd_alignment(spec, apply_permutation(spec, sigma, sd_a), apply_permutation(spec, sigma, sd_b))
    for g in r1.R:
        assert r2.R[g]["after"] == pytest.approx(r1.R[g]["after"], abs=1e-9)
        assert r3.R[g]["before"] == pytest.approx(r1.R[g]["before"], abs=1e-9)
    assert r1.R["0"]["after"] != pytest.approx(r1.R["0"]["before"], abs=1e-6)  # the permutation does matter


def test_weight_matching_recovers_planted_permutation():
    match = pytest.importorskip("lmckit.match")
    m = _model("mlp_tiny", 0)
    spec, sd = spec_for(m), m.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, 9), sd)
    res = match.weight_matching(spec, sd, sd_b, seed=0)
    assert distances(spec, sd, sd_b, res.perms)["l2_after"] == pytest.approx(0.0, abs=1e-5)
    assert svd_alignment(spec, sd, sd_b, res.perms).R["0.3"]["after"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name,kw", MODELS[:2])
def test_full_rank_truncation_reproduces_outputs(name, kw, synthetic):
    m = _model(name, 0, **kw).eval()
    spec, sd = spec_for(m), m.state_dict()
    x, _ = synthetic.tensors("test", limit=64)
    ref = m(x)
    for opt in ({"gamma": 0.0}, {"fraction": 1.0}):
        sd_k, kept = truncate_state(spec, sd, **opt)
        assert all(v["kept"] == v["rank"] for v in kept.values())
        out = torch.func.functional_call(m, sd_k, (x,))
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_planted_rank():
    m = _model("mlp_tiny", 0)
    spec, sd = spec_for(m), dict(m.state_dict())
    u, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    s = torch.tensor([10.0, 5.0, 3.5, 2.9] + [0.1] * 12, dtype=torch.float64)
    sd["fc1.weight"] = (u * s @ v.T).float()
    sd_k, kept = truncate_state(spec, sd, gamma=0.3)
    assert kept["fc1"] == {"kept": 3, "rank": 16} and "fc2" not in kept  # sigma >= 3 kept; output layer whole
    expect = (u[:, :3] * s[:3]) @ v[:, :3].T
    assert torch.allclose(sd_k["fc1.weight"].double(), expect, atol=1e-5)
    assert torch.equal(sd_k["fc2.weight"], sd["fc2.weight"]) and torch.equal(sd_k["fc1.bias"], sd["fc1.bias"])
    _, kept = truncate_state(spec, sd, fraction=0.2)
    assert kept["fc1"]["kept"] == math.ceil(0.2 * 16)
    _, kept = truncate_state(spec, sd, fraction=0.2, keep_output_layer=False)
    assert kept["fc2"] == {"kept": 2, "rank": 10}
    from lmckit.errors import LmcError

    with pytest.raises(LmcError):
        truncate_state(spec, sd, gamma=0.3, fraction=0.5)


def test_rank_sweep_records(synthetic):
    m = _model("mlp_tiny", 0)
    recs = rank_sweep(m, m.state_dict(), synthetic, gammas=[0.3], fractions=[0.1, 1.0], limit=200)
    assert [r["kind"] for r in recs] == ["full", "gamma", "fraction", "fraction"]
    assert recs[-1]["acc"] == recs[0]["acc"] and recs[-1]["loss"] == pytest.approx(recs[0]["loss"], abs=1e-5)
    assert recs[2]["kept_total"] == 2 * math.ceil(0.1 * 16)


def test_taylor_exact_for_quadratic_loss(synthetic):
    # A linear model with squared error is exactly quadratic in its parameters.
    a = create_model("mlp", depth=0).double()
    spec = spec_for(a)
    torch.manual_seed(1)
    sd_b = {k: v + 0.05 * torch.randn_like(v) for k, v in a.state_dict().items()}

    def mse(out, y):
        return ((out - F.one_hot(y, 10).to(out.dtype)) ** 2).sum(1)

    r = taylor_midpoint(a, spec, a.state_dict(), sd_b, synthetic, num_samples=300, batch_size=128, loss_fn=mse)
    assert r["num_samples"] == 300 and abs(r["measured_midpoint"]) > 1e-3
    assert r["taylor_midpoint"] == pytest.approx(r["measured_midpoint"], rel=1e-6)


def test_taylor_bn_model_uses_batch_statistics_and_leaves_states_alone(synthetic):
    # The midpoint's stored BN statistics (an average of the endpoints') must not
    # enter the estimate: corrupting them changes nothing, and the caller's
    # tensors are not modified by train-mode BatchNorm.
    torch.manual_seed(0)
    a = create_model("vgg_tiny", in_channels=1, image_size=28, norm="batchnorm")
    torch.manual_seed(1)
    b = create_model("vgg_tiny", in_channels=1, image_size=28, norm="batchnorm")
    spec = spec_for(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    before = {k: v.clone() for k, v in {**sd_a, **{"b." + k: v for k, v in sd_b.items()}}.items()}
    r1 = taylor_midpoint(a, spec, sd_a, sd_b, synthetic, num_samples=200, batch_size=100)
    assert all(torch.equal(v, before[k]) for k, v in sd_a.items())
    assert all(torch.equal(v, before["b." + k]) for k, v in sd_b.items())
    bad = {k: (v * 1e3 if "running_var" in k else v) for k, v in sd_b.items()}
    r2 = taylor_midpoint(a, spec, sd_a, bad, synthetic, num_samples=200, batch_size=100)
    assert r1["bn_batch_statistics"] is True
    assert r2["measured_midpoint"] == pytest.approx(r1["measured_midpoint"], rel=1e-6, abs=1e-9)
    assert r2["taylor_midpoint"] == pytest.approx(r1["taylor_midpoint"], rel=1e-6, abs=1e-9)


def test_taylor_curvature_matches_finite_difference(synthetic):
    # Smooth (tanh) network: Delta^T H Delta equals the second difference of L along Delta at the midpoint.
    m = _model("mlp_tiny", 0, activation="tanh").double()
    spec = spec_for(m)
    sd_a = m.state_dict()
    sd_b = {k: v.double() for k, v in _model("mlp_tiny", 1, activation="tanh").state_dict().items()}
    r = taylor_midpoint(m, spec, sd_a, sd_b, synthetic, num_samples=100, batch_size=50)
    x = synthetic.normalize(
        synthetic.images["train"][torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:100]]
    ).double()
    y = synthetic.labels["train"][torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:100]]
    mid = {k: (sd_a[k] + sd_b[k]) / 2 for k in sd_a}
    d = {k: sd_a[k] - sd_b[k] for k in sd_a}

    def L(t):
        with torch.no_grad():
            return float(F.cross_entropy(torch.func.functional_call(m, {k: mid[k] + t * d[k] for k in mid}, (x,)), y))

    h = 1e-3
    fd = (L(h) - 2 * L(0.0) + L(-h)) / h**2
    assert r["dHd"] == pytest.approx(fd, rel=1e-4)
    assert r["loss_mid"] == pytest.approx(L(0.0), rel=1e-9)
    assert r["measured_midpoint"] == pytest.approx(L(0.0) - (L(0.5) + L(-0.5)) / 2, rel=1e-9)


def test_input_projections_linear_matches_manual(synthetic):
    m = _model("mlp_tiny", 0)
    spec, sd = spec_for(m), m.state_dict()
    proj = input_projections(m, spec, sd, synthetic, num_batches=2, batch_size=100, seed=3)
    gen = torch.Generator().manual_seed(3)
    xs = [x for _, (x, _) in zip(range(2), synthetic.batches("train", 100, shuffle=True, generator=gen))]
    z = torch.cat(xs).flatten(1).double()
    _, _, vh = torch.linalg.svd(sd["fc0.weight"].double(), full_matrices=False)
    manual = (z @ vh.T).abs().mean(0)
    assert torch.allclose(torch.tensor(proj["fc0"]["mean_abs"], dtype=torch.float64), manual, rtol=1e-4)
    assert proj["fc0"]["count"] == 200 and set(proj) == {"fc0", "fc1", "fc2"}


def test_input_projections_conv_energy(synthetic):
    # sum_i sigma_i^2 mean (v_i . z)^2 = mean over positions of ||W z||^2 = ||conv(x) - b||^2 per position.
    m = _model("vgg_tiny", 0, in_channels=1, image_size=28, norm="none").eval()
    spec, sd = spec_for(m), m.state_dict()
    proj = input_projections(m, spec, sd, synthetic, num_batches=1, batch_size=20, max_positions=10**6, seed=0)
    gen = torch.Generator().manual_seed(0)
    x, _ = next(synthetic.batches("train", 20, shuffle=True, generator=gen))
    captured = {}
    h = m.convs[1].register_forward_hook(lambda mod, i, o: captured.update(out=o - mod.bias.view(1, -1, 1, 1)))
    with torch.no_grad():
        m(x)
    h.remove()
    energy = float((captured["out"] ** 2).sum(1).mean())
    p = proj["convs.1"]
    est = sum(s**2 * q for s, q in zip(p["sigma"], p["mean_sq"]))
    assert est == pytest.approx(energy, rel=1e-4)
    assert p["count"] == 20 * 14 * 14


def test_analyze_pair_batchnorm_midpoint_uses_bn_reset(synthetic):
    lmc = pytest.importorskip("lmckit.lmc")
    from lmckit.analysis import analyze_pair, midpoint_state
    from lmckit.evaluate import evaluate

    kw = {"in_channels": 1, "image_size": 28, "norm": "batchnorm"}
    a, b = _model("vgg_tiny", 0, **kw), _model("vgg_tiny", 1, **kw)
    spec = spec_for(a)
    res = analyze_pair(
        a,
        spec,
        a.state_dict(),
        b.state_dict(),
        None,
        dataset=synthetic,
        rank_fractions=(0.5,),
        eval_limit=100,
        projection_batches=1,
    )
    sweep = res.summary["rank_sweep"]
    assert set(sweep) == {"A", "midpoint"} and res.summary["notes"] == [
        "no permutation given: 'after' equals 'before' (pass --perm from `lmckit match`)"
    ]
    mid = _model("vgg_tiny", 2, **kw)
    mid.load_state_dict(midpoint_state(a.state_dict(), b.state_dict()))
    lmc.reset_bn_stats(mid, synthetic)
    loss, acc = evaluate(mid, synthetic, "test", limit=100)
    assert sweep["midpoint"][0]["loss"] == pytest.approx(loss, rel=1e-5) and sweep["midpoint"][0]["acc"] == acc
