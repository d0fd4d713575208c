"""Reproduction reports: aggregate stage outputs (:mod:`.results`), figures (:mod:`.figures`), report files
(:mod:`.writer`)."""

from .results import collect, judge_claims, stats, timings
from .writer import check_finite_tree, summary_rows, write_report

__all__ = ["collect", "judge_claims", "stats", "timings", "write_report", "summary_rows", "check_finite_tree"]
