"""The stage graph's order and the scheduling loop every executor shares.

The graph is implicit in the specs (see :func:`lmckit.pipeline.stages.dependencies`).
:func:`plan` flattens the targets into a topologically ordered list without
duplicates; :func:`dry_run` says which stages a run would compute. An
:class:`Executor` subclass only decides *where* one stage runs: it implements
:meth:`Executor._submit`, returning a :class:`concurrent.futures.Future` of a
:class:`~lmckit.pipeline.stages.StageOutcome`; the shared scheduling loop in
:meth:`Executor.run` starts every stage whose inputs are done, up to ``jobs``
at a time, and drives one overall progress display. The executors themselves
are in :mod:`lmckit.pipeline.executor` (in process, a process pool) and
:mod:`lmckit.pipeline.ray_executor` (Ray tasks): both build on this module.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import LmcError
from ..progress import Progress
from .stages import (
    Runtime,
    Stage,
    StageOutcome,
    critical_path,
    dependencies,
    is_cached,
    stage_label,
    stage_path,
)

__all__ = ["plan", "PlanEntry", "dry_run", "RunSummary", "Executor"]


def plan(targets: Iterable[Stage]) -> list[Stage]:
    """All stages needed for ``targets``, each once, every stage after its inputs."""
    order: list[Stage] = []
    seen: set[Stage] = set()
    visiting: set[Stage] = set()

    def visit(s: Stage) -> None:
        if s in seen:
            return
        if s in visiting:  # impossible with frozen specs, but cheap to check
            raise ValueError(f"dependency cycle through {stage_label(s)}")
        visiting.add(s)
        for d in dependencies(s):
            visit(d)
        visiting.discard(s)
        seen.add(s)
        order.append(s)

    for t in targets:
        visit(t)
    return order


@dataclass(frozen=True)
class PlanEntry:
    spec: Stage
    path: Path
    cached: bool


def dry_run(targets: Iterable[Stage], root: str | os.PathLike, runtime: Runtime | None = None) -> list[PlanEntry]:
    """Every stage of the plan with its folder and whether it is cached: complete, trusted
    (:func:`~lmckit.pipeline.stages.cache_problem`, with ``runtime``'s data folder) and reading only cached
    stages."""
    entries: list[PlanEntry] = []
    stale: set[Stage] = set()
    for s in plan(targets):  # a stage reading one that must run cannot be counted as cached yet
        ok = not any(d in stale for d in dependencies(s)) and is_cached(root, s, runtime)
        if not ok:
            stale.add(s)
        entries.append(PlanEntry(s, stage_path(root, s), ok))
    return entries


@dataclass
class RunSummary:
    outcomes: list[StageOutcome] = field(default_factory=list)

    @property
    def ran(self) -> list[StageOutcome]:
        return [o for o in self.outcomes if o.status == "ran"]

    @property
    def cached(self) -> list[StageOutcome]:
        return [o for o in self.outcomes if o.status == "cached"]

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class Executor:
    """Base executor: dependency-ordered scheduling over :meth:`_submit`.

    Attributes
    ----------
    jobs:
        Most stages in flight at once.
    """

    jobs: int = 1
    #: Seconds between progress refreshes while nothing finishes (None: refresh on completions only).
    poll_seconds: float | None = None

    def running_count(self) -> int | None:
        """Stages in flight that have started (None: every stage in flight is running)."""
        return None

    def _submit(self, spec: Stage, root: Path, runtime: Runtime) -> "cf.Future[StageOutcome]":
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        targets: Sequence[Stage],
        root: str | os.PathLike,
        runtime: Runtime | None = None,
        on_done: Callable[[StageOutcome], None] | None = None,
    ) -> RunSummary:
        """Run everything ``targets`` need; complete stages are skipped without starting a worker.

        The first failure stops new submissions; stages already running
        finish, then :class:`LmcError` (for user errors) or ``RuntimeError``
        (for bugs, with the worker's traceback) is raised naming the stage
        and its log file.
        """
        runtime = runtime or Runtime()
        root = Path(root)
        order = plan(targets)
        summary = RunSummary()
        todo: list[Stage] = []
        for s in order:  # in plan order: a stage whose input will run is not reused before that input is known
            if not any(d in todo for d in dependencies(s)) and is_cached(root, s, runtime):
                summary.outcomes.append(StageOutcome(s.KIND, stage_path(root, s).name, stage_label(s), "cached"))
            else:
                todo.append(s)
        if not todo:
            return summary
        done: set[Stage] = {s for s in order if s not in todo}
        priority = critical_path(todo)  # longest remaining chain first, ties in plan order (never changes a result)
        pending = sorted(todo, key=lambda s: -priority[s])
        running: dict[cf.Future, Stage] = {}
        failure: StageOutcome | None = None
        with Progress(len(todo), "stages", every=0.0, unit="stage") as bar:
            last_state = None

            def state() -> dict[str, int]:
                started = self.running_count()
                started = len(running) if started is None else min(started, len(running))
                return {
                    "done": len(todo) - len(pending) - len(running),
                    "running": started,
                    "queued": len(pending) + len(running) - started,
                }

            while (pending and failure is None) or running:
                if failure is None:
                    for s in list(pending):
                        if len(running) >= max(1, self.jobs):
                            break
                        if all(d in done for d in dependencies(s)):
                            pending.remove(s)
                            bar.write(f"[lmckit] start {stage_label(s)}")
                            running[self._submit(s, root, runtime)] = s
                if not running:  # nothing runnable: cannot happen for a valid plan
                    raise RuntimeError("pipeline scheduler stalled")
                finished, _ = cf.wait(list(running), timeout=self.poll_seconds, return_when=cf.FIRST_COMPLETED)
                if not finished:
                    st = state()
                    if st != last_state:
                        last_state = st
                        bar.write("[lmckit] stages: " + ", ".join(f"{v} {k}" for k, v in st.items()))
                    continue
                for fut in finished:
                    s = running.pop(fut)
                    try:
                        out = fut.result()
                    except LmcError as e:  # raised around the stage (its lock, its folder): the user's paths
                        out = StageOutcome(
                            s.KIND, stage_path(root, s).name, stage_label(s), "failed", 0.0, e.message, e.hint, True
                        )
                    except Exception as e:  # the worker itself died
                        out = StageOutcome(
                            s.KIND,
                            stage_path(root, s).name,
                            stage_label(s),
                            "failed",
                            error=f"worker crashed: {type(e).__name__}: {e}",
                        )
                    summary.outcomes.append(out)
                    if on_done is not None:
                        on_done(out)
                    if out.status == "failed":
                        failure = failure or out
                        bar.write(f"[lmckit] FAILED {out.label}")
                    else:
                        done.add(s)
                        bar.update(1, last=f"{out.label.split()[0]} {out.seconds:.1f}s", **state())
                        bar.write(f"[lmckit] {out.status} {out.label} ({out.seconds:.1f}s)")
        if failure is not None:
            where = f" (log: {failure.log})" if failure.log else ""
            if failure.user_error:
                raise LmcError(f"stage {failure.label} failed: {failure.error}{where}", failure.hint)
            raise RuntimeError(f"stage {failure.label} failed{where}: {failure.error}")
        return summary
