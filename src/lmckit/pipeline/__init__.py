"""The cached stage pipeline: stage specs, executors, recipes and ``lmckit reproduce``."""

from .executor import InProcessExecutor, ProcessPoolExecutor, dry_run, make_executor, plan
from .stages import Runtime, Stage, StageContext, dependencies, resolved_config, run_stage, stage_hash, stage_path

__all__ = [
    "Stage",
    "StageContext",
    "Runtime",
    "dependencies",
    "resolved_config",
    "stage_hash",
    "stage_path",
    "run_stage",
    "plan",
    "dry_run",
    "make_executor",
    "InProcessExecutor",
    "ProcessPoolExecutor",
]
