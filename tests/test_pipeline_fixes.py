"""Regression tests for pipeline/report/merge fixes: reserved overrides, report-file confinement, drift helpers."""

from __future__ import annotations

import pytest

from lmckit.errors import LmcError


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.overrides={model_kwargs={width_mult=2.0}}", "width_mult"),
        ('models.0.overrides={model_kwargs={norm="batchnorm"}}', "norm"),
        ('models.0.options={norm="layernorm"}', "norm"),
        ('train.overrides={model="vgg11"}', "model"),
    ],
)
def test_overrides_may_not_contradict_the_recipe(override, key):
    from lmckit.pipeline.recipe import load_recipe

    with pytest.raises(LmcError, match=key):
        load_recipe("tiny", [override])


def test_allowed_overrides_still_reach_the_train_config():
    from lmckit.pipeline.build import build_plan
    from lmckit.pipeline.recipe import load_recipe

    plan = build_plan(load_recipe("tiny", ["train.overrides={epochs=3, model_kwargs={width=8}}"]))
    cfgs = {s: t.train_config() for s, t in plan.experiments[0].trains.items()}
    assert {s: c.seed for s, c in cfgs.items()} == {0: 0, 1: 1, 2: 2}
    assert {c.epochs for c in cfgs.values()} == {3}
    assert all(dict(c.model_kwargs)["width"] == 8 for c in cfgs.values())


@pytest.mark.parametrize("name", ["quick", "my-run_2.v1"])
def test_safe_names_are_accepted(name):
    from lmckit.pipeline.recipe import load_recipe

    assert load_recipe("tiny", [f'name="{name}"']).name == name


@pytest.mark.parametrize("name", ["", ".", "a b", "x\\\\y", "a" * 101])
def test_unsafe_names_are_refused(name):
    from lmckit.pipeline.recipe import load_recipe

    with pytest.raises(LmcError, match="name"):
        load_recipe("tiny", [f'name="{name}"'])


def test_changed_fraction_by_hand():
    from lmckit.report.results import changed_fraction

    a = {"g1": [0, 1, 2, 3], "g2": [1, 0]}
    b = {"g1": [0, 1, 3, 2], "g2": [1, 0]}
    assert changed_fraction(a, b) == pytest.approx(2 / 6)
    assert changed_fraction(a, a) == 0.0
    with pytest.raises(ValueError):
        changed_fraction(a, {"g1": [0, 1, 2, 3]})


def test_drift_sentence_compares_with_the_baseline():
    from lmckit.report.writer import _drift_sentence

    def st(v):
        return {"mean": v, "std": 0.0, "n": 1, "values": [v]}

    d = {
        "runs": [{}],
        "summary": {
            "epochs": 2,
            "changed_vs_wm_end": st(0.25),
            "r03_start": st(0.5),
            "r03_end": st(0.4),
            "tilde_rel_dist_end": st(0.1),
        },
    }
    assert "25.0% of units" in _drift_sentence(d) and "no WM seed-to-seed baseline" in _drift_sentence(d)
    d["wm_vs_wm"] = {"mean": 0.05, "std": 0.01, "n": 3, "values": [0.04, 0.05, 0.06]}
    s = _drift_sentence(d)
    assert "against 5.0%" in s and "more than" in s
    d["wm_vs_wm"] = {"mean": 0.6, "std": 0.01, "n": 3, "values": [0.59, 0.6, 0.61]}
    assert "less than" in _drift_sentence(d)
