"""End to end: the tiny recipe through every stage, the report, caching, --set, determinism, locks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmckit.cli import main
from lmckit.errors import LmcError
from lmckit.pipeline.executor import plan as order
from lmckit.pipeline.stages import dependencies, stage_hash, stage_path
from lmckit.pipeline.tasks import MatchStage
from lmckit.reproduce import reproduce
from lmckit.store import file_lock

FIGURES = [
    "interpolation.png",
    "R_bars.png",
    "spectra.png",
    "per_index.png",
    "projections.png",
    "rank.png",
    "three_models.png",
    "landscape.png",
    "ste_drift.png",
    "width_sweep.png",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    res = reproduce("tiny", out=root / "report", cache=root / "cache")
    return root, res


def _leaves(obj, where="results"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{where}[{i}]")
    else:
        yield where, obj


def _stage_mtimes(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.glob("*/*/result.json")}


def test_every_figure_and_result_exists_and_is_finite(tiny):
    root, res = tiny
    out = root / "report"
    assert not res.summary.failed and len(res.summary.ran) == len(order(res.plan.targets()))
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, name
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name in FIGURES:
        assert f"]({name})" in md and f'src="{name}"' in html
    r = json.loads((out / "results.json").read_text())
    for where, v in _leaves(r):
        assert v is not None, where
        if isinstance(v, float):
            assert math.isfinite(v), where
    e = r["experiments"][0]
    assert set(e["methods"]) == {"naive", "weight", "activation", "ste"}
    for m in ("naive", "weight", "activation", "ste"):
        for split in ("train", "test"):
            for q in ("loss_barrier", "accuracy_barrier", "midpoint_loss", "midpoint_accuracy"):
                assert e["methods"][m]["barrier"][split][q]["n"] == 1  # one pair of seeds in tiny
    for m in ("weight", "activation", "ste"):
        assert set(e["methods"][m]["R"]) == {"0", "0.3"}
        assert set(e["methods"][m]["distance"]) == {"l2_before", "l2_after", "reduction"}
        assert "taylor" in e["methods"][m]
    assert e["methods"]["weight"]["R"]["0.3"]["after"]["n"] == 2  # two WM searches
    assert {"spectra", "projections", "rank_sweep", "R_per_layer"} <= set(e)
    assert set(r["three_models"]) == {"weight", "ste", "merge_many"}
    for d in r["three_models"].values():
        assert [x["n"] for x in d["merged"]] == [1, 2, 3] and "landscape" in d
    assert sorted(x["width_mult"] for x in r["width_sweep"]) == [0.5, 1.0]
    assert {c["id"] for c in r["claims"]} == {"1", "2", "3", "4", "5a", "5b", "6", "width"}
    for c in r["claims"]:
        assert isinstance(c["held"], bool) and c["text"] in md
    assert not [w for w, _ in _leaves(r) if "seconds" in w or "timing" in w]  # timings live in timings.json only
    assert json.loads((out / "timings.json").read_text())["stage_seconds_total"] > 0


def test_results_are_the_stage_outputs_and_claims_follow_the_numbers(tiny):
    root, res = tiny
    r = res.results
    e = r["experiments"][0]
    # the aggregate is the stage output (one pair): read the barrier stage folder directly
    ((key, naive_bar),) = [(k, b) for k, b in res.plan.experiments[0].barriers.items() if k[1] == "naive"]
    raw = json.loads((stage_path(root / "cache", naive_bar) / "result.json").read_text())
    assert e["methods"]["naive"]["barrier"]["test"]["loss_barrier"]["mean"] == raw["loss_barrier"]["test"]
    # mean and sample std over the two WM searches
    wm = [
        json.loads((stage_path(root / "cache", a) / "result.json").read_text())["R"]["0.3"]["after"]
        for k, a in res.plan.experiments[0].analyses.items()
        if k[1] == "weight"
    ]
    s = e["methods"]["weight"]["R"]["0.3"]["after"]
    assert s["mean"] == pytest.approx(sum(wm) / 2) and s["std"] == pytest.approx(abs(wm[0] - wm[1]) / math.sqrt(2))
    claims = {c["id"]: c for c in r["claims"]}
    nb = e["methods"]["naive"]["barrier"]["test"]["loss_barrier"]["mean"]
    wb = e["methods"]["weight"]["barrier"]["test"]["loss_barrier"]["mean"]
    red = e["methods"]["weight"]["distance"]["reduction"]["mean"]
    assert claims["1"]["held"] == (wb <= 0.2 * nb and red <= 0.3)
    assert claims["6"]["held"] == (
        r["three_models"]["weight"]["pair_loss_barrier"] < r["three_models"]["ste"]["pair_loss_barrier"]
    )
    # the anchor's own accuracy in the merge curve is model seed 0's test accuracy on the same images
    assert r["three_models"]["weight"]["merged"][0]["accuracy"] == pytest.approx(e["models"][0]["test_accuracy"])


def test_rerun_is_a_noop(tiny, capsys):
    root, res = tiny
    before = _stage_mtimes(root / "cache")
    results = (root / "report" / "results.json").read_bytes()
    n = len(order(res.plan.targets()))
    rc = main(["reproduce", "--recipe", "tiny", "--cache", str(root / "cache"), "--out", str(root / "report")])
    out = capsys.readouterr().out
    assert rc == 0 and f"0 stages run, {n} reused" in out
    assert "test loss barrier" in out and "WM" in out and "claim 1" in out  # the summary table and claims
    assert _stage_mtimes(root / "cache") == before
    assert (root / "report" / "results.json").read_bytes() == results


def test_set_reruns_only_the_stages_downstream_of_the_change(tiny, capsys):
    root, _ = tiny
    sets = ["match.ste.epochs=2"]
    rc = main(
        [
            "reproduce",
            "--recipe",
            "tiny",
            "--cache",
            str(root / "cache"),
            "--out",
            str(root / "r2"),
            "--dry-run",
            *(f"--set={s}" for s in sets),
        ]
    )
    assert rc == 0
    listing = capsys.readouterr().out
    res = reproduce("tiny", out=root / "r2", cache=root / "cache", sets=sets, jobs=2)
    stages = order(res.plan.targets())

    memo: dict = {}

    def downstream_of_ste(s):
        if s not in memo:
            memo[s] = (isinstance(s, MatchStage) and s.method == "ste") or any(
                downstream_of_ste(d) for d in dependencies(s)
            )
        return memo[s]

    expected = {stage_hash(s) for s in stages if downstream_of_ste(s)}
    assert {o.hash for o in res.summary.ran} == expected
    assert {o.kind for o in res.summary.ran} == {"match", "barrier", "analysis", "three"}
    assert f"{len(stages) - len(expected)} cached, {len(expected)} to run" in listing
    assert res.results["recipe"]["match"]["ste"]["epochs"] == 2


def test_two_runs_in_different_folders_give_identical_results(tiny, tmp_path):
    root, _ = tiny
    reproduce("tiny", out=tmp_path / "report", cache=tmp_path / "cache")
    assert (tmp_path / "report" / "results.json").read_bytes() == (root / "report" / "results.json").read_bytes()


def test_busy_report_folder_fails_at_once(tiny):
    root, _ = tiny
    out = root / "report"
    with file_lock(out / ".lmckit.lock", wait=True):
        with pytest.raises(LmcError, match="another lmckit process is using"):
            reproduce("tiny", out=out, cache=root / "cache")


def test_missing_dataset_fails_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LMCKIT_DATA", str(tmp_path / "nodata"))
    rc = main(
        ["reproduce", "--recipe", "cifar10-resnet20", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cifar10" in err and "not available" in err and "fix:" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_ste_drift_is_reported_beside_the_wm_baseline(tiny):
    """The drift figure's numbers are the STE stages' own records, and the baseline is recomputed from WM's perms."""
    from lmckit.report.results import changed_fraction

    root, res = tiny
    r = json.loads((root / "report" / "results.json").read_text())
    d = r["ste_drift"]
    e = res.plan.experiments[0]
    ste = e.matches[((0, 1), "ste", 0)]
    rec = json.loads((stage_path(root / "cache", ste) / "result.json").read_text())["drift"]
    run = d["runs"][0]
    assert run["pair"] == [0, 1] and run["epoch"] == rec["epoch"] == [0, 1]
    assert run["changed_vs_wm"] == rec["changed_vs_wm"] and run["r03"] == rec["r03"]
    assert run["changed_vs_wm"][0] == 0.0 and run["tilde_dist"][0] == 0.0  # STE starts at theta_a with WM's perm
    assert run["train_epoch"] == [1] and len(run["train_midpoint_loss"]) == 1
    assert [x["pair"] for x in d["runs"]] == [[0, 1], [0, 2]]  # the three-model STE match to the anchor too
    wm = [
        json.loads((stage_path(root / "cache", e.matches[((0, 1), "weight", s)]) / "perms.json").read_text())["perms"]
        for s in (0, 1)
    ]
    assert d["wm_vs_wm"]["values"] == [changed_fraction(wm[0], wm[1])]
    end = [x["changed_vs_wm"][-1] for x in d["runs"]]
    assert d["summary"]["changed_vs_wm_end"]["mean"] == pytest.approx(sum(end) / len(end))
    md = (root / "report" / "report.md").read_text()
    assert f"differs from plain WM's on {sum(end) / len(end):.1%} of units" in md
    assert f"against {d['wm_vs_wm']['mean']:.1%} between two WM searches" in md


