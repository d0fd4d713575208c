"""The issue-11 zoo models (vit, lstm) through every matcher and measurement, on the synthetic data set."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmckit.analysis import alignment_tracker
from lmckit.match import anchor_matching, merge_many, weight_matching
from lmckit.match.activation import activation_matching
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, spec_for, validate_perms


def _train(name, ds, seed, steps=6):
    torch.manual_seed(seed)
    m = create_model(name, in_channels=ds.in_channels, image_size=ds.image_size, num_classes=ds.num_classes)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for i, (x, y) in enumerate(ds.batches("train", 100, shuffle=True, generator=gen)):
        if i >= steps:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m


@pytest.mark.parametrize("name", ["vit_tiny", "lstm_tiny"])
def test_zoo_arch_through_every_matcher(name, synthetic):
    a, b = _train(name, synthetic, 0), _train(name, synthetic, 1)
    spec = spec_for(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    # AM recovers a planted permutation of A exactly (sites derived from the spec: Q/K/V, LSTM states)
    planted = random_permutation(spec, 2)
    bp = create_model(name, in_channels=1, image_size=28, num_classes=10)
    bp.load_state_dict(apply_permutation(spec, planted, sd_a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning for these models
        res = activation_matching(a, bp, synthetic, spec=spec, num_batches=4, batch_size=100)
    inv = invert_permutation(planted)
    assert all(torch.equal(res.perms[g], inv[g]) for g in spec.sizes)
    # WM between two trained models: head-structured, objective non-decreasing, distance reduced
    wm = weight_matching(spec, sd_a, sd_b, seed=0)
    validate_perms(spec, wm.perms)
    assert wm.final_objective >= wm.initial_objective
    # anchor and MergeMany on three models keep head structure
    c = _train(name, synthetic, 2).state_dict()
    for multi in (anchor_matching(spec, [sd_a, sd_b, c]), merge_many(spec, [sd_a, sd_b, c], max_iter=3)):
        for p in multi.perms:
            validate_perms(spec, p)


def test_ste_runs_on_head_structured_specs(synthetic):
    from lmckit.match.ste import ste_matching

    a, b = _train("vit_tiny", synthetic, 0), _train("vit_tiny", synthetic, 1)
    spec = spec_for(a)
    res = ste_matching(
        a,
        a.state_dict(),
        b.state_dict(),
        synthetic,
        spec=spec,
        epochs=1,
        batch_size=200,
        progress=False,
        heldout_size=200,
        train_limit=400,
        alignment=alignment_tracker(spec, a.state_dict(), b.state_dict()),
    )
    validate_perms(spec, res.perms)
    assert all(r is not None for r in res.extra["drift"]["r03"])


def test_barrier_curve_on_lstm(synthetic):
    from lmckit.lmc import barrier_curve

    a, b = _train("lstm_tiny", synthetic, 0), _train("lstm_tiny", synthetic, 1)
    spec = spec_for(a)
    wm = weight_matching(spec, a.state_dict(), b.state_dict())
    cur = barrier_curve(
        a,
        a.state_dict(),
        apply_permutation(spec, wm.perms, b.state_dict()),
        synthetic,
        points=5,
        limit=200,
        progress=False,
    )
    assert cur["test"].loss_barrier >= 0.0
    # lambda = 1 is the permuted B: same loss as B itself (permutation preserves the function)
    cur_b = barrier_curve(a, b.state_dict(), b.state_dict(), synthetic, points=3, limit=200, progress=False)
    assert cur["test"].endpoint_loss[1] == pytest.approx(cur_b["test"].endpoint_loss[1], rel=1e-5)


@pytest.mark.parametrize("name", ["vit_tiny", "lstm_tiny"])
def test_tiny_variants_take_width_mult_so_recipes_can_name_them(name):
    """vit_tiny / lstm_tiny scale with width_mult like their full-size models (recipes pass it always)."""
    one, two = create_model(name), create_model(name, width_mult=2.0)
    sizes1, sizes2 = spec_for(one).sizes, spec_for(two).sizes
    assert sizes1.keys() == sizes2.keys()
    assert all(sizes2[g] >= 2 * sizes1[g] or sizes1[g] == sizes2[g] for g in sizes1)
    assert sum(sizes2.values()) > sum(sizes1.values())
    assert {k: v.shape for k, v in create_model(name, width_mult=1.0).state_dict().items()} == {
        k: v.shape for k, v in one.state_dict().items()
    }
