"""A stage's result is a function of its inputs alone, whatever executor runs it (issue 28).

The cause of the differences measured before (tiny recipe: in process with 2 torch threads vs ``--jobs 2``
with 1 thread per worker, naive barrier 0.29919141 vs 0.29919135): float32 reductions split their work by
thread. The one mechanism: :func:`lmckit.pipeline.stages.run_stage` sets ``STAGE_THREADS`` torch threads
for every stage, in process, in a process pool and in a Ray task (tests/test_ray_executor.py compares a Ray
run with an in-process one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from lmckit.pipeline.executor import InProcessExecutor, ProcessPoolExecutor
from lmckit.pipeline.stages import STAGE_THREADS, Stage, StageContext, stage_path


@dataclass(frozen=True)
class ThreadProbe(Stage):
    """Writes the torch thread count it ran with, and a float32 sum whose rounding depends on it."""

    KIND = "probe"
    n: int = 0

    def run(self, ctx: StageContext) -> None:
        g = torch.Generator().manual_seed(self.n)
        x = torch.randn(4096, 512, generator=g)
        (ctx.dir / "result.json").write_text(
            json.dumps({"threads": torch.get_num_threads(), "sum": float((x @ x.T).sum())})
        )


def _results(root, specs):
    return [json.loads((stage_path(root, s) / "result.json").read_text()) for s in specs]


def test_every_executor_runs_a_stage_with_the_same_thread_count(tmp_path):
    specs = [ThreadProbe(n) for n in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's own count must not reach the stage
    try:
        with InProcessExecutor() as ex:
            ex.run(specs, tmp_path / "a")
        assert torch.get_num_threads() == 2, "the caller's thread count was not restored"
    finally:
        torch.set_num_threads(before)
    with ProcessPoolExecutor(2) as ex:
        ex.run(specs, tmp_path / "b")
    a, b = _results(tmp_path / "a", specs), _results(tmp_path / "b", specs)
    assert [r["threads"] for r in a] == [STAGE_THREADS] * 3 == [r["threads"] for r in b]
    assert a == b  # the same sums to the last bit
    for root in ("a", "b"):
        for s in specs:
            rec = json.loads((stage_path(tmp_path / root, s) / "stage.json").read_text())
            assert rec["threads"] == STAGE_THREADS


@pytest.mark.slow
def test_tiny_jobs_1_and_jobs_2_give_byte_identical_results(tmp_path):
    """Two fresh caches, the whole tiny recipe in process and in a two-worker pool: the same results.json."""
    from lmckit.reproduce import reproduce

    reproduce("tiny", out=tmp_path / "r1", cache=tmp_path / "c1", jobs=1)
    reproduce("tiny", out=tmp_path / "r2", cache=tmp_path / "c2", jobs=2)
    assert (tmp_path / "r1" / "results.json").read_bytes() == (tmp_path / "r2" / "results.json").read_bytes()
