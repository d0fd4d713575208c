"""What the stage cache trusts (issue 28): a complete folder is reused only when its files, its inputs and the
data it read are those recorded in its ``stage.json`` (:func:`lmckit.pipeline.stages.cache_problem`, the one
check on every cache hit); the perms.json of a match records the models it was computed for; a run waiting
on another's lock says which process holds it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from lmckit.errors import LmcError
from lmckit.pipeline.executor import InProcessExecutor
from lmckit.pipeline.stages import Runtime, Stage, StageContext, cache_problem, is_cached, stage_path
from lmckit.pipeline.tasks import TrainStage, train_stage
from lmckit.store import file_lock, lock_holder
from tests.helpers.data_files import IDX_NAMES, idx_bytes, planted_images, write_idx_dataset
from tests.helpers.reliability import REPO


@dataclass(frozen=True)
class Source(Stage):
    KIND = "source"
    n: int = 3

    def run(self, ctx: StageContext) -> None:
        (ctx.dir / "result.json").write_text(json.dumps({"values": list(range(self.n)), "at": time.time()}))


@dataclass(frozen=True)
class Total(Stage):
    """Reads a stage (a source or a trained model) and writes something derived from it."""

    KIND = "total"
    src: Stage = Source()

    def run(self, ctx: StageContext) -> None:
        files = sorted(p.name for p in ctx.input(self.src).iterdir())
        (ctx.dir / "result.json").write_text(json.dumps({"files": files}))


def _ran(summary) -> set[str]:
    return {o.kind for o in summary.ran}


def _run(root, targets, runtime=None):
    with InProcessExecutor() as ex:
        return ex.run(targets, root, runtime)


def test_a_second_run_reuses_every_stage_silently(tmp_path, capsys):
    t = Total(Source())
    assert _ran(_run(tmp_path, [t])) == {"source", "total"}
    capsys.readouterr()
    again = _run(tmp_path, [t])
    assert not again.ran and len(again.cached) == 2
    assert "warning" not in capsys.readouterr().err
    rec = json.loads((stage_path(tmp_path, t) / "stage.json").read_text())
    assert set(rec["files"]) == {"result.json", "log.txt"} and list(rec["inputs"]) == [
        f"source/{stage_path(tmp_path, Source()).name}"
    ]


@pytest.mark.parametrize(
    "tamper,why",
    [
        (lambda p: p.write_text(p.read_text().replace("0", "7")), "edited"),  # same size, other bytes
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["edited-same-size", "truncated", "deleted"],
)
def test_a_cache_entry_changed_by_hand_is_recomputed_with_a_warning(tmp_path, capsys, tamper, why):
    t = Total(Source())
    _run(tmp_path, [t])
    src = stage_path(tmp_path, Source()) / "result.json"
    good = json.loads(src.read_text())["values"]
    tamper(src)
    assert not is_cached(tmp_path, Source()) and why in cache_problem(tmp_path, Source())
    capsys.readouterr()
    res = _run(tmp_path, [t])
    err = capsys.readouterr().err
    assert "source" in _ran(res) and re.search(
        rf"warning: cached stage source/\S+ .*is not used: result\.json.*{why}", err
    ), err
    assert json.loads(src.read_text())["values"] == good
    # the source was recomputed (a new time stamp): the stage that read it is recomputed too
    assert "total" in _ran(res)
    assert not list(tmp_path.glob("source/*.stale-*")), "the untrusted folder was left behind"


def test_a_missing_stage_record_is_not_trusted(tmp_path):
    _run(tmp_path, [Source()])
    (stage_path(tmp_path, Source()) / "stage.json").unlink()
    assert "stage.json" in cache_problem(tmp_path, Source())
    assert _ran(_run(tmp_path, [Source()])) == {"source"}


def _mnist(folder, offset):
    write_idx_dataset(folder, n_train=40, n_test=20, size=8)
    x, _ = planted_images(40, 8, 1, offset)
    (folder / IDX_NAMES["train"][0]).write_bytes(idx_bytes(x.reshape(40, 8, 8)))
    return folder


def _weights(folder) -> dict:
    from lmckit.store import load_state

    return {k: v.tolist() for k, v in load_state(folder / "model.safetensors")[0].items()}


def test_swapping_the_data_reruns_the_stages_that_read_it(tmp_path, capsys, monkeypatch):
    """Same recipe, same stage hashes, other dataset files (another --data-dir, then files replaced in place):
    the training stage and everything downstream run again; back on the first data nothing is reused wrongly."""
    monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
    d1, d2 = _mnist(tmp_path / "d1", 1), _mnist(tmp_path / "d2", 2)
    model = train_stage("tiny", {"model": "mlp_tiny", "dataset": "mnist", "seed": 0, "epochs": 1})
    assert isinstance(model, TrainStage)
    t = Total(model)
    root = tmp_path / "cache"
    assert _ran(_run(root, [t], Runtime(data_dir=str(d1)))) == {"model", "total"}
    w1 = _weights(stage_path(root, model))
    assert not _run(root, [t], Runtime(data_dir=str(d1))).ran  # same data: reused
    capsys.readouterr()
    res = _run(root, [t], Runtime(data_dir=str(d2)))
    assert _ran(res) == {"model", "total"}, "other data reused the model trained on the first"
    assert "dataset mnist differ" in capsys.readouterr().err
    assert _weights(stage_path(root, model)) != w1
    # the files of d2 replaced by those of d1 in place: the same folder, other content
    for p in d1.iterdir():
        (d2 / p.name).write_bytes(p.read_bytes())
    assert _ran(_run(root, [t], Runtime(data_dir=str(d2)))) == {"model", "total"}
    assert _weights(stage_path(root, model)) == w1  # the same data, the same weights


def test_pipeline_perms_record_their_models_and_are_checked(tmp_path, monkeypatch):
    """A match stage's perms.json names the models it aligned; reading it for other models fails."""
    from lmckit.pipeline.tasks import MatchStage

    monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
    a = train_stage("tiny", {"model": "mlp_tiny", "dataset": "synthetic", "seed": 0, "epochs": 1})
    b = train_stage("tiny", {"model": "mlp_tiny", "dataset": "synthetic", "seed": 1, "epochs": 1})
    c = train_stage("tiny", {"model": "mlp_tiny", "dataset": "synthetic", "seed": 2, "epochs": 1})
    m = MatchStage(a, b, "weight", 0, (("max_iter", 5),))
    _run(tmp_path, [m])
    perms = json.loads((stage_path(tmp_path, m) / "perms.json").read_text())
    assert perms["model_a_sha256"].startswith("sha256:") and perms["model_b_sha256"] != perms["model_a_sha256"]
    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.perm import spec_for
    from lmckit.pipeline.tasks import load_stage_perms

    sd_a, info = load_checkpoint(stage_path(tmp_path, a) / "model.safetensors")
    sd_b, _ = load_checkpoint(stage_path(tmp_path, b) / "model.safetensors")
    spec = spec_for(build_model(info["model"], sd_a, "a"))
    assert load_stage_perms(stage_path(tmp_path, m) / "perms.json", spec, sd_a, sd_b)
    _run(tmp_path, [c])
    sd_c, _ = load_checkpoint(stage_path(tmp_path, c) / "model.safetensors")
    with pytest.raises(LmcError, match="perms.json was computed for other models"):
        load_stage_perms(stage_path(tmp_path, m) / "perms.json", spec, sd_a, sd_c)


