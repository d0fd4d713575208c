"""Executors: run a graph of stages in dependency order, in process or in a process pool.

The graph is implicit in the specs (see :func:`lmckit.pipeline.stages.dependencies`).
:func:`plan` flattens the targets into a topologically ordered list without
duplicates. An :class:`Executor` subclass only decides *where* one stage runs:
it implements :meth:`Executor._submit`, returning a
:class:`concurrent.futures.Future` of a :class:`StageOutcome`; the shared
scheduling loop in :meth:`Executor.run` starts every stage whose inputs are
done, up to ``jobs`` at a time, and drives one overall progress display.
:class:`lmckit.pipeline.ray_executor.RayExecutor` wraps
``ray.remote(run_stage).remote(...).future()``; an executor whose submitted
stages may wait in a queue of its own reports how many have really started
through :meth:`Executor.running_count` (progress shows done/running/queued).

Stages talk only through their folders under the output root, so any
executor whose workers see that folder can run them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import LmcError
from ..progress import Progress
from .stages import (
    STAGE_THREADS,
    Runtime,
    Stage,
    StageOutcome,
    critical_path,
    dependencies,
    is_cached,
    run_stage,
    stage_label,
    stage_path,
)

__all__ = [
    "plan",
    "PlanEntry",
    "dry_run",
    "RunSummary",
    "Executor",
    "InProcessExecutor",
    "ProcessPoolExecutor",
    "make_executor",
]


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


class InProcessExecutor(Executor):
    """Runs stages one after another in this process (the default for ``--jobs 1``)."""

    jobs = 1

    def _submit(self, spec: Stage, root: Path, runtime: Runtime) -> "cf.Future[StageOutcome]":
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(run_stage(spec, root, runtime))
        except BaseException as e:  # noqa: BLE001 - handed to the scheduler
            if isinstance(e, KeyboardInterrupt):
                raise
            fut.set_exception(e)
        return fut


def _worker_init(threads: int | None, parent: int | None = None) -> None:
    _tie_to_parent(parent)
    os.environ.setdefault("LMCKIT_NO_PROGRESS", "0")
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- ending workers with the main process
def _tie_to_parent(parent: int | None) -> None:
    """In a worker: leave SIGINT to the main process, and die with it (Linux ``PR_SET_PDEATHSIG``).

    Ctrl-C reaches the whole process group; the main process then ends the workers itself
    (:func:`end_processes`), so a worker never dies half-way through writing a result on its own.
    If the main process dies without that chance (SIGKILL), the kernel sends each worker SIGTERM.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is None:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the main process still ends its workers on a signal
        return
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def end_processes(procs: Sequence, grace: float = 5.0) -> None:
    """SIGTERM each process, wait up to ``grace`` seconds in all, SIGKILL the rest, reap them all."""
    import time

    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.kill()
            p.join(5.0)


class ProcessPoolExecutor(Executor):
    """Runs up to ``jobs`` independent stages at once in spawned worker processes.

    Each stage runs with :data:`~lmckit.pipeline.stages.STAGE_THREADS` torch threads (as in process and in
    Ray tasks, so ``--jobs`` never changes a result) unless the runtime names a count. Workers are spawned
    (not forked) so no torch or OpenMP state is inherited.
    """

    def __init__(self, jobs: int):
        if jobs < 1:
            raise LmcError(f"--jobs must be at least 1 (got {jobs})")
        self.jobs = jobs
        self._pool: cf.ProcessPoolExecutor | None = None
        self._threads: int | None = None

    def _ensure(self, runtime: Runtime) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._threads = runtime.threads or STAGE_THREADS
            self._pool = cf.ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self._threads, os.getpid()),
            )
        return self._pool

    def _submit(self, spec: Stage, root: Path, runtime: Runtime) -> "cf.Future[StageOutcome]":
        pool = self._ensure(runtime)
        rt = runtime if runtime.threads else dataclasses.replace(runtime, threads=self._threads)
        return pool.submit(run_stage, spec, root, rt)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def terminate(self) -> None:
        """End the workers now (their stages stay ``.partial`` and resume on the next run)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        end_processes(list((getattr(pool, "_processes", None) or {}).values()))
        pool.shutdown(wait=False, cancel_futures=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        # a signal (KeyboardInterrupt, lmckit.cli.Terminated) or exit must not wait for running stages
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate()
        else:
            self.close()


EXECUTORS = ("local", "ray")


def make_executor(
    jobs: int | None = 1, executor: str = "local", address: str | None = None, resources=None
) -> Executor:
    """The executor of a run.

    ``executor="local"``: ``jobs`` 1 (or None) runs in process, more in a
    local process pool. ``executor="ray"``: Ray tasks
    (:class:`lmckit.pipeline.ray_executor.RayExecutor`) on the cluster at
    ``address`` (None: a private local instance), at most ``jobs`` in flight
    (None: as many as the cluster's resources allow), ``resources`` per stage
    kind (:class:`~lmckit.pipeline.ray_executor.StageResources`).
    """
    if jobs is not None and jobs < 1:
        raise LmcError(f"--jobs must be at least 1 (got {jobs})")
    if executor == "ray":
        from .ray_executor import RayExecutor, require_ray

        require_ray()
        return RayExecutor(address=address, jobs=jobs, resources=resources)
    if executor != "local":
        raise LmcError(f"unknown executor {executor!r}", f"choose one of {', '.join(EXECUTORS)}")
    if address is not None or resources is not None:
        raise LmcError("--address and --ray-resources need --executor ray")
    return InProcessExecutor() if jobs in (None, 1) else ProcessPoolExecutor(jobs)
