"""Package layering: imports inside ``lmckit`` only point down the stack (parsed with ``ast``).

The allowed direction (DESIGN.md, issue 14), lowest first; a module may
import its own layer and the layers below it, never a layer above::

    base (errors, untrusted, device, progress, store, model_index, states, tied)
      -> data, models, evaluate
      -> perm, checkpoint, hf (Hugging Face folders, optional transformers)
      -> match
      -> lmc, plotting
      -> analysis
      -> experiments (merge, train)
      -> pipeline
      -> report
      -> reproduce (the recipe driver)
      -> commands, cli

Every import counts, function-local ones included (a lazy import is still a
dependency), so the test sees the real graph. Two packages of one layer must
not import each other both ways (a cycle), and inside a package no module may
reach itself through imports (an import circle, e.g. ``pipeline.build ->
pipeline.recipe -> pipeline.build``): what two modules both need moves below
both. ``lmckit/__init__.py`` is the public facade and may import anything.

No file under ``src/`` is over :data:`MAX_LINES` lines: a long module is
split along its seams, each new module with one job.

Violations that exist today are listed in :data:`KNOWN_VIOLATIONS`, each
with why; any NEW upward import or cycle fails, and so does a listed one
that has been fixed (delete its line then, so the list stays true).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "lmckit"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "untrusted", "device", "progress", "store", "model_index", "states", "checks", "tied"),
    ("data", "models", "evaluate"),
    ("perm", "checkpoint", "limits", "hf"),  # hf: Hugging Face folders in and out (converts at the edge)
    ("match",),
    ("lmc", "plotting"),
    ("analysis",),
    # experiments (presets: train's plain-data recipes; train_config / train_store: its config and run files)
    ("merge", "train", "train_config", "train_store", "studies", "presets"),
    ("pipeline",),
    ("report",),
    ("reproduce",),  # the recipe driver: runs the pipeline, then writes the report
    ("commands", "cli"),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
FACADE = {"lmckit"}  # lmckit/__init__.py

#: (importing module, imported package) -> why it is tolerated for now. Fix, then delete the line.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}
#: the longest a file under src/ may be (issue 23); none is listed as an exception
MAX_LINES = 800


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every ``lmckit`` module imported anywhere in ``path`` (relative imports resolved)."""
    mod = _module_name(path)
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lmckit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lmckit":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            out.update(subs or [target])
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def violations() -> dict[tuple[str, str], str]:
    """``(module, imported package) -> reason`` for every import against the layering."""
    graph = import_graph()
    found: dict[tuple[str, str], str] = {}
    pkg_edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for mod, targets in graph.items():
        if mod in FACADE:
            continue
        src = _package(mod)
        for t in targets:
            dst = _package(t)
            if dst == src or dst in FACADE:
                continue
            if src not in RANK or dst not in RANK:
                found[(mod, dst)] = f"package {src if src not in RANK else dst!r} has no layer: add it to LAYERS"
            elif RANK[dst] > RANK[src]:
                found[(mod, dst)] = f"upward import: {src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]})"
            else:
                pkg_edges[(src, dst)].append(mod)
    for (src, dst), mods in pkg_edges.items():
        if (dst, src) in pkg_edges and RANK[src] == RANK[dst]:
            for mod in mods:
                found[(mod, dst)] = f"cycle between {src} and {dst} (same layer)"
    return found


def _find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str]:
    """One import circle through ``nodes`` (a strongly connected set): ``[a, b, ..., a]``."""
    start = min(nodes)
    parent: dict[str, str] = {}
    stack, seen = [start], {start}
    while stack:  # breadth-first from start until an edge leads back to it: the shortest circle through start
        nxt = []
        for u in stack:
            for v in sorted(graph.get(u, ()) & nodes):
                if v == start:
                    path = [u]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]  # start ... u, then back to start
                if v not in seen:
                    seen.add(v)
                    parent[v] = u
                    nxt.append(v)
        stack = nxt
    raise AssertionError(f"no circle through {start}")  # pragma: no cover - nodes come from an SCC


