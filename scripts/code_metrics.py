"""Code-shape numbers for src/lmckit, parsed with ``ast``: long functions and function-local imports.

    python scripts/code_metrics.py [--limit 60] [--list]

Prints the number of functions longer than ``--limit`` lines (``def`` to last line, docstring included) and
the number of import statements inside functions; ``--list`` names them. Package import cycles are checked
by ``tests/test_layering.py``.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "lmckit"


def long_functions(root: Path, limit: int) -> list[tuple[int, str]]:
    """``(lines, "file:line name")`` of every function longer than ``limit`` lines, longest first."""
    out = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{f.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def local_imports(root: Path) -> Counter:
    """File -> number of ``import`` statements inside functions (each counted once, nested functions too)."""
    counts: Counter = Counter()
    for f in sorted(root.rglob("*.py")):
        seen: set[int] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)) and id(sub) not in seen:
                        seen.add(id(sub))
                        counts[str(f.relative_to(root.parent))] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60, help="report functions longer than this many lines")
    ap.add_argument("--list", action="store_true", help="name the functions and files")
    args = ap.parse_args()
    long = long_functions(SRC, args.limit)
    imports = local_imports(SRC)
    print(f"functions over {args.limit} lines: {len(long)}")
    if args.list:
        for n, where in long:
            print(f"  {n:4d} {where}")
    print(f"function-local imports: {sum(imports.values())}")
    if args.list:
        for where, n in imports.most_common():
            print(f"  {n:4d} {where}")


if __name__ == "__main__":
    main()
