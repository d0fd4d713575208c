"""The stage framework: hashing, caching, resume after a kill, executors, dry runs."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmckit.errors import LmcError
from lmckit.pipeline import (
    InProcessExecutor,
    ProcessPoolExecutor,
    Stage,
    dry_run,
    plan,
    resolved_config,
    stage_hash,
    stage_path,
)
from lmckit.pipeline.stages import critical_path, dependencies, read_output, run_stage
from lmckit.store import atomic_write_json, is_complete


@dataclass(frozen=True)
class Source(Stage):
    KIND = "source"
    value: int = 1
    scale: float = 1.0

    def run(self, ctx):
        print(f"making {self.value}")
        atomic_write_json(ctx.dir / "result.json", {"x": self.value * self.scale, "pid": os.getpid()})


@dataclass(frozen=True)
class Add(Stage):
    KIND = "add"
    a: Source = Source()
    b: Source = Source(2)
    sleep: float = 0.0

    def run(self, ctx):
        time.sleep(self.sleep)
        xa = json.loads((ctx.input(self.a) / "result.json").read_text())["x"]
        xb = json.loads((ctx.input(self.b) / "result.json").read_text())["x"]
        atomic_write_json(ctx.dir / "result.json", {"x": xa + xb, "pid": os.getpid(), "t": time.time()})


@dataclass(frozen=True)
class Total(Stage):
    KIND = "total"
    parts: tuple[Add, ...] = ()

    def run(self, ctx):
        xs = [json.loads((ctx.input(p) / "result.json").read_text())["x"] for p in self.parts]
        atomic_write_json(ctx.dir / "result.json", {"x": sum(xs)})


@dataclass(frozen=True)
class Bad(Stage):
    KIND = "bad"
    user: bool = True

    def run(self, ctx):
        if self.user:
            raise LmcError("setting bad.user is wrong", "set it right")
        raise ValueError("a bug")


@dataclass(frozen=True)
class Resumable(Stage):
    """Writes one file per step and skips steps already present; blocks at ``block_at`` when told to."""

    KIND = "resumable"
    steps: int = 4
    block_at: int = -1
    flag: str = ""  # a file whose presence makes it block (runtime-only trick for the kill test)

    def run(self, ctx):
        for i in range(self.steps):
            f = ctx.dir / f"step{i}.json"
            if f.exists():
                print(f"step {i} resumed")
                continue
            if i == self.block_at and self.flag and Path(self.flag).exists():
                Path(self.flag).write_text("blocked")
                time.sleep(60)
            atomic_write_json(f, {"i": i, "pid": os.getpid()})
        atomic_write_json(ctx.dir / "result.json", {"steps": self.steps})


def test_hash_covers_every_field_and_upstream():
    a = Add()
    assert stage_hash(a) == stage_hash(Add(Source(1), Source(2)))
    assert stage_hash(a) != stage_hash(Add(Source(1), Source(3)))  # upstream change
    assert stage_hash(a) != stage_hash(Add(sleep=0.5))  # own field
    assert stage_hash(Source(1, 1.0)) != stage_hash(Source(1, 2.0))
    cfg = resolved_config(a)
    assert cfg["kind"] == "add" and cfg["params"]["a"] == {"stage": "source", "hash": stage_hash(Source(1))}
    assert dependencies(a) == [Source(1), Source(2)]
    assert dependencies(Add(Source(5), Source(5))) == [Source(5)]


def test_pinned_hashes():
    # A changed default, field or store schema changes these: update the pins knowingly (old results won't be reused).
    import hashlib

    text = '{"config":{"kind":"source","params":{"scale":1.0,"value":1},"version":1},"schema":1}'
    assert stage_hash(Source()) == hashlib.sha256(text.encode()).hexdigest()[:16] == "6f1f584918ae1b6b"
    assert stage_hash(Add()) == "755e5e755085b169"


def test_specs_are_picklable_and_hashable():
    t = Total((Add(), Add(Source(3))))
    t2 = pickle.loads(pickle.dumps(t))
    assert t2 == t and hash(t2) == hash(t) and stage_hash(t2) == stage_hash(t)


def test_unhashable_values_are_rejected():
    @dataclass(frozen=True)
    class Listy(Stage):
        KIND = "listy"
        xs: object = None

    with pytest.raises(TypeError, match="lists or dicts"):
        resolved_config(Listy(xs={"a": 1}))


def test_plan_is_topological_and_deduplicated():
    t = Total((Add(), Add(Source(1), Source(3))))
    order = plan([t])
    assert order.count(Source(1)) == 1 and order[-1] == t
    for i, s in enumerate(order):
        for d in dependencies(s):
            assert order.index(d) < i


def test_run_caches_and_skips(tmp_path):
    t = Total((Add(), Add(Source(1), Source(3))))
    ex = InProcessExecutor()
    first = ex.run([t], tmp_path)
    assert len(first.ran) == 6 and not first.cached
    assert read_output(tmp_path, t)["x"] == 1 + 2 + 1 + 3
    folder = stage_path(tmp_path, t)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["hash"] == folder.name and cfg["params"]["parts"][0]["path"] == f"add/{stage_hash(Add())}"
    assert "making 1" in (stage_path(tmp_path, Source(1)) / "log.txt").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    second = ex.run([t], tmp_path)
    assert not second.ran and len(second.cached) == 6
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    # change one leaf: only it and its downstream rerun
    t3 = Total((Add(), Add(Source(1), Source(4))))
    third = ex.run([t3], tmp_path)
    assert sorted(o.kind for o in third.ran) == ["add", "source", "total"]
    entries = dry_run([Total((Add(), Add(Source(1), Source(5))))], tmp_path)
    assert [(e.spec.KIND, e.cached) for e in entries] == [
        ("source", True),
        ("source", True),
        ("add", True),
        ("source", False),
        ("add", False),
        ("total", False),
    ]


def test_failures_are_reported_and_leave_nothing_complete(tmp_path):
    ex = InProcessExecutor()
    with pytest.raises(LmcError, match="setting bad.user is wrong") as ei:
        ex.run([Bad()], tmp_path)
    assert ei.value.hint == "set it right" and "log.txt" in ei.value.message
    assert not is_complete(stage_path(tmp_path, Bad()))
    with pytest.raises(RuntimeError, match="ValueError: a bug"):
        ex.run([Bad(user=False)], tmp_path)
    assert "Traceback" in (tmp_path / "bad" / f"{stage_hash(Bad(user=False))}.partial" / "log.txt").read_text()


def test_killed_stage_resumes(tmp_path):
    flag = tmp_path / "flag"
    flag.write_text("")
    spec = Resumable(steps=4, block_at=2, flag=str(flag))
    code = (
        "import tests.test_pipeline as t; from lmckit.pipeline.stages import run_stage;"
        "run_stage(t.Resumable(steps=4, block_at=2, flag=%r), %r)"
    ) % (str(flag), str(tmp_path))
    # `python -c` puts its working folder first on sys.path: the repository root, where the tests package is
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, cwd=repo)
    try:
        deadline = time.time() + 60
        while flag.read_text() != "blocked":
            assert time.time() < deadline and proc.poll() is None, "stage never reached its blocking step"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    final = stage_path(tmp_path, spec)
    partial = final.with_name(final.name + ".partial")
    assert not final.exists() and (partial / "step1.json").exists() and not (partial / "step2.json").exists()
    flag.unlink()
    out = run_stage(spec, tmp_path)
    assert out.status == "ran" and is_complete(final)
    log = (final / "log.txt").read_text()
    assert "step 0 resumed" in log and "step 1 resumed" in log and "step 2 resumed" not in log
    pids = {json.loads((final / f"step{i}.json").read_text())["pid"] for i in range(4)}
    assert len(pids) == 2 and proc.pid in pids  # first two steps came from the killed run


def test_process_pool_runs_independent_stages_in_parallel(tmp_path):
    a1, a2 = Add(Source(10), Source(11), sleep=1.5), Add(Source(12), Source(13), sleep=1.5)
    with ProcessPoolExecutor(2) as ex:
        s = ex.run([Total((a1, a2))], tmp_path)
    assert len(s.ran) == 7
    r1, r2 = read_output(tmp_path, a1), read_output(tmp_path, a2)
    assert r1["pid"] != os.getpid() and r1["pid"] != r2["pid"]
    assert abs(r1["t"] - r2["t"]) < 1.4  # they slept at the same time
    assert read_output(tmp_path, Total((a1, a2)))["x"] == 46
    with ProcessPoolExecutor(2) as ex:
        with pytest.raises(LmcError, match="bad.user"):
            ex.run([Bad(), Source(99)], tmp_path)


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # Regression: a trained tiny model's checkpoint was refused as "a pickle" because the
    # little-endian header length began with byte 0x80 (pickle's protocol marker).
    import torch

    from lmckit.store import load_state, save_state

    for pad in range(300):
        path = save_state(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not craft the header length")
    state, meta = load_state(path)
    assert torch.equal(state["w"], torch.ones(2)) and meta["pad"] == "x" * pad


@dataclass(frozen=True)
class Costly(Stage):
    """A stage with a declared cost that records the order in which stages ran."""

    KIND = "costly"
    name: str = ""
    weight: float = 1.0
    after: tuple = ()
    log: str = ""

    def cost(self) -> float:
        return self.weight

    def run(self, ctx):
        with open(self.log, "a") as f:
            f.write(self.name + "\n")
        atomic_write_json(ctx.dir / "result.json", {"name": self.name})


def test_critical_path_is_cost_plus_the_costliest_waiting_chain():
    a = Costly("a", 1.0)
    b = Costly("b", 5.0, (a,))
    c = Costly("c", 2.0, (a,))
    d = Costly("d", 10.0, (c,))
    e = Costly("e", 0.5)
    order = plan([b, d, e])
    cp = critical_path(order)
    # by hand: d 10, c 2+10, b 5, a 1+max(5, 12) = 13, e 0.5
    assert cp == {d: 10.0, c: 12.0, b: 5.0, a: 13.0, e: 0.5}
    # only the stages given count (finished stages are left out by the scheduler)
    assert critical_path([c, d]) == {c: 12.0, d: 10.0}


def test_scheduler_starts_the_longest_chain_first(tmp_path):
    """In plan order the cheap independent stage would run first; by critical path it runs last."""
    log = str(tmp_path / "order.txt")
    cheap = Costly("cheap", 1.0, log=log)
    head = Costly("head", 1.0, log=log)
    tail = Costly("tail", 50.0, (head,), log=log)
    order = plan([cheap, tail])
    assert order.index(cheap) < order.index(head)  # plan order puts the cheap stage first
    InProcessExecutor().run([cheap, tail], tmp_path / "root")
    assert (tmp_path / "order.txt").read_text().split() == ["head", "tail", "cheap"]


def test_pipeline_stage_costs_rank_ste_over_weight_matching():
    """The cost hints of the quick recipe's stages: an STE match outranks training, which outranks WM."""
    from lmckit.pipeline.tasks import MatchStage, train_stage

    a = train_stage("mlp-fmnist", {"seed": 0})
    b = train_stage("mlp-fmnist", {"seed": 1})
    ste = MatchStage(a, b, "ste", 0, (("epochs", 3),))
    wm = MatchStage(a, b, "weight", 0, ())
    assert ste.cost() == 90.0 and wm.cost() == 1.0 and a.cost() == 25.0 and a.cost() < ste.cost()
    assert MatchStage(a, b, "ste", 0, (("epochs", -1),)).cost() == 1.0  # bad options: the run says why
