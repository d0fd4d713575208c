"""The CLI's light commands start without heavy imports, and the static model index equals the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")
HEAVY = ("torch", "numpy", "scipy", "matplotlib")
PROBE = (
    "import sys, io, contextlib\n"
    "from lmckit.cli import main\n"
    "out = io.StringIO()\n"
    "with contextlib.redirect_stdout(out):\n"
    "    try:\n"
    "        code = main(sys.argv[1:])\n"
    "    except SystemExit as e:\n"
    "        code = e.code\n"
    "assert code in (0, None), (code, out.getvalue())\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["match", "--help"],
        ["merge", "--help"],
        ["train", "--help"],
        ["models"],
        ["models", "--json"],
        ["data", "list"],
    ],
)
def test_light_commands_import_no_heavy_module(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY="))
    assert line == "HEAVY=", f"lmckit {' '.join(argv)} imported {line[6:]}"


def test_importtime_of_models_lists_no_torch():
    # the check, literally: python -X importtime -m lmckit.cli models
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lmckit.cli", "models"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    modules = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "lmckit.cli" in modules or "lmckit" in modules  # the probe saw the imports at all
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert "mlp" in proc.stdout and "resnet20" in proc.stdout


def test_model_index_equals_the_registry():
    from lmckit.model_index import MODEL_INDEX, list_index
    from lmckit.models import list_models, model_entry
    from lmckit.models.registry import PROVIDERS

    def zoo(names):  # the built-in zoo (other tests register user architectures, --arch, in this process)
        return [
            n
            for n in names
            if model_entry(n).factory.__module__.startswith("lmckit.models.")
            or model_entry(n).factory.__module__ == PROVIDERS.get(n)
        ]

    reg = {n: (model_entry(n).description, model_entry(n).tiny) for n in zoo(list_models())}
    assert len(reg) >= 10
    assert MODEL_INDEX == reg, "update src/lmckit/model_index.py to the registered models"
    for pattern, tiny in (("*", True), ("*", False), ("resnet*", True), ("nothing*", True)):
        assert list_index(pattern, tiny) == zoo(list_models(pattern, include_tiny=tiny))


def test_models_command_output_matches_the_registry(capsys):
    from lmckit.cli import main
    from lmckit.models import list_models, model_entry

    assert main(["models", "--no-tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [n for n in list_models(include_tiny=False) if ":" not in n]  # (user architectures: arch:...)
    assert [ln.split()[0] for ln in lines] == names
    assert all(ln.rstrip().endswith(model_entry(n).description) for ln, n in zip(lines, names))
