"""Interpolation / mixing of state dicts and the pure barrier functions (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.lmc import accuracy_barrier, interpolate_states, lambda_grid, loss_barrier, mix_states, state_vector
from lmckit.models import create_model


def _states(seed_a=0, seed_b=1, **kw):
    torch.manual_seed(seed_a)
    a = create_model("mlp_tiny", norm="batchnorm", **kw).state_dict()
    torch.manual_seed(seed_b)
    b = create_model("mlp_tiny", norm="batchnorm", **kw).state_dict()
    # distinguishable float buffers and integer counters
    a = {k: (v + 0.1 if k.endswith("running_mean") else v.clone()) for k, v in a.items()}
    b = {k: (v - 0.3 if k.endswith("running_mean") else v.clone()) for k, v in b.items()}
    a["norm0.num_batches_tracked"] = torch.tensor(7)
    b["norm0.num_batches_tracked"] = torch.tensor(11)
    return a, b


def test_endpoints_are_bitwise_copies():
    a, b = _states()
    # a value for which (1-0)*a + 0*b is NOT bitwise a: -0.0 + 0*x = +0.0
    a["fc0.bias"][0] = -0.0
    b["fc0.bias"][0] = 5.0
    s0 = interpolate_states(a, b, 0.0)
    s1 = interpolate_states(a, b, 1)
    for k in a:
        assert torch.equal(s0[k], a[k]) and s0[k].dtype == a[k].dtype
        assert torch.equal(s1[k], b[k])
        assert s0[k].data_ptr() != a[k].data_ptr() and s1[k].data_ptr() != b[k].data_ptr()  # copies
    assert math.copysign(1.0, float(s0["fc0.bias"][0])) == -1.0
    assert int(s1["norm0.num_batches_tracked"]) == 11


def test_interior_values_and_integer_buffers():
    a, b = _states()
    a0 = {k: v.clone() for k, v in a.items()}
    s = interpolate_states(a, b, 0.25)
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(s[k], 0.75 * a[k] + 0.25 * b[k], rtol=0, atol=1e-7)
    assert torch.equal(s["norm0.running_mean"], 0.75 * a["norm0.running_mean"] + 0.25 * b["norm0.running_mean"])
    assert int(s["norm0.num_batches_tracked"]) == 7  # integers from the first model
    assert all(torch.equal(a[k], a0[k]) for k in a)  # caller's dict untouched
    # extrapolation is allowed
    s2 = interpolate_states(a, b, 2.0)
    torch.testing.assert_close(s2["fc1.weight"], -a["fc1.weight"] + 2 * b["fc1.weight"])


def test_mix_states_hand_values_and_exact_vertices():
    a, b = _states()
    c = {k: (v * 3 if v.is_floating_point() else v + 100) for k, v in a.items()}
    m = mix_states([a, b, c], [0.5, 0.25, 0.25])
    torch.testing.assert_close(m["fc2.weight"], 0.5 * a["fc2.weight"] + 0.25 * b["fc2.weight"] + 0.25 * c["fc2.weight"])
    assert int(m["norm0.num_batches_tracked"]) == 7
    # affine (beyond the triangle)
    m = mix_states([a, b, c], [1.5, -1.0, 0.5])
    torch.testing.assert_close(m["fc0.bias"], 1.5 * a["fc0.bias"] - b["fc0.bias"] + 0.5 * c["fc0.bias"])
    v = mix_states([a, b, c], [0.0, 1.0, 0.0])
    assert all(torch.equal(v[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="sum to 1"):
        mix_states([a, b], [0.5, 0.6])
    m = mix_states([a, b], [2.0, 3.0], require_affine=False)
    torch.testing.assert_close(m["fc1.bias"], 2 * a["fc1.bias"] + 3 * b["fc1.bias"])


def test_incompatible_states_raise_lmc_error():
    a, _ = _states()
    torch.manual_seed(0)
    wide = create_model("mlp_tiny", norm="batchnorm", width=17).state_dict()
    with pytest.raises(LmcError, match="shape"):
        interpolate_states(a, wide, 0.5)
    other = create_model("mlp_tiny").state_dict()
    with pytest.raises(LmcError, match="different state-dict entries"):
        interpolate_states(a, other, 0.5)


def test_state_vector_round_numbers():
    a, b = _states()
    d = state_vector(a) - state_vector(b)
    direct = math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()))
    assert abs(float(d.norm()) - direct) < 1e-9


def test_lambda_grid():
    g = lambda_grid(25)
    assert len(g) == 25 and g[0] == 0.0 and g[-1] == 1.0 and g[12] == 0.5
    assert all(abs(x - i / 24) < 1e-15 for i, x in enumerate(g))
    g4 = lambda_grid(4)
    assert g4 == [0.0, 1 / 3, 0.5, 2 / 3, 1.0]
    assert lambda_grid(2) == [0.0, 0.5, 1.0]
    with pytest.raises(LmcError):
        lambda_grid(1)


def test_loss_barrier_toy_curves():
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    # baseline 1, 1.25, 1.5, 1.75, 2 -> gaps 0, .75, 1.5, .75, 0
    b, at = loss_barrier(lam, [1.0, 2.0, 3.0, 2.5, 2.0])
    assert b == pytest.approx(1.5) and at == 0.5
    # peak off-centre: gaps 0, 1.75, 0.5, 0.25, 0
    b, at = loss_barrier(lam, [1.0, 3.0, 2.0, 2.0, 2.0])
    assert b == pytest.approx(1.75) and at == 0.25
    # convex curve below the chord: no barrier
    b, _ = loss_barrier(lam, [1.0, 0.8, 0.7, 0.9, 2.0])
    assert b == 0.0
    # unsorted grid with the endpoints anywhere
    b, at = loss_barrier([0.5, 1.0, 0.0], [3.0, 2.0, 1.0])
    assert b == pytest.approx(1.5) and at == 0.5
    with pytest.raises(ValueError):
        loss_barrier([0.0, 0.5], [1.0, 2.0])


def test_accuracy_barrier_toy_curves():
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    # baseline .9, .875, .85, .825, .8 -> gaps 0, .375, .65, .225, 0
    b, at = accuracy_barrier(lam, [0.9, 0.5, 0.2, 0.6, 0.8])
    assert b == pytest.approx(0.65) and at == 0.5
    b, _ = accuracy_barrier(lam, [0.9, 0.95, 0.97, 0.9, 0.8])
    assert b == 0.0
