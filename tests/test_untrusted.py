"""Untrusted files: nothing lmckit reads can run code, and nothing it writes escapes the chosen output folder.

* A static scan (AST) of every module under ``src/lmckit``: no ``pickle.load(s)``/``Unpickler`` except the
  data helper's restricted CIFAR unpickler, no ``torch.load`` without ``weights_only=True``, no
  ``eval``/``exec``/``compile``/``__import__``, no unsafe ``yaml`` or ``numpy.load(allow_pickle=True)``, no
  shell commands, no ``tarfile.extractall``. The scanner is itself tested on planted bad code.
* Checkpoint loading never calls any unpickler (spied), and payloads that would create a marker file
  never run, whichever path (checkpoint, CIFAR batch) they come in through.
* Recipes are data: code in a recipe or ``--set`` value is kept as a string and never evaluated.
* Output paths: a recipe (or ``--set``) naming its report folder outside ``reports/`` is refused.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from lmckit.errors import LmcError
from tests.helpers.reliability import MarkerPayload, hostile_pickle, hostile_torch_save, run_cli

PKG = Path(__file__).resolve().parents[1] / "src" / "lmckit"
RESTRICTED_UNPICKLER = "data/cifar.py"  # the only module allowed to unpickle (a tiny whitelist of numpy globals)
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "joblib", "marshal"}


# --------------------------------------------------------------------------- the scanner
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, rel: str) -> list[str]:
    """Unsafe constructs in one module's source, as ``"rel:line: what"`` strings."""
    tree = ast.parse(source)
    problems: list[str] = []
    aliases: dict[str, str] = {}  # local name -> module or module.attr it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{rel}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in PICKLE_MODULES and rel != RESTRICTED_UNPICKLER:
                    bad(node, f"imports {m}")
        if isinstance(node, ast.ClassDef) and rel != RESTRICTED_UNPICKLER:
            for b in node.bases:
                if _dotted(b).split(".")[-1] == "Unpickler":
                    bad(node, "defines an Unpickler")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        last = full.split(".")[-1]
        root = full.split(".")[0]
        if full in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            bad(node, f"calls {full}()")
        elif root in PICKLE_MODULES and last in ("load", "loads", "Unpickler") and rel != RESTRICTED_UNPICKLER:
            bad(node, f"calls {full}()")
        elif full == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            bad(node, "torch.load without weights_only=True")
        elif (
            root in ("numpy", "np")
            and last == "load"
            and not (_kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False))
        ):
            bad(node, "numpy.load with allow_pickle")
        elif root == "yaml" and last in ("unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"):
            bad(node, f"calls {full}()")
        elif full == "yaml.load":
            loader = (
                _dotted(_kw(node, "Loader"))
                if _kw(node, "Loader") is not None
                else (_dotted(node.args[1]) if len(node.args) > 1 else "")
            )
            if loader.split(".")[-1] not in ("SafeLoader", "CSafeLoader"):
                bad(node, "yaml.load without SafeLoader")
        elif full in ("os.system", "os.popen") or (root == "subprocess" and _is_const(_kw(node, "shell"), True)):
            bad(node, f"runs a shell command ({full})")
        elif last in ("extractall",):
            bad(node, "tarfile/zipfile extractall (extract member by member, checking names)")
    return problems


def scan_package() -> list[str]:
    out: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        out += scan_source(path.read_text(), path.relative_to(PKG).as_posix())
    return out


def test_package_has_no_unsafe_loaders_or_code_evaluation():
    assert len(list(PKG.rglob("*.py"))) > 50  # the scan sees the whole package
    assert scan_package() == []


def test_restricted_unpickler_exists_and_is_whitelisted():
    src = (PKG / RESTRICTED_UNPICKLER).read_text()
    tree = ast.parse(src)
    classes = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in n.bases)
    ]
    assert len(classes) == 1
    methods = {f.name for f in classes[0].body if isinstance(f, ast.FunctionDef)}
    assert {"find_class", "persistent_load"} <= methods
    from lmckit.data import cifar

    assert set(cifar._ALLOWED) <= {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }


@pytest.mark.parametrize(
    "snippet, what",
    [
        ("import pickle\npickle.loads(b'')", "imports pickle"),
        ("from pickle import loads as l\nl(b'')", "calls pickle.loads()"),
        ("import pickle as p\nclass U(p.Unpickler): pass", "defines an Unpickler"),
        ("import torch\ntorch.load('f')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('f', weights_only=False)", "torch.load without weights_only=True"),
        ("from torch import load\nload('f')", "torch.load without weights_only=True"),
        ("eval('1')", "calls eval()"),
        ("exec('x = 1')", "calls exec()"),
        ("__import__('os')", "calls __import__()"),
        ("import yaml\nyaml.load(s)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.load(s, Loader=yaml.FullLoader)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.unsafe_load(s)", "calls yaml.unsafe_load()"),
        ("import numpy as np\nnp.load('f', allow_pickle=True)", "numpy.load with allow_pickle"),
        ("import os\nos.system('ls')", "runs a shell command"),
        ("import subprocess\nsubprocess.run('ls', shell=True)", "runs a shell command"),
        ("import tarfile\ntarfile.open('x').extractall('.')", "extractall"),
    ],
)
def test_scanner_catches_planted_unsafe_code(snippet, what):
    problems = scan_source(snippet, "planted.py")
    assert any(what in p for p in problems), problems


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('f', weights_only=True)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(s)",
        "import numpy as np\nnp.load('f')",
        "model.eval()",
        "import subprocess\nsubprocess.run(['ls'])",
    ],
)
def test_scanner_accepts_safe_code(snippet):
    assert scan_source(snippet, "planted.py") == []


