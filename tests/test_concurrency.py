"""Concurrent runs: two ``lmckit reproduce`` processes on one report folder (the second refuses at once with a
clear message; nothing is corrupted), and two on one stage cache with different report folders (stage locks
make them wait for each other: every stage is computed exactly once and both reports are identical).

One process is a real ``python -m lmckit.cli`` child, the other is forked from the pre-imported zygote so it
starts within milliseconds while the first is known to be inside a stage.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.helpers.reliability import Zygote, lmckit_cmd, snapshot, subprocess_env

SETS = [
    "three_models.enabled=false",
    "width_sweep.enabled=false",
    'match.methods=["naive","weight"]',
    "match.searches=1",
]


def reproduce_args(out: Path, cache: Path) -> list:
    return ["reproduce", "--recipe", "tiny", "--out", out, "--cache", cache, *[f"--set={s}" for s in SETS]]


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"first process ended early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the first process")
        time.sleep(0.005)


def _run_zygote(z: Zygote, argv: list, cwd: Path, log: Path) -> int:
    pid = z.start(argv, cwd, log)
    while z.running(pid):
        time.sleep(0.01)
    return z.finish(pid)


def test_second_process_on_the_same_report_folder_refuses(zygote, tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    first = subprocess.Popen(
        lmckit_cmd(*reproduce_args(out, cache)),
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: any(cache.glob("*/*.partial")), first)  # the first one is inside a stage, holding the lock
        rc = _run_zygote(zygote, reproduce_args(out, cache), tmp_path, tmp_path / "second.log")
        err = (tmp_path / "second.log").read_text()
        assert first.poll() is None, "the first process must still be running for this test to mean anything"
        assert rc == 2, err
        assert "another lmckit process is using the report folder" in err and "fix:" in err
        assert "Traceback" not in err
        assert "[lmckit] start" not in err  # refused before running any stage
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())  # whole and valid
    assert results["experiments"] and not list(cache.glob("*/*.partial"))
    # once the first is done the folder is free again: a rerun reuses everything and writes the same results
    before = snapshot(cache)
    rc = _run_zygote(zygote, reproduce_args(out, cache), tmp_path, tmp_path / "third.log")
    assert rc == 0, (tmp_path / "third.log").read_text()[-3000:]
    assert "0 stages run" in (tmp_path / "third.log").read_text()
    assert json.loads((out / "results.json").read_text()) == results
    assert {k: v for k, v in snapshot(cache).items() if not k.startswith(".locks")} == {
        k: v for k, v in before.items() if not k.startswith(".locks")
    }


def test_two_processes_sharing_a_cache_compute_each_stage_once(zygote, tmp_path):
    cache = tmp_path / "cache"
    first = subprocess.Popen(
        lmckit_cmd(*reproduce_args(tmp_path / "r1", cache)),
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # start the second while the first is training its first model: it must wait on that stage's lock
        _wait_for(lambda: any(cache.glob("model/*.partial")), first)
        rc = _run_zygote(zygote, reproduce_args(tmp_path / "r2", cache), tmp_path, tmp_path / "second.log")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert first.returncode == 0, stderr[-3000:]
    assert (tmp_path / "r1" / "results.json").read_bytes() == (tmp_path / "r2" / "results.json").read_bytes()
    logs = list(cache.glob("*/*/log.txt"))
    assert len(logs) == 8  # 3 models, 1 match, 2 barriers, 2 analyses
    for log in logs:
        assert log.read_text().count(" started ") == 1, f"{log} was computed twice:\n{log.read_text()}"
    # each model was trained once, in its own stage folder (one folder per model, no ROOT/train/ runs)
    assert len([p for p in (cache / "model").glob("*/model.safetensors")]) == 3
    assert not (cache / "train").exists()
    assert not list(cache.glob("*/*.partial"))
