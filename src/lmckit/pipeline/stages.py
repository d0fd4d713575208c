"""Cached stages: frozen specs, hashed output folders, one function to run one stage.

A stage is a pure function of a frozen, hashable spec (a dataclass deriving
from :class:`Stage`) and of the output folders of the stages it reads. Stages
it reads are simply fields of the spec that hold other :class:`Stage`
instances (directly or inside tuples), so a spec *is* its dependency graph.

Addressing
----------
Every stage writes to ``ROOT/<KIND>/<hash>`` where::

    hash = config_hash({"kind": KIND, "version": VERSION,
                        "params": resolved fields, each dependency replaced
                                  by {"stage": its kind, "hash": its hash}})

(:func:`lmckit.store.config_hash` adds the store's schema version). Every
field takes part, defaults included, so changing a default changes the hash
and can never silently reuse an old result; changing an upstream stage
changes the hash of everything downstream of it. How a stage runs (device,
threads, data folder, progress) is in :class:`Runtime` and never enters the
hash.

Life cycle (:func:`run_stage`)
------------------------------
1. Complete folder present (``config.json`` inside, name not ``.partial``):
   nothing to do.
2. Otherwise take ``ROOT/.locks/<kind>-<hash>.lock`` (blocking, so two
   processes sharing a cache never compute the same stage twice), look
   again, then work inside ``<hash>.partial``. A killed run leaves the
   partial folder behind; the next run continues in it (stages may pick up
   files they find there, e.g. a training checkpoint) and nothing ever looks
   complete before :func:`lmckit.store.finalize_dir` renames it.
3. The stage's stdout/stderr (and its :class:`~lmckit.progress.Progress`
   lines) go to ``log.txt`` in the stage folder; ``stage.json`` records
   timing and provenance (kept out of ``config.json`` so the readable config
   stays a pure function of the spec).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from ..errors import LmcError
from ..store import atomic_write_json, config_hash, file_lock, finalize_dir, is_complete, partial_dir, read_json

__all__ = [
    "Stage",
    "Runtime",
    "STAGE_THREADS",
    "StageContext",
    "StageOutcome",
    "dependencies",
    "resolved_config",
    "stage_hash",
    "stage_path",
    "stage_label",
    "run_stage",
    "cache_problem",
    "is_cached",
    "folder_manifest",
    "readable_config",
]


@dataclass(frozen=True)
class Stage:
    """Base class of stage specs. Subclasses are ``@dataclass(frozen=True)``.

    Class attributes
    ----------------
    KIND:
        Folder name under the output root (``ROOT/KIND/<hash>``).
    VERSION:
        Bump it when the stage's code changes what it computes: the hash
        changes and old results are not reused.

    Fields may hold ``None``, ``bool``, ``int``, ``float``, ``str``, other
    stages, frozen dataclasses of those, and tuples of any of these. Mappings
    are stored as sorted tuples of ``(key, value)`` pairs so specs stay
    hashable and picklable.
    """

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def run(self, ctx: "StageContext") -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def label(self) -> str:
        """A short human-readable description (logs, dry runs)."""
        return self.KIND

    def cost(self) -> float:
        """A rough relative cost (about seconds on 2 CPU cores for the quick recipe's MLP), used only to
        order runnable stages (longest remaining chain first, :func:`critical_path`); never hashed,
        never changes a result."""
        return 1.0


def critical_path(stages: Sequence[Stage]) -> dict[Stage, float]:
    """For each stage, its :meth:`Stage.cost` plus the costliest chain of stages (among ``stages``)
    that wait on it: the scheduler starts the runnable stage with the largest value first, so long
    chains (training -> STE -> three-model stage) do not end the run alone on one worker.

    ``stages`` must be in topological order (as :func:`lmckit.pipeline.executor.plan` returns them).
    """
    among = set(stages)
    waiting: dict[Stage, list[Stage]] = {s: [] for s in stages}
    for s in stages:
        for d in dependencies(s):
            if d in among:
                waiting[d].append(s)
    out: dict[Stage, float] = {}
    for s in reversed(stages):
        out[s] = float(s.cost()) + max((out[w] for w in waiting[s]), default=0.0)
    return out


@dataclass(frozen=True)
class Runtime:
    """How to run, never what to compute (not hashed)."""

    device: str = "auto"
    data_dir: str | None = None
    threads: int | None = None  # torch intra-op threads inside a stage; None: STAGE_THREADS, in every executor


#: torch intra-op threads of every stage unless :attr:`Runtime.threads` names another count. Fixed, not
#: "the cores this process may use": float32 reductions (matmul, sums) split their work by thread and so round
#: differently with another count, and a stage's result must be a function of its inputs alone, the same in
#: process (``--jobs 1``), in a process pool (``--jobs 2``) and in a Ray task (measured on the tiny recipe:
#: 2 threads in process vs 1 per pool worker changed the naive barrier in its 7th digit, 1 vs 1 is
#: byte-identical). One thread is what ``--jobs auto`` (one stage per core) always used; the shipped results
#: in docs/results were computed with it.
STAGE_THREADS = 1


@dataclass(frozen=True)
class StageOutcome:
    kind: str
    hash: str
    label: str
    status: str  # "cached" | "ran" | "failed"
    seconds: float = 0.0
    error: str | None = None  # rendered message for failures
    hint: str | None = None
    user_error: bool = False  # an LmcError (bad input) rather than a bug
    log: str | None = None  # path of the stage log


# --------------------------------------------------------------------------- hashing
def _walk(value: Any) -> Iterator["Stage"]:
    if isinstance(value, Stage):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _walk(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))


def dependencies(spec: Stage) -> list[Stage]:
    """The stages ``spec`` reads (its direct inputs), in field order, without duplicates."""
    out: list[Stage] = []
    for f in dataclasses.fields(spec):
        for dep in _walk(getattr(spec, f.name)):
            if dep not in out:
                out.append(dep)
    return out


def _resolve(value: Any, where: str, deps_as: str) -> Any:
    if isinstance(value, Stage):
        if deps_as == "hash":
            return {"stage": value.KIND, "hash": stage_hash(value)}
        return {"stage": value.KIND, "hash": stage_hash(value), "path": f"{value.KIND}/{stage_hash(value)}"}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError(f"{where}: non-finite float {value!r} in a stage spec")
        return value
    if isinstance(value, (tuple, list)):
        return [_resolve(v, f"{where}[{i}]", deps_as) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _resolve(getattr(value, f.name), f"{where}.{f.name}", deps_as) for f in dataclasses.fields(value)
        }
    raise TypeError(
        f"{where}: {type(value).__name__} values cannot go into a stage spec (use tuples, not lists or dicts)"
    )


def resolved_config(spec: Stage) -> dict[str, Any]:
    """The hashed description of a stage: kind, version and every field (defaults included)."""
    if not spec.KIND:
        raise TypeError(f"{type(spec).__name__} has no KIND")
    params = {
        f.name: _resolve(getattr(spec, f.name), f"{type(spec).__name__}.{f.name}", "hash")
        for f in dataclasses.fields(spec)
    }
    return {"kind": spec.KIND, "version": spec.VERSION, "params": params}


@functools.lru_cache(maxsize=None)
def stage_hash(spec: Stage) -> str:
    """``config_hash(resolved_config(spec))``: the stage's folder name."""
    return config_hash(resolved_config(spec))


def readable_config(spec: Stage) -> dict[str, Any]:
    """What goes into ``config.json``: the resolved config plus each input's relative path."""
    params = {
        f.name: _resolve(getattr(spec, f.name), f"{type(spec).__name__}.{f.name}", "path")
        for f in dataclasses.fields(spec)
    }
    return {
        "kind": spec.KIND,
        "version": spec.VERSION,
        "hash": stage_hash(spec),
        "spec_class": f"{type(spec).__module__}.{type(spec).__qualname__}",
        "params": params,
    }


def stage_path(root: str | os.PathLike, spec: Stage) -> Path:
    """``ROOT/KIND/<hash>`` (it may not exist yet)."""
    return Path(root) / spec.KIND / stage_hash(spec)


def stage_label(spec: Stage) -> str:
    return f"{spec.KIND}/{stage_hash(spec)[:8]} {spec.label()}".rstrip()


# --------------------------------------------------------------------------- running
@dataclass
class StageContext:
    """What a running stage sees.

    ``dir`` is the working (``.partial``) folder it writes its outputs to;
    :meth:`input` gives the finished folder of a stage it reads. Nothing else
    is shared between stages: each reads its inputs from disk.
    """

    spec: Stage
    root: Path
    dir: Path
    runtime: Runtime = field(default_factory=Runtime)

    def input(self, dep: Stage) -> Path:
        path = stage_path(self.root, dep)
        if not is_complete(path):
            raise LmcError(
                f"stage {stage_label(self.spec)} needs {path}, which is not complete",
                "run the whole pipeline (lmckit reproduce) rather than a single stage",
            )
        return path

    @property
    def device(self):
        from ..device import resolve_device

        return resolve_device(self.runtime.device)

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _redirect_to(path: Path) -> Iterator[io.TextIOBase]:
    """Send this process's Python-level stdout/stderr to ``path`` (appending; a regular file only)."""
    from ..store import check_replaceable

    check_replaceable(path, "stage log")  # a pipe left in a .partial folder would block the stage forever
    with open(path, "a", buffering=1) as f:
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield f


def run_stage(spec: Stage, root: str | os.PathLike, runtime: Runtime | None = None) -> StageOutcome:
    """Run one stage unless its folder is complete; return what happened.

    Never raises for a failing stage: the outcome carries the error (so it
    can cross process boundaries) and the partial folder is kept for a
    resumed run. Inputs must already be complete.
    """
    runtime = runtime or Runtime()
    root = Path(root)
    h = stage_hash(spec)
    final = root / spec.KIND / h
    label = stage_label(spec)
    if is_complete(final) and cache_problem(root, spec, runtime) is None:
        return StageOutcome(spec.KIND, h, label, "cached", log=str(final / "log.txt"))
    lock = root / ".locks" / f"{spec.KIND}-{h}.lock"
    with file_lock(lock, wait=True, what="stage", owner=f"stage {label}"):
        if is_complete(final):  # another process finished it while we waited, or it is there but not trusted
            why = cache_problem(root, spec, runtime)
            if why is None:
                return StageOutcome(spec.KIND, h, label, "cached", log=str(final / "log.txt"))
            print(f"warning: cached stage {label} ({final}) is not used: {why}; recomputing it", file=sys.stderr)
            _discard(final)
        work = partial_dir(final)
        work.mkdir(parents=True, exist_ok=True)
        logf = work / "log.txt"
        t0, c0 = time.time(), time.process_time()
        prev_threads = None
        try:
            import torch

            prev_threads = torch.get_num_threads()
            torch.set_num_threads(runtime.threads or STAGE_THREADS)  # see STAGE_THREADS: same count everywhere
            with _redirect_to(logf) as log:
                print(f"== {label} started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})", file=log)
                try:
                    ctx = StageContext(spec, root, work, runtime)
                    for dep in dependencies(spec):
                        ctx.input(dep)
                    _loaded_data().clear()
                    spec.run(ctx)
                    data = {k: dict(v) for k, v in _loaded_data().items()}
                    where = _where(ctx)  # threads and device: float sums may round differently with others
                except LmcError as e:
                    print(f"== failed: {e.render()}", file=log)
                    return StageOutcome(
                        spec.KIND, h, label, "failed", time.time() - t0, e.message, e.hint, True, str(logf)
                    )
                except Exception as e:  # a bug: keep the traceback in the log and the outcome
                    tb = traceback.format_exc()
                    print(tb, file=log)
                    return StageOutcome(
                        spec.KIND,
                        h,
                        label,
                        "failed",
                        time.time() - t0,
                        f"{type(e).__name__}: {e}\n{tb}",
                        None,
                        False,
                        str(logf),
                    )
                seconds = time.time() - t0
                print(f"== finished in {seconds:.1f}s", file=log)
        finally:
            if prev_threads is not None:
                import torch

                torch.set_num_threads(prev_threads)
        atomic_write_json(
            work / "stage.json",
            {
                "seconds": seconds,
                "cpu_seconds": time.process_time() - c0,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "pid": os.getpid(),
                "lmckit": _version(),
                **where,
                # what cache_problem checks before the folder is reused: its files, its inputs, its data
                "files": folder_manifest(work),
                "inputs": _input_digests(root, spec),
                "data": data,
            },
        )
        # config.json last: its presence (outside .partial) marks the folder complete.
        atomic_write_json(work / "config.json", readable_config(spec))
        finalize_dir(work, final)
    return StageOutcome(spec.KIND, h, label, "ran", seconds, log=str(final / "log.txt"))


# --------------------------------------------------------------------------- what a cached folder is trusted for
#: files of a stage folder outside its manifest: the record holding the manifest, and the readable config
_UNLISTED = ("stage.json", "config.json")


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def folder_manifest(folder: str | os.PathLike) -> dict[str, list]:
    """``{relative path: [size in bytes, "sha256:..."]}`` of every regular file under a stage folder (but
    ``stage.json`` and ``config.json``): recorded in ``stage.json`` when the stage finishes."""
    folder = Path(folder)
    out: dict[str, list] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel in _UNLISTED or p.is_symlink() or not p.is_file():
            continue
        out[rel] = [p.stat().st_size, _file_digest(p)]
    return out


def _manifest_digest(files: dict) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _stage_record(folder: Path) -> dict | None:
    try:
        return read_json(folder / "stage.json", "stage record", expect=dict)
    except (LmcError, OSError):  # unreadable or not a record: the stage is not trusted (recomputed)
        return None


def _input_digests(root: Path, spec: Stage) -> dict[str, str]:
    """``{"kind/hash": digest of its manifest}`` of the stages ``spec`` read (those that record one)."""
    out = {}
    for dep in dependencies(spec):
        rec = _stage_record(stage_path(root, dep))
        if rec and isinstance(rec.get("files"), dict):
            out[f"{dep.KIND}/{stage_hash(dep)}"] = _manifest_digest(rec["files"])
    return out


def _loaded_data() -> dict:
    from ..data.registry import LOADED

    return LOADED


def _current_checksums(name: str, runtime: Runtime | None) -> dict[str, str] | None:
    """Checksums of dataset ``name`` as this run would read it (None: it cannot be read here)."""
    from ..data import load_dataset

    try:
        return dict(load_dataset(name, data_dir=(runtime or Runtime()).data_dir).checksums)
    except LmcError:
        return None


def cache_problem(root: str | os.PathLike, spec: Stage, runtime: Runtime | None = None) -> str | None:
    """Why the complete folder of ``spec`` must not be reused, or None when it may.

    Checked on every cache hit (:func:`is_cached`, :func:`run_stage`) against what ``stage.json`` recorded
    when the stage finished: every file's size and sha256 (a file edited, truncated or deleted by hand), the
    manifests of the input stages it read (an input recomputed since, with other content) and the checksums
    of the dataset files it read (another ``--data-dir``, or files replaced in place). Folders written by an
    lmckit that recorded none of this are trusted as before.
    """
    folder = stage_path(root, spec)
    rec = _stage_record(folder)
    if rec is None:
        return "its stage.json is missing or not valid JSON"
    files = rec.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return "its stage.json lists no valid file manifest"
    for rel, entry in sorted(files.items()):
        p = folder / rel
        try:
            size, digest = entry
            st = p.stat()
        except (OSError, ValueError, TypeError):
            return f"{rel} is missing"
        if st.st_size != size:
            return f"{rel} is {st.st_size} bytes but was {size} when written (edited or truncated)"
        if _file_digest(p) != digest:
            return f"{rel} was edited after it was written (its sha256 differs)"
    inputs = rec.get("inputs") or {}
    for key, digest in sorted(inputs.items()) if isinstance(inputs, dict) else ():
        kind, _, h = key.partition("/")
        dep_rec = _stage_record(Path(root) / kind / h)
        if dep_rec and isinstance(dep_rec.get("files"), dict) and _manifest_digest(dep_rec["files"]) != digest:
            return f"its input {key} was recomputed since, with other content"
    data = rec.get("data") or {}
    for name, sums in sorted(data.items()) if isinstance(data, dict) else ():
        now = _current_checksums(name, runtime)
        if now is not None and now != sums:
            return f"the files of dataset {name} differ from those it was computed on"
    return None


def is_cached(root: str | os.PathLike, spec: Stage, runtime: Runtime | None = None) -> bool:
    """The stage's folder is complete and may be reused (:func:`cache_problem` finds nothing)."""
    return is_complete(stage_path(root, spec)) and cache_problem(root, spec, runtime) is None


def _discard(final: Path) -> None:
    """Remove an untrusted complete folder (renamed first, so it never looks complete half-deleted)."""
    import shutil

    gone = final.with_name(f"{final.name}.stale-{os.getpid()}")
    os.replace(final, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _where(ctx: StageContext) -> dict[str, Any]:
    """How the stage ran, for its provenance: torch threads and device (not hashed: the thread count is
    :data:`STAGE_THREADS` in every executor unless a caller's :class:`Runtime` names another, and results can
    differ in the last digits between thread counts or devices)."""
    import torch

    return {"threads": torch.get_num_threads(), "device": str(ctx.device)}


def _version() -> str:
    from .. import __version__

    return __version__


def read_output(root: str | os.PathLike, spec: Stage, name: str = "result.json") -> Any:
    """Read a JSON output of a finished stage."""
    path = stage_path(root, spec) / name
    if not path.exists():
        raise LmcError(f"stage output {path} is missing", "rerun lmckit reproduce; the cache may have been edited")
    return read_json(path, "stage output")
