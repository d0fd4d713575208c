"""Weight matching: planted permutations recovered exactly, objective monotone, fixed points, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lmckit.errors import LmcError
from lmckit.match import MatchResult, l2_distance, weight_matching
from lmckit.match.weight import objective_keys
from lmckit.models import create_model, list_models
from lmckit.models.registry import PROVIDERS
from lmckit.perm import (
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    random_permutation,
    spec_for,
)

#: the image zoo (models a higher layer provides, hf-gpt2, have their own tier: tests/test_hf_gpt2_zoo.py)
IMAGE_ZOO = [n for n in list_models() if n not in PROVIDERS]


def _model(name, norm="none", seed=0):
    torch.manual_seed(seed)
    kw = {"in_channels": 1, "image_size": 28, "norm": norm}
    if not name.endswith("tiny"):
        kw["width_mult"] = 0.125
    return create_model(name, **kw)


def _randomise(sd, seed):
    """Every float entry drawn afresh, so BN/LN scales and biases are not all equal (no ties)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def _inner(spec, a, b):
    return sum(float((a[k].double() * b[k].double()).sum()) for k in objective_keys(spec, a))


def _assert_planted(spec, sd, planted, res):
    inv = invert_permutation(planted)
    assert set(res.perms) == set(spec.sizes)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    back = apply_permutation(spec, res.perms, apply_permutation(spec, planted, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert np.all(np.diff(res.objective) >= 0)
    assert res.converged


@pytest.mark.parametrize("name", IMAGE_ZOO)
@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
def test_planted_permutation_recovered_exactly(name, norm):
    m = _model(name, norm)
    spec = spec_for(m)
    sd = _randomise(m.state_dict(), 1)
    planted = random_permutation(spec, seed=5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted.values())
    sd_b = apply_permutation(spec, planted, sd)
    res = weight_matching(spec, sd, sd_b, seed=0)
    _assert_planted(spec, sd, planted, res)
    assert l2_distance(spec, sd, sd_b) > 0
    assert l2_distance(spec, sd, apply_permutation(spec, res.perms, sd_b)) == 0.0
    # at the optimum the objective is ||A||^2 over the matched entries
    assert res.final_objective == pytest.approx(_inner(spec, sd, sd), rel=1e-5)


def _odd_cases():
    try:
        from tests.helpers.odd_models import ODD_MODELS
    except ImportError:
        return []
    return [m for m in ODD_MODELS.values() if m.expect != "error"]


@pytest.mark.parametrize("odd", _odd_cases(), ids=lambda m: m.name)
def test_planted_permutation_recovered_on_traced_models(odd):
    pytest.importorskip("lmckit.perm.trace")
    torch.manual_seed(0)
    model = odd.factory()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = spec_for(model, odd.example_input())
    sd = _randomise(model.state_dict(), 2)
    planted = random_permutation(spec, seed=7)
    res = weight_matching(spec, sd, apply_permutation(spec, planted, sd))
    _assert_planted(spec, sd, planted, res)


def _pair(name="mlp_tiny", norm="batchnorm"):
    ma, mb = _model(name, norm, seed=0), _model(name, norm, seed=1)
    spec = spec_for(ma)
    return spec, _randomise(ma.state_dict(), 10), _randomise(mb.state_dict(), 11)


def _naive_cost(spec, sd_a, sd_b, perms, g):
    """C_g[i, j] = sum over g's (entry, axis) of <A slice i, pi_{-g}(B) slice j>, straight from the definition."""
    others = dict(perms)
    others[g] = torch.arange(spec.sizes[g])
    bp = apply_permutation(spec, others, sd_b)
    n = spec.sizes[g]
    c = np.zeros((n, n))
    for k in objective_keys(spec, sd_a):
        for ax, x in enumerate(spec.axes[k]):
            if x == g:
                a = sd_a[k].double().movedim(ax, 0).reshape(n, -1)
                b = bp[k].double().movedim(ax, 0).reshape(n, -1)
                c += (a @ b.t()).numpy()
    return c


@pytest.mark.parametrize("name", ["mlp_tiny", "vgg_tiny", "resnet_tiny"])
def test_result_is_a_coordinate_wise_optimum(name):
    """No single group can be improved at the result: checks the incremental cost cache and the skip rule."""
    spec, sd_a, sd_b = _pair(name)
    res = weight_matching(spec, sd_a, sd_b, seed=3)
    assert res.converged and res.sweeps >= 2
    for g in spec.sizes:
        c = _naive_cost(spec, sd_a, sd_b, res.perms, g)
        cur = c[np.arange(len(c)), res.perms[g].numpy()].sum()
        r, col = linear_sum_assignment(c, maximize=True)
        assert c[r, col].sum() <= cur + 1e-6 * (1 + abs(cur)), g


@pytest.mark.parametrize("name", ["mlp_tiny", "vgg_tiny", "resnet_tiny"])
def test_objective_non_decreasing_and_true(name):
    spec, sd_a, sd_b = _pair(name)
    res = weight_matching(spec, sd_a, sd_b, seed=1)
    obj = np.array(res.objective)
    assert len(obj) == res.sweeps + 1
    assert np.all(np.diff(obj) >= 0)
    assert obj[-1] > obj[0]
    aligned = apply_permutation(spec, res.perms, sd_b)
    assert obj[0] == pytest.approx(_inner(spec, sd_a, sd_b), rel=1e-9)
    assert obj[-1] == pytest.approx(_inner(spec, sd_a, aligned), rel=1e-5)
    # ||A - pi(B)||^2 = ||A||^2 + ||B||^2 - 2 J over the matched entries: distance must drop
    keys = objective_keys(spec, sd_a)
    assert l2_distance(spec, sd_a, aligned, keys) < l2_distance(spec, sd_a, sd_b, keys)


def test_single_group_matches_brute_force():
    """One group: WM is a single LAP, so it must equal the best of all 4! permutations."""
    torch.manual_seed(0)
    m = create_model("mlp_tiny", depth=1, width=4)
    spec = spec_for(m)
    sd_a, sd_b = _randomise(m.state_dict(), 1), _randomise(m.state_dict(), 2)
    best = max(
        itertools.permutations(range(4)),
        key=lambda p: _inner(spec, sd_a, apply_permutation(spec, {"P0": torch.tensor(p)}, sd_b)),
    )
    res = weight_matching(spec, sd_a, sd_b)
    assert res.perms["P0"].tolist() == list(best)


def test_warm_start_at_optimum_is_one_sweep():
    spec, sd_a, sd_b = _pair("resnet_tiny")
    res = weight_matching(spec, sd_a, sd_b, seed=0)
    again = weight_matching(spec, sd_a, sd_b, seed=4, init_perms=res.perms)
    assert again.sweeps == 1 and again.converged
    assert all(torch.equal(again.perms[g], res.perms[g]) for g in spec.sizes)
    assert again.objective[0] == pytest.approx(res.final_objective, rel=1e-6)
    assert again.objective[-1] == again.objective[0]


def test_seeds_reproducible_and_restarts_keep_best():
    spec, sd_a, sd_b = _pair("vgg_tiny")
    r1 = weight_matching(spec, sd_a, sd_b, seed=2)
    r2 = weight_matching(spec, sd_a, sd_b, seed=2)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in spec.sizes) and r1.objective == r2.objective
    many = weight_matching(spec, sd_a, sd_b, seed=2, restarts=4)
    finals = many.extra["restart_objectives"]
    assert len(finals) == 4 and finals[0] == pytest.approx(r1.final_objective)
    assert many.final_objective == max(finals)


def test_max_iter_caps_sweeps():
    spec, sd_a, sd_b = _pair("mlp_tiny")
    full = weight_matching(spec, sd_a, sd_b, seed=0)
    assert full.sweeps >= 2
    one = weight_matching(spec, sd_a, sd_b, seed=0, max_iter=1)
    assert one.sweeps == 1 and not one.converged


def test_inputs_not_modified():
    spec, sd_a, sd_b = _pair("resnet_tiny")
    ca = {k: v.clone() for k, v in sd_a.items()}
    cb = {k: v.clone() for k, v in sd_b.items()}
    weight_matching(spec, sd_a, sd_b)
    assert all(torch.equal(sd_a[k], ca[k]) and torch.equal(sd_b[k], cb[k]) for k in sd_a)


def test_running_stats_are_not_in_the_objective():
    spec, sd_a, sd_b = _pair("mlp_tiny", "batchnorm")
    keys = objective_keys(spec, sd_a)
    assert "norm0.weight" in keys and "norm0.bias" in keys
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)
    # changing only B's running statistics changes nothing
    sd_b2 = dict(sd_b, **{"norm0.running_mean": torch.randn(16) * 100})
    r1, r2 = weight_matching(spec, sd_a, sd_b), weight_matching(spec, sd_a, sd_b2)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in spec.sizes)
    r3 = weight_matching(spec, sd_a, sd_b2, include_buffers=True)
    assert r3.final_objective != pytest.approx(r1.final_objective)


