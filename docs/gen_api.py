"""Generate the API reference pages at build time (mkdocs-gen-files): one page per package of
``src/lmckit`` and one for the top-level modules, each listing every public module (a name without a
leading underscore) so that a new module is documented without editing anything here. mkdocstrings renders
each module's docstrings; ``mkdocs build --strict`` fails on one that does not parse, and on a generated
page missing from ``nav`` in mkdocs.yml (a new package must be given its place there).
"""

from pathlib import Path

import mkdocs_gen_files

SRC = Path(__file__).resolve().parents[1] / "src" / "lmckit"
#: packages documented elsewhere: the CLI's command modules are the command-line tour's subject
SKIP = {"commands"}
#: top-level modules that are the CLI's plumbing, not an API
SKIP_TOP = {"cli", "__main__"}


def public(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def page(path: str, title: str, package: str | None, modules: list[str]) -> None:
    lines = [f"# {title}", ""]
    if package:
        lines += [f"::: {package}", "    options:", "      members: false", "      show_root_heading: false", ""]
    lines += [f"::: {m}\n" for m in modules]
    with mkdocs_gen_files.open(path, "w") as f:
        f.write("\n".join(lines))


page("api/lmckit.md", "lmckit (top-level modules)", "lmckit", [f"lmckit.{m}" for m in public(SRC) if m not in SKIP_TOP])
for pkg in sorted(p.parent.name for p in SRC.glob("*/__init__.py")):
    if pkg not in SKIP:
        page(f"api/{pkg}.md", f"lmckit.{pkg}", f"lmckit.{pkg}", [f"lmckit.{pkg}.{m}" for m in public(SRC / pkg)])
