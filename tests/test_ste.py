"""Straight-through estimator permutation search (lmckit.match.ste)."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.analysis import alignment_tracker, svd_alignment
from lmckit.errors import LmcError
from lmckit.evaluate import evaluate
from lmckit.match import ste as ste_mod
from lmckit.match.ste import PRESETS, resolve_preset, ste_matching, ste_midpoint
from lmckit.models import create_model
from lmckit.perm import apply_permutation, identity_permutation, spec_for, validate_perms


def _train(name: str, ds, seed: int, epochs: int = 3, limit: int | None = None, **kw) -> dict[str, torch.Tensor]:
    """A few epochs of Adam on the synthetic data (in memory, well under a second for the tiny MLP)."""
    torch.manual_seed(seed)
    model = create_model(name, in_channels=ds.in_channels, image_size=ds.image_size, num_classes=ds.num_classes, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for x, y in ds.batches("train", 100, shuffle=True, generator=gen, limit=limit):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mlp_pair(synthetic):
    kw = dict(in_channels=1, image_size=28, num_classes=10)
    model = create_model("mlp_tiny", **kw)
    return model, _train("mlp_tiny", synthetic, 0), _train("mlp_tiny", synthetic, 1)


def _midpoint_train_loss(model, spec, sd_a, sd_b, perms, ds) -> float:
    pb = apply_permutation(spec, perms, sd_b)
    mid = {k: (v + pb[k]) / 2 if v.is_floating_point() else v for k, v in sd_a.items()}
    m = create_model(model.lmckit_config["name"], **{k: v for k, v in model.lmckit_config.items() if k != "name"})
    m.load_state_dict(mid)
    return evaluate(m, ds, "train")[0]


def test_straight_through_midpoint_value_and_gradient():
    a = {"w": torch.tensor([1.0, 2.0]), "rm": torch.tensor([4.0]), "n": torch.tensor(3)}
    pb = {"w": torch.tensor([3.0, -2.0]), "rm": torch.tensor([0.0]), "n": torch.tensor(7)}
    tilde = {"w": torch.tensor([10.0, 20.0], requires_grad=True)}
    mid = ste_midpoint(a, pb, tilde)
    assert torch.equal(mid["w"].detach(), torch.tensor([2.0, 0.0]))  # value of (a + pi(b)) / 2, not of theta~
    assert torch.equal(mid["rm"], torch.tensor([2.0])) and int(mid["n"]) == 3
    (mid["w"] * torch.tensor([4.0, -6.0])).sum().backward()
    assert torch.equal(tilde["w"].grad, torch.tensor([2.0, -3.0]))  # d mid / d theta~ = 1/2
    mid["n"] += 1  # buffers are fresh tensors: in-place BN updates never touch the inputs
    assert int(a["n"]) == 3


def test_presets_and_bad_settings():
    assert resolve_preset("adam") == PRESETS["adam"]
    assert PRESETS["adam"].optimizer == "adam" and PRESETS["adam"].lr == 1e-3 and PRESETS["adam"].batch_size == 256
    g = PRESETS["git-re-basin"]
    assert (g.optimizer, g.lr, g.momentum, g.batch_size) == ("sgd", 1e-2, 0.9, 1000)
    assert resolve_preset("adam", epochs=2, lr=0.5, batch_size=7).epochs == 2
    for bad in (dict(preset="sgd"), dict(epochs=-1), dict(lr=0.0), dict(batch_size=0)):
        with pytest.raises(LmcError):
            resolve_preset(**{"preset": "adam", **bad})


def test_ste_valid_and_never_worse_than_identity_or_wm(mlp_pair, synthetic, tmp_path):
    model, sd_a, sd_b = mlp_pair
    spec = spec_for(model)
    before = {k: v.clone() for k, v in sd_a.items()}
    calls = []

    def tracker(perms):
        calls.append({g: p.clone() for g, p in perms.items()})
        return alignment_tracker(spec, sd_a, sd_b)(perms)

    res = ste_matching(
        model,
        sd_a,
        sd_b,
        synthetic,
        epochs=2,
        batch_size=100,
        seed=0,
        progress=False,
        state_dir=tmp_path,
        alignment=tracker,
    )
    assert res.method == "ste"
    validate_perms(spec, {g: p.tolist() for g, p in res.perms.items()})
    assert all(torch.equal(before[k], sd_a[k]) for k in sd_a)  # caller's state untouched
    cands = {c["name"]: c["heldout_loss"] for c in res.extra["candidates"]}
    assert list(cands)[:2] == ["identity", "wm"] and len(cands) == 4
    best = res.extra["best_heldout_loss"]
    assert best <= cands["identity"] and best <= cands["wm"] and best == min(cands.values())
    assert res.objective[-1] == best and all(x >= y for x, y in zip(res.objective, res.objective[1:]))
    # The held-out set is the whole train split here (synthetic has no val, 2000 < heldout_size): recompute
    # the returned permutation's midpoint loss independently with lmckit.evaluate.
    assert res.extra["heldout"].startswith("fixed seeded subset of the train split (2000")
    assert _midpoint_train_loss(model, spec, sd_a, sd_b, res.perms, synthetic) == pytest.approx(best, rel=1e-5)
    ident = _midpoint_train_loss(model, spec, sd_a, sd_b, identity_permutation(spec), synthetic)
    assert ident == pytest.approx(cands["identity"], rel=1e-5)
    # drift record: epoch 0 (start, pi = WM) plus one per epoch, written as JSON and a plot
    d = res.extra["drift"]
    assert d["epoch"] == [0, 1, 2] and d["changed_vs_wm"][0] == 0.0 and d["tilde_dist"][0] == 0.0
    assert d["tilde_dist"][2] > 0.0 and all(0.0 <= c <= 1.0 for c in d["changed_vs_wm"])
    assert all(r is not None and -1.0 <= r <= 1.0 for r in d["r03"])
    # R(0.3) comes from the caller's alignment function, once per drift epoch, for the permutation then
    assert len(calls) == 3 and torch.equal(calls[0][next(iter(calls[0]))], res.extra["wm_perms"][next(iter(calls[0]))])
    want = svd_alignment(spec, sd_a, sd_b, calls[-1], gammas=(0.3,)).R["0.3"]["after"]
    assert d["r03"][-1] == pytest.approx(want, abs=1e-12)
    assert json.loads((tmp_path / "drift.json").read_text())["epoch"] == [0, 1, 2]
    assert not (tmp_path / "drift.png").exists()  # the library writes the record; the CLI draws it
    # without an alignment function R(0.3) is not tracked
    plain = ste_matching(model, sd_a, sd_b, synthetic, epochs=1, batch_size=100, seed=0, progress=False)
    assert plain.extra["drift"]["r03"] == [None, None]


def test_ste_deterministic_for_a_seed(mlp_pair, synthetic):
    model, sd_a, sd_b = mlp_pair
    kw = dict(epochs=1, batch_size=200, progress=False, track_alignment=False, train_limit=1000)
    r1 = ste_matching(model, sd_a, sd_b, synthetic, seed=3, **kw)
    r2 = ste_matching(model, sd_a, sd_b, synthetic, seed=3, **kw)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)
    assert r1.objective == r2.objective and r1.extra["drift"] == r2.extra["drift"]


def test_ste_resume_after_kill_equals_uninterrupted(mlp_pair, synthetic, tmp_path, monkeypatch):
    model, sd_a, sd_b = mlp_pair
    kw = dict(epochs=3, batch_size=250, lr=1e-2, seed=1, progress=False, track_alignment=False, train_limit=1000)
    full = ste_matching(model, sd_a, sd_b, synthetic, **kw)

    real = ste_mod._project
    calls = {"n": 0}
    steps = 4  # 1000 / 250 training steps per epoch, plus one projection at each epoch's end

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + (steps + 1) + 3:  # initial WM, epoch 1, then 3 steps into epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ste_mod, "_project", dying)
    with pytest.raises(KeyboardInterrupt):
        ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **kw)
    monkeypatch.setattr(ste_mod, "_project", real)
    assert (tmp_path / ste_mod.STATE_FILE).exists()
    resumed = ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **kw)
    assert resumed.extra["resumed"] is True
    assert all(torch.equal(full.perms[g], resumed.perms[g]) for g in full.perms)
    assert resumed.objective == full.objective
    assert resumed.extra["drift"] == full.extra["drift"]
    # a finished state is returned as is; a different run in the same folder is refused
    again = ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **kw)
    assert again.objective == full.objective
    with pytest.raises(LmcError, match="another run"):
        ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **{**kw, "seed": 2})
    with pytest.raises(LmcError, match="already holds 3 epochs"):
        ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **{**kw, "epochs": 2})
    with pytest.raises(LmcError, match="another run"):  # the approximations change the run: not resumable
        ste_matching(model, sd_a, sd_b, synthetic, state_dir=tmp_path, **{**kw, "project_every": 2})


def test_projection_approximations_are_options_that_change_the_run(mlp_pair, synthetic):
    """project_sweeps / project_every: validated registry options; with them off the run is the exact one."""
    from lmckit.match.registry import get_method
    from lmckit.perm import validate_perms

    model, sd_a, sd_b = mlp_pair
    spec = spec_for(model)
    m = get_method("ste")
    for bad in ({"project_sweeps": -1}, {"project_every": 0}, {"project_every": 10**9}):
        with pytest.raises(LmcError):
            m.options(bad)
    kw = dict(epochs=2, batch_size=100, lr=1e-2, seed=0, progress=False, track_alignment=False, train_limit=1000)
    exact = ste_matching(model, sd_a, sd_b, synthetic, **kw)
    off = ste_matching(model, sd_a, sd_b, synthetic, project_sweeps=0, project_every=1, **kw)
    assert off.objective == exact.objective and all(torch.equal(off.perms[g], exact.perms[g]) for g in off.perms)
    import unittest.mock as um

    made = []
    real = ste_mod.ste_projector

    def spy(*a, **k):
        made.append(k)
        return real(*a, **k)

    with um.patch.object(ste_mod, "ste_projector", spy):
        approx = m.match(
            spec, sd_a, sd_b, model=model, dataset=synthetic, seed=0,
            options={"epochs": 2, "batch_size": 100, "lr": 1e-2, "track_alignment": False, "train_limit": 1000,
                     "project_sweeps": 1, "project_every": 2},
        )  # fmt: skip
    assert made == [{"every": 2, "step_sweeps": 1}]  # the registry options reach the per-step projector
    validate_perms(spec, {g: p.tolist() for g, p in approx.perms.items()})
    assert approx.extra["settings"]["epochs"] == 2 and len(approx.objective) == len(exact.objective)


def test_ste_vgg_tiny_batchnorm(synthetic):
    kw = dict(in_channels=1, image_size=28, num_classes=10, norm="batchnorm")
    model = create_model("vgg_tiny", **kw)
    sd_a = _train("vgg_tiny", synthetic, 0, epochs=1, limit=500, norm="batchnorm")
    sd_b = _train("vgg_tiny", synthetic, 1, epochs=1, limit=500, norm="batchnorm")
    before = {k: v.clone() for k, v in sd_b.items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(model)
    res = ste_matching(
        model,
        sd_a,
        sd_b,
        synthetic,
        epochs=1,
        batch_size=250,
        seed=0,
        progress=False,
        heldout_size=500,
        track_alignment=False,
        train_limit=500,
    )
    validate_perms(spec, {g: p.tolist() for g, p in res.perms.items()})
    assert all(torch.equal(before[k], sd_b[k]) for k in sd_b)
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    cands = [c["heldout_loss"] for c in res.extra["candidates"]]
    assert len(cands) == 3 and all(torch.isfinite(torch.tensor(cands)))
    assert res.objective[-1] == min(cands)
