"""Generalised weight and activation matching (issue 29): planted transforms of each class recovered."""

from __future__ import annotations

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.match import activation_matching
from lmckit.match.symmetric import relative_distance, weight_matching_sym
from lmckit.models import create_model
from lmckit.perm import spec_for
from lmckit.perm.symmetry import apply_transform, derive_symmetry, fold_norms, random_transform
from lmckit.perm.trace import trace_streams

from .helpers.symmetry_models import GPTBlock, TanhMLP, perturb


def _vit(norm, seed=0):
    torch.manual_seed(seed)
    m = perturb(create_model("vit", width=16, depth=2, heads=4, norm=norm), 0.05, seed)
    return fold_norms(m)[0]


def _planted(spec, model, cls, seed=3):
    sd_a = model.state_dict()
    sym = derive_symmetry(spec, sd_a, cls, model=model)
    return sd_a, apply_transform(spec, sym, random_transform(spec, sym, seed), sd_a), sym


@pytest.mark.parametrize("norm", ["none", "layernorm"])
@pytest.mark.parametrize("cls", ["signed", "orthogonal"])
def test_wm_recovers_a_planted_transform(norm, cls):
    model = _vit(norm)
    spec = spec_for(model)
    sd_a, sd_b, sym = _planted(spec, model, cls)
    assert any(s.cls == cls for s in sym.values())
    res = weight_matching_sym(spec, sd_a, sd_b, cls, model=model, max_iter=200)
    assert res.extra["start"] == "permutation" and res.extra["start_sweeps"] >= 1
    aligned = apply_transform(spec, res.sym, res.transform, sd_b)
    assert res.extra["distance_before"] > 0.5
    assert relative_distance(spec, sd_a, aligned) < 1e-6 and res.extra["distance_after"] < 1e-6
    assert res.converged and res.sweeps < 200
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(res.objective, res.objective[1:]))  # non-decreasing


def test_wm_from_the_identity_also_recovers_a_planted_transform():
    model = _vit("none")
    spec = spec_for(model)
    sd_a, sd_b, _ = _planted(spec, model, "orthogonal")
    res = weight_matching_sym(spec, sd_a, sd_b, "orthogonal", model=model, start="identity")
    assert res.extra["start"] == "identity" and res.extra["start_sweeps"] == 0
    assert res.extra["distance_after"] < 1e-6
    with pytest.raises(LmcError, match="unknown start 'random'"):
        weight_matching_sym(spec, sd_a, sd_b, "orthogonal", model=model, start="random")


def test_wm_on_a_traced_gpt_block_with_rmsnorm():
    x = torch.randn(4, 5, 6)
    model = fold_norms(perturb(GPTBlock()), x)[0]
    spec = trace_streams(model, x).spec
    sd_a, sd_b, sym = _planted(spec, model, "orthogonal")
    assert sym["embed"].cls == "orthogonal" and not sym["embed"].fix_ones
    res = weight_matching_sym(spec, sd_a, sd_b, "orthogonal", model=model)
    assert res.extra["distance_after"] < 1e-6


def test_wm_signed_on_tanh_hidden_units():
    model = TanhMLP(hidden=12)
    spec = trace_streams(model, torch.randn(3, 6)).spec
    sd_a, sd_b, _ = _planted(spec, model, "signed")
    res = weight_matching_sym(spec, sd_a, sd_b, "signed", model=model)
    assert res.extra["distance_after"] < 1e-6 and res.sym["fc1"].cls == "signed"


def test_wm_orthogonal_lowers_the_distance_below_permutation_wm():
    """Two unrelated models: a larger class can only fit better (its optimum is at least permutation WM's)."""
    a, b = _vit("none", 0), _vit("none", 1)
    spec = spec_for(a)
    perm = weight_matching_sym(spec, a.state_dict(), b.state_dict(), "permutation", model=a)
    orth = weight_matching_sym(spec, a.state_dict(), b.state_dict(), "orthogonal", model=a)
    assert orth.extra["distance_after"] < perm.extra["distance_after"] < perm.extra["distance_before"]


