"""STE protocols (lmckit.match.ste ``protocol``): git-re-basin's minibatch keep-best, random mixing, held-out best."""

from __future__ import annotations

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.match.ste import PROTOCOLS, check_protocol, ste_matching, ste_midpoint, ste_mm_point, ste_mm_weights
from lmckit.perm import (
    apply_permutation,
    invert_permutation,
    perm_changed_units,
    random_permutation,
    spec_for,
    validate_perms,
)
from tests.test_ste import _train


@pytest.fixture(scope="module")
def pair(synthetic):
    from lmckit.models import create_model

    model = create_model("mlp_tiny", in_channels=1, image_size=28, num_classes=10)
    return model, _train("mlp_tiny", synthetic, 0), _train("mlp_tiny", synthetic, 1)


def test_random_mixing_point_value_and_gradient():
    a = {"w": torch.tensor([1.0, 2.0])}
    pb = {"w": torch.tensor([3.0, -2.0])}
    tilde = {"w": torch.tensor([10.0, 20.0], requires_grad=True)}
    mid = ste_midpoint(a, pb, tilde, lam=0.25)
    assert torch.allclose(mid["w"].detach(), torch.tensor([1.5, 1.0]))  # 0.75 a + 0.25 pi(b)
    mid["w"].sum().backward()
    assert torch.allclose(tilde["w"].grad, torch.tensor([0.25, 0.25]))  # d point / d theta~ = lambda


def test_protocol_names_and_defaults():
    assert set(PROTOCOLS) == {"heldout-best", "git-re-basin", "random-mixing", "ste-mm-random", "ste-mm-midpoint"}
    assert PROTOCOLS["git-re-basin"] == "git-re-basin" and PROTOCOLS["random-mixing"] == "adam"
    # Ito et al.'s configs/rebasin/method/ste.yaml: Adam, lr 1e-3, 10 epochs, batch 256
    from lmckit.match.ste import PRESETS

    for p in ("ste-mm-random", "ste-mm-midpoint"):
        pre = PRESETS[PROTOCOLS[p]]
        assert (pre.optimizer, pre.lr, pre.epochs, pre.batch_size) == ("adam", 1e-3, 10, 256)
    with pytest.raises(LmcError, match="did you mean 'git-re-basin'"):
        check_protocol("git-rebasin")


def test_ste_mm_point_value_and_gradient():
    # l_0 a + l_1 [pb1 + t1 - sg(t1)] + l_2 [pb2 + t2 - sg(t2)], computed by hand
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    pbs = [
        {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(7)},
        {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(9)},
    ]
    tildes = [
        {"w": torch.tensor([10.0, 20.0], requires_grad=True)},
        {"w": torch.tensor([5.0, 5.0], requires_grad=True)},
    ]
    pt = ste_mm_point(a, pbs, tildes, [0.5, 0.25, 0.25])
    assert torch.allclose(pt["w"].detach(), torch.tensor([0.5 + 0.75 + 0.0, 1.0 - 0.5 + 1.0]))
    assert pt["n"].item() == 3  # integer entries are the anchor's
    pt["w"].sum().backward()
    assert torch.allclose(tildes[0]["w"].grad, torch.tensor([0.25, 0.25]))
    assert torch.allclose(tildes[1]["w"].grad, torch.tensor([0.25, 0.25]))
    # two models, weights (1 - l, l): the midpoint of the other protocols
    two = ste_mm_point(a, pbs[:1], tildes[:1], [0.75, 0.25])
    assert torch.allclose(two["w"], ste_midpoint(a, pbs[0], tildes[0], lam=0.25)["w"])
    with pytest.raises(LmcError, match="weights"):
        ste_mm_point(a, pbs, tildes, [0.5, 0.5])


def test_ste_mm_weights_are_theirs():
    assert ste_mm_weights(4, True, 0) == [0.25] * 4
    w = ste_mm_weights(3, False, 5)
    assert len(w) == 3 and min(w) >= 0 and abs(sum(w) - 1) < 1e-12
    assert w == ste_mm_weights(3, False, 5) and w != ste_mm_weights(3, False, 6)  # seeded
    # rand(2) normalised: P(1/4 <= l_1 <= 3/4) = 2/3 (uniform on [0, 1] would give 1/2)
    lams = [ste_mm_weights(2, False, s)[1] for s in range(4000)]
    frac = sum(0.25 <= v <= 0.75 for v in lams) / len(lams)
    assert 0.63 < frac < 0.70