def test_square_stream_weight_quadratic_group():
    """A stream-to-stream weight moved by one group on both axes (J quadratic in P): planted truth still found."""
    g = torch.Generator().manual_seed(0)
    n = 6
    # the linearised LAP step cannot always escape a strong diagonal; w_in (20 inputs) carries the signal here
    sd = {
        "w_in": torch.randn(n, 20, generator=g),
        "w_sq": torch.randn(n, n, generator=g),
        "b": torch.randn(n, generator=g),
        "w_out": torch.randn(3, n, generator=g),
    }
    spec = PermutationSpec(
        axes={"w_in": ("S", None), "w_sq": ("S", "S"), "b": ("S",), "w_out": (None, "S")},
        sizes={"S": n},
        shapes={k: tuple(v.shape) for k, v in sd.items()},
    )
    planted = {"S": torch.randperm(n, generator=g)}
    res = weight_matching(spec, sd, apply_permutation(spec, planted, sd))
    assert torch.equal(res.perms["S"], invert_permutation(planted)["S"])
    assert np.all(np.diff(res.objective) >= 0)
    # and on an unrelated pair the exact objective never drops
    sd_b = {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
    res = weight_matching(spec, sd, sd_b)
    assert np.all(np.diff(res.objective) >= 0)
    assert res.final_objective == pytest.approx(_inner(spec, sd, apply_permutation(spec, res.perms, sd_b)), rel=1e-6)


def test_result_helpers():
    spec, sd_a, sd_b = _pair("mlp_tiny")
    res = weight_matching(spec, sd_a, sd_b)
    assert isinstance(res, MatchResult) and res.method == "weight"
    d = res.to_dict(with_perms=True)
    assert d["sweeps"] == res.sweeps and d["objective_after"] == res.final_objective
    assert sorted(d["perms"]["P0"]) == list(range(16))
    assert "weight matching" in res.summary()


# ----------------------------------------------------------------------------- errors
def test_mismatched_architectures_raise():
    spec, sd_a, _ = _pair("mlp_tiny")
    other = _model("vgg_tiny").state_dict()
    with pytest.raises(LmcError, match="model B"):
        weight_matching(spec, sd_a, other)


def test_mismatched_width_raises():
    torch.manual_seed(0)
    a = create_model("mlp_tiny", width=16)
    b = create_model("mlp_tiny", width=17)
    with pytest.raises(LmcError, match="shape"):
        weight_matching(spec_for(a), a.state_dict(), b.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad):
    spec, sd_a, sd_b = _pair("mlp_tiny")
    sd_b = dict(sd_b)
    w = sd_b["fc1.weight"].clone()
    w[0, 0] = bad
    sd_b["fc1.weight"] = w
    with pytest.raises(LmcError, match="fc1.weight.*NaN or inf"):
        weight_matching(spec, sd_a, sd_b)


def test_bad_arguments_raise():
    spec, sd_a, sd_b = _pair("mlp_tiny")
    with pytest.raises(LmcError):
        weight_matching(spec, sd_a, sd_b, max_iter=0)
    with pytest.raises(LmcError):
        weight_matching(spec, sd_a, sd_b, restarts=0)
    bad = identity_permutation(spec)
    bad["P0"] = torch.zeros(16, dtype=torch.long)
    with pytest.raises(LmcError, match="not a permutation"):
        weight_matching(spec, sd_a, sd_b, init_perms=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    spec, sd_a, sd_b = _pair("resnet_tiny")
    cpu = weight_matching(spec, sd_a, sd_b, seed=0)
    gpu = weight_matching(spec, {k: v.cuda() for k, v in sd_a.items()}, {k: v.cuda() for k, v in sd_b.items()}, seed=0)
    assert gpu.extra["device"].startswith("cuda")
    assert gpu.final_objective == pytest.approx(cpu.final_objective, rel=1e-4)


def test_concurrent_assignment_solves_equal_the_sequential_sweep(monkeypatch):
    """Non-neighbouring groups solved at once must give exactly the sequential trajectory."""
    from lmckit.match import weight as wmod
    from lmckit.match import weight_sweep as sweep  # where the descent reads its pool settings
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    torch.manual_seed(0)
    a = create_model("resnet_tiny", in_channels=1, image_size=28, norm="batchnorm")
    torch.manual_seed(1)
    b = create_model("resnet_tiny", in_channels=1, image_size=28, norm="batchnorm")
    spec = spec_for(a)
    monkeypatch.setattr(sweep, "_lap_workers", lambda: 4)
    monkeypatch.setattr(sweep, "_PARALLEL_MIN_UNITS", 1)  # tiny groups: force the thread pool
    calls = []
    real_pool = sweep._lap_pool
    monkeypatch.setattr(sweep, "_lap_pool", lambda: calls.append(1) or real_pool())
    par = wmod.weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    monkeypatch.setattr(sweep, "_lap_workers", lambda: 1)
    seq = wmod.weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    assert calls, "the concurrent path was never taken"
    assert par.objective == seq.objective
    assert all(torch.equal(par.perms[g], seq.perms[g]) for g in seq.perms)


def test_independent_runs_never_group_neighbours():
    from lmckit.match.weight import _independent_runs

    nb = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": set()}
    runs = _independent_runs(["a", "c", "d", "b"], nb, 4)
    assert runs == [["a", "c", "d"], ["b"]]
    assert _independent_runs(["a", "b", "c"], nb, 4) == [["a"], ["b"], ["c"]]
    assert _independent_runs(["a", "c", "d"], nb, 2) == [["a", "c"], ["d"]]