def test_timings_give_the_cost_of_each_stage_kind(tiny):
    root, res = tiny
    t = json.loads((root / "report" / "timings.json").read_text())
    kinds = t["stages_by_kind"]
    n_by_kind: dict[str, int] = {}
    for s in order(res.plan.targets()):
        n_by_kind[s.KIND] = n_by_kind.get(s.KIND, 0) + 1
    assert {k: v["count"] for k, v in kinds.items()} == n_by_kind
    for k, v in kinds.items():
        assert v["ran"] + v["cached"] == v["count"]
        assert v["seconds"] == pytest.approx(t["stage_seconds_by_kind"][k])
        assert v["mean_seconds"] == pytest.approx(v["seconds"] / v["count"])
    assert 0 < t["wall_seconds"] and t["conditions"]["cpus"] >= 1
    from lmckit.pipeline.reproduce import stage_costs

    first = stage_costs(res.plan, root / "cache", res.summary, res.seconds)["stages_by_kind"]  # the first, full run
    assert sum(v["ran"] for v in first.values()) == len(res.summary.ran) > 0


def test_jobs_auto_is_one_job_per_core_and_bad_values_are_usage_errors(tmp_path, capsys, monkeypatch):
    import os

    from lmckit.commands import reproduce as cmd

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cmd._jobs("auto") == 3 and cmd._jobs("AUTO") == 3 and cmd._jobs("2") == 2
    argv = ["reproduce", "--recipe", "tiny", "--dry-run", "--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c")]
    assert main([*argv, "--jobs", "auto"]) == 0
    capsys.readouterr()
    assert main([*argv, "--jobs", "many"]) == 2
    assert "'auto'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()  # a dry run creates nothing
