"""How the report names and draws each method: its legend label, colour and line style.

Read from the matching registry when used (:data:`METHOD_LABEL` is the
entry's ``label``: WM, AM, STE, ...), so a newly registered method gets a
label, a colour and a line style in every figure and table without an edit
here. The naive path and MergeMany, which are not registry methods, have
fixed ones. Used by the figures (:mod:`lmckit.report.figures`), the tables
(:mod:`lmckit.report.writer`, :mod:`lmckit.report.architectures`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from ..match.registry import get_method, list_methods
from ..pipeline.recipe import NAIVE
from ..pipeline.tasks import MERGE_MANY

__all__ = ["METHOD_LABEL", "METHOD_COLOR", "METHOD_STYLE"]


class _ByMethod(Mapping):
    """``{method: value}`` for the naive path, every method of the matching registry (in its order), MergeMany.

    Read from the registry when used, so a newly registered method gets its label (the entry's ``label``),
    a colour and a line style in every figure and table without an edit here.
    """

    def __init__(self, naive: str, merge_many: str, of_method: Callable[[str, int], str]):
        self._naive, self._merge_many, self._of = naive, merge_many, of_method

    def _table(self) -> dict[str, str]:
        d = {NAIVE: self._naive}
        d.update({m: self._of(m, i) for i, m in enumerate(list_methods())})
        d[MERGE_MANY] = self._merge_many
        return d

    def __getitem__(self, key: str) -> str:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


_COLORS = ("C3", "C0", "C2", "C1", "C5", "C6", "C7", "C8", "C9")  # C4 is MergeMany's
_STYLES = ("-", "--", ":", (0, (5, 1, 1, 1)), (0, (1, 2)), (0, (6, 2)))
#: legend label of each method (the registry's ``label``: WM, AM, STE, ...)
METHOD_LABEL = _ByMethod("naive", "MergeMany", lambda m, i: get_method(m).label)
METHOD_COLOR = _ByMethod("0.5", "C4", lambda m, i: _COLORS[i % len(_COLORS)])
METHOD_STYLE = _ByMethod("-", "-.", lambda m, i: _STYLES[i % len(_STYLES)])
