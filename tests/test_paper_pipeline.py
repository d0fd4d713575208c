"""The paper recipe's machinery end to end on synthetic data (issue 30): two model entries (the authors'
best-test epoch, the held-out best-val epoch), STE per protocol, the many-models study with the joint
methods (STE-MM, C2M3) and pairwise WM, and the report's ``paper`` section. Every number must be finite,
every method that maps all models to one order must have cycle error 0 (measured, not assumed), and the
section's claims must be those the criteria name."""

from __future__ import annotations

import json
import math

import pytest

from lmckit.reproduce import reproduce

RECIPE = """
name = "paper-tiny"
[data]
dataset = "synthetic"
[[models]]
name = "mlp_tiny"
overrides = { preprocess = "scale01", keep_epoch = "best-test", epochs = 3 }
[[models]]
name = "mlp_tiny"
label = "held-out"
overrides = { preprocess = "scale01", keep_epoch = "best-val", val_size = 500, epochs = 3 }
seeds = [0, 1, 2, 3, 4, 5]
[train]
preset = "tiny"
seeds = [0, 1, 2, 3, 4, 5]
[match]
methods = ["naive", "weight", "activation", "ste"]
searches = 1
max_iter = 20
am_samples = 500
[match.options]
ste-mm = { epochs = 1, train_limit = 400, batch_size = 200 }
c2m3 = { max_iter = 20 }
[match.ste]
epochs = 1
lr = 1e-2
batch_size = 200
max_iter = 10
[barrier]
lambdas = 5
splits = ["train", "test"]
limit = 500
[analysis]
taylor_samples = 200
projection_samples = 500
rank_fractions = [0.25, 0.5, 1.0]
eval_limit = 500
[three_models]
enabled = true
landscape = false
[studies.many_models]
enabled = true
counts = [2, 3, 4]
methods = ["weight", "ste", "merge_many"]
ste_protocols = ["ste-mm-random"]
joint = ["ste-mm", "c2m3", "pairwise"]
[studies.ste_protocols]
enabled = true
protocols = ["ste-mm-random", "heldout-best"]
epochs = [1, 1]
train_limit = 400
pairs = 3
[paper]
enabled = true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    (root / "paper-tiny.toml").write_text(RECIPE)
    res = reproduce(str(root / "paper-tiny.toml"), out=root / "report", cache=root / "cache")
    return root, res.results


def _finite(obj, where="results"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def test_paper_section_judges_every_claim_per_setting(run):
    root, res = run
    p = res["paper"]
    _finite(p)
    ids = {(c["claim"], c["setting"].split(",")[0]) for c in p["claims"]}
    for cid in ("1", "2", "3", "4", "5a", "5b"):
        assert (cid, "mlp_tiny") in ids and (cid, "held-out") in ids, cid
    settings = [c["setting"] for c in p["claims"] if c["claim"] == "5b"]
    assert any("ste-mm-random (1 epoch(s))" in s for s in settings)
    six = [c["setting"] for c in p["claims"] if c["claim"] == "6"]
    assert any("ste heldout-best" in s for s in six) and any("ste ste-mm-random" in s for s in six)
    assert any("ste-mm" in s and "ste ste-mm" not in s for s in six)  # the joint STE-MM beside the pairwise
    for c in p["claims"]:
        for cond in c["conditions"]:
            m = cond["margin"]
            assert cond["held"] == ((m["mean"] <= 0) if cond["side"] == "<= 0" else (m["mean"] > 0)) or m["n"] == 1
    # the held-out entry's models were selected on val, the authors' on test
    recs = res["recipe"]["models"]
    assert recs[0]["overrides"]["keep_epoch"] == "best-test" and recs[1]["overrides"]["keep_epoch"] == "best-val"
    md = (root / "report" / "report.md").read_text()
    assert "## The paper's claims under the authors' protocol and lmckit's" in md and "| 17.9% |" in md
    assert json.loads((root / "report" / "results.json").read_text())["paper"] == p


def test_many_models_joint_methods_and_cycle_error(run):
    _, res = run
    t = res["paper"]["many_models"]
    assert {"weight", "ste", "ste[ste-mm-random]", "merge_many", "ste-mm", "c2m3", "pairwise"} <= set(t)
    assert [r["n"] for r in t["c2m3"]] == [3, 4]  # C2M3 needs N >= 3
    assert [r["n"] for r in t["ste-mm"]] == [2, 3, 4]
    for name in ("ste-mm", "c2m3"):  # one common order: every cycle closes (measured from the permutations)
        assert all(r["cycle_error"] == 0.0 for r in t[name] if r["n"] >= 3), name
    pw = [r["cycle_error"] for r in t["pairwise"] if r["n"] >= 3]
    assert pw and all(0.0 <= e <= 1.0 for e in pw)
    for name, rows in t.items():
        for r in rows:
            assert 0.0 <= r["merged_accuracy"] <= 1.0 and r["mean_pair_barrier"] >= 0.0, name
