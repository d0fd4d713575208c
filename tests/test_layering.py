"""Package layering: imports inside ``lmckit`` only point down the stack (parsed with ``ast``).

The allowed direction (DESIGN.md, issue 14), lowest first; a module may
import its own layer and the layers below it, never a layer above::

    base (errors, device, progress, store, model_index, states)
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
not import each other both ways (a cycle). ``lmckit/__init__.py`` is the
public facade and may import anything.

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
    ("errors", "device", "progress", "store", "model_index", "states", "checks"),
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
    pytest.main([__file__, "-q"])
