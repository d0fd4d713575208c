"""``lmckit reproduce``: recipe -> stage graph -> cached execution -> report folder.

Steps: read and validate the recipe (with ``--set`` overrides), check that
its dataset is findable (before any stage starts), build the stage graph,
take the report folder's lock (non-blocking: a second process on the same
``--out`` fails at once with a clear message), run the missing stages
(in process, or ``jobs`` at a time in a process pool), then aggregate every
stage's outputs into ``results.json``, figures, ``report.md`` and
``report.html``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import LmcError
from ..store import file_lock
from .build import Plan, build_plan, check_data
from .executor import PlanEntry, RunSummary, dry_run, make_executor
from .recipe import Recipe, load_recipe
from .stages import Runtime

__all__ = ["ReproduceResult", "reproduce", "prepare"]


@dataclass
class ReproduceResult:
    recipe: Recipe
    plan: Plan
    out: Path
    cache: Path
    entries: list[PlanEntry] = field(default_factory=list)  # the dry-run listing
    summary: RunSummary | None = None
    results: dict | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def prepare(recipe: str = "quick", sets: Sequence[str] = (), data_dir: str | None = None) -> tuple[Recipe, Plan]:
    """Load and validate the recipe, check its data is present, build its stage graph."""
    r = load_recipe(recipe, sets)
    check_data(r, data_dir)
    return r, build_plan(r)


def reproduce(
    recipe: str = "quick",
    out: str | os.PathLike | None = None,
    cache: str | os.PathLike = "runs",
    sets: Sequence[str] = (),
    jobs: int | None = 1,
    dry: bool = False,
    device: str = "auto",
    data_dir: str | None = None,
    executor: str = "local",
    address: str | None = None,
    resources=None,
) -> ReproduceResult:
    """Run (or, with ``dry``, list) every stage of a recipe and write its report.

    ``out`` defaults to ``reports/<recipe name>``; ``cache`` is the stage
    output root shared by all recipes (stages are keyed by content, so
    recipes that share a stage share its folder). ``executor="ray"`` runs
    the stages as Ray tasks on the cluster at ``address`` (None: a private
    local instance) with ``resources`` per stage kind
    (:class:`lmckit.pipeline.ray_executor.StageResources`); see
    :func:`lmckit.pipeline.executor.make_executor`.
    """
    from ..device import check_device_name, resolve_device
    from ..report import collect, timings, write_report

    t0 = time.time()
    try:
        load_at_start = os.getloadavg()
    except OSError:
        load_at_start = None
    r, plan = prepare(recipe, sets, data_dir)
    if out is not None:
        out_dir = Path(out)
    else:  # the recipe name is checked to be one safe path component; confine it to reports/ regardless
        out_dir = Path("reports") / r.name
        if (
            not out_dir.resolve().is_relative_to(Path("reports").resolve())
            or out_dir.resolve() == Path("reports").resolve()
        ):
            raise LmcError(
                f"recipe name {r.name!r} would place the report outside reports/",
                "set name to letters, digits, '-', '_' or '.', or pass --out",
            )
    cache = Path(cache)
    for what, path, flag in (("report folder", out_dir, "--out"), ("stage cache", cache, "--cache")):
        for p in (path, *path.parents):
            if p.exists() and not p.is_dir():
                raise LmcError(
                    f"the {what} {path} cannot be created: {p} is a file",
                    f"pass a folder path to {flag} (it is created if missing)",
                )
    res = ReproduceResult(r, plan, out_dir, cache)
    res.entries = dry_run(plan.targets(), cache)
    if dry:
        return res
    if executor == "ray":
        check_device_name(device)  # Ray workers may have a GPU this driver lacks: check the name only
    else:
        resolve_device(device)  # fail fast on a bad --device
    ex = make_executor(
        jobs, executor, address, resources
    )  # before the lock: checks jobs, and a missing Ray fails at once
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    lock = out_dir / ".lmckit.lock"
    lock_created = not lock.exists()
    try:
        with file_lock(lock, wait=False, what="report folder"):
            runtime = Runtime(device=device, data_dir=data_dir)
            with ex:
                res.summary = ex.run(plan.targets(), cache, runtime)
            res.results = collect(plan, cache)
            timing = dict(timings(plan, cache))
            timing.update(stage_costs(plan, cache, res.summary, time.time() - t0, load_at_start))
            res.files = write_report(res.results, out_dir, timing, cache=str(cache))
    except BaseException:  # a failed run removes the lock and report folders it created (the cache resumes)
        if lock_created and not (out_dir / "report.md").exists():
            lock.unlink(missing_ok=True)
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty
        raise
    res.seconds = time.time() - t0
    return res


def stage_costs(
    plan: Plan,
    cache: str | os.PathLike,
    summary: RunSummary | None,
    wall_seconds: float,
    load_at_start: tuple[float, float, float] | None = None,
) -> dict:
    """Cost of each stage kind, for ``timings.json``.

    Returns ``{"stages_by_kind": {kind: {"count", "ran", "cached", "seconds",
    "mean_seconds"}}, "wall_seconds", "conditions"}``: ``seconds`` is the
    compute time recorded in each stage folder's ``stage.json`` (the time of
    the run that made it, also for stages reused from the cache), ``ran`` and
    ``cached`` count this call's stages by outcome, ``wall_seconds`` is this
    call's time up to the report, and ``conditions`` the CPU count and load
    averages when it started and ended (timings on a shared machine depend on them).
    """
    import json

    from .executor import plan as order
    from .stages import stage_path

    kinds: dict[str, dict] = {}
    for s in order(plan.targets()):
        k = kinds.setdefault(s.KIND, {"count": 0, "ran": 0, "cached": 0, "seconds": 0.0})
        k["count"] += 1
        f = stage_path(Path(cache), s) / "stage.json"
        if f.exists():
            k["seconds"] += float(json.loads(f.read_text()).get("seconds", 0.0))
    for o in summary.outcomes if summary is not None else []:
        if o.kind in kinds and o.status in ("ran", "cached"):
            kinds[o.kind][o.status] += 1
    for k in kinds.values():
        k["mean_seconds"] = k["seconds"] / max(k["count"], 1)
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    return {
        "stages_by_kind": kinds,
        "wall_seconds": wall_seconds,
        "conditions": {"cpus": os.cpu_count(), "load_average_start": load_at_start, "load_average_end": load_end},
    }
