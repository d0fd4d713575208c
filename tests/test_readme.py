"""Every code block of README.md and of the documentation pages runs: the tours and the library
examples on tiny models, the rest as written.

The pages are every ``docs/*.md`` but those in :data:`NOT_RUN` (each with its reason). A block whose
first line is ``# not executed by the test suite: REASON`` is skipped (the reason is required). The
tours and the library examples train the paper's MLP on Fashion-MNIST as written; here
:data:`REWRITES` swaps in the ``tiny`` preset on synthetic data (seconds), and the test fails when a
rewrite no longer matches anything, so the README cannot drift away from what is tested.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "# not executed by the test suite:"
#: pages whose blocks are fragments or need what a test machine lacks, and why
NOT_RUN = {
    "adding-a-method.md": "fragments of one module, shown piece by piece (test_registry_dispatch.py registers one)",
    "scaling.md": "starts Ray clusters and writes to /shared (the Ray tier of test_ray_executor.py runs a local one)",
}
#: pages whose runnable blocks need an optional extra's module (skipped with the reason where it is missing)
NEEDS = {"docs/hf.md": "transformers"}
DOCS = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in NOT_RUN)

#: (language, text in the README, replacement in the test)
REWRITES = [
    ("bash", "--model mlp --dataset fashion-mnist", "--preset tiny --model mlp_tiny --dataset synthetic"),
    ("bash", "lmckit data info fashion-mnist", "lmckit data info synthetic"),
    ("python", 'load_dataset("fashion-mnist")', 'load_dataset("synthetic")'),
    ("python", 'make_config("mlp-fmnist"', 'make_config("tiny"'),
]

#: files the tour must leave behind (it creates everything it uses)
TOUR_OUTPUTS = [
    "wm.json",
    "curves.png",
    "plots/spectra.png",
    "merged/merged.safetensors",
    "merged/perm_1.json",
    "merged/perm_2.json",
    "merged-accuracy.png",
    "plane.png",
    "plane-accuracy.png",
]


def code_blocks(text: str, where: str = "README.md") -> list[tuple[str, str, str]]:
    """``(language, code, "file:line")`` of every fenced block of ``text`` (the file named ``where``)."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        out.append((m.group(1), m.group(2), f"{where}:{text[: m.start()].count(chr(10)) + 1}"))
    return out


BLOCKS = [b for doc in DOCS for b in code_blocks(doc.read_text(), doc.relative_to(ROOT).as_posix())]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", LMCKIT_NO_PROGRESS="1", MPLBACKEND="Agg")
    return env


def _rewrite(lang: str, code: str) -> str:
    for lg, old, new in REWRITES:
        if lg == lang:
            code = code.replace(old, new)
    return code


def test_blocks_are_bash_or_python_and_skips_give_a_reason():
    assert len(BLOCKS) >= 6 and len(code_blocks(README.read_text())) >= 3
    for lang, code, where in BLOCKS:
        assert lang in ("bash", "python", "toml", "text"), f"{where}: unknown block language {lang!r}"
        first = code.splitlines()[0] if code.strip() else ""
        if first.startswith(SKIP):
            assert len(first[len(SKIP) :].strip()) > 10, f"{where}: a skipped block must say why"


def test_pages_not_run_exist_and_say_why():
    for name, why in NOT_RUN.items():
        assert (ROOT / "docs" / name).is_file(), f"NOT_RUN names a missing page {name}"
        assert len(why) > 20


def test_every_rewrite_still_applies():
    for lang, old, _ in REWRITES:
        assert any(lg == lang and old in code for lg, code, _ in BLOCKS), (
            f"no README or docs block contains {old!r} in a {lang} block: update REWRITES in {__file__}"
        )


def _run(lang: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    if lang == "bash":
        prelude = f'lmckit() {{ {shlex.quote(sys.executable)} -m lmckit.cli "$@"; }}\n'
        cmd = ["bash", "-euo", "pipefail", "-c", prelude + code]
    else:
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


RUNNABLE = [
    (lang, code, line) for lang, code, line in BLOCKS if lang in ("bash", "python") and not code.startswith(SKIP)
]


@pytest.mark.parametrize("lang,code,where", RUNNABLE, ids=[b[2] for b in RUNNABLE])
def test_readme_block_runs(lang, code, where, tmp_path):
    need = NEEDS.get(where.rsplit(":", 1)[0])
    if need:
        pytest.importorskip(need, reason=f"{where} needs {need} (pip install 'lmckit[hf]')")
    p = _run(lang, _rewrite(lang, code), tmp_path)
    assert p.returncode == 0, f"{where} ({lang}) failed with {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    if "lmckit landscape" in code:  # the tour
        for f in TOUR_OUTPUTS:
            assert (tmp_path / f).is_file(), f"the tour did not create {f}"
        assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    if "barrier_curve" in code:  # the library example prints both barriers as fractions
        vals = [float(x) for x in re.findall(r"accuracy barrier (-?[0-9.]+)", p.stdout)]
        assert len(vals) == 2 and all(-1.0 <= v <= 1.0 for v in vals), p.stdout


def test_a_broken_block_fails(tmp_path):
    """The runner itself can fail: a block calling a missing option exits non-zero."""
    p = _run("bash", "lmckit barrier --no-such-option\n", tmp_path)
    assert p.returncode != 0
    p = _run("python", "from lmckit.lmc import no_such_name\n", tmp_path)
    assert p.returncode != 0
