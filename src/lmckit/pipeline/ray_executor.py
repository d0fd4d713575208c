"""Run pipeline stages as Ray tasks (``lmckit reproduce --executor ray``).

Ray (https://docs.ray.io) is an optional dependency: ``pip install 'lmckit[ray]'``.
:class:`RayExecutor` plugs into the scheduling loop of
:class:`lmckit.pipeline.scheduler.Executor` through ``_submit``: each stage whose
inputs are finished becomes one Ray task, placed by Ray on whichever node has
the CPUs/GPUs its stage kind asks for. Stages talk only through their folders
under the output root, so the only requirement on the cluster is that every
worker sees that root at the same path (a shared filesystem); :func:`check_shared_root`
verifies it before any stage starts (the driver writes a random token, one
task per node reads it back).

Guarantees (the same as the in-process executor)
------------------------------------------------
* A stage is :func:`lmckit.pipeline.stages.run_stage` executed in a Ray
  worker: same hashed folders, same per-stage ``flock`` (two runs sharing a
  root never compute one stage twice), same ``.partial`` life cycle. The
  report is written by the driver from the stage folders, so ``results.json``
  is byte-identical to an in-process run whenever each stage computes the
  same numbers, which it does: every executor runs a stage with
  :data:`~lmckit.pipeline.stages.STAGE_THREADS` torch threads.
* A worker process killed in the middle of a stage: Ray retries the task
  (``max_retries``); the retry takes the released lock and resumes in the
  ``.partial`` folder (training resumes from its last epoch checkpoint).
* The driver killed: finished stages are complete folders; a rerun with any
  executor resumes from them.

What never enters a stage hash: the executor, the address, the resources
(:class:`StageResources`), retries, thread counts.

Local instance
--------------
Without an address lmckit starts a private Ray instance for the run and
shuts it down afterwards. It listens on 127.0.0.1 only (the node address is
forced to the loopback interface), has no dashboard, and sends workers' output
to the stage logs rather than to the console.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmcError
from ..store import atomic_write_text, check_replaceable
from .scheduler import Executor
from .stages import Runtime, Stage, StageOutcome, run_stage, stage_hash, stage_label, stage_path

__all__ = [
    "RayExecutor",
    "StageResources",
    "ray_available",
    "require_ray",
    "check_shared_root",
    "parse_resources",
    "RAY_INSTALL_HINT",
    "MARKER_DIR",
    "check_token_answers",
]

RAY_INSTALL_HINT = "install the optional extra: pip install 'lmckit[ray]' (or pip install ray)"
#: Folder under the output root holding the per-run start markers and filesystem tokens.
MARKER_DIR = ".ray"
#: Stage kinds that may ask for resources; ``ste`` is a match (or three-model) stage whose method is STE.
KINDS = ("model", "match", "ste", "barrier", "analysis", "three", "symmetry")
# Environment passed to every worker (a remote cluster does not inherit the driver's environment).
_FORWARD_ENV = (
    "LMCKIT_DATA",
    "LMCKIT_DATA_MIRROR",
    "LMCKIT_NO_PROGRESS",
    "LMCKIT_TF32",
    "LMCKIT_CHANNELS_LAST",
    "PYTHONHASHSEED",
)


# Off, Ray falls back to the loopback address for its node and binds its servers there (read by
# ray.init and by the processes it spawns).
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_available() -> bool:
    """Whether ``import ray`` works here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def require_ray():
    """Import and return the ``ray`` module, or raise :class:`LmcError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LmcError("--executor ray needs the Ray package, which is not installed", RAY_INSTALL_HINT) from None
    return ray


# --------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class StageResources:
    """CPUs and GPUs one Ray task asks for, per stage kind (run-time only, never hashed).

    Parameters
    ----------
    cpus:
        ``(kind, cpus)`` pairs; kinds missing here ask for ``default_cpus``.
        They are reserved for the task; its torch thread count stays
        :data:`~lmckit.pipeline.stages.STAGE_THREADS` (as in process), so where a
        stage ran never changes its result.
    gpus:
        ``(kind, gpus)`` pairs (fractions allowed: 0.5 lets two such stages
        share a GPU); kinds missing here ask for :meth:`gpu_default`.
    default_cpus:
        CPUs of kinds not listed in ``cpus``.

    Notes
    -----
    Kinds are the stage folder names ``model``, ``match``, ``barrier``,
    ``analysis``, ``three``, plus ``ste`` for match and three-model stages
    that run the straight-through estimator (they train, so they want a GPU
    like ``model``).
    """

    cpus: tuple = ()
    gpus: tuple = ()
    default_cpus: float = 1.0

    def kind_of(self, spec: Stage) -> str:
        """The resource kind of a stage (``ste`` for STE matches, else its KIND)."""
        if getattr(spec, "method", None) == "ste" and spec.KIND in ("match", "three"):
            return "ste"
        return spec.KIND

    @staticmethod
    def gpu_default(kind: str, use_gpus: bool) -> float:
        """Default GPUs of a kind: 1 for training and STE, 0.5 for the rest, 0 without GPUs."""
        if not use_gpus:
            return 0.0
        return 1.0 if kind in ("model", "ste") else 0.5

    def for_stage(self, spec: Stage, use_gpus: bool) -> tuple[float, float]:
        """``(num_cpus, num_gpus)`` of the Ray task running ``spec``."""
        kind = self.kind_of(spec)
        cpus = dict(self.cpus).get(kind, dict(self.cpus).get(spec.KIND, self.default_cpus))
        gpus = dict(self.gpus).get(kind, dict(self.gpus).get(spec.KIND, self.gpu_default(kind, use_gpus)))
        return float(cpus), float(gpus)


def parse_resources(items: list[str] | tuple[str, ...] = (), default_cpus: float = 1.0) -> StageResources:
    """Parse ``KIND=cpu:N[,gpu:G]`` options (``--ray-resources``) into :class:`StageResources`.

    Examples: ``model=cpu:4,gpu:1``, ``analysis=cpu:2``, ``match=gpu:0``.

    Raises
    ------
    LmcError
        Unknown kind, unknown resource name, or a negative / non-numeric amount.
    """
    cpus: dict[str, float] = {}
    gpus: dict[str, float] = {}
    for item in items:
        kind, eq, rest = item.partition("=")
        kind = kind.strip()
        if not eq or kind not in KINDS:
            raise LmcError(
                f"bad --ray-resources {item!r}: expected KIND=cpu:N[,gpu:G] with KIND one of {', '.join(KINDS)}",
                "e.g. --ray-resources model=cpu:2,gpu:1",
            )
        for part in rest.split(","):
            name, colon, amount = part.strip().partition(":")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not colon or name not in ("cpu", "gpu") or not value >= 0 or value != value:
                raise LmcError(
                    f"bad --ray-resources {item!r}: {part!r} is not cpu:N or gpu:G with N, G >= 0",
                    "e.g. --ray-resources model=cpu:2,gpu:1",
                )
            (cpus if name == "cpu" else gpus)[kind] = value
    if not default_cpus > 0:
        raise LmcError(f"CPUs per stage must be positive, got {default_cpus}")
    return StageResources(tuple(sorted(cpus.items())), tuple(sorted(gpus.items())), float(default_cpus))


# --------------------------------------------------------------------------- tasks (run in Ray workers)
def _marker_path(marker_dir: str, spec: Stage) -> Path:
    return Path(marker_dir) / f"{spec.KIND}-{stage_hash(spec)}.started"


_ORPHAN_WATCH: list[threading.Thread] = []


def _exit_when_orphaned(interval: float = 1.0) -> None:
    """End this worker process when its parent (the raylet that started it) is gone.

    A Ray worker notices a dead raylet only at its next call into Ray, so a worker in the middle of
    a long stage would otherwise run on (and use a CPU) after the driver and its local Ray instance
    were killed. The stage's ``.partial`` folder is left for the next run to redo; nothing complete
    is touched. Started once per worker process.
    """
    if _ORPHAN_WATCH:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    t = threading.Thread(target=watch, name="lmckit-orphan-watch", daemon=True)
    t.start()
    _ORPHAN_WATCH.append(t)


def _ray_stage(spec: Stage, root: str, runtime: Runtime, marker_dir: str) -> StageOutcome:
    """The body of one Ray task: note the start (pid, host; one line per attempt), then :func:`run_stage`."""
    _exit_when_orphaned()
    mark = _marker_path(marker_dir, spec)
    try:
        check_replaceable(mark, "start marker")
        with open(mark, "a") as f:
            f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n")
    except (OSError, LmcError):  # progress display only; never fail a stage for it
        pass
    return run_stage(spec, root, runtime)


def _read_token(path: str) -> tuple[str, str | None]:
    """Read back the driver's token from a worker: ``(hostname, content or None)``."""
    try:
        return socket.gethostname(), Path(path).read_text()
    except OSError:
        return socket.gethostname(), None


