"""The Ray executor: options, the missing-Ray message, and faults against a real local Ray instance.

The fast tests need no Ray, except one that starts a private Ray instance for a
few seconds (loopback binding, shared-root check). The ones marked ``slow`` start a real Ray instance
on 127.0.0.1 (in a child ``lmckit reproduce`` process, bounded in time and
stopped by the test) and are skipped with a reason when ray is not installed
(``pip install 'lmckit[ray]'``); ``.ci/run`` installs it and runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lmckit.cli import main
from lmckit.errors import LmcError
from lmckit.pipeline.executor import InProcessExecutor, ProcessPoolExecutor, make_executor
from lmckit.pipeline.ray_executor import (
    RAY_INSTALL_HINT,
    StageResources,
    check_token_answers,
    parse_resources,
    ray_available,
)
from lmckit.pipeline.stages import STAGE_THREADS
from lmckit.pipeline.tasks import MatchStage, TrainStage

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install 'lmckit[ray]')")


# --------------------------------------------------------------------------- no Ray needed
def test_parse_resources_per_kind():
    r = parse_resources(["model=cpu:2,gpu:1", "analysis=cpu:0.5", "ste=gpu:0.25"])
    assert dict(r.cpus) == {"model": 2.0, "analysis": 0.5}
    assert dict(r.gpus) == {"model": 1.0, "ste": 0.25}
    train = TrainStage(())
    ste = MatchStage(a=train, b=train, method="ste")
    wm = MatchStage(a=train, b=train, method="weight")
    assert r.kind_of(ste) == "ste" and r.kind_of(wm) == "match" and r.kind_of(train) == "model"
    assert r.for_stage(train, use_gpus=False) == (2.0, 1.0)  # explicit GPU kept
    assert r.for_stage(ste, use_gpus=True) == (1.0, 0.25)
    assert r.for_stage(wm, use_gpus=True) == (1.0, 0.5)  # default share
    assert r.for_stage(wm, use_gpus=False) == (1.0, 0.0)
    assert StageResources().for_stage(train, use_gpus=True) == (1.0, 1.0)


@pytest.mark.parametrize(
    "bad", ["model", "modle=cpu:1", "model=cpu", "model=tpu:1", "model=cpu:-1", "model=cpu:x", "model=cpu:nan"]
)
def test_parse_resources_rejects_bad_items(bad):
    with pytest.raises(LmcError) as e:
        parse_resources([bad])
    assert bad in e.value.message and "cpu:" in e.value.hint


def test_resources_never_enter_the_stage_hash():
    import dataclasses

    from lmckit.pipeline.stages import Runtime, stage_hash

    fields = {f.name for f in dataclasses.fields(Runtime)}
    assert not fields & {"resources", "executor", "address"}
    assert stage_hash(TrainStage(())) == stage_hash(TrainStage(()))


def test_token_check_names_the_nodes_that_cannot_see_the_root(tmp_path):
    check_token_answers(tmp_path, "abc", [("n1", "abc"), ("n2", "abc")])
    with pytest.raises(LmcError) as e:
        check_token_answers(tmp_path, "abc", [("n1", "abc"), ("n2", None), ("n3", "other")])
    assert "n2, n3" in e.value.message and "n1" not in e.value.message.split("node(s)")[1]
    assert str(tmp_path) in e.value.message and "shared" in e.value.message
    with pytest.raises(LmcError):
        check_token_answers(tmp_path, "abc", [])


def test_make_executor_choices():
    assert isinstance(make_executor(), InProcessExecutor)
    assert isinstance(make_executor(None), InProcessExecutor)
    ex = make_executor(2)
    assert isinstance(ex, ProcessPoolExecutor)
    ex.close()
    with pytest.raises(LmcError, match="unknown executor"):
        make_executor(1, "slurm")
    with pytest.raises(LmcError, match="need --executor ray"):
        make_executor(1, "local", address="auto")


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(LmcError) as e:
        make_executor(1, "ray")
    assert e.value.hint == RAY_INSTALL_HINT and "lmckit[ray]" in e.value.hint
    out = tmp_path / "rep"
    rc = main(["reproduce", "--recipe", "tiny", "--executor", "ray", "--out", str(out), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'lmckit[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists() and not out.exists()  # nothing written


def test_ray_options_without_ray_executor_are_refused(tmp_path, capsys):
    rc = main(
        [
            "reproduce",
            "--recipe",
            "tiny",
            "--address",
            "auto",
            "--out",
            str(tmp_path / "r"),
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2 and "--executor ray" in capsys.readouterr().err
    rc = main(
        [
            "reproduce",
            "--recipe",
            "tiny",
            "--executor",
            "ray",
            "--ray-resources",
            "gpu=1",
            "--out",
            str(tmp_path / "r"),
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2 and "--ray-resources" in capsys.readouterr().err


def test_bad_device_name_with_ray_fails_before_starting_anything(tmp_path):
    from lmckit.reproduce import reproduce

    with pytest.raises(LmcError, match="unknown device"):
        reproduce("tiny", out=tmp_path / "r", cache=tmp_path / "c", executor="ray", device="gpu0")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- a real local Ray instance
def _env(ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
            "LMCKIT_NO_PROGRESS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
            "RAY_TMPDIR": ray_tmp,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


def _session_pids(sid: int) -> list[int]:
    """Live processes of the session a child was started in (the driver and every Ray process it spawned)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                pass
    return pids


