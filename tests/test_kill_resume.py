"""Killed runs lose nothing: SIGKILL ``lmckit train`` and ``lmckit reproduce`` at seeded random moments, rerun,
and compare with an uninterrupted run (bitwise weights; identical results.json).

While a killed series runs, a watcher polls the output folder every few milliseconds and asserts that no
folder ever looks complete before it is: a final run folder (no ``.partial``) exists only with every file in
it, and files the code reads back on resume (training checkpoints, metrics, results.json) are always whole.

The runs are real processes forked from a pre-imported zygote (see ``tests.helpers.reliability.Zygote``), so each
kill point costs the work it interrupts, not a torch start-up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.reliability import Zygote

TRAIN_ARGS = ["train", "--preset", "tiny", "--epochs", "5", "--batch-size", "20", "--quiet"]
RECIPE_SETS = [
    "three_models.enabled=false",
    "width_sweep.enabled=false",
    'match.methods=["naive","weight"]',
    "match.searches=1",
]
TIMING_KEYS = {"seconds", "eval_seconds"}  # per-epoch wall times in metrics.jsonl: the only fields allowed to differ


@dataclass
class KillLog:
    """What the kill points hit, for the assertions and the report."""

    killed: int = 0  # runs SIGKILLed while running
    finished: int = 0  # runs that ended by themselves before their kill time
    phases: dict[str, int] = field(default_factory=dict)

    def hit(self, phase: str) -> None:
        self.killed += 1
        self.phases[phase] = self.phases.get(phase, 0) + 1


def run_until(
    zygote: Zygote,
    argv: list,
    cwd: Path,
    log: Path,
    stop: Callable[[float], bool],
    watch: Callable[[], None],
    timeout: float = 120.0,
) -> tuple[bool, float]:
    """Start a run; poll ``watch()`` until it exits or ``stop(elapsed)``; then SIGKILL it.

    Returns (killed, seconds it ran).
    """
    t0 = time.monotonic()
    pid = zygote.start(argv, cwd, log)
    killed = False
    while True:
        watch()
        elapsed = time.monotonic() - t0
        if not zygote.running(pid):
            break
        if stop(elapsed):
            os.kill(pid, signal.SIGKILL)  # our own child; a zombie keeps its pid until reaped (no recycled pid)
            killed = True
            break
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"run {argv} did not finish in {timeout}s; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)
    code = zygote.finish(pid)
    watch()
    if killed:
        assert code in (-signal.SIGKILL, 0), code  # 0: it finished in the instant before the signal
        killed = code == -signal.SIGKILL
    else:
        assert code == 0, f"run {argv} failed ({code}); log:\n{log.read_text()[-3000:]}"
    return killed, time.monotonic() - t0


# --------------------------------------------------------------------------- lmckit train
def _train_folder(out: Path) -> tuple[Path | None, Path | None]:
    """(final run folder or None, partial folder or None) under ``out/train``."""
    final = partial = None
    for p in (out / "train").glob("*"):
        if p.is_dir():
            if p.name.endswith(".partial"):
                partial = p
            else:
                final = p
    return final, partial


def _check_train_invariants(out: Path) -> None:
    from lmckit.store import load_state

    final, partial = _train_folder(out)
    if final is not None:
        # a final folder only ever appears whole (it is renamed from .partial when done)
        names = {p.name for p in final.iterdir()}
        assert names == {"model.safetensors", "config.json", "metrics.jsonl"}, names
        json.loads((final / "config.json").read_text())
        load_state(final / "model.safetensors")


def _check_partial_is_resumable(out: Path) -> str:
    """After a kill: every file the resume reads is whole. Returns the phase the kill hit."""
    from lmckit.store import load_state

    final, partial = _train_folder(out)
    if final is not None:
        return "after finish"
    if partial is None:
        return "before the run folder"
    ckpt = partial / "checkpoint.safetensors"
    if not ckpt.exists():
        return "before the first checkpoint"
    _, meta = load_state(ckpt)  # never half-written (atomic write): a truncated file would raise here
    mfile = partial / "metrics.jsonl"
    lines = mfile.read_text().splitlines() if mfile.exists() else []
    # metrics.jsonl is written just after the checkpoint: it may lag it by one epoch (the resume reads the
    # metrics from the checkpoint and rewrites the file)
    epochs = [json.loads(x)["epoch"] for x in lines]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) in (meta["epoch"] - 1, meta["epoch"])
    return f"after epoch {meta['epoch']}"


def _same_metrics(a: Path, b: Path) -> None:
    ra = [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in a.read_text().splitlines()]
    rb = [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in b.read_text().splitlines()]
    assert ra == rb


def _assert_same_run(run: Path, ref: Path) -> None:
    from lmckit.store import load_state

    # bitwise equal tensors and equal metadata (the file bytes may differ: safetensors writes its metadata
    # map in a per-process hash order)
    sa, ma = load_state(run / "model.safetensors")
    sb, mb = load_state(ref / "model.safetensors")
    assert list(sa) == list(sb) and ma == mb
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
        assert sa[k].numpy().tobytes() == sb[k].numpy().tobytes(), k
    _same_metrics(run / "metrics.jsonl", ref / "metrics.jsonl")
    a, b = json.loads((run / "config.json").read_text()), json.loads((ref / "config.json").read_text())
    assert a["result"] == b["result"] and a["config"] == b["config"] and a["hash"] == b["hash"]


def kill_train_series(zygote: Zygote, tmp: Path, random_kills: int, seed: int) -> KillLog:
    ref_out = tmp / "ref"
    ran, t_ref = run_until(zygote, [*TRAIN_ARGS, "--out", ref_out], tmp, tmp / "ref.log", lambda e: False, lambda: None)
    ref, _ = _train_folder(ref_out)
    rng = random.Random(seed)
    log = KillLog()
    chain = 0

    def out_dir() -> Path:
        return tmp / f"chain{chain}"

    def finish_chain() -> None:
        nonlocal chain
        out = out_dir()
        run_until(
            zygote,
            [*TRAIN_ARGS, "--out", out],
            tmp,
            tmp / "run.log",
            lambda e: False,
            lambda: _check_train_invariants(out),
        )
        final, partial = _train_folder(out)
        assert final is not None and partial is None
        _assert_same_run(final, ref)
        chain += 1

    # event-driven kill points first (the resume paths are exercised whatever the machine's speed)
    def killed_once(stop: Callable[[float], bool]) -> None:
        out = out_dir()
        killed, _ = run_until(
            zygote, [*TRAIN_ARGS, "--out", out], tmp, tmp / "run.log", stop, lambda: _check_train_invariants(out)
        )
        if killed:
            log.hit(_check_partial_is_resumable(out))
        else:
            log.finished += 1

    def after_epochs(k: int) -> Callable[[float], bool]:
        def stop(_e: float) -> bool:
            _, partial = _train_folder(out_dir())
            m = partial / "metrics.jsonl" if partial else None
            return bool(m and m.exists() and len(m.read_text().splitlines()) >= k)

        return stop

    killed_once(after_epochs(1))
    killed_once(after_epochs(3))
    finish_chain()
    # random kill points: each run of a chain is killed at a seeded random time in [0, t_ref)
    for _ in range(random_kills):
        delay = rng.uniform(0.0, t_ref)
        out = out_dir()
        killed, _ = run_until(
            zygote,
            [*TRAIN_ARGS, "--out", out],
            tmp,
            tmp / "run.log",
            lambda e, delay=delay: e >= delay,
            lambda out=out: _check_train_invariants(out),
        )
        if killed:
            log.hit(_check_partial_is_resumable(out))
        else:  # it finished first: verify it and start a new chain
            log.finished += 1
            final, _ = _train_folder(out)
            _assert_same_run(final, ref)
            chain += 1
    finish_chain()
    return log


def test_killed_training_resumes_to_bitwise_identical_weights(zygote, tmp_path):
    log = kill_train_series(zygote, tmp_path, random_kills=5, seed=20240531)
    print(f"train kill points: {log.killed} killed, {log.finished} finished first; phases {log.phases}")
    assert log.killed >= 4
    assert any(p.startswith("after epoch") for p in log.phases), log.phases  # resumed from a checkpoint


@pytest.mark.slow
def test_killed_training_many_points(zygote, tmp_path):
    log = kill_train_series(zygote, tmp_path, random_kills=40, seed=7)
    print(f"train kill points: {log.killed} killed, {log.finished} finished first; phases {log.phases}")
    assert log.killed >= 20


# --------------------------------------------------------------------------- lmckit reproduce
def _check_pipeline_invariants(root: Path) -> None:
    cache, report = root / "cache", root / "report"
    if cache.exists():
        for kind in cache.iterdir():
            if not kind.is_dir() or kind.name.startswith("."):
                continue
            for d in kind.iterdir():
                if d.is_dir() and not d.name.endswith(".partial"):
                    assert (d / "config.json").is_file(), f"{d} looks complete but has no config.json"
                    for f in d.glob("*.json"):
                        json.loads(f.read_text())  # whole files only
    if (report / "results.json").exists():
        json.loads((report / "results.json").read_text())


def _untimed(obj):
    """A stage's result.json without wall-time fields (``*_seconds``; match stages record setup/solve times)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not (k == "seconds" or k.endswith("_seconds"))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _pipeline_phase(root: Path) -> str:
    """Where a pipeline run is: the stage folders in progress and done, or the report being written."""
    cache = root / "cache"
    busy = sorted(p.parent.name for p in cache.glob("*/*.partial"))
    done = sum(1 for p in cache.glob("*/*") if p.is_dir() and not p.name.endswith(".partial"))
    if busy:
        return f"in {'+'.join(busy)} stage ({done} folders done)"
    if list((root / "report").glob("*.png")):
        return "writing the report"
    return f"between stages ({done} folders done)"


