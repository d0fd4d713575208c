"""``lmckit reproduce``: recipe -> stage graph -> cached execution -> report folder.

Steps: read and validate the recipe (with ``--set`` overrides), check that
its dataset is findable (before any stage starts), build the stage graph
(:func:`lmckit.pipeline.reproduce.prepare`), take the report folder's lock
(non-blocking: a second process on the same ``--out`` fails at once with a
clear message), run the missing stages (in process, ``jobs`` at a time in a
process pool, or on Ray), then aggregate every stage's outputs into
``results.json``, figures, ``report.md`` and ``report.html`` (:mod:`lmckit.report`).

This driver sits above both ``pipeline`` and ``report`` in the layering
(``tests/test_layering.py``): it calls the two, and neither calls it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .device import check_device_name, resolve_device
from .errors import LmcError
from .pipeline.build import Plan
from .pipeline.executor import PlanEntry, RunSummary, dry_run, make_executor
from .pipeline.recipe import Recipe
from .pipeline.reproduce import prepare, stage_costs
from .pipeline.stages import Runtime
from .report import collect, timings, write_report
from .store import check_output_path, check_replaceable, file_kind, file_lock, real_path

#: the files every report folder gets (figures besides: the .png files)
REPORT_FILES = ("report.md", "report.html", "results.json", "timings.json", ".lmckit.lock")

__all__ = ["ReproduceResult", "reproduce"]


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
        real_out, reports = real_path(out_dir, "report folder"), real_path("reports", "report folder")
        if not real_out.is_relative_to(reports) or real_out == reports:
            raise LmcError(
                f"recipe name {r.name!r} would place the report outside reports/",
                "set name to letters, digits, '-', '_' or '.', or pass --out",
            )
    cache = Path(cache)
    for what, path, flag in (("report folder", out_dir, "--out"), ("stage cache", cache, "--cache")):
        for p in (path, *path.parents):
            if p.exists() and not p.is_dir():
                raise LmcError(
                    f"the {what} {path} cannot be created: {p} is a {file_kind(p) or 'file'}",
                    f"pass a folder path to {flag} (it is created if missing)",
                )
    if out_dir.is_dir():  # the report's own files: refused now, not after every stage ran
        for name in sorted({*REPORT_FILES, *(p.name for p in out_dir.glob("*.png"))}):
            check_replaceable(out_dir / name, "report file")
    res = ReproduceResult(r, plan, out_dir, cache)
    res.entries = dry_run(plan.targets(), cache, Runtime(device=device, data_dir=data_dir))
    if dry:
        return res
    check_output_path("stage cache --cache", cache, folder=True)  # a real run writes there (a dry run need not)
    check_output_path("stage cache lock folder", cache / ".locks", folder=True)
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
