"""Signals that end lmckit end its children too: SIGTERM (what ``timeout`` and CI runners send), SIGINT (Ctrl-C)
and SIGHUP (a closed terminal) to the main process of ``lmckit reproduce --jobs 2`` leave no worker and no
resource tracker behind (so a ``| tee`` returns), exit with 128 + the signal number and one line on stderr, and a
rerun resumes to a complete report. Real processes throughout (``subprocess``), not an in-process call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.reliability import lmckit_cmd, subprocess_env

SETS = [
    "three_models.enabled=false",
    "width_sweep.enabled=false",
    'match.methods=["naive","weight"]',
    "match.searches=1",
]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(x) for x in (t / "children").read_text().split()}
        except OSError:
            pass
    return out


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time (field 22 of /proc/PID/stat) of every process below ``pid``."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in found:
                st = _start_time(c)
                if st is not None:
                    found[c] = st
                    todo.append(c)
    return found


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(procs: dict[int, str]) -> list[int]:
    """The processes still running (same pid *and* start time: a recycled pid does not count)."""
    out = []
    for pid, st in procs.items():
        if _start_time(pid) == st:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                out.append(pid)
    return out


def _reproduce(root: Path, jobs: int = 2) -> list[str]:
    return lmckit_cmd(
        "reproduce",
        "--recipe",
        "tiny",
        "--jobs",
        jobs,
        "--out",
        root / "report",
        "--cache",
        root / "cache",
        *[f"--set={s}" for s in SETS],
    )


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a foreground terminal.

    A job started in the background (``cmd &``, as CI runners and ``nohup`` may start the suite)
    inherits SIGINT ignored, and Python then rightly leaves it ignored; Ctrl-C reaches a foreground
    process with the default disposition, which is what this test models.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_reproduce(root: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        _reproduce(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    try:
        seen: dict[int, str] = {}
        t0 = time.monotonic()
        # wait until both workers and the resource tracker exist and a stage is under way
        while time.monotonic() - t0 < 120:
            seen.update(_descendants(proc.pid))
            busy = list((root / "cache").glob("*/*.partial"))
            if len(seen) >= 3 and busy:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        else:
            raise AssertionError("the workers did not start in 120 s")
        seen.update(_descendants(proc.pid))
        os.kill(proc.pid, sig)
        # communicate() returns only once every holder of the stdout/stderr pipes has closed them (| tee returns)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert f"stopped by {sig.name}" in err and "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 15
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(seen)
    if left:  # clean up before failing
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind after {sig.name}: {left}"
    assert not (root / "report" / "results.json").exists()


def _resume(root: Path) -> None:
    proc = subprocess.run(_reproduce(root), capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "report" / "results.json").read_text())
    assert results["claims"]
    assert not list((root / "cache").glob("*/*.partial")), "a stage was left unfinished"


def test_sigterm_ends_workers_and_resource_tracker_and_resume_works(tmp_path):
    _signal_reproduce(tmp_path, signal.SIGTERM)
    _resume(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_end_workers_too(tmp_path, sig):
    _signal_reproduce(tmp_path, sig)
    _resume(tmp_path)


def test_sigterm_to_train_exits_143_and_resumes(tmp_path):
    """In-process work (``train``): SIGTERM unwinds (lock released, checkpoint kept); the rerun finishes."""
    args = lmckit_cmd("train", "--preset", "tiny", "--epochs", "40", "--batch-size", "20", "--out", tmp_path, "--quiet")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    t0 = time.monotonic()
    while not list(tmp_path.glob("train/*.partial/checkpoint.safetensors")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    again = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(tmp_path.glob("train/*.partial"))
