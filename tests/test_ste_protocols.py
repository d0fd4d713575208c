"""STE protocols (lmckit.match.ste ``protocol``): git-re-basin's minibatch keep-best, random mixing, held-out best."""

from __future__ import annotations

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.match.ste import PROTOCOLS, check_protocol, ste_matching, ste_midpoint
from lmckit.perm import perm_changed_units, spec_for, validate_perms
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
    assert set(PROTOCOLS) == {"heldout-best", "git-re-basin", "random-mixing"}
    assert PROTOCOLS["git-re-basin"] == "git-re-basin" and PROTOCOLS["random-mixing"] == "adam"
    with pytest.raises(LmcError, match="did you mean 'git-re-basin'"):
        check_protocol("git-rebasin")


@pytest.mark.parametrize("protocol", ["git-re-basin", "random-mixing"])
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