def check_token_answers(root: Path, token: str, answers: list[tuple[str, str | None]]) -> None:
    """Raise :class:`LmcError` unless every ``(host, content read)`` answer is ``token``."""
    bad = [host for host, got in answers if got != token]
    if bad:
        raise LmcError(
            f"the output root {root} is not shared with the Ray node(s) {', '.join(sorted(set(bad)))}: "
            f"they cannot read the token the driver wrote there",
            "put --cache on a filesystem every node mounts at the same path (NFS, Lustre, ...); "
            "see docs/scaling.md for clusters without one",
        )
    if not answers:
        raise LmcError("the Ray cluster has no alive node to run stages", "check the cluster (ray status)")


def check_shared_root(ray, root: Path, timeout: float = 120.0) -> list[str]:
    """Check that every alive Ray node sees ``root`` (a shared filesystem); returns the node host names.

    The driver writes a random token under ``root/.ray/``; one zero-CPU task
    pinned to each alive node reads it back.

    Raises
    ------
    LmcError
        A node cannot read the token or reads other content (its ``root`` is
        another folder), or the check does not finish within ``timeout`` seconds.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tokdir = root / MARKER_DIR
    tokdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    path = tokdir / f"fs-check-{token}.token"
    atomic_write_text(path, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        reader = ray.remote(num_cpus=0, max_retries=1)(_read_token)
        refs = [
            reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(path)
            )
            for n in nodes
        ]
        try:
            answers = ray.get(refs, timeout=timeout)
        except Exception as e:  # GetTimeoutError, worker failures
            raise LmcError(
                f"could not check that the Ray workers see the output root {root}: {type(e).__name__}: {e}",
                "check that the cluster is healthy (ray status)",
            ) from None
        check_token_answers(root, token, answers)
        return [host for host, _ in answers]
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- executor
class RayExecutor(Executor):
    """Runs each stage as a Ray task (see the module docstring).

    Parameters
    ----------
    address:
        ``None``: start a private local Ray instance (127.0.0.1 only) and shut
        it down in :meth:`close`. ``"auto"`` or ``"HOST:PORT"``: connect to a
        running cluster (``ray start --head``); it is left running.
    jobs:
        Most stages in flight at once; ``None`` submits every ready stage and
        lets Ray queue them by resources.
    resources:
        CPUs/GPUs per stage kind (:class:`StageResources`).
    num_cpus, num_gpus:
        Size of the local instance (default: all CPUs, all visible GPUs);
        ignored when connecting to a cluster.
    max_retries:
        Retries of a task whose worker process died (the stage resumes).
    """

    def __init__(
        self,
        address: str | None = None,
        jobs: int | None = None,
        resources: StageResources | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        max_retries: int = 3,
        fs_timeout: float = 120.0,
    ):
        if jobs is not None and jobs < 1:
            raise LmcError(f"--jobs must be at least 1 (got {jobs})")
        if max_retries < 0:
            raise LmcError(f"max_retries must not be negative (got {max_retries})")
        self.address = address
        self.jobs = jobs if jobs is not None else 1_000_000
        self.resources = resources or StageResources()
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_retries = max_retries
        self.poll_seconds = 2.0
        self.fs_timeout = fs_timeout
        self._ray = None
        self._started = False  # whether this executor started (and must stop) the Ray instance
        self._remote = None
        self._root: Path | None = None
        self._markers: Path | None = None
        self._use_gpus = False
        self._total = (0.0, 0.0)
        self._in_flight: dict[cf.Future, Stage] = {}
        self.nodes: list[str] = []

    # ---- set-up
    def _connect(self, root: Path, runtime: Runtime) -> None:
        ray = require_ray()
        self._ray = ray
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        env.setdefault("LMCKIT_NO_PROGRESS", "1")  # progress lines would only go to the stage logs
        if self.address is None:
            # Loopback only: Ray binds its servers to the node address, which falls back to 127.0.0.1
            # when Ray's cluster mode is off (the variable is read when ray is first imported, and by
            # the processes ray.init spawns).
            import ray._private.ray_constants as rc

            if ray.is_initialized():
                raise LmcError(
                    "a Ray instance is already initialised in this process",
                    "pass its address (--address auto) or call ray.shutdown() first",
                )
            # Workers must import this lmckit: hand them the driver's module path.
            src = str(Path(__file__).resolve().parents[2])
            pp = os.environ.get("PYTHONPATH", "")
            env["PYTHONPATH"] = pp if src in pp.split(os.pathsep) else src + (os.pathsep + pp if pp else "")
            # Loopback only, no usage statistics sent anywhere, and workers at normal priority (Ray
            # renices workers to 15 by default, which starves the stages on a busy machine; the
            # stages are the whole job here) for the instance lmckit owns. Each can be overridden.
            set_env = {
                _CLUSTER_ENV: "0",
                "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
                "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
            }
            prev_env = {k: os.environ.get(k) for k in set_env}
            prev_flag = rc.ENABLE_RAY_CLUSTER
            os.environ.update(set_env)
            rc.ENABLE_RAY_CLUSTER = False
            try:
                ray.init(
                    num_cpus=self.num_cpus or os.cpu_count() or 1,
                    num_gpus=self.num_gpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level="ERROR",
                    runtime_env={"env_vars": env},
                )
            finally:
                rc.ENABLE_RAY_CLUSTER = prev_flag
                for k, v in prev_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            self._started = True
        else:
            try:
                ray.init(
                    address=self.address, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env}
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LmcError(
                    f"cannot connect to the Ray cluster at {self.address}: {e}",
                    "start it with 'ray start --head' (then --address auto), or omit --address for a local instance",
                ) from None
        total = ray.cluster_resources()
        dev = runtime.device
        gpus = float(total.get("GPU", 0))
        if dev.startswith("cuda") and gpus == 0:
            raise LmcError(f"--device {dev} but the Ray cluster has no GPUs", "use --device auto or cpu")
        self._use_gpus = dev.startswith("cuda") or (dev == "auto" and gpus > 0)
        self._root = root
        self.nodes = check_shared_root(ray, root, self.fs_timeout)
        self._markers = root / MARKER_DIR / f"run-{os.getpid()}-{secrets.token_hex(4)}"
        self._markers.mkdir(parents=True, exist_ok=True)
        self._remote = ray.remote(_ray_stage)
        self._total = (float(total.get("CPU", 0)), gpus)

    # ---- the executor seam
    def _submit(self, spec: Stage, root: Path, runtime: Runtime) -> "cf.Future[StageOutcome]":
        root = Path(root).resolve()
        if self._ray is None:
            self._connect(root, runtime)
        cpus, gpus = self.resources.for_stage(spec, self._use_gpus)
        if cpus > self._total[0] or gpus > self._total[1]:  # Ray would queue it forever
            kind = self.resources.kind_of(spec)
            raise LmcError(
                f"{kind} stages ask for {cpus:g} CPU and {gpus:g} GPU but the Ray cluster has "
                f"{self._total[0]:g} CPU and {self._total[1]:g} GPU",
                f"lower --ray-resources {kind}=... or add nodes",
            )
        rt = runtime  # torch threads: STAGE_THREADS as in process (run_stage), whatever CPUs the task reserves
        if rt.data_dir:
            rt = dataclasses.replace(rt, data_dir=str(Path(rt.data_dir).resolve()))
        ref = self._remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,
            name=f"lmckit:{spec.KIND}",
        ).remote(spec, str(root), rt, str(self._markers))
        inner = ref.future()
        outer: cf.Future = cf.Future()
        log = str(stage_path(root, spec).with_name(stage_hash(spec) + ".partial") / "log.txt")

        def done(f: cf.Future, spec=spec) -> None:
            try:
                outer.set_result(f.result())
            except BaseException as e:  # noqa: BLE001 - the task failed beyond its retries
                outer.set_result(
                    StageOutcome(
                        spec.KIND,
                        stage_hash(spec),
                        stage_label(spec),
                        "failed",
                        error=f"Ray task failed after {self.max_retries} retries: "
                        f"{type(e).__name__}: {str(e).strip()[:2000]}",
                        log=log,
                    )
                )
            self._in_flight.pop(outer, None)

        self._in_flight[outer] = spec
        inner.add_done_callback(done)
        return outer

    def running_count(self) -> int:
        """How many submitted stages have started in a worker (the rest wait in Ray's queue)."""
        if self._markers is None:
            return 0
        return sum(_marker_path(str(self._markers), s).exists() for s in list(self._in_flight.values()))

    def attempts(self) -> dict[str, int]:
        """``{"kind/hash": starts}`` of this run's tasks (more than 1: a retried task)."""
        out: dict[str, int] = {}
        if self._markers is not None and self._markers.exists():
            for p in self._markers.glob("*.started"):
                kind, _, h = p.stem.partition("-")
                out[f"{kind}/{h}"] = len(p.read_text().splitlines())
        return out

    def close(self) -> None:
        if self._markers is not None:
            import shutil

            shutil.rmtree(self._markers, ignore_errors=True)
            self._markers = None
        if self._ray is not None:
            if self._ray.is_initialized():
                self._ray.shutdown()
            self._ray = None