@pytest.mark.parametrize("protocol", ["ste-mm-random", "ste-mm-midpoint"])
def test_ste_mm_protocols_recover_a_planted_pair(pair, synthetic, protocol):
    # B is A with its hidden units permuted: the protocol returns exactly the inverse permutation
    model, sd_a, _ = pair
    spec = spec_for(model)
    planted = random_permutation(spec, seed=3)
    sd_b = apply_permutation(spec, planted, sd_a)
    res = ste_matching(
        model,
        sd_a,
        sd_b,
        synthetic,
        protocol=protocol,
        epochs=2,
        batch_size=100,
        seed=0,
        progress=False,
        train_limit=500,
        wm_max_iter=20,
    )
    want = invert_permutation(planted)
    assert all(torch.equal(res.perms[g], want[g]) for g in spec.sizes)
    aligned = apply_permutation(spec, res.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    assert res.extra["protocol"] == protocol and res.extra["candidates"] == []
    assert (res.extra["settings"]["optimizer"], res.extra["settings"]["lr"]) == ("adam", 1e-3)


@pytest.mark.parametrize("protocol", ["git-re-basin", "random-mixing", "ste-mm-random", "ste-mm-midpoint"])
def test_protocols_run_and_keep_what_they_say(pair, synthetic, tmp_path, protocol):
    model, sd_a, sd_b = pair
    spec = spec_for(model)
    kw = dict(epochs=2, batch_size=200, seed=0, progress=False, train_limit=600, wm_max_iter=10)
    res = ste_matching(model, sd_a, sd_b, synthetic, protocol=protocol, state_dir=tmp_path / "s", **kw)
    validate_perms(spec, {g: p.tolist() for g, p in res.perms.items()})
    assert res.extra["protocol"] == protocol
    assert res.extra["candidates"] == []  # neither protocol scores identity / plain WM as candidates
    settings = res.extra["settings"]
    if protocol == "git-re-basin":
        assert (settings["optimizer"], settings["lr"], settings["momentum"]) == ("sgd", 1e-2, 0.9)
        # the kept loss is the lowest minibatch loss seen: non-increasing per epoch
        assert all(x >= y for x, y in zip(res.objective, res.objective[1:])) and len(res.objective) == 2
        assert res.extra["kept_minibatch_loss"] == res.objective[-1]
    elif protocol.startswith("ste-mm"):
        assert (settings["optimizer"], settings["lr"]) == ("adam", 1e-3)
        # the last step's projection, with no selection: its held-out loss is the objective's last value
        assert res.objective[-1] == res.extra["best_heldout_loss"] and len(res.objective) == 2
    else:
        assert (settings["optimizer"], settings["lr"]) == ("adam", 1e-3)
        # the final permutation: its held-out loss is the last epoch's
        assert res.objective[-1] == res.extra["drift"]["heldout_loss"][-1]
        assert res.extra["changed_vs_wm"] == res.extra["drift"]["changed_vs_wm"][-1]
    again = ste_matching(model, sd_a, sd_b, synthetic, protocol=protocol, **kw)  # deterministic, no state folder
    assert all(torch.equal(again.perms[g], res.perms[g]) for g in res.perms)
    assert again.objective == res.objective
    # resuming from the finished state (more epochs) equals a longer uninterrupted run
    longer = ste_matching(model, sd_a, sd_b, synthetic, protocol=protocol, **{**kw, "epochs": 3})
    resumed = ste_matching(
        model, sd_a, sd_b, synthetic, protocol=protocol, state_dir=tmp_path / "s", **{**kw, "epochs": 3}
    )
    assert resumed.objective == longer.objective
    assert perm_changed_units(resumed.perms, longer.perms) == 0.0


def test_state_of_another_protocol_is_refused(pair, synthetic, tmp_path):
    model, sd_a, sd_b = pair
    kw = dict(epochs=1, batch_size=200, seed=0, progress=False, train_limit=400, wm_max_iter=5, state_dir=tmp_path)
    ste_matching(model, sd_a, sd_b, synthetic, protocol="random-mixing", **kw)
    with pytest.raises(LmcError, match="protocol"):
        ste_matching(model, sd_a, sd_b, synthetic, protocol="git-re-basin", **kw)
