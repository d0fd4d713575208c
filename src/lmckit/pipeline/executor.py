"""Executors: run a graph of stages in dependency order, in process or in a process pool.

The graph's order (:func:`plan`, :func:`dry_run`) and the scheduling loop
every executor shares (:class:`Executor`: it starts every stage whose inputs
are done, up to ``jobs`` at a time) are in :mod:`lmckit.pipeline.scheduler`
and importable from here; this module holds the executors that run stages on
this machine and :func:`make_executor`, which picks one (or
:class:`lmckit.pipeline.ray_executor.RayExecutor`, which wraps
``ray.remote(run_stage).remote(...).future()``). An executor whose submitted
stages may wait in a queue of its own reports how many have really started
through :meth:`~lmckit.pipeline.scheduler.Executor.running_count` (progress shows
done/running/queued).

Stages talk only through their folders under the output root, so any
executor whose workers see that folder can run them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

from ..errors import LmcError
from .ray_executor import RayExecutor, require_ray
from .scheduler import (  # noqa: F401  (plan, PlanEntry, dry_run, RunSummary: importable from here as before)
    Executor,
    PlanEntry,
    RunSummary,
    dry_run,
    plan,
)
from .stages import (
    STAGE_THREADS,
    Runtime,
    Stage,
    StageOutcome,
    run_stage,
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
        require_ray()
        return RayExecutor(address=address, jobs=jobs, resources=resources)
    if executor != "local":
        raise LmcError(f"unknown executor {executor!r}", f"choose one of {', '.join(EXECUTORS)}")
    if address is not None or resources is not None:
        raise LmcError("--address and --ray-resources need --executor ray")
    return InProcessExecutor() if jobs in (None, 1) else ProcessPoolExecutor(jobs)