def test_a_run_waiting_on_a_lock_says_who_holds_it(tmp_path):
    lock = tmp_path / ".locks" / "model-abc.lock"
    code = (
        "import sys, time\n"
        "from lmckit.store import file_lock\n"
        f"with file_lock({str(lock)!r}, owner='stage model/abc seed 0'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, "reproduce", "--recipe", "tiny"], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        who = lock_holder(lock)
        assert who.startswith(f"pid {holder.pid} (stage model/abc seed 0; ") and "reproduce --recipe tiny" in who
        busy = rf"another lmckit process is using the stage .*\(pid {holder.pid} \(stage model/abc"
        with pytest.raises(LmcError, match=busy):
            with file_lock(lock, wait=False, what="stage"):
                pass
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from lmckit.store import file_lock\n"
                f"with file_lock({str(lock)!r}, what='stage'):\n    print('got it')",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 0 and r.stdout.strip() == "got it"
        assert re.search(
            rf"waiting for the stage lock .*model-abc\.lock, held by pid {holder.pid} \(stage model/abc", r.stderr
        ), r.stderr
    finally:
        holder.wait(30)


def test_a_pipe_left_in_a_partial_folder_fails_the_stage_instead_of_blocking(tmp_path):
    """A FIFO named like the stage log in a .partial folder: the stage fails naming it (it would block forever)."""
    final = stage_path(tmp_path, Source())
    part = final.with_name(final.name + ".partial")
    part.mkdir(parents=True)
    os.mkfifo(part / "log.txt")
    with InProcessExecutor() as ex, pytest.raises(LmcError, match=r"log\.txt.*named pipe"):
        ex.run([Source()], tmp_path)
    assert stat_is_fifo(part / "log.txt")


def stat_is_fifo(p) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(p).st_mode)