def _after(seconds: float) -> Callable[[float], bool]:
    """A stop condition: true once ``seconds`` have elapsed."""
    return lambda e: e >= seconds


def kill_reproduce_series(zygote: Zygote, tmp: Path, sets: list[str], random_kills: int, seed: int) -> KillLog:
    """Event-driven kill points (inside a training epoch, a match, a barrier, the report), then seeded random ones."""

    def argv(root: Path) -> list:
        return [
            "reproduce",
            "--recipe",
            "tiny",
            "--out",
            root / "report",
            "--cache",
            root / "cache",
            *[f"--set={s}" for s in sets],
        ]

    ref = tmp / "ref"
    _, t_ref = run_until(zygote, argv(ref), tmp, tmp / "ref.log", lambda e: False, lambda: None)
    rng = random.Random(seed)
    log = KillLog()
    root = tmp / "killed"
    events = [
        lambda: any((root / "cache" / "model").glob("*.partial/checkpoint.safetensors")),
        lambda: any((root / "cache" / "match").glob("*.partial")),
        lambda: any((root / "cache" / "barrier").glob("*.partial")),
        lambda: any((root / "report").glob("*.png")),
    ]
    stops = [lambda e, ev=ev: ev() for ev in events]
    stops += [_after(rng.uniform(0.0, t_ref / 2)) for _ in range(random_kills)]
    for stop in stops:
        phase = []

        def stop_and_note(e: float, stop=stop, phase=phase) -> bool:
            if stop(e):
                phase.append(_pipeline_phase(root))
                return True
            return False

        killed, _ = run_until(
            zygote, argv(root), tmp, tmp / "run.log", stop_and_note, lambda: _check_pipeline_invariants(root)
        )
        if killed:
            log.hit(phase[0])
        else:
            log.finished += 1
            break
    run_until(zygote, argv(root), tmp, tmp / "run.log", lambda e: False, lambda: _check_pipeline_invariants(root))
    assert (root / "report" / "results.json").read_bytes() == (ref / "report" / "results.json").read_bytes()
    assert not list((root / "cache").glob("*/*.partial")), "a finished pipeline left partial folders"
    assert not list((root / "cache").glob("*/*/.*.tmp")), "a finished pipeline left temp files in complete folders"
    # every stage folder of the killed series holds the same results as the uninterrupted one
    for res in (ref / "cache").glob("*/*/result.json"):
        twin = root / res.relative_to(ref)
        assert _untimed(json.loads(twin.read_text())) == _untimed(json.loads(res.read_text())), twin
    return log


