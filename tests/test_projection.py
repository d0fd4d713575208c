"""Warm-started STE projections (lmckit.match.projection) and the LAP entry point (lmckit.match.lap)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmckit.match import lap, lap_warm
from lmckit.match.projection import WarmProjector, WeightMatchingProjector
from lmckit.match.weight import weight_matching
from lmckit.models import create_model
from lmckit.perm import apply_permutation, spec_for


def _brute_best(c: np.ndarray) -> float:
    n = c.shape[0]
    return max(sum(c[i, s[i]] for i in range(n)) for s in itertools.permutations(range(n)))


@pytest.mark.parametrize("solver", lap.available())
def test_lap_solvers_optimal_against_brute_force(solver):
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.normal(size=(6, 6))
        col = lap.solve(c, solver=solver)
        assert sorted(col.tolist()) == list(range(6))
        assert c[np.arange(6), col].sum() == pytest.approx(_brute_best(c), abs=1e-12)
        # minimise = maximise the negation
        assert np.array_equal(lap.solve(-c, maximize=False, solver=solver), col)


def test_lap_bad_inputs():
    with pytest.raises(ValueError):
        lap.solve(np.zeros((3, 4)))
    with pytest.raises(ValueError):
        lap.solve(np.zeros((3, 3)), solver="nope")
    assert lap.solve(np.zeros((0, 0))).shape == (0,)
    assert lap.choose(10) in lap.available()


def test_lap_env_forces_scipy(monkeypatch):
    monkeypatch.setenv("LMCKIT_LAP", "scipy")
    assert lap.choose(64) == "scipy"


def _perturbed(sd, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in sd.items()}


@pytest.mark.parametrize(
    "solver,name",
    [("warm", "mlp"), ("cold", "mlp"), ("warm", "vgg_tiny"), ("warm", "resnet_tiny"), ("cold", "vgg_tiny")],
)
def test_projector_equals_weight_matching_along_a_trajectory(solver, name):
    """A sequence of slowly moving A's (as theta~ in STE): every projection equals weight_matching's.

    Conv models check the gathered-A products of 4-D kernels and the norm vectors."""
    if name == "mlp":
        model = create_model("mlp", in_channels=1, image_size=8, width=24, depth=3)
    else:
        model = create_model(name)
    spec = spec_for(model)
    torch.manual_seed(0)
    sd_b = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perm = {g: torch.randperm(n) for g, n in spec.sizes.items()}
    a = _perturbed(apply_permutation(spec, perm, sd_b), 0.02, 1)  # B planted in A, plus noise
    proj = WarmProjector(spec, sd_b, max_iter=100, solver=solver)
    assert proj.warm == (solver == "warm" and lap_warm.available())
    cur = weight_matching(spec, a, sd_b, seed=0).perms
    assert all(torch.equal(cur[g], perm[g]) for g in spec.sizes)  # planted permutation recovered
    for t in range(12):
        a = _perturbed(a, 0.01 if t % 3 else 0.2, 100 + t)  # small steps and a few large ones
        want = weight_matching(spec, a, sd_b, seed=t, max_iter=100, init_perms=cur, restarts=1).perms
        got = proj(a, cur, t)
        assert all(torch.equal(got[g], want[g]) for g in spec.sizes), f"step {t}"
        cur = got
    st = proj.stats
    assert st["calls"] == 12 and st["sweeps"] >= 12
    if proj.warm:
        # warm solves re-assign only some rows: fewer than all rows of every solve
        assert 0 < st["freed"] < st["solves"] * max(spec.sizes.values())
    else:
        assert st["freed"] == 0


def test_ste_projector_modes_and_approximations(monkeypatch):
    from lmckit.errors import LmcError
    from lmckit.match.projection import ste_projector

    model = create_model("mlp_tiny", in_channels=1, image_size=8)
    spec = spec_for(model)
    sd = model.state_dict()
    monkeypatch.delenv("LMCKIT_STE_PROJECTION", raising=False)
    p = ste_projector(spec, sd, 10, "cpu")
    assert isinstance(p, WarmProjector) and p.warm == lap_warm.available() and p.every == 1
    monkeypatch.setenv("LMCKIT_STE_PROJECTION", "exact-cold")
    p = ste_projector(spec, sd, 10, "cpu")
    assert isinstance(p, WarmProjector) and not p.warm
    monkeypatch.setenv("LMCKIT_STE_PROJECTION", "reference")
    assert isinstance(ste_projector(spec, sd, 10, "cpu"), WeightMatchingProjector)
    monkeypatch.setenv("LMCKIT_STE_PROJECTION", "bogus")
    with pytest.raises(LmcError):
        ste_projector(spec, sd, 10, "cpu")
    monkeypatch.setenv("LMCKIT_STE_PROJECTION", "exact")
    with pytest.raises(LmcError):
        ste_projector(spec, sd, 10, "cpu", every=0)
    with pytest.raises(LmcError):
        ste_projector(spec, sd, 10, "cpu", step_sweeps=-1)
    p = ste_projector(spec, sd, 10, "cpu", every=2, step_sweeps=1)
    assert isinstance(p, WarmProjector) and p.every == 2 and p.step_sweeps == 1


def test_project_every_k_holds_the_projection_between_projections():
    model = create_model("mlp", in_channels=1, image_size=8, width=12, depth=2)
    spec = spec_for(model)
    torch.manual_seed(0)
    sd_b = {k: v.detach().clone() for k, v in model.state_dict().items()}
    proj = WarmProjector(spec, sd_b, every=3)
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    perm = {g: torch.randperm(n) for g, n in spec.sizes.items()}
    a = apply_permutation(spec, perm, sd_b)  # exact planted copy: a real projection finds `perm`
    outs = [proj(a, ident, t) for t in range(4)]
    assert all(torch.equal(outs[0][g], perm[g]) for g in spec.sizes)  # call 1 projects
    assert all(torch.equal(outs[1][g], ident[g]) for g in spec.sizes)  # calls 2, 3 hold init
    assert all(torch.equal(outs[2][g], ident[g]) for g in spec.sizes)
    assert all(torch.equal(outs[3][g], perm[g]) for g in spec.sizes)  # call 4 projects again
    assert proj.stats["held"] == 2


def test_lap_automatic_choice_by_size(monkeypatch):
    monkeypatch.delenv("LMCKIT_LAP", raising=False)
    assert lap.choose(512) == "scipy"
    if "lapx" in lap.available():
        assert lap.choose(lap.LAPX32_MIN_UNITS) == "lapx32"
        monkeypatch.setenv("LMCKIT_LAP", "lapx")
        assert lap.choose(512) == "lapx"


@pytest.mark.parametrize("name", ["vit_tiny", "lstm_tiny"])
def test_structured_specs_use_weight_matching_itself(name):
    # The warm projector models free whole-axis groups only: for attention heads and block axes STE must
    # fall back to weight_matching (which honours them), never run the projector on such a spec.
    from lmckit.match.projection import ste_projector
    from lmckit.models import create_model
    from lmckit.perm import spec_for

    m = create_model(name)
    spec = spec_for(m)
    assert isinstance(ste_projector(spec, m.state_dict(), 10, "cpu"), WeightMatchingProjector)


def test_step_sweeps_is_weight_matching_with_that_many_sweeps_and_full_ignores_it():
    """The per-step sweep cap (an approximation) equals weight_matching(max_iter=s) from the same start,
    the projector for structured specs does the same, and ``full=True`` runs to convergence."""
    model = create_model("mlp", in_channels=1, image_size=8, width=24, depth=3)
    spec = spec_for(model)
    torch.manual_seed(0)
    sd_b = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    a = dict(create_model("mlp", in_channels=1, image_size=8, width=24, depth=3).state_dict())  # unrelated A
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    warm, ref = WarmProjector(spec, sd_b, step_sweeps=1), WeightMatchingProjector(spec, sd_b, step_sweeps=1)
    one = weight_matching(spec, a, sd_b, seed=5, max_iter=1, init_perms=ident).perms
    conv = weight_matching(spec, a, sd_b, seed=5, max_iter=100, init_perms=ident).perms
    assert any(not torch.equal(one[g], conv[g]) for g in spec.sizes)  # one sweep does not converge here
    for proj in (warm, ref):
        got = proj(a, ident, 5)
        assert all(torch.equal(got[g], one[g]) for g in spec.sizes)
        got = proj(a, ident, 5, full=True)
        assert all(torch.equal(got[g], conv[g]) for g in spec.sizes)


def test_without_numba_the_projector_solves_from_scratch_with_the_same_result(monkeypatch):
    model = create_model("mlp", in_channels=1, image_size=8, width=16, depth=2)
    spec = spec_for(model)
    sd_b = {k: v.detach().clone() for k, v in model.state_dict().items()}
    a = _perturbed(sd_b, 0.5, 7)
    init = {g: torch.arange(n) for g, n in spec.sizes.items()}
    want = WarmProjector(spec, sd_b, max_iter=100)(a, init, 0)
    monkeypatch.setattr(lap_warm, "_NUMBA", False)  # as on a platform without numba's wheels
    proj = WarmProjector(spec, sd_b, max_iter=100)
    assert not proj.warm
    got = proj(a, init, 0)
    assert all(torch.equal(got[g], want[g]) for g in spec.sizes) and proj.stats["freed"] == 0
    with pytest.raises(ValueError, match="numba"):
        lap_warm.solve_warm(np.eye(2))
