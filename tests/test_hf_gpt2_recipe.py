"""Issue 26: the ``gpt2-text`` recipe end to end on a far smaller preset (the hf tier; skipped without transformers).

The shipped recipe with ``--set`` overrides only: the in-memory ``text-synthetic`` token dataset, a GPT-2 of
width 8 (1 block, 2 heads), one epoch, toy evaluation sizes, three seeds (one pair and the three-model
experiment), so every stage the real recipe plans runs: training, naive / WM / AM / STE, barriers in nats
per token, every analysis, three models and the width sweep.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers", reason="the hf tier needs `pip install 'lmckit[hf]'` (transformers)")

from lmckit.pipeline.recipe import load_recipe  # noqa: E402
from lmckit.report.architectures import layer_kind  # noqa: E402
from lmckit.reproduce import reproduce  # noqa: E402

TINY = [
    "data.dataset=text-synthetic",
    "train.seeds=[0, 1, 2]",
    "train.overrides.epochs=1",
    "models.0.options={width = 8, depth = 1, heads = 2}",
    "match.searches=2",
    "match.max_iter=10",
    "match.am_samples=64",
    "match.ste.epochs=1",
    "match.ste.train_limit=64",
    "barrier.lambdas=3",
    "barrier.limit=64",
    "analysis.taylor_samples=32",
    "analysis.projection_samples=32",
    "analysis.eval_limit=64",
    "three_models.grid=3",
    "width_sweep.widths=[1.0, 2.0]",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-text")
    res = reproduce("gpt2-text", out=root / "report", cache=root / "cache", sets=TINY)
    return root, res, json.loads((root / "report" / "results.json").read_text())


def test_shipped_recipe_plans_every_part_of_the_issue():
    r = load_recipe("gpt2-text")
    assert r.models[0].name == "hf-gpt2" and r.data.dataset == "kjv-mini" and len(r.train.seeds) >= 4
    assert set(r.match.methods) == {"naive", "weight", "activation", "ste"}
    assert r.analysis.enabled and r.three_models.enabled and r.width_sweep.enabled
    assert r.barrier.splits == ("train", "test")


def test_recipe_end_to_end_in_lm_units(run):
    root, _out, res = run
    assert res["units"]["loss"].startswith("nats per token")
    e = res["experiments"][0]
    m = e["methods"]
    assert set(m) == {"naive", "weight", "activation", "ste"}
    for d in m.values():
        for sp in ("train", "test"):
            b, p = d["barrier"][sp], d["perplexity"][sp]
            assert b["loss_barrier"]["mean"] >= -1e-6
            assert p["barrier_factor"]["values"] == pytest.approx([math.exp(v) for v in b["loss_barrier"]["values"]])
            curve = d["curves"][sp]["loss_mean"]
            assert p["endpoints"] == pytest.approx([math.exp(curve[0]), math.exp(curve[-1])])
            # a permutation does not change the function: every method's path ends at the same two models
            assert curve[0] == pytest.approx(m["naive"]["curves"][sp]["loss_mean"][0], rel=1e-5)
            assert curve[-1] == pytest.approx(m["naive"]["curves"][sp]["loss_mean"][-1], rel=1e-4)
    assert m["naive"]["distance"]["reduction"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert m["weight"]["distance"]["reduction"]["mean"] > 0
    for mod in e["models"]:
        assert mod["test_perplexity"] == pytest.approx(math.exp(mod["test_loss"]))
        assert 0.0 <= mod["test_accuracy"] <= 1.0  # next-token accuracy: a fraction of tokens
    # R per layer kind: the attention matrices of GPT-2 and its MLP
    kinds = [k["kind"] for k in res["architectures"][0]["R_by_kind"]]
    assert {"W_Q", "W_K", "W_V", "W_O", "MLP in", "MLP out"} <= set(kinds)
    assert {layer_kind(n) for n in e["R_per_layer"]} >= {"W_Q", "W_K", "W_V", "W_O"}
    assert [w["width_mult"] for w in res["width_sweep"]] == [1.0, 2.0]
    assert {"weight", "ste"} <= set(res["three_models"])
    md = (root / "report" / "report.md").read_text()
    assert "## Language model: nats per token and perplexity" in md and "perplexity barrier factor" in md
    assert "## Layer kinds and model size" in md and "| W_Q |" in md
    assert "windows of 32 tokens" in md