# --------------------------------------------------------------------------- nothing unpickles at run time
@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every unpickling entry point raise and record the attempt."""
    calls: list[str] = []

    def spy(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return f

    monkeypatch.setattr(pickle, "load", spy("pickle.load"))
    monkeypatch.setattr(pickle, "loads", spy("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", spy("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", spy("torch.load"))
    return calls


@pytest.mark.parametrize("kind", ["pickle-p2", "pickle-p4", "pickle-p0", "torch-save"])
def test_checkpoint_loaders_never_unpickle(kind, tmp_path, no_unpickling):
    from lmckit.checkpoint import load, load_checkpoint
    from lmckit.store import load_state

    marker = tmp_path / "PWNED"
    f = tmp_path / "model.pt"
    if kind == "torch-save":
        hostile_torch_save(f, marker)
    else:
        hostile_pickle(f, marker, protocol=int(kind[-1]))
    for loader in (load_state, load_checkpoint, load):
        with pytest.raises(LmcError, match="model.pt"):
            loader(f)
    # a run folder holding the pickle under the expected name is refused the same way
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(f.read_bytes())
    (run / "config.json").write_text('{"model": {"name": "mlp_tiny"}}')
    with pytest.raises(LmcError, match="model.safetensors"):
        load(run)
    assert no_unpickling == [] and not marker.exists()


def test_hostile_cifar_batches_never_run_code(tmp_path):
    from lmckit.data.cifar import restricted_unpickle

    marker = tmp_path / "PWNED"
    payloads = [pickle.dumps(MarkerPayload(marker), protocol=p) for p in (0, 2, 4, 5)]
    # the class of a whitelisted name used as a callable target: numpy.dtype with a reduce of os.system
    payloads.append(b"\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03.")
    payloads.append(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.")
    for data in payloads:
        with pytest.raises(LmcError, match="refusing|not a plain|corrupt"):
            restricted_unpickle(data, "hostile batch")
    assert not marker.exists()


# --------------------------------------------------------------------------- recipes are data
RECIPE = """
name = "code-is-data"
description = "__import__('pathlib').Path('{marker}').touch()"
[data]
dataset = "synthetic"
[[models]]
name = "mlp_tiny"
label = "{{__import__('os').system('touch {marker}')}}"
[train]
preset = "tiny"
seeds = [0, 1]
[three_models]
enabled = false
"""


def test_recipe_strings_are_never_evaluated(tmp_path):
    from lmckit.pipeline.recipe import load_recipe

    marker = tmp_path / "PWNED"
    p = tmp_path / "r.toml"
    p.write_text(RECIPE.format(marker=marker))
    sets = [
        f"models.0.preset=__import__('pathlib').Path('{marker}').touch()",
        f"description=exec(\"open('{marker}', 'w')\")",
    ]
    r = load_recipe(str(p), sets[1:])
    assert r.description == f"exec(\"open('{marker}', 'w')\")"  # a plain string, as written
    assert r.models[0].label.startswith("{__import__")
    with pytest.raises(LmcError):  # a code-looking preset is just an unknown preset name
        from lmckit.pipeline.build import build_plan

        build_plan(load_recipe(str(p), sets[:1]))
    assert not marker.exists()
    src = (PKG / "pipeline" / "recipe.py").read_text()
    assert "tomllib" in src and scan_source(src, "pipeline/recipe.py") == []


# --------------------------------------------------------------------------- outputs stay in the output folder
ESCAPES = ["../../escaped-report", "/tmp/lmckit-escaped-report", "reports/../../escaped", "..", "a/../../b"]


@pytest.mark.parametrize("name", ESCAPES)
def test_recipe_name_cannot_place_the_report_outside_reports(name, tmp_path):
    from lmckit.pipeline.recipe import load_recipe

    with pytest.raises(LmcError, match="name"):
        load_recipe("tiny", [f'name="{name}"'])


def test_cli_refuses_a_report_name_outside_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(
        ["reproduce", "--recipe", "tiny", "--set", 'name="../outside"', "--cache", tmp_path / "c", "--dry-run"], capsys
    )
    assert rc == 2 and "name" in err


def test_explicit_out_is_where_everything_goes(tmp_path, monkeypatch, capsys):
    """With --out and --cache, a dry run writes nothing anywhere, and the folders it reports are the ones given."""
    from tests.helpers.reliability import snapshot

    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    rc, out, err = run_cli(
        ["reproduce", "--recipe", "tiny", "--out", tmp_path / "o", "--cache", tmp_path / "c", "--dry-run", "--json"],
        capsys,
    )
    assert rc == 0, err
    import json

    for e in json.loads(out):
        assert Path(e["path"]).resolve().is_relative_to((tmp_path / "c").resolve())
    assert snapshot(tmp_path) == before