@pytest.mark.parametrize("norm", ["none", "layernorm"])
@pytest.mark.parametrize("cls", ["signed", "orthogonal", "permutation"])
def test_wm_tracked_objective_equals_the_objective_of_the_returned_transform(norm, cls):
    """The sweep updates T(B) by each step's change only; J after it must be J of the transform it returns.

    Unrelated models (many accepted steps, head structures, norm gains under the signed class), compared
    with ``sum <A, T(B)>`` recomputed from scratch over the same entries.
    """
    a, b = _vit(norm, 0), _vit(norm, 1)
    spec = spec_for(a)
    sd_a, sd_b = ({k: v.double() for k, v in m.state_dict().items()} for m in (a, b))  # fresh J in float64
    res = weight_matching_sym(spec, sd_a, sd_b, cls, model=a, max_iter=15, start="identity", relax=False)
    # no group of the ViT moves two axes of one tensor, so every step is exact and none may be rejected
    # (a wrong incremental update shows up here: J computed on a stale T(B) falls and the step is refused)
    assert res.extra["steps"] >= 10 and res.extra["steps_rejected"] == 0 and res.objective[-1] > res.objective[0]
    _assert_tracked_objective(spec, sd_a, sd_b, res)


def _assert_tracked_objective(spec, sd_a, sd_b, res):
    from lmckit.match.symmetric import _objective_keys

    aligned = apply_transform(spec, res.sym, res.transform, sd_b)
    fresh = sum(float((sd_a[k] * aligned[k]).sum()) for k in _objective_keys(spec, sd_a))
    assert abs(res.objective[-1] - fresh) <= 1e-10 * abs(fresh)


def test_wm_signed_tracks_rmsnorm_gains_moved_by_abs():
    """Unfolded RMSNorm under the signed class: the gains move by |D| (in J, not in the cost)."""
    x = torch.randn(4, 5, 6)
    a = perturb(GPTBlock().double())
    spec = trace_streams(a, x.double()).spec
    sd_a, sd_b, _ = _planted(spec, a, "signed")  # B: a random signed transform of A (sign flips in the gains)
    res = weight_matching_sym(spec, sd_a, sd_b, "signed", model=a, max_iter=15, start="identity", relax=False)
    assert res.sym["embed"].cls == "signed" and res.sym["embed"].norm_keys
    assert not torch.equal(res.transform["embed"].abs(), res.transform["embed"])  # some sign flipped
    _assert_tracked_objective(spec, sd_a, sd_b, res)


def test_wm_refuses_invertible_and_mismatched_folding():
    a = _vit("layernorm")
    spec = spec_for(a)
    with pytest.raises(LmcError, match="no exact step for invertible"):
        weight_matching_sym(spec, a.state_dict(), a.state_dict(), "invertible", model=a)
    raw = perturb(create_model("vit", width=16, depth=2, heads=4, norm="layernorm"), 0.05, 1)
    with pytest.raises(LmcError, match="group 'patch' admits orthogonal maps in model A but permutation in model B"):
        weight_matching_sym(spec, a.state_dict(), raw.state_dict(), "orthogonal", model=a)


@pytest.mark.parametrize("norm", ["none", "layernorm"])
@pytest.mark.parametrize("cls", ["signed", "orthogonal"])
def test_am_recovers_a_planted_transform(synthetic, norm, cls):
    a = _vit(norm)
    spec = spec_for(a)
    sd_a, sd_b, _ = _planted(spec, a, cls)
    b = _vit(norm, 5)
    b.load_state_dict(sd_b)
    res = activation_matching(a, b, synthetic, num_batches=2, batch_size=200, symmetry=cls)
    aligned = apply_transform(spec, res.sym, res.transform, sd_b)
    assert relative_distance(spec, sd_a, aligned) < 1e-6
    assert any(s.cls == cls for s in res.sym.values())