def test_killed_reproduce_resumes_to_identical_results(zygote, tmp_path):
    log = kill_reproduce_series(zygote, tmp_path, RECIPE_SETS, random_kills=1, seed=99)
    print(f"reproduce kill points: {log.killed} killed, {log.finished} finished first; phases {log.phases}")
    assert log.killed >= 4 and sum(1 for p in log.phases if p.startswith("in ")) >= 2, log.phases


@pytest.mark.slow
def test_killed_reproduce_full_tiny_recipe(zygote, tmp_path):
    log = kill_reproduce_series(zygote, tmp_path, [], random_kills=10, seed=3)
    print(f"reproduce kill points: {log.killed} killed, {log.finished} finished first; phases {log.phases}")
    assert log.killed >= 6


def test_kill_between_last_checkpoint_and_its_metrics_line_loses_nothing(tmp_path):
    """The window the random kills found: checkpoint of the last epoch written, metrics.jsonl not yet.

    Reproduced deterministically: stop after the last epoch (callback), drop the last metrics line as the kill
    would have, resume: the finished run must still list every epoch.
    """
    from lmckit.train import make_config, run_dir_for, train

    cfg = make_config("tiny", epochs=2)

    def stop(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_root=tmp_path, progress=False, callback=stop)
    partial = run_dir_for(cfg, tmp_path).with_name(run_dir_for(cfg, tmp_path).name + ".partial")
    m = partial / "metrics.jsonl"
    m.write_text(m.read_text().splitlines(keepends=True)[0])
    res = train(cfg, out_root=tmp_path, progress=False)
    assert [json.loads(x)["epoch"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
