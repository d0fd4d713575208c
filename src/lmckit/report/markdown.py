"""Markdown the report writes from values: table cells and one-line text a user controls, made inert.

:func:`plain` turns user text (a recipe's name and description, labels,
notes) into one line of text that cannot start a Markdown block; ``_table``
writes rows as a Markdown table with every cell escaped (pipes, line breaks,
control characters). The report sections (:mod:`lmckit.report.writer`,
:mod:`lmckit.report.architectures`) share them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["plain"]


#: control characters (C0 but tab and newline, DEL, C1): ESC and BEL would drive a terminal showing report.md
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: what would start a Markdown block (heading, quote, list, table row, fence, thematic break) at a line's start
_BLOCK_START = re.compile(r"^([#>+*=|_~`-]|\d+[.)])")


def plain(text: Any) -> str:
    """Text a user controls (recipe name and description, labels, notes) as one line of Markdown text.

    Control characters are removed, every run of whitespace (line breaks included) becomes one space, and a
    leading character that would start a Markdown block (``#`` heading, ``|`` table row, ``>`` quote, list
    markers, fences) is backslash-escaped: a multi-line recipe ``description`` cannot add headings, tables
    or anything else to report.md / report.html, only text.
    """
    s = " ".join(_CONTROL.sub("", str(text)).split())
    m = _BLOCK_START.match(s)
    if m:
        k = len(m.group(1)) - 1  # before the marker's last character: "\\#", "1\\."
        s = s[:k] + "\\" + s[k:]
    return s


def _cell(v: Any) -> str:
    """A table cell: pipes escaped (a ``|`` would split the cell), no line breaks, no control characters."""
    return " ".join(_CONTROL.sub("", str(v)).replace("|", "\\|").split("\n"))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(_cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return out


def _pm(s: dict[str, Any] | None, fmt: str = "{:.3f}", ci: bool = False) -> str:
    """``mean ± std (n=N)``, or the single value; with ``ci`` also the 95% t-interval where n >= 3."""
    if not s:
        return "-"
    n = s.get("n", 1)
    if n > 1:
        text = f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} (n={n})"
        if ci and "ci95" in s:
            lo, hi = s["ci95"]
            text += f", 95% CI [{fmt.format(lo)}, {fmt.format(hi)}]"
        return text
    return fmt.format(s["mean"])