class RayRun:
    """``lmckit reproduce --recipe tiny --executor ray`` in its own session; :meth:`stop` kills what is left of it."""

    def __init__(self, tmp: Path, name: str):
        self.cache, self.out = tmp / "cache", tmp / name
        self.ray_tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.log = tmp / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "lmckit.cli",
            "reproduce",
            "--recipe",
            "tiny",
            "--executor",
            "ray",
            "--out",
            str(self.out),
            "--cache",
            str(self.cache),
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=_env(self.ray_tmp),
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the Ray run did not finish in {timeout}s; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline:  # Ray's own processes share the driver's fate; give them a moment
            left = [p for p in _session_pids(sid) if p != os.getpid()]
            if not left:
                break
            time.sleep(0.5)
        self.stragglers = [p for p in _session_pids(sid) if p != os.getpid()]
        for p in self.stragglers:  # stragglers of this run only (by session id)
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15  # SIGKILL is delivered asynchronously: wait until they are gone
        while [p for p in _session_pids(sid) if p != os.getpid()] and time.time() < deadline:
            time.sleep(0.1)
        import shutil

        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _complete_stages(cache: Path) -> dict[str, str]:
    """``kind/hash`` -> stage.json text of every complete stage folder."""
    return {
        f"{p.parent.parent.name}/{p.parent.name}": p.read_text()
        for p in cache.glob("*/*/stage.json")
        if not p.parent.name.endswith(".partial")
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """results.json of an in-process run of the tiny recipe (one torch thread, as in each Ray task)."""
    from lmckit.reproduce import reproduce

    root = tmp_path_factory.mktemp("ref")
    reproduce("tiny", out=root / "report", cache=root / "cache")
    return (root / "report" / "results.json").read_bytes()


@needs_ray
@pytest.mark.slow
def test_ray_run_on_a_fresh_cache_is_byte_identical_to_in_process(tmp_path, reference):
    """The tiny recipe as Ray tasks from an empty cache: results.json equals the in-process run's byte for byte
    (every executor runs a stage with STAGE_THREADS torch threads; before, Ray's tasks and the in-process run
    used different counts and differed in the 7th digit)."""
    run = RayRun(tmp_path, "report")
    try:
        assert run.wait(600) == 0, run.log.read_text()[-3000:]
    finally:
        run.stop()
    assert (run.out / "results.json").read_bytes() == reference
    threads = {json.loads(t)["threads"] for t in _complete_stages(run.cache).values()}
    assert threads == {STAGE_THREADS}


@needs_ray
@pytest.mark.slow
def test_worker_killed_mid_stage_is_retried_and_results_identical(tmp_path, reference):
    """SIGKILL the Ray worker while it runs a stage: the task is retried, the stage resumes, results.json matches.

    Each task notes its start (worker pid) before it calls ``run_stage``; the test waits until that
    stage's ``.partial`` log shows the worker's start line (so the stage body is running), kills the
    pid, and counts the kill as mid-stage when, with the worker dead, the stage is not complete.
    Killing at the marker itself lands before the stage body on a slow machine (CI saw 10 of 10
    kills land there), so the kill waits for the log line. A stage that completes first is skipped
    (at most 10 kills).
    """
    from lmckit.store import is_complete

    run = RayRun(tmp_path, "report")
    hits: list[tuple[int, str, str]] = []
    kills: list[int] = []

    def killer() -> None:
        seen: set[str] = set()
        watching: dict[str, tuple[int, str, str]] = {}  # marker name -> (worker pid, kind, hash)
        deadline = time.time() + 240
        while time.time() < deadline and run.proc.poll() is None and not hits and len(kills) < 10:
            for mark in run.cache.glob(".ray/run-*/*.started"):
                if mark.name in seen:
                    continue
                lines = mark.read_text().splitlines()
                if len(lines) != 1 or len(lines[0].split()) < 3:  # one attempt, its line written in full
                    continue
                seen.add(mark.name)
                kind, h = mark.stem.split("-", 1)
                watching[mark.name] = (int(lines[0].split()[0]), kind, h)
            for name, (pid, kind, h) in list(watching.items()):
                final = run.cache / kind / h
                plog = final.with_name(h + ".partial") / "log.txt"
                if is_complete(final):
                    del watching[name]  # finished before its start line was seen: try another stage
                    continue
                try:
                    started = f"(pid {pid})" in plog.read_text()
                except OSError:
                    started = False
                if not started:
                    continue
                del watching[name]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append(pid)
                time.sleep(0.05)  # the kill is delivered; the partial folder is as the worker left it
                if not is_complete(final):
                    hits.append((pid, kind, h))
                    return
            time.sleep(0.002)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc = run.wait(300)
    finally:
        t.join(5)
        run.stop()
    log = run.log.read_text()
    assert rc == 0, log[-3000:]
    assert hits, f"no stage was caught mid-way in {len(kills)} kills"
    pid, kind, h = hits[0]
    stage_log = (run.cache / kind / h / "log.txt").read_text()
    starts = [ln for ln in stage_log.splitlines() if ln.startswith("== ") and " started " in ln]
    assert len(starts) == 2 and f"(pid {pid})" in starts[0] and f"(pid {pid})" not in starts[1], stage_log
    assert (run.out / "results.json").read_bytes() == reference
    assert not list(run.cache.glob("*/*.partial"))


@needs_ray
@pytest.mark.slow
def test_driver_killed_then_rerun_resumes_from_finished_stages(tmp_path, reference):
    """SIGKILL the driver after some stages finished: Ray goes down with it, a rerun reuses those stages."""
    from lmckit.reproduce import reproduce

    run = RayRun(tmp_path, "report")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and run.proc.poll() is None and len(_complete_stages(run.cache)) < 6:
            time.sleep(0.05)
        assert run.proc.poll() is None, f"the run ended before the kill:\n{run.log.read_text()[-3000:]}"
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(30)
        before = _complete_stages(run.cache)
        assert 6 <= len(before) < 30

        def ray_core() -> list[str]:
            out = []
            for pid in _session_pids(run.proc.pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                if cmd.endswith(("gcs_server", "raylet")):
                    out.append(cmd)
            return out

        deadline = time.time() + 30
        while ray_core() and time.time() < deadline:
            time.sleep(0.2)
        assert not ray_core(), "the local Ray instance outlived its driver"

        def left() -> list[str]:
            out = []
            for pid in _session_pids(run.proc.pid):
                try:
                    out.append(
                        f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                    )
                except OSError:
                    pass
            return out

        # Everything else ends by itself: workers within seconds (lmckit's orphan watch), Ray's dashboard and
        # runtime-env agents after about 60 s (they see the raylet die at once, then report it to the dead GCS
        # with a fixed 60 s timeout: ray._private.utils.publish_error_to_driver).
        deadline = time.time() + 120
        while left() and time.time() < deadline:
            time.sleep(0.5)
        assert not left(), f"processes of the killed run outlived it by 120 s: {left()}"
    finally:
        run.stop()
    assert not _session_pids(run.proc.pid), "processes of the killed run survived SIGKILL"
    res = reproduce("tiny", out=tmp_path / "report", cache=run.cache)  # in process
    after = _complete_stages(run.cache)
    assert {k: after[k] for k in before} == before  # finished stages were reused, not recomputed
    assert len(res.summary.cached) >= len(before) and len(res.summary.ran) == 30 - len(res.summary.cached)
    assert (tmp_path / "report" / "results.json").read_bytes() == reference


@needs_ray
@pytest.mark.slow
def test_failing_stage_shows_its_log_and_stops_cleanly(tmp_path):
    """A stage that fails in a Ray task: exit status 2 (bad input), the error and the stage log's path."""
    # A learning rate the recipe accepts but training diverges with: the first training stage fails.
    run_dir = tmp_path
    env = _env(tempfile.mkdtemp(prefix="lr", dir="/tmp"))
    argv = [
        sys.executable,
        "-m",
        "lmckit.cli",
        "reproduce",
        "--recipe",
        "tiny",
        "--executor",
        "ray",
        "--set",
        "train.overrides.lr=1e30",
        "--out",
        str(run_dir / "r"),
        "--cache",
        str(run_dir / "c"),
    ]
    p = subprocess.Popen(
        argv, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0]
        pytest.fail(f"did not stop in time:\n{out[-3000:]}")
    finally:
        for pid in _session_pids(p.pid):
            os.kill(pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert p.returncode == 2, out[-3000:]
    assert "diverged" in out and "log.txt" in out and "Traceback" not in out, out[-3000:]
    logs = [ln for ln in out.splitlines() if "log: " in ln]
    assert logs and Path(logs[0].split("log: ")[1].split(")")[0]).exists()
    assert not (run_dir / "r" / "results.json").exists()


@needs_ray
def test_local_ray_instance_listens_on_loopback_only(tmp_path):
    """The executor's private instance passes the shared-root check, binds every Ray server to 127.0.0.1
    and runs its workers at normal priority.

    In the default tier (a few seconds) so that a fresh clone without Ray shows a skip with its reason.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, subprocess, sys\n"
        "from pathlib import Path\n"
        "from lmckit.pipeline.ray_executor import RayExecutor\n"
        "from lmckit.pipeline.stages import Runtime\n"
        "ex = RayExecutor()\n"
        "ex._connect(Path(sys.argv[1]), Runtime(device='cpu'))\n"
        "ss = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
        "ps = subprocess.run(['ps', '-eo', 'ni,sid,args'], capture_output=True, text=True).stdout\n"
        "print(json.dumps({'nodes': ex.nodes, 'ss': ss, 'ps': ps}))\n"
        "ex.close()\n"
    )
    env = _env(tempfile.mkdtemp(prefix="lr", dir="/tmp"))
    p = subprocess.Popen(
        [sys.executable, str(probe), str(tmp_path / "root")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        for pid in _session_pids(p.pid):
            os.kill(pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert p.returncode == 0, err[-3000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert len(info["nodes"]) == 1
    # the worker that read the token back runs at normal priority (Ray's default would be nice 15)
    workers = [ln.split() for ln in info["ps"].splitlines() if "ray::IDLE" in ln or "ray::_read_token" in ln]
    mine = [w for w in workers if w[1] == str(p.pid)]
    assert mine and all(w[0] == "0" for w in mine), info["ps"]
    if not info["ss"].strip():
        pytest.skip("ss lists no sockets here")
    ray_lines = [ln for ln in info["ss"].splitlines() if any(k in ln for k in ("gcs_server", "raylet", "ray::"))]
    assert ray_lines, info["ss"]
    for ln in ray_lines:
        local = ln.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), ln