def package_cycles() -> list[list[str]]:
    """Import circles between modules of one package (its ``__init__`` included), each as ``[a, ..., a]``.

    Strongly connected components of the module graph restricted to imports inside one package
    (Tarjan, iterative); one circle is named per component.
    """
    graph = import_graph()
    inside = {m: {t for t in ts if t in graph and _package(t) == _package(m)} for m, ts in graph.items()}
    inside = {m: ts for m, ts in inside.items() if m not in FACADE}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(inside):
        if root in index:
            continue
        work = [(root, iter(sorted(inside[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(inside.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in inside[v]:
                    out.append(_find_cycle(inside, comp))
    return sorted(out)


def long_files() -> dict[str, int]:
    """Files under ``src/`` (caches aside) over :data:`MAX_LINES` lines: ``path -> lines``."""
    out = {}
    for path in sorted(SRC.parent.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            n = len(path.read_bytes().splitlines())
            if n > MAX_LINES:
                out[str(path.relative_to(SRC.parent.parent))] = n
    return out


def test_every_package_has_a_layer():
    pkgs = {_package(_module_name(p)) for p in SRC.rglob("*.py")} - FACADE
    assert pkgs <= set(RANK), f"packages without a layer: {sorted(pkgs - set(RANK))}"


def test_no_new_layering_violations():
    new = {k: v for k, v in violations().items() if k not in KNOWN_VIOLATIONS}
    assert not new, "imports against the layering (see this file's docstring):\n" + "\n".join(
        f"  {m} imports {p}: {why}" for (m, p), why in sorted(new.items())
    )


def test_known_violations_still_exist():
    fixed = sorted(set(KNOWN_VIOLATIONS) - set(violations()))
    assert not fixed, f"fixed, delete from KNOWN_VIOLATIONS: {fixed}"


def test_no_import_cycle_inside_a_package():
    cycles = package_cycles()
    assert not cycles, "import circles inside a package (move what both sides need below both):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )


def test_no_file_in_src_is_over_max_lines():
    long = long_files()
    assert not long, f"files over {MAX_LINES} lines (split each along its seams, one job per module):\n" + "\n".join(
        f"  {p}: {n} lines" for p, n in long.items()
    )


def test_scanner_finds_a_function_local_cycle_and_long_files(tmp_path, monkeypatch):
    """The cycle and size checks themselves: a planted circle (one side a lazy import) and a long file fail."""
    pkg = tmp_path / "src" / "lmckit"
    (pkg / "pipeline").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "pipeline" / "a.py").write_text("from .b import g\n")
    (pkg / "pipeline" / "b.py").write_text("def g():\n    from .c import h\n    return h\n")
    (pkg / "pipeline" / "c.py").write_text("from lmckit.pipeline import a\n")
    (pkg / "pipeline" / "d.py").write_text("from .a import g\n")  # imports the circle, is not on it
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert package_cycles() == [["lmckit.pipeline.a", "lmckit.pipeline.b", "lmckit.pipeline.c", "lmckit.pipeline.a"]]
    (pkg / "pipeline" / "b.py").write_text("def g():\n    return 1\n")
    assert package_cycles() == []
    assert long_files() == {}
    (pkg / "pipeline" / "d.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files() == {"src/lmckit/pipeline/d.py": MAX_LINES + 1}


def test_scanner_sees_relative_function_local_and_upward_imports(tmp_path, monkeypatch):
    """The scanner itself: a planted upward, function-local, relative import is reported."""
    pkg = tmp_path / "lmckit"
    (pkg / "match").mkdir(parents=True)
    (pkg / "report").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "report" / "__init__.py").write_text("")
    (pkg / "match" / "__init__.py").write_text("from .x import f\n")
    (pkg / "match" / "x.py").write_text("def f():\n    from ..report import y\n    return y\n")
    (pkg / "report" / "y.py").write_text("from lmckit.match import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert imports_of(pkg / "match" / "x.py") == {"lmckit.report.y"}
    assert imports_of(pkg / "report" / "y.py") == {"lmckit.match.x"}
    v = violations()
    assert ("lmckit.match.x", "report") in v and "upward" in v[("lmckit.match.x", "report")]
    assert not any(m == "lmckit.report.y" for m, _ in v)


if __name__ == "__main__":  # pragma: no cover - a readable dump of the graph
    for (m, p), why in sorted(violations().items()):
        print(f"{m} -> {p}: {why}{'  [known]' if (m, p) in KNOWN_VIOLATIONS else ''}")
    for c in package_cycles():
        print("cycle: " + " -> ".join(c))
    for path, n in long_files().items():
        print(f"{path}: {n} lines")
    pytest.main([__file__, "-q"])
