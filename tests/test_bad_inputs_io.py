"""Bad-input table, round three (issue 28): outputs, environment oddities, --json discipline, hostile names,
locks and concurrent runs, stdout that cannot be written.

Reuses the machinery of ``tests/test_bad_inputs.py`` (its :class:`Workspace`, the :class:`Row` record, the
snapshot and CLI runners) with rows of its own. Every row must end in exit status 2, one paragraph on
stderr naming the file or setting (a regex), no traceback and an unchanged workspace; a row whose command
line has ``--json`` must also print exactly one JSON document on stdout, the error object with its exit code.
Each class is fixed through one shared mechanism: :func:`lmckit.store.check_replaceable` (outputs that are
not regular files), :class:`lmckit.cli._GuardedStdout` (stdout), :func:`lmckit.cli.main` (``--json`` errors,
the working folder), :func:`lmckit.store.file_lock` (locks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.reliability import run_cli, snapshot, snapshot_diff, subprocess_env
from tests.test_bad_inputs import TINY_RECIPE, Row, Workspace

ROWS: list[Row] = []
IS_ROOT = os.geteuid() == 0


def row(id: str, pattern: str, xfail: str | None = None):
    def deco(fn):
        ROWS.append(Row(id, fn, pattern, xfail))
        return fn

    return deco


# --------------------------------------------------------------------------- making files that are not files
def make_special(path: Path, kind: str) -> Path:
    """Put a ``kind`` at ``path``: fifo, chardev (a /dev/full-like node; root only), socket, folder, file,
    link-fifo / link-chardev (a symlink to one). Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        if not IS_ROOT:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers, in the sandbox
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # bind by a short relative name (socket paths are limited to 108 bytes)
        try:
            s = socket.socket(socket.AF_UNIX)
            s.bind(path.name)
            s.close()
        finally:
            os.chdir(cwd)
    elif kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_text("a file, not a folder\n")
    elif kind.startswith("link-"):
        target = make_special(path.with_name(f".target-{path.name}"), kind[5:])
        path.symlink_to(target.name)
    else:  # pragma: no cover - a typo in a row
        raise ValueError(kind)
    return path


KIND_WORDS = {
    "fifo": "named pipe",
    "chardev": "character device",
    "socket": "socket",
    "folder": "folder",
    "file": "file",
    "link-fifo": "named pipe",
    "link-chardev": "character device",
    "link-folder": "folder",
}
FILE_KINDS = ["fifo", "chardev", "socket", "folder", "link-fifo", "link-chardev", "link-folder"]
FOLDER_KINDS = ["file", "fifo", "chardev", "socket"]


def _b(ws: Workspace) -> Path:
    return ws.ckpt("b.safetensors", seed=1)


# --------------------------------------------------------------------------- file outputs that are not files
FILE_WRITERS: dict[str, Callable[[Workspace, Path], list]] = {
    "match-out": lambda ws, p: ["match", ws.a, _b(ws), "--out", p],
    "barrier-plot": lambda ws, p: [
        "barrier",
        ws.a,
        _b(ws),
        "--dataset",
        "synthetic",
        "--points",
        "3",
        "--limit",
        "50",
        "--plot",
        p,
    ],
    "merge-plot": lambda ws, p: ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic", "--plot", p],
    "landscape-plot": lambda ws, p: [
        "landscape",
        ws.a,
        _b(ws),
        ws.ckpt("c.safetensors", seed=2),
        "--dataset",
        "synthetic",
        "--grid",
        "3",
        "--limit",
        "20",
        "--plot",
        p,
    ],
}

for _writer, _argv in FILE_WRITERS.items():
    for _kind in FILE_KINDS:

        def _build(ws, _argv=_argv, _kind=_kind):
            return _argv(ws, make_special(ws.out / "target.png", _kind))

        ROWS.append(Row(f"out-{_writer}-is-{_kind}", _build, rf"target\.png.*{KIND_WORDS[_kind]}"))


# --------------------------------------------------------------------------- folder outputs that are not folders
FOLDER_WRITERS: dict[str, Callable[[Workspace, Path], list]] = {
    "train-out": lambda ws, p: ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--out", p, "--epochs", "1"],
    "merge-out": lambda ws, p: ["merge", ws.a, _b(ws), "--out", p, "--dataset", "synthetic"],
    "analyze-plot": lambda ws, p: ["analyze", ws.a, _b(ws), "--no-data", "--plot", p],
    "match-multi-out": lambda ws, p: [
        "match",
        ws.a,
        _b(ws),
        ws.ckpt("c.safetensors", seed=2),
        "--multi",
        "anchor",
        "--out",
        p,
    ],
    "reproduce-out": lambda ws, p: ["reproduce", "--recipe", "tiny", "--out", p, "--cache", ws.out / "cache"],
    "reproduce-cache": lambda ws, p: ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", p],
    "data-download-root": lambda ws, p: ["data", "download", "mnist", "--root", p, "--dry-run"],
}

for _writer, _argv in FOLDER_WRITERS.items():
    for _kind in FOLDER_KINDS:

        def _build(ws, _argv=_argv, _kind=_kind):
            return _argv(ws, make_special(ws.out / "target.d", _kind))

        _word = KIND_WORDS[_kind]
        ROWS.append(Row(f"outdir-{_writer}-is-{_kind}", _build, rf"target\.d.*({_word}|not a folder|is a file)"))


# --------------------------------------------------------------------------- an output's own files inside its folder
INNER = {
    "report-md": ("reproduce", "report.md"),
    "results-json": ("reproduce", "results.json"),
    "report-html": ("reproduce", "report.html"),
    "report-figure": ("reproduce", "interpolation.png"),
    "report-lock": ("reproduce", ".lmckit.lock"),
}


def _reproduce_into(ws: Workspace, name: str, kind: str) -> list:
    make_special(ws.out / "r" / name, kind)
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cache"]


for _id, (_cmd, _name) in INNER.items():
    for _kind in ("fifo", "chardev", "socket", "folder"):
        if _kind == "folder" and _name.endswith(".png"):
            continue

        def _build(ws, _name=_name, _kind=_kind):
            return _reproduce_into(ws, _name, _kind)

        ROWS.append(Row(f"inner-{_id}-is-{_kind}", _build, rf"{re.escape(_name)}.*{KIND_WORDS[_kind]}"))


@row("inner-merge-lock-is-fifo", r"\.lock.*named pipe")
def _(ws):
    make_special(ws.out / "m" / ".lock", "fifo")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic"]


@row("inner-analyze-figure-is-fifo", r"spectra\.png.*named pipe")
def _(ws):
    make_special(ws.out / "plots" / "spectra.png", "fifo")
    return ["analyze", ws.a, _b(ws), "--no-data", "--plot", ws.out / "plots"]


@row("inner-cache-locks-is-a-file", r"\.locks.*(file|in the way)")
def _(ws):
    (ws.out / "cache").mkdir()
    (ws.out / "cache" / ".locks").write_text("not a folder")
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cache", "--quiet"]


# --------------------------------------------------------------------------- the run store, checked before training
TRAIN_ARGV = ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--epochs", "1"]


def _train_into(ws: Workspace, store: Path) -> list:
    """``lmckit train`` into ``store``; no --quiet, so a progress line printed before the refusal fails the row."""
    return [*TRAIN_ARGV, "--out", store]


def _run_folder(store: Path) -> Path:
    from lmckit.cli import build_parser
    from lmckit.commands.train import config_from_args
    from lmckit.train import run_dir_for

    config, _ = config_from_args(build_parser().parse_args([*TRAIN_ARGV, "--out", str(store)]))
    return run_dir_for(config, store)


STORE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {  # id -> (make it, in the store), message
    "train-folder-is-a-file": (lambda s: make_special(s / "train", "file"), r"runs/train is a file"),
    "train-folder-is-a-fifo": (lambda s: make_special(s / "train", "fifo"), r"runs/train is a named pipe"),
    "train-folder-is-a-link-loop": (lambda s: (s / "train").symlink_to("train"), r"runs/train.*loop"),
    "train-folder-is-a-dangling-link": (
        lambda s: (s / "train").symlink_to("nowhere"),
        r"runs/train.*symbolic link to nowhere, which does not exist",
    ),
    "run-folder-is-a-file": (lambda s: make_special(_run_folder(s), "file"), r"in the way of the run folder.*file"),
    "run-folder-is-a-fifo": (lambda s: make_special(_run_folder(s), "fifo"), r"run folder.*named pipe"),
    "run-folder-is-unfinished": (lambda s: make_special(_run_folder(s), "folder"), r"not a finished run"),
    "partial-is-a-file": (
        lambda s: make_special(_run_folder(s).with_suffix(".partial"), "file"),
        r"unfinished run folder .*\.partial is a file",
    ),
    "lock-is-a-fifo": (lambda s: make_special(_run_folder(s).with_suffix(".lock"), "fifo"), r"\.lock.*named pipe"),
    "lock-is-a-folder": (lambda s: make_special(_run_folder(s).with_suffix(".lock"), "folder"), r"\.lock.*folder"),
    "resumed-model-file-is-a-folder": (
        lambda s: (
            make_special(_run_folder(s).with_suffix(".partial") / "checkpoint.safetensors", "file"),
            make_special(_run_folder(s).with_suffix(".partial") / "model.safetensors", "folder"),
        ),
        r"model\.safetensors: it is a folder",
    ),
    "resumed-metrics-is-a-fifo": (
        lambda s: (
            make_special(_run_folder(s).with_suffix(".partial") / "checkpoint.safetensors", "file"),
            make_special(_run_folder(s).with_suffix(".partial") / "metrics.jsonl", "fifo"),
        ),
        r"metrics\.jsonl: it is a named pipe",
    ),
}

for _id, (_make, _pattern) in STORE_CASES.items():

    def _build(ws, _make=_make):
        store = ws.out / "runs"
        store.mkdir()
        _make(store)
        return _train_into(ws, store)

    ROWS.append(Row(f"train-store-{_id}", _build, _pattern))


@row("train-store-train-folder-read-only", r"run store folder .*runs/train: .*runs/train is not writable")
def _(ws):
    from tests.helpers.reliability import read_only_dir

    (ws.out / "runs" / "train").mkdir(parents=True)
    read_only_dir(ws.monkeypatch, ws.out / "runs" / "train")
    return _train_into(ws, ws.out / "runs")


@row("train-store-is-a-link-loop", r"runs.*symbolic links form a loop")
def _(ws):
    (ws.out / "runs").symlink_to("runs")
    return _train_into(ws, ws.out / "runs")


@row("train-store-is-a-dangling-link", r"runs.*symbolic link to nowhere/x, which does not exist")
def _(ws):
    (ws.out / "runs").symlink_to("nowhere/x")
    return _train_into(ws, ws.out / "runs")


# --------------------------------------------------------------------------- data info and download: exit 2, one line
def _idx_folder(ws: Workspace, name: str, **kw) -> Path:
    from tests.helpers.data_files import write_idx_dataset

    write_idx_dataset(ws.inp / "data" / name, **kw)
    return ws.inp / "data"


@row("data-info-files-differ-from-the-published", r"data info: error: 4 of the 4 files of fashion-mnist .*mismatch")
def _(ws):
    return ["data", "info", "fashion-mnist", "--data-dir", _idx_folder(ws, "fashion-mnist", gz=True)]


@row("data-info-files-differ-json", r"4 of the 4 files of fashion-mnist .*do not match the published dataset")
def _(ws):
    return ["data", "info", "fashion-mnist", "--data-dir", _idx_folder(ws, "fashion-mnist", gz=True), "--json"]


@row("data-info-idx-file-garbled", r"data info: error: .*train-images-idx3-ubyte.*(magic|not an IDX)")
def _(ws):
    data = _idx_folder(ws, "mnist")
    (data / "mnist" / "train-images-idx3-ubyte").write_bytes(b"garbage, not an IDX file")
    return ["data", "info", "mnist", "--data-dir", data, "--no-checksums"]


@row("data-info-data-dir-is-a-link-loop", r"data info: error: .*mnist not found")
def _(ws):
    (ws.inp / "loop").symlink_to("loop")
    return ["data", "info", "mnist", "--data-dir", ws.inp / "loop"]


@row("data-download-dataset-folder-is-a-file", r"dataset folder .*target\.d/mnist is a file, not a folder")
def _(ws):
    make_special(ws.out / "target.d" / "mnist", "file")
    return ["data", "download", "mnist", "--root", ws.out / "target.d", "--mirror", "http://127.0.0.1:9/"]


@row("data-download-dataset-file-is-a-folder", r"dataset file .*train-images-idx3-ubyte\.gz: it is a folder")
def _(ws):
    make_special(ws.out / "target.d" / "mnist" / "train-images-idx3-ubyte.gz", "folder")
    return ["data", "download", "mnist", "--root", ws.out / "target.d", "--dry-run"]


@row("data-download-lock-is-a-fifo", r"\.download\.lock.*named pipe")
def _(ws):
    make_special(ws.out / "target.d" / "mnist" / ".download.lock", "fifo")
    return ["data", "download", "mnist", "--root", ws.out / "target.d", "--mirror", "http://127.0.0.1:9/"]


@row("data-download-root-empty-string", r"--root is an empty string")
def _(ws):
    return ["data", "download", "mnist", "--root", "", "--mirror", "http://127.0.0.1:9/"]


@row("data-download-root-dangling-link", r"--root .*symbolic link to nowhere")
def _(ws):
    (ws.out / "target.d").symlink_to("nowhere")
    return ["data", "download", "mnist", "--root", ws.out / "target.d", "--dry-run"]


@row("data-download-user-cache-under-a-fifo", r"dataset folder .*xdg-fifo/lmckit/datasets/mnist.*named pipe")
def _(ws):
    ws.monkeypatch.setenv("XDG_CACHE_HOME", str(make_special(ws.out / "xdg-fifo", "fifo")))
    return ["data", "download", "mnist", "--mirror", "http://127.0.0.1:9/", "--timeout", "1"]


# --------------------------------------------------------------------------- symbolic-link loops and chains
def _chain(folder: Path, n: int) -> Path:
    """``l0`` (a file) and ``l1 -> l0``, ..., ``ln -> l(n-1)``: a chain longer than the kernel follows for n > 40."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "l0").write_text("x")
    for i in range(1, n + 1):
        (folder / f"l{i}").symlink_to(f"l{i - 1}")
    return folder / f"l{n}"


@row("link-chain-1500-as-model", r"model A .*l1500.*(loop|chain)")
def _(ws):
    return ["match", _chain(ws.inp / "chain", 1500), _b(ws), "--out", ws.out / "p.json"]


@row("link-chain-1500-as-merge-out", r"l1500.*(loop|chain)")
def _(ws):
    return ["merge", ws.a, _b(ws), "--out", _chain(ws.out / "chain", 1500), "--dataset", "synthetic"]


@row("link-cycle-of-two-as-landscape-model", r"model C .*cyc1.*loop")
def _(ws):
    (ws.inp / "cyc1").symlink_to("cyc2")
    (ws.inp / "cyc2").symlink_to("cyc1")
    return ["landscape", ws.a, _b(ws), ws.inp / "cyc1", "--dataset", "synthetic", "--plot", ws.out / "l.png"]


@row("link-loop-as-default-reports-folder", r"report folder reports/tiny.*loop")
def _(ws):
    (ws.out / "reports").symlink_to("reports")
    ws.monkeypatch.chdir(ws.out)
    return ["reproduce", "--recipe", "tiny", "--cache", ws.out / "cache", "--dry-run"]


@row("link-loop-as-data-download-root", r"--root .*loop")
def _(ws):
    (ws.out / "loop").symlink_to("loop")
    return ["data", "download", "mnist", "--root", ws.out / "loop", "--dry-run"]


# --------------------------------------------------------------------------- hostile output names
@row("name-out-trailing-slash-on-a-file-output", r"perm\.json/?.*(folder|directory|file name)")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", str(ws.out / "perm.json") + "/"]


@row("name-out-through-a-file", r"earlier-result\.txt.*(is a file|not a directory|in the way)")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", ws.out / "earlier-result.txt" / "perm.json"]


@row("name-out-is-the-output-folder-itself", r"out.*folder")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", ws.out]


@row("name-out-empty-string", r"(--out|empty|folder|''|\")")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", ""]


@row("name-out-too-long", r"(longer than the file system allows|too long)")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", ws.out / ("x" * 300 + ".json")]


@row("name-plot-too-long-component-in-folder", r"(longer than the file system allows|too long)")
def _(ws):
    return ["analyze", ws.a, _b(ws), "--no-data", "--plot", ws.out / ("d" * 300) / "x"]


@row("name-out-is-dev-null-path-via-link", r"character device")
def _(ws):
    link = ws.out / "null.json"
    link.symlink_to("/dev/null")
    return ["match", ws.a, _b(ws), "--out", link]


@row("name-out-link-loop", r"loop\.json.*(symbolic links|loop)")
def _(ws):
    (ws.out / "loop.json").symlink_to("loop.json")
    return ["match", ws.a, _b(ws), "--out", ws.out / "loop.json"]


@row("name-plot-is-input-checkpoint-link", r"(input|a\.safetensors)")
def _(ws):
    (ws.out / "alias.png").symlink_to(ws.a)
    return [
        "barrier",
        ws.a,
        _b(ws),
        "--dataset",
        "synthetic",
        "--points",
        "3",
        "--limit",
        "50",
        "--plot",
        ws.out / "alias.png",
    ]


@row("name-read-only-folder-output", r"(not writable|read-only|Permission denied|EACCES|may write)")
def _(ws):
    (ws.out / "ro").mkdir()
    if IS_ROOT:  # root ignores modes: the file system calls are patched
        from tests.helpers.reliability import read_only_dir

        read_only_dir(ws.monkeypatch, ws.out / "ro")
    else:
        (ws.out / "ro").chmod(0o500)
    return ["match", ws.a, _b(ws), "--out", ws.out / "ro" / "perm.json"]


# --------------------------------------------------------------------------- --json: one document, also on errors
JSON_BAD: dict[str, Callable[[Workspace], tuple[list, str]]] = {  # id -> ws -> (argv, pattern)
    "models-bad-arg": lambda ws: (["models", "--json", "--bogus"], r"unrecognized arguments: --bogus"),
    "methods-bad-arg": lambda ws: (["methods", "--json", "--bogus"], r"unrecognized arguments: --bogus"),
    "data-list-data-dir-is-file": lambda ws: (
        ["data", "info", "mnist", "--json", "--data-dir", ws.file("notdir", "x")],
        r"notdir",
    ),
    "data-info-unknown": lambda ws: (["data", "info", "nosuchdata", "--json"], r"nosuchdata"),
    "data-download-unknown": lambda ws: (["data", "download", "nosuchdata", "--json", "--dry-run"], r"nosuchdata"),
    "train-bad-model": lambda ws: (
        ["train", "--model", "nosuchmodel", "--dataset", "synthetic", "--out", ws.out / "runs", "--json"],
        r"nosuchmodel",
    ),
    "train-bad-epochs": lambda ws: (
        ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--out", ws.out / "runs", "--epochs", "x", "--json"],
        r"--epochs",
    ),
    "check-spec-missing": lambda ws: (["check-spec", ws.inp / "none.safetensors", "--json"], r"none\.safetensors"),
    "match-missing": lambda ws: (
        ["match", ws.a, ws.inp / "none.safetensors", "--out", ws.out / "p.json", "--json"],
        r"none\.safetensors",
    ),
    "match-out-fifo": lambda ws: (
        ["match", ws.a, _b(ws), "--out", make_special(ws.out / "p.json", "fifo"), "--json"],
        r"p\.json.*named pipe",
    ),
    "barrier-missing": lambda ws: (["barrier", ws.a, ws.inp / "none", "--json"], r"none"),
    "barrier-bad-points": lambda ws: (["barrier", ws.a, _b(ws), "--points", "0", "--json"], r"--points"),
    "analyze-missing": lambda ws: (["analyze", ws.a, ws.inp / "none", "--no-data", "--json"], r"none"),
    "merge-missing-out": lambda ws: (["merge", ws.a, _b(ws), "--json"], r"--out"),
    "landscape-missing-plot": lambda ws: (["landscape", ws.a, _b(ws), _b(ws), "--json"], r"--plot"),
    "reproduce-unknown-recipe": lambda ws: (
        ["reproduce", "--recipe", "nosuchrecipe", "--out", ws.out / "r", "--cache", ws.out / "c", "--json"],
        r"nosuchrecipe",
    ),
    "reproduce-show-unknown": lambda ws: (["reproduce", "--show", "nosuchrecipe", "--json"], r"nosuchrecipe"),
    "reproduce-dry-run-bad-set": lambda ws: (
        [
            "reproduce",
            "--recipe",
            "tiny",
            "--set",
            "nokey=1",
            "--dry-run",
            "--out",
            ws.out / "r",
            "--cache",
            ws.out / "c",
            "--json",
        ],
        r"nokey",
    ),
    "top-level-unknown-command": lambda ws: (["nosuchcommand", "--json"], r"nosuchcommand"),
}

#: the message each JSON row must match (the argv half is built in the row, the pattern needs no files)
JSON_PATTERNS: dict[str, str] = {}

for _id, _fn in JSON_BAD.items():

    def _build(ws, _fn=_fn, _id=_id):
        argv, JSON_PATTERNS[_id] = _fn(ws)
        return argv

    ROWS.append(Row(f"json-{_id}", _build, "(set when built)"))


# --------------------------------------------------------------------------- locks held by others, lock files
@row("lock-report-folder-held", r"another lmckit process is using the report folder .*\(pid \d+ \(a test holding it")
def _(ws):
    from lmckit.store import file_lock

    lock = ws.out / "r" / ".lmckit.lock"
    cm = file_lock(lock, wait=False, what="report folder", owner="a test holding it")
    cm.__enter__()
    ws.monkeypatch.setattr(ws, "_held", cm, raising=False)
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cache"]


@row("lock-merge-folder-held", r"another lmckit process is using the output folder .*\(pid \d+ \(a test holding it")
def _(ws):
    from lmckit.store import file_lock

    (ws.out / "m").mkdir()
    cm = file_lock(ws.out / "m" / ".lock", wait=False, what="output folder", owner="a test holding it")
    cm.__enter__()
    ws.monkeypatch.setattr(ws, "_held", cm, raising=False)
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic"]


# --------------------------------------------------------------------------- environment oddities
@row("env-lmckit-data-is-a-fifo", r"(fifo|synthetic-missing|not found|no dataset|LMCKIT_DATA|mnist)")
def _(ws):
    ws.monkeypatch.setenv("LMCKIT_DATA", str(make_special(ws.inp / "fifo", "fifo")))
    return ["barrier", ws.a, _b(ws), "--dataset", "mnist", "--points", "3", "--limit", "50"]


@row("env-data-dir-is-a-socket", r"sock")
def _(ws):
    return ["barrier", ws.a, _b(ws), "--dataset", "mnist", "--data-dir", make_special(ws.inp / "sock", "socket")]


@row("env-data-dir-is-a-device", r"dev")
def _(ws):
    return ["barrier", ws.a, _b(ws), "--dataset", "mnist", "--data-dir", make_special(ws.inp / "dev", "chardev")]


@row("env-recipe-is-a-fifo", r"recipe.*(not a regular file|named pipe|device, pipe)")
def _(ws):
    return ["reproduce", "--recipe", make_special(ws.inp / "recipe.toml", "fifo"), "--out", ws.out / "r"]


@row("env-perm-is-a-socket", r"p\.json.*(not a regular file|socket|device, pipe)")
def _(ws):
    return [
        "barrier",
        ws.a,
        _b(ws),
        "--dataset",
        "synthetic",
        "--points",
        "3",
        "--limit",
        "50",
        "--perm",
        make_special(ws.inp / "p.json", "socket"),
    ]


@row("env-checkpoint-is-a-device", r"b\.safetensors.*(not a regular file|device)")
def _(ws):
    return ["check-spec", make_special(ws.inp / "b.safetensors", "chardev")]


@row("env-recipe-description-with-escapes-and-bad-key", r"recipe.*nokey")
def _(ws):
    text = TINY_RECIPE.replace('description = "', 'nokey = 1\ndescription = "\\u001b[31m\\u0007')
    return ws.recipe(text)


# =========================================================================== unseen pass (round three, rel-fix)
#: class of each unseen-pass row (docs/reliability.md "Round three: unseen pass" counts them by class)
UNSEEN_CLASS: dict[str, str] = {}


def unseen(id: str, cls: str, pattern: str):
    UNSEEN_CLASS[f"u-{id}"] = cls
    return row(f"u-{id}", pattern)


def _barrier_argv(ws: Workspace, *extra) -> list:
    return ["barrier", ws.a, _b(ws), "--dataset", "synthetic", "--points", "3", "--limit", "50", *extra]


def _perm_json(ws: Workspace, text: str | bytes) -> Path:
    return ws.file("p.json", text)


def _good_perm_obj(ws: Workspace) -> dict:
    from tests.helpers.reliability import good_perms

    return {"format": "lmckit.permutation", "version": 1, "perms": good_perms(ws.a)}


# ---- outputs that are not regular files (lmckit.store.check_replaceable / check_output_path)
@unseen("merge-merged-checkpoint-is-a-fifo", "outputs", r"merged\.safetensors.*named pipe")
def _(ws):
    make_special(ws.out / "m" / "merged.safetensors", "fifo")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic"]


@unseen("merge-record-is-a-folder", "outputs", r"merge\.json.*folder")
def _(ws):
    make_special(ws.out / "m" / "merge.json", "folder")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic"]


@unseen("merge-perm-file-is-a-socket", "outputs", r"perm_1\.json.*socket")
def _(ws):
    make_special(ws.out / "m" / "perm_1.json", "socket")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic"]


@unseen("match-multi-perm-file-is-a-fifo", "outputs", r"perm_1\.json.*named pipe")
def _(ws):
    make_special(ws.out / "d" / "perm_1.json", "fifo")
    return ["match", ws.a, _b(ws), ws.ckpt("c.safetensors", seed=2), "--multi", "anchor", "--out", ws.out / "d"]


@unseen("match-multi-summary-is-a-folder", "outputs", r"summary\.json.*folder")
def _(ws):
    make_special(ws.out / "d" / "summary.json", "folder")
    return ["match", ws.a, _b(ws), ws.ckpt("c.safetensors", seed=2), "--multi", "anchor", "--out", ws.out / "d"]


@unseen("landscape-accuracy-plot-is-a-fifo", "outputs", r"l-accuracy\.png.*named pipe")
def _(ws):
    make_special(ws.out / "l-accuracy.png", "fifo")
    return [
        "landscape", ws.a, _b(ws), ws.ckpt("c.safetensors", seed=2), "--dataset", "synthetic", "--grid", "3",
        "--limit", "20", "--plot", ws.out / "l.png",
    ]  # fmt: skip


@unseen("analyze-figure-is-a-folder", "outputs", r"spectra\.png.*folder")
def _(ws):
    make_special(ws.out / "plots" / "spectra.png", "folder")
    return ["analyze", ws.a, _b(ws), "--no-data", "--plot", ws.out / "plots"]


@unseen("reproduce-results-is-a-link-to-dev-null", "outputs", r"results\.json.*character device")
def _(ws):
    (ws.out / "r").mkdir()
    (ws.out / "r" / "results.json").symlink_to("/dev/null")
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cache"]


@unseen("train-store-folder-is-a-link-to-a-fifo", "outputs", r"runs/train is a named pipe")
def _(ws):
    (ws.out / "runs").mkdir()
    make_special(ws.out / "runs" / "train", "link-fifo")
    return _train_into(ws, ws.out / "runs")


@unseen("barrier-plot-under-a-fifo", "outputs", r"curve\.png.*fifo.*named pipe")
def _(ws):
    make_special(ws.out / "fifo", "fifo")
    return _barrier_argv(ws, "--plot", ws.out / "fifo" / "curve.png")


@unseen("merge-out-under-a-socket", "outputs", r"--out .*sock/m .*socket")
def _(ws):
    make_special(ws.out / "sock", "socket")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "sock" / "m", "--dataset", "synthetic"]


@unseen("reproduce-cache-locks-is-a-fifo", "outputs", r"\.locks.*named pipe")
def _(ws):
    make_special(ws.out / "cache" / ".locks", "fifo")
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cache", "--quiet"]


# ---- outside files: parser, numbers, format fields
@unseen("perm-json-lone-surrogate-group", "parser", r"p\.json")
def _(ws):
    text = json.dumps(_good_perm_obj(ws))[:-2] + ', "\\ud800": [0]}}'
    return _barrier_argv(ws, "--perm", _perm_json(ws, text))


@unseen("perm-json-entries-as-strings", "parser", r"p\.json.*(integer|int)")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {g: [str(i) for i in p] for g, p in obj["perms"].items()}
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen("perm-json-entries-as-bools", "parser", r"p\.json.*(integer|bool)")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {g: [True] + [False] * (len(p) - 1) for g, p in obj["perms"].items()}
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen("perm-json-entries-nested-lists", "parser", r"p\.json")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {g: [[i] for i in p] for g, p in obj["perms"].items()}
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen("perm-json-format-with-trailing-space", "parser", r"p\.json.*format")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["format"] = "lmckit.permutation "
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen("perm-json-version-zero", "parser", r"p\.json.*version")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["version"] = 0
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen("perm-json-10-mib-of-whitespace-then-garbage", "parser", r"p\.json")
def _(ws):
    return _barrier_argv(ws, "--perm", _perm_json(ws, b" " * (10 * 2**20) + b"x"))


@unseen("perm-transform-file-is-a-perm-json", "parser", r"p\.safetensors")
def _(ws):
    p = ws.file("p.safetensors", json.dumps(_good_perm_obj(ws)))
    return _barrier_argv(ws, "--perm", p)


@unseen("recipe-utf16", "parser", r"recipe\.toml.*(UTF-8|not valid)")
def _(ws):
    p = ws.file("recipe.toml", TINY_RECIPE.encode("utf-16"))
    return ["reproduce", "--recipe", p, "--out", ws.out / "r", "--cache", ws.out / "c", "--dry-run"]


@unseen("recipe-nul-byte", "parser", r"recipe\.toml")
def _(ws):
    p = ws.file("recipe.toml", TINY_RECIPE.replace("[data]", "[data]\x00"))
    return ["reproduce", "--recipe", p, "--out", ws.out / "r", "--cache", ws.out / "c", "--dry-run"]


@unseen("recipe-seeds-bool", "parser", r"seeds")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("seeds = [0, 1, 2]", "seeds = [true, false]")), "--dry-run"]


@unseen("recipe-seeds-float", "parser", r"seeds")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("seeds = [0, 1, 2]", "seeds = [0.5, 1.5]")), "--dry-run"]


@unseen("recipe-seeds-duplicate", "parser", r"seeds")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("seeds = [0, 1, 2]", "seeds = [1, 1, 2]")), "--dry-run"]


@unseen("recipe-name-with-slash", "parser", r"name")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace('name = "tiny"', 'name = "../tiny"')), "--dry-run"]


@unseen("recipe-lambdas-huge", "sizes", r"lambdas")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("lambdas = 5", "lambdas = 100000000")), "--dry-run"]


@unseen("recipe-grid-huge", "sizes", r"grid")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("grid = 3", "grid = 1000000")), "--dry-run"]


@unseen("recipe-am-samples-huge", "sizes", r"am_samples")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("am_samples = 500", "am_samples = 1000000000000")), "--dry-run"]


@unseen("recipe-gamma-out-of-range", "parser", r"gammas")
def _(ws):
    return [*ws.recipe(TINY_RECIPE.replace("gammas = [0.0, 0.3]", "gammas = [0.0, 7.0]")), "--dry-run"]


@unseen("run-folder-config-is-a-fifo", "parser", r"config\.json.*(regular file|named pipe)")
def _(ws):
    folder = ws.inp / "run"
    folder.mkdir()
    ws.ckpt("run/model.safetensors", seed=0)
    make_special(folder / "config.json", "fifo")
    return _barrier_argv(ws)[:1] + [folder] + _barrier_argv(ws)[2:]


@unseen("run-folder-model-is-a-link-loop", "naming", r"checkpoint .*model\.safetensors: its symbolic links form a loop")
def _(ws):
    folder = ws.inp / "run"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to("model.safetensors")
    return ["check-spec", folder]


@unseen("run-folder-model-is-a-dangling-link", "naming", r"model\.safetensors is a symbolic link to gone\.safetensors")
def _(ws):
    folder = ws.inp / "run"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to("gone.safetensors")
    return ["barrier", folder, _b(ws), "--dataset", "synthetic"]


@unseen("checkpoint-is-a-link-loop", "naming", r"checkpoint .*loop\.safetensors: its symbolic links form a loop")
def _(ws):
    (ws.inp / "loop.safetensors").symlink_to("loop.safetensors")
    return ["check-spec", ws.inp / "loop.safetensors"]


@unseen("perm-is-a-link-loop", "naming", r"p\.json: its symbolic links form a loop")
def _(ws):
    (ws.inp / "p.json").symlink_to("p.json")
    return _barrier_argv(ws, "--perm", ws.inp / "p.json")


@unseen("recipe-is-a-link-loop", "naming", r"recipe\.toml.*loop")
def _(ws):
    (ws.inp / "recipe.toml").symlink_to("recipe.toml")
    return ["reproduce", "--recipe", ws.inp / "recipe.toml", "--out", ws.out / "r", "--dry-run"]


@unseen("data-dir-is-a-dangling-link", "naming", r"(gone|not a folder|not found)")
def _(ws):
    (ws.inp / "data").symlink_to("gone")
    return ["data", "info", "mnist", "--data-dir", ws.inp / "data"]


# ---- numbers and sizes from options
@unseen("train-lr-nan", "numbers", r"\blr must be a finite number, got nan")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--lr", "nan", "--quiet"]


@unseen("train-lr-inf", "numbers", r"\blr must be a finite number, got inf")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--lr", "inf", "--quiet"]


@unseen("train-val-size-negative", "naming", r"training setting val_size must not be negative, got -5")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--val-size", "-5", "--quiet"]


@unseen("train-threads-zero", "numbers", r"--threads")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--threads", "0", "--quiet"]


@unseen("train-eval-batch-size-zero", "numbers", r"eval_batch_size must be positive")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--eval-batch-size", "0", "--quiet"]


@unseen("train-epochs-1e300", "numbers", r"--epochs")
def _(ws):
    return [*TRAIN_ARGV[:-2], "--epochs", "1e300", "--out", ws.out / "runs", "--quiet"]


@unseen("train-seed-negative", "numbers", r"seed must be between 0 and")
def _(ws):
    return [*TRAIN_ARGV, "--out", ws.out / "runs", "--seed", "-1", "--quiet"]


@unseen("barrier-limit-zero", "numbers", r"--limit")
def _(ws):
    return ["barrier", ws.a, _b(ws), "--dataset", "synthetic", "--limit", "0"]


@unseen("data-info-val-size-huge", "sizes", r"(--val-size|val)")
def _(ws):
    return ["data", "info", "synthetic", "--val-size", str(10**12)]


@unseen("data-download-timeout-nan", "numbers", r"--timeout")
def _(ws):
    return ["data", "download", "mnist", "--root", ws.out / "d", "--timeout", "nan"]


@unseen("data-download-timeout-negative", "numbers", r"--timeout")
def _(ws):
    return ["data", "download", "mnist", "--root", ws.out / "d", "--timeout", "-1"]


@unseen("data-download-mirror-not-a-url", "traceback", r"--mirror 'ftp//nowhere' is not an http://, https://")
def _(ws):
    return ["data", "download", "mnist", "--root", ws.out / "d", "--mirror", "ftp//nowhere", "--timeout", "1"]


@unseen("check-spec-tol-inf", "numbers", r"--tol")
def _(ws):
    return ["check-spec", "mlp_tiny", "--tol", "inf"]


@unseen("match-max-iter-zero", "numbers", r"--max-iter")
def _(ws):
    return ["match", ws.a, _b(ws), "--out", ws.out / "p.json", "--max-iter", "0"]


@unseen("analyze-gamma-nan", "numbers", r"--gamma.*nan")
def _(ws):
    return ["analyze", ws.a, _b(ws), "--no-data", "--gamma", "nan"]


@unseen("analyze-rank-fraction-zero", "numbers", r"rank.fraction")
def _(ws):
    return ["analyze", ws.a, _b(ws), "--dataset", "synthetic", "--rank-fractions", "0", "--limit", "50"]


# ---- environment
@unseen("env-data-mirror-not-a-url-dry-run", "environment", r"LMCKIT_DATA_MIRROR 'notaurl' is not an http")
def _(ws):
    ws.monkeypatch.setenv("LMCKIT_DATA_MIRROR", "notaurl")
    return ["data", "download", "mnist", "--root", ws.out / "d", "--dry-run"]


# ---- --json: one document, also on errors
@unseen("json-train-store-is-a-fifo", "json", r"runs/train is a named pipe")
def _(ws):
    (ws.out / "runs").mkdir()
    make_special(ws.out / "runs" / "train", "fifo")
    return [*_train_into(ws, ws.out / "runs"), "--json"]


@unseen("json-merge-out-is-a-file", "json", r"m.*(file|not a folder)")
def _(ws):
    make_special(ws.out / "m", "file")
    return ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic", "--json"]


@unseen("json-landscape-bad-grid", "json", r"--grid")
def _(ws):
    return ["landscape", ws.a, _b(ws), _b(ws), "--plot", ws.out / "l.png", "--grid", "0", "--json"]


@unseen("json-data-download-root-loop", "json", r"--root .*loop")
def _(ws):
    (ws.out / "loop").symlink_to("loop")
    return ["data", "download", "mnist", "--root", ws.out / "loop", "--dry-run", "--json"]


@unseen("json-check-spec-link-loop", "json", r"loop\.safetensors")
def _(ws):
    (ws.inp / "loop.safetensors").symlink_to("loop.safetensors")
    return ["check-spec", ws.inp / "loop.safetensors", "--json"]


@unseen("json-data-info-files-differ", "json", r"do not match the published dataset")
def _(ws):
    return ["data", "info", "fashion-mnist", "--data-dir", _idx_folder(ws, "fashion-mnist", gz=True), "--json"]


# ---- hostile names
@unseen("checkpoint-name-dash", "naming", r"(-|not found|does not exist|option)")
def _(ws):
    return ["check-spec", "-"]


# =========================================================================== unseen pass, part two (issue 28)
#: class of each part-two row (docs/reliability.md "Round three, part two" counts them by class)
UNSEEN2_CLASS: dict[str, str] = {}


def unseen2(id: str, cls: str, pattern: str, xfail: str | None = None):
    UNSEEN2_CLASS[f"v-{id}"] = cls
    return row(f"v-{id}", pattern, xfail)


def _hostile_b(ws: Workspace, kind: str) -> Path:
    """``in/b.safetensors`` damaged as ``kind`` (bytes level, or a real checkpoint of another dtype / model)."""
    import struct

    if kind == "float16":
        return ws.ckpt("b.safetensors", seed=1, state_edit=lambda s: {k: v.half() for k, v in s.items()})
    if kind == "int8":
        return ws.ckpt(
            "b.safetensors", seed=1, state_edit=lambda s: {k: v.to(__import__("torch").int8) for k, v in s.items()}
        )
    if kind == "nan":

        def nan(s):
            k = next(iter(s))
            s[k] = s[k].clone()
            s[k].view(-1)[0] = float("nan")
            return s

        return ws.ckpt("b.safetensors", seed=1, state_edit=nan)
    if kind == "other-model":
        return ws.ckpt("b.safetensors", name="resnet_tiny", seed=1)
    data = ws.ckpt("tmp-b.safetensors", seed=1).read_bytes()
    (ws.inp / "tmp-b.safetensors").unlink()
    n = int.from_bytes(data[:8], "little")
    body = {
        "truncated-half": data[: len(data) // 2],
        "header-claims-2-62": struct.pack("<Q", 2**62) + data[8:],
        "header-longer-than-file": struct.pack("<Q", len(data)) + data[8:],
        "empty": b"",
        "zero-header": b"\0" * 8,
        "no-tensors": struct.pack("<Q", 2) + b"{}",
        "header-not-object": struct.pack("<Q", 2) + b"[]",
        "tail-garbage": data[: 8 + n] + b"\xff" * 3,
    }[kind]
    return ws.file("b.safetensors", body)


HOSTILE_CKPT_KINDS = [
    "truncated-half", "header-claims-2-62", "header-longer-than-file", "empty", "zero-header", "no-tensors",
    "header-not-object", "tail-garbage", "float16", "int8", "nan", "other-model",
]  # fmt: skip
HOSTILE_CKPT_COMMANDS: dict[str, Callable[[Workspace, Path], list]] = {
    "match": lambda ws, b: ["match", ws.a, b, "--out", ws.out / "p.json"],
    "analyze": lambda ws, b: ["analyze", ws.a, b, "--no-data"],
    "merge": lambda ws, b: ["merge", ws.a, b, "--out", ws.out / "m", "--dataset", "synthetic"],
    "landscape": lambda ws, b: [
        "landscape",
        ws.a,
        b,
        ws.ckpt("c.safetensors", seed=2),
        "--dataset",
        "synthetic",
        "--grid",
        "3",
        "--limit",
        "20",
        "--plot",
        ws.out / "l.png",
    ],  # fmt: skip
}
for _cmd, _argv in HOSTILE_CKPT_COMMANDS.items():
    for _kind in HOSTILE_CKPT_KINDS:

        def _build(ws, _argv=_argv, _kind=_kind):
            return _argv(ws, _hostile_b(ws, _kind))

        UNSEEN2_CLASS[f"v-ckpt-{_kind}-to-{_cmd}"] = "checkpoints"
        ROWS.append(Row(f"v-ckpt-{_kind}-to-{_cmd}", _build, r"b\.safetensors"))

for _kind in ["truncated-half", "header-claims-2-62", "no-tensors", "header-not-object", "int8", "nan"]:

    def _build(ws, _kind=_kind):
        return ["check-spec", _hostile_b(ws, _kind)]

    UNSEEN2_CLASS[f"v-ckpt-{_kind}-to-check-spec"] = "checkpoints"
    ROWS.append(Row(f"v-ckpt-{_kind}-to-check-spec", _build, r"b\.safetensors"))


# ---- Hugging Face folders (--hf)
_HF_BYTES: dict[str, bytes] = {}


def _hf_folder(ws: Workspace, name: str = "hfa") -> Path:
    """A tiny GPT-2 folder written by save_pretrained (config.json + model.safetensors), built once per session."""
    if not _HF_BYTES:
        T = pytest.importorskip("transformers")
        import tempfile

        cfg = T.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        __import__("torch").manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            T.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
            for f in Path(d).iterdir():
                _HF_BYTES[f.name] = f.read_bytes()
    folder = ws.inp / name
    folder.mkdir()
    for k, v in _HF_BYTES.items():
        if k in ("config.json", "model.safetensors"):
            (folder / k).write_bytes(v)
    return folder


def _hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _hf_edit_config(ws: Workspace, edit) -> Path:
    folder = _hf_folder(ws)
    cfg = _hf_config(folder)
    out = edit(cfg)
    (folder / "config.json").write_text(out if isinstance(out, str) else json.dumps(cfg))
    return folder


def _hf_sharded(ws: Workspace, weight_map_edit) -> Path:
    """The folder's model.safetensors moved to one shard, with an index whose weight_map ``weight_map_edit`` damages."""
    from safetensors import safe_open

    folder = _hf_folder(ws)
    shard = folder / "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(shard)
    with safe_open(str(shard), "pt") as f:
        wm = {k: shard.name for k in f.keys()}
    index = weight_map_edit(wm)
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def _hf_state_edit(ws: Workspace, edit) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _hf_folder(ws)
    st = load_file(str(folder / "model.safetensors"))
    save_file(edit(st), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _first_key_edit(fn):
    def edit(st):
        k = sorted(st)[0]
        st[k] = fn(st[k])
        return st

    return edit


HF_CASES: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "config-not-json": (lambda ws: _hf_edit_config(ws, lambda c: "{not json"), r"config\.json"),
    "config-a-list": (lambda ws: _hf_edit_config(ws, lambda c: "[1, 2]"), r"config\.json.*not a JSON object"),
    "config-empty-file": (lambda ws: _hf_edit_config(ws, lambda c: ""), r"config\.json"),
    "config-no-architectures": (lambda ws: _hf_edit_config(ws, lambda c: c.pop("architectures")), r"architectures"),
    "config-architectures-a-string": (
        lambda ws: _hf_edit_config(ws, lambda c: c.update(architectures="GPT2LMHeadModel")),
        r"architectures",
    ),
    "config-two-architectures": (
        lambda ws: _hf_edit_config(ws, lambda c: c.update(architectures=["GPT2LMHeadModel", "GPT2Model"])),
        r"architectures",
    ),
    "config-architecture-is-a-function": (
        lambda ws: _hf_edit_config(ws, lambda c: c.update(architectures=["pipeline"])),
        r"'pipeline' is not a transformers model class",
    ),
    "config-architecture-unknown": (
        lambda ws: _hf_edit_config(ws, lambda c: c.update(architectures=["NoSuchModelForLM"])),
        r"NoSuchModelForLM",
    ),
    "config-auto-map": (
        lambda ws: _hf_edit_config(ws, lambda c: c.update(auto_map={"AutoModel": "evil.Model"})),
        r"custom model code",
    ),
    "config-width-negative": (lambda ws: _hf_edit_config(ws, lambda c: c.update(n_embd=-8)), r"hfa"),
    "config-width-string": (lambda ws: _hf_edit_config(ws, lambda c: c.update(n_embd="eight")), r"hfa"),
    "config-heads-not-dividing": (lambda ws: _hf_edit_config(ws, lambda c: c.update(n_head=3)), r"hfa"),
    "config-model-type-bert": (lambda ws: _hf_edit_config(ws, lambda c: c.update(model_type="bert")), r"hfa"),
    "config-vocab-huge": (lambda ws: _hf_edit_config(ws, lambda c: c.update(vocab_size=10**12)), r"hfa"),
    "config-is-a-folder": (
        lambda ws: (lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir(), f)[2])(_hf_folder(ws)),
        r"hfa.*config\.json",
    ),
    "config-is-a-fifo": (
        lambda ws: (lambda f: ((f / "config.json").unlink(), os.mkfifo(f / "config.json"), f)[2])(_hf_folder(ws)),
        r"config\.json.*(named pipe|regular file)",
    ),
    "config-is-a-link-loop": (
        lambda ws: (lambda f: ((f / "config.json").unlink(), (f / "config.json").symlink_to("config.json"), f)[2])(
            _hf_folder(ws)
        ),
        r"config\.json",
    ),
    "no-config": (lambda ws: (lambda f: ((f / "config.json").unlink(), f)[1])(_hf_folder(ws)), r"hfa.*config\.json"),
    "only-pytorch-model-bin": (
        lambda ws: (lambda f: ((f / "model.safetensors").rename(f / "pytorch_model.bin"), f)[1])(_hf_folder(ws)),
        r"pytorch_model\.bin.*pickle",
    ),
    "no-weights": (
        lambda ws: (lambda f: ((f / "model.safetensors").unlink(), f)[1])(_hf_folder(ws)),
        r"hfa.*model\.safetensors",
    ),
    "index-shard-missing": (
        lambda ws: _hf_sharded(ws, lambda wm: {"weight_map": {**wm, "extra": "model-00002-of-00002.safetensors"}}),
        r"model-00002-of-00002\.safetensors.*missing",
    ),
    "index-points-outside": (
        lambda ws: _hf_sharded(ws, lambda wm: {"weight_map": {k: "../a.safetensors" for k in wm}}),
        r"\.\./a\.safetensors.*outside",
    ),
    "index-absolute-path": (
        lambda ws: _hf_sharded(ws, lambda wm: {"weight_map": {k: "/etc/passwd" for k in wm}}),
        r"/etc/passwd.*outside",
    ),
    "index-not-json": (lambda ws: _hf_sharded(ws, lambda wm: "{garbage"), r"index"),
    "index-empty-weight-map": (lambda ws: _hf_sharded(ws, lambda wm: {"weight_map": {}}), r"weight_map"),
    "index-weight-map-ints": (lambda ws: _hf_sharded(ws, lambda wm: {"weight_map": {k: 1 for k in wm}}), r"weight_map"),
    "index-a-list": (lambda ws: _hf_sharded(ws, lambda wm: "[]"), r"weight_map"),
    "index-shard-is-a-folder": (
        lambda ws: (lambda f: ((f / "shard.safetensors").mkdir(), f)[1])(
            _hf_sharded(ws, lambda wm: {"weight_map": {k: "shard.safetensors" for k in wm}})
        ),
        r"shard\.safetensors",
    ),
    "weights-truncated": (
        lambda ws: (
            lambda f: ((f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]), f)[1]
        )(_hf_folder(ws)),
        r"model\.safetensors",
    ),
    "weights-extra-tensor": (
        lambda ws: _hf_state_edit(ws, lambda st: {**st, "evil.weight": __import__("torch").zeros(2)}),
        r"evil\.weight",
    ),
    "weights-missing-tensor": (
        lambda ws: _hf_state_edit(ws, lambda st: {k: v for k, v in st.items() if "ln_f" not in k}),
        r"lacks tensors.*ln_f",
    ),
    "weights-misshapen": (lambda ws: _hf_state_edit(ws, _first_key_edit(lambda t: t[:1].clone())), r"has shape"),
    "weights-nan": (
        lambda ws: _hf_state_edit(ws, _first_key_edit(lambda t: t.clone().fill_(float("nan")))),
        r"model\.safetensors.*(finite|nan)",
    ),
    "weights-int8": (
        lambda ws: _hf_state_edit(ws, lambda st: {k: v.to(__import__("torch").int8) for k, v in st.items()}),
        r"model\.safetensors",
    ),
    "weights-pickle-named-safetensors": (
        lambda ws: (lambda f: (__import__("torch").save({"x": 1}, f / "model.safetensors"), f)[1])(_hf_folder(ws)),
        r"model\.safetensors",
    ),
    "lmckit-run-folder": (
        lambda ws: (
            lambda f: (
                f.mkdir(),
                (f / "config.json").write_text('{"model": "mlp_tiny"}'),
                (f / "model.safetensors").write_bytes(ws.a.read_bytes()),
                f,
            )[3]
        )(ws.inp / "hfa"),
        r"hfa.*architectures",
    ),  # fmt: skip
    "plain-safetensors-file": (lambda ws: ws.a, r"a\.safetensors.*not a folder"),
    "hub-id": (lambda ws: Path("EleutherAI/pythia-70m"), r"Hub id"),
}
for _case, (_make, _pat) in HF_CASES.items():

    def _build(ws, _make=_make):
        pytest.importorskip("transformers")
        return ["check-spec", "--hf", _make(ws)]

    UNSEEN2_CLASS[f"v-hf-{_case}"] = "hf"
    ROWS.append(Row(f"v-hf-{_case}", _build, _pat))


@unseen2("hf-match-second-folder-bad-config", "hf", r"hfb.*config\.json")
def _(ws):
    pytest.importorskip("transformers")
    a = _hf_folder(ws)
    b = _hf_folder(ws, "hfb")
    (b / "config.json").write_text("{")
    return ["match", "--hf", a, b, "--out", ws.out / "p.json"]


@unseen2("hf-match-folders-of-two-widths", "hf", r"hfb")
def _(ws):
    pytest.importorskip("transformers")
    a = _hf_folder(ws)
    b = _hf_folder(ws, "hfb")
    cfg = _hf_config(b)
    cfg["n_embd"] = 16
    (b / "config.json").write_text(json.dumps(cfg))
    return ["match", "--hf", a, b, "--out", ws.out / "p.json"]


@unseen2("hf-barrier-hub-id-second", "hf", r"Hub id")
def _(ws):
    pytest.importorskip("transformers")
    return ["barrier", "--hf", _hf_folder(ws), "gpt2", "--dataset", "text-synthetic", "--points", "3", "--limit", "4"]


@unseen2("hf-merge-out-exists-as-file", "hf", r"m.*(file|not a folder|exists)")
def _(ws):
    pytest.importorskip("transformers")
    (ws.out / "m").write_text("x")
    return [
        "merge", "--hf", _hf_folder(ws), _hf_folder(ws, "hfb"), "--out", ws.out / "m", "--dataset",
        "text-synthetic", "--no-curve", "--limit", "4",
    ]  # fmt: skip


@unseen2("hf-barrier-image-dataset", "hf", r"(dataset|mnist|text)")
def _(ws):
    pytest.importorskip("transformers")
    a = _hf_folder(ws)
    return ["barrier", "--hf", a, _hf_folder(ws, "hfb"), "--dataset", "synthetic", "--points", "3", "--limit", "4"]


# ---- the new recipes: --dry-run with bad --set
def _dry(recipe: str, *sets: str):
    def build(ws):
        return [
            "reproduce", "--recipe", recipe, "--dry-run", "--out", ws.out / "r", "--cache", ws.out / "c",
            *[f"--set={s}" for s in sets],
        ]  # fmt: skip

    return build


RECIPE_SETS: dict[str, tuple[str, list[str], str]] = {
    "paper-val-size-negative": ("paper", ["models.1.overrides.val_size=-1"], r"val_size"),
    "paper-seeds-repeated": ("paper", ["train.seeds=[0, 0]"], r"seeds"),
    "paper-split-unknown": ("paper", ['barrier.splits=["nope"]'], r"splits"),
    "paper-ste-protocol-unknown": ("paper", ['match.ste.protocol="bogus"'], r"protocol"),
    "paper-keep-epoch-unknown": ("paper", ['models.0.overrides.keep_epoch="bogus"'], r"keep_epoch"),
    "paper-methods-empty": ("paper", ["match.methods=[]"], r"methods"),
    "paper-method-unknown": ("paper", ['match.methods=["naive", "magic"]'], r"magic"),
    "paper-lambdas-one": ("paper", ["barrier.lambdas=1"], r"lambdas"),
    "paper-limit-string": ("paper", ['barrier.limit="all"'], r"limit"),
    "paper-preprocess-unknown": ("paper", ['models.0.overrides.preprocess="rot13"'], r"preprocess"),
    "paper-models-index-negative": ("paper", ["models.-1.options.width=3"], r"models"),
    "paper-dataset-unknown": ("paper", ['data.dataset="imagenet"'], r"imagenet"),
    "gpt2-width-zero": ("gpt2-text", ["models.0.options.width=0"], r"width"),
    "gpt2-depth-zero": ("gpt2-text", ["models.0.options.depth=0"], r"depth"),
    "gpt2-image-dataset": ("gpt2-text", ['data.dataset="mnist"'], r"(mnist|dataset|token)"),
    "gpt2-norm-batchnorm": ("gpt2-text", ['models.0.norm="batchnorm"'], r"norm"),
    "gpt2-preset-unknown": ("gpt2-text", ['train.preset="nope"'], r"preset"),
    "gpt2-am-samples-negative": ("gpt2-text", ["match.am_samples=-1"], r"am_samples"),
    "gpt2-gamma-nan": ("gpt2-text", ["analysis.gammas=[nan]"], r"gammas"),
    "gpt2-option-unknown": ("gpt2-text", ["models.0.options.colour=3"], r"colour"),
    "set-empty-key": ("tiny", ["=3"], r"--set"),
    "set-unterminated-list": ("tiny", ["train.seeds=[0, 1"], r"train\.seeds"),
    "set-double-dot": ("tiny", ["train..seeds=[0, 1]"], r"train\.\.seeds"),
    "set-on-a-table": ("tiny", ["match=3"], r"match"),
    "set-name-with-slash": ("tiny", ['name="../x"'], r"name"),
    "set-inline-table-for-seeds": ("tiny", ["train.seeds={a=1}"], r"seeds"),
}
for _case, (_recipe, _sets, _pat) in RECIPE_SETS.items():
    UNSEEN2_CLASS[f"v-set-{_case}"] = "recipes"
    ROWS.append(Row(f"v-set-{_case}", _dry(_recipe, *_sets), _pat))


# ---- hostile recipe files
RECIPE_FILES: dict[str, tuple[Callable[[str], str], str]] = {
    "empty-file": (lambda t: "", r"recipe\.toml"),
    "models-empty": (lambda t: t.split("[[models]]")[0].replace("[data]", "models = []\n[data]", 1), r"models"),
    "model-unknown": (
        lambda t: re.sub(r'(\[\[models\]\]\s*\nname = )"[^"]*"', r'\1"nosuchnet"', t, count=1),
        r"nosuchnet",
    ),
    "seeds-datetime": (lambda t: t.replace("seeds = [0, 1, 2]", "seeds = 1979-05-27T07:32:00Z"), r"seeds"),
    "splits-a-string": (lambda t: re.sub(r"splits = \[[^\]]*\]", 'splits = "test"', t), r"splits"),
    "seeds-inline-table": (lambda t: t.replace("seeds = [0, 1, 2]", "seeds = {a = 1}"), r"seeds"),
    "description-a-table": (
        lambda t: t.replace('description = "', 'description = {x = 1}\nnothing = "'),
        r"description",
    ),
    "name-empty": (lambda t: re.sub(r'^name = "[^"]*"', 'name = ""', t, count=1, flags=re.M), r"name"),
    "data-a-list": (lambda t: t.replace("[data]", "data = [1]\n[dataz]"), r"data"),
}
for _case, (_edit, _pat) in RECIPE_FILES.items():

    def _build(ws, _edit=_edit):
        return [*ws.recipe(_edit(TINY_RECIPE)), "--dry-run"]

    UNSEEN2_CLASS[f"v-recipe-{_case}"] = "recipes"
    ROWS.append(Row(f"v-recipe-{_case}", _build, _pat))


# ---- hostile perm files through the other subcommands
@unseen2("perm-wrong-length-to-analyze", "perms", r"p\.json")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {g: p[:-1] for g, p in obj["perms"].items()}
    return ["analyze", ws.a, _b(ws), "--no-data", "--perm", _perm_json(ws, json.dumps(obj))]


@unseen2("perm-duplicates-to-landscape", "perms", r"p\.json")
def _(ws):
    obj = _good_perm_obj(ws)
    good = ws.file("pc.json", json.dumps(_good_perm_obj(ws)))
    obj["perms"] = {g: [0] * len(p) for g, p in obj["perms"].items()}
    return [
        "landscape", ws.a, _b(ws), ws.ckpt("c.safetensors", seed=2), "--dataset", "synthetic", "--grid", "3",
        "--limit", "20", "--plot", ws.out / "l.png", "--perm", _perm_json(ws, json.dumps(obj)), "--perm", good,
    ]  # fmt: skip


@unseen2("perm-empty-perms-to-barrier", "perms", r"p\.json")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {}
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen2("perm-file-empty-object", "perms", r"p\.json")
def _(ws):
    return _barrier_argv(ws, "--perm", _perm_json(ws, "{}"))


@unseen2("perm-huge-entry-count", "perms", r"p\.json")
def _(ws):
    obj = _good_perm_obj(ws)
    obj["perms"] = {g: list(range(200000)) for g in obj["perms"]}
    return _barrier_argv(ws, "--perm", _perm_json(ws, json.dumps(obj)))


@unseen2("perm-is-a-checkpoint", "perms", r"a\.safetensors|perm")
def _(ws):
    return _barrier_argv(ws, "--perm", ws.a)


# ---- outputs
@unseen2("match-out-is-a-link-to-the-checkpoint-a", "outputs", r"p\.json|a\.safetensors")
def _(ws):
    (ws.out / "p.json").symlink_to(ws.a)
    return ["match", ws.a, _b(ws), "--out", ws.out / "p.json"]


@unseen2("reproduce-out-under-a-file", "outputs", r"afile")
def _(ws):
    (ws.out / "afile").write_text("x")
    return ["reproduce", "--recipe", "tiny", "--dry-run", "--out", ws.out / "afile" / "r", "--cache", ws.out / "c"]


@unseen2("reproduce-cache-is-a-file", "outputs", r"--cache|cache")
def _(ws):
    (ws.out / "cachefile").write_text("x")
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "r", "--cache", ws.out / "cachefile", "--quiet"]


# ---- environment
@unseen2("env-lmckit-data-relative-missing", "environment", r"(mnist|not found|LMCKIT_DATA|no dataset)")
def _(ws):
    ws.monkeypatch.setenv("LMCKIT_DATA", "no/such/relative/dir")
    return ["barrier", ws.a, _b(ws), "--dataset", "mnist", "--points", "3", "--limit", "50"]


# ---- part two: the Python API with hostile files (lmckit.load, lmckit.hf.load_hf, load_recipe)
def _api2_hf(ws: Workspace, case: str) -> Path:
    return HF_CASES[case][0](ws)


API2_CASES: dict[str, tuple[Callable[[Workspace], object], str]] = {
    "load-truncated": (lambda ws: __import__("lmckit").load(_hostile_b(ws, "truncated-half")), r"b\.safetensors"),
    "load-header-claims-2-62": (
        lambda ws: __import__("lmckit").load(_hostile_b(ws, "header-claims-2-62")),
        r"b\.safetensors",
    ),
    "load-empty": (lambda ws: __import__("lmckit").load(_hostile_b(ws, "empty")), r"b\.safetensors"),
    "load-nan": (lambda ws: __import__("lmckit").load(_hostile_b(ws, "nan")), r"b\.safetensors"),
    "load-int8": (lambda ws: __import__("lmckit").load(_hostile_b(ws, "int8")), r"b\.safetensors"),
    "load-bytes-path": (lambda ws: __import__("lmckit").load(b"\xff/x.safetensors"), r"(path|x\.safetensors)"),
    "load-device-bogus": (lambda ws: __import__("lmckit").load(ws.a, device="tpu:9"), r"tpu"),
    "load-hf-config-width-negative": (
        lambda ws: __import__("lmckit.hf").hf.load_hf(_api2_hf(ws, "config-width-negative")),
        r"hfa/config\.json",
    ),
    "load-hf-index-outside": (
        lambda ws: __import__("lmckit.hf").hf.load_hf(_api2_hf(ws, "index-points-outside")),
        r"outside",
    ),
    "load-hf-int8": (lambda ws: __import__("lmckit.hf").hf.load_hf(_api2_hf(ws, "weights-int8")), r"int8"),
    "load-recipe-empty": (
        lambda ws: __import__("lmckit.pipeline.recipe").pipeline.recipe.load_recipe(str(ws.file("r.toml", ""))),
        r"r\.toml.*no key",
    ),
    "load-recipe-gpt2-depth-0": (
        lambda ws: __import__("lmckit.pipeline.recipe").pipeline.recipe.load_recipe(
            "gpt2-text", ["models.0.options.depth=0"]
        ),
        r"depth must be at least 1",
    ),
}
for _k in list(API2_CASES):
    UNSEEN2_CLASS[f"api-{_k}"] = "api"


@pytest.mark.parametrize("case", list(API2_CASES))
def test_api_refuses_hostile_files_with_lmc_error(case, tmp_path, monkeypatch):
    from lmckit.errors import LmcError

    if "hf" in case or "gpt2" in case:
        pytest.importorskip("transformers")
    ws = Workspace(tmp_path / "ws", monkeypatch)
    call, pattern = API2_CASES[case]
    with pytest.raises(LmcError, match=pattern):
        call(ws)


# ---- the Python API: the same paths raise LmcError naming them (unseen pass, class "api")
def _api_tiny_config():
    from lmckit.train import make_config

    return make_config("tiny", model="mlp_tiny", dataset="synthetic", epochs=1)


API_CASES: dict[str, tuple[Callable[[Path], object], str]] = {  # id -> (call in a folder with loop, fifo, afile)
    "checkpoint-load-loop": (lambda d: __import__("lmckit.checkpoint").checkpoint.load(d / "loop"), r"loop.*loop"),
    "load-checkpoint-fifo": (
        lambda d: __import__("lmckit.checkpoint").checkpoint.load_checkpoint(d / "fifo"),
        r"fifo is not a regular file",
    ),
    "read-json-loop": (lambda d: __import__("lmckit.store").store.read_json(d / "loop", "record"), r"record .*loop"),
    "load-state-loop": (lambda d: __import__("lmckit.store").store.load_state(d / "loop"), r"loop.*symbolic links"),
    "atomic-write-under-a-file": (
        lambda d: __import__("lmckit.store").store.atomic_write_text(d / "afile" / "x", "x"),
        r"afile/x",
    ),
    "save-state-fifo": (
        lambda d: __import__("lmckit.store").store.save_state(d / "fifo", {"w": __import__("torch").zeros(2)}, {}),
        r"fifo: it is a named pipe",
    ),
    "download-root-fifo": (
        lambda d: __import__("lmckit.data.download").data.download.download_dataset(
            "mnist", d / "fifo", mirror="http://127.0.0.1:9/", timeout=1
        ),
        r"--root .*fifo is a named pipe",
    ),
    "download-mirror-gopher": (
        lambda d: __import__("lmckit.data.download").data.download.download_plan("mnist", mirror="gopher:x"),
        r"--mirror 'gopher:x'",
    ),
    "train-store-fifo": (
        lambda d: __import__("lmckit.train").train.train(_api_tiny_config(), out_root=d / "fifo", progress=False),
        r"run store --out .*fifo is a named pipe",
    ),
    "train-store-loop": (
        lambda d: __import__("lmckit.train").train.train(_api_tiny_config(), out_root=d / "loop", progress=False),
        r"run store --out .*loop: its symbolic links form a loop",
    ),
    "real-path-under-a-loop": (lambda d: __import__("lmckit.store").store.real_path(d / "loop" / "x"), r"loop/x"),
    "file-lock-loop": (
        lambda d: __import__("lmckit.store").store.file_lock(d / "loop").__enter__(),
        r"loop.*symbolic links",
    ),
    "make-dirs-under-a-fifo": (lambda d: __import__("lmckit.store").store.make_dirs(d / "fifo" / "x"), r"fifo/x"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses_paths_with_lmc_error(case, tmp_path, monkeypatch):
    from lmckit.errors import LmcError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "afile").write_text("x")
    call, pattern = API_CASES[case]
    with pytest.raises(LmcError, match=pattern):
        call(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "xdg")
    assert left == ["afile", "fifo", "loop"]  # nothing created beside them


# --------------------------------------------------------------------------- the table
def test_table_has_enough_rows():
    assert len(ROWS) >= 100
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    "case",
    [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []) for r in ROWS],
)
def test_bad_input_io(case: Row, tmp_path, monkeypatch, capsys):
    if "gpt2" in case.id:  # the gpt2-text recipe's model is a Hugging Face GPT-2: its sizes are checked with the extra
        pytest.importorskip("transformers")
    ws = Workspace(tmp_path / "ws", monkeypatch)
    try:
        argv = case.build(ws)
        pattern = JSON_PATTERNS[case.id[5:]] if case.id.startswith("json-") else case.pattern
        before = snapshot(ws.root)
        specials = {p: os.lstat(p) for p in ws.root.rglob("*") if not (p.is_file() or p.is_dir()) or p.is_symlink()}
        rc, out, err = run_cli(argv, capsys)
        after = snapshot(ws.root)
    finally:
        held = getattr(ws, "_held", None)
        if held is not None:
            with contextlib.suppress(Exception):
                held.__exit__(None, None, None)
    assert rc == 2, f"exit status {rc}, stderr:\n{err}\nstdout:\n{out[-2000:]}"
    assert re.search(pattern, err, re.S | re.I), f"message does not match {pattern!r}:\n{err}"
    assert re.match(r"lmckit[ :]", err) and "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, f"not one paragraph:\n{err}"
    assert snapshot_diff(before, after) == [], "the failed command changed files"
    for p, st in specials.items():  # devices, pipes, sockets and links are the same nodes, not replaced
        now = os.lstat(p)
        assert (now.st_ino, now.st_mode) == (st.st_ino, st.st_mode), f"{p} was replaced"
    if "--json" in [str(a) for a in argv]:
        doc = json.loads(out)  # exactly one JSON document, nothing else on stdout
        assert doc["exit_code"] == 2 and isinstance(doc["error"], str) and re.search(pattern, doc["error"], re.S | re.I)


# --------------------------------------------------------------------------- real processes
def _env(ws: Workspace) -> dict:
    return subprocess_env(XDG_CACHE_HOME=str(ws.root.parent / "xdg"), LMCKIT_DATA=str(ws.empty))


@pytest.mark.parametrize("argv", [["methods", "--json"], ["models"], ["reproduce", "--list"], ["data", "list"]])
def test_full_stdout_is_one_line_and_status_2(argv, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "lmckit.cli", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(ws),
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]  # `lmckit data list`, as its usage errors say
    assert proc.stderr.strip().splitlines() == [
        f"lmckit {command}: error: cannot write to standard output: No space left on device (errno 28)"
    ]


@pytest.mark.parametrize("how", ["read-end-closed", "fd-closed"])
def test_closed_stdout_is_one_line_and_nonzero(how, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    cmd = [sys.executable, "-m", "lmckit.cli", "methods", "--json"]
    if how == "read-end-closed":
        r, w = os.pipe()
        os.close(r)
        proc = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, env=_env(ws), timeout=120)
        os.close(w)
        want = "Broken pipe"
    else:
        proc = subprocess.run(
            ["sh", "-c", 'exec "$@" >&-', "sh", *cmd], stderr=subprocess.PIPE, text=True, env=_env(ws), timeout=120
        )
        want = "closed"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("lmckit methods: error: cannot write to standard output")
        and want in lines[0]
    )


def test_deleted_working_folder_is_named_before_torch_loads(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    gone = tmp_path / "gone"
    code = (
        "import os, sys\n"
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r})\n"
        "from lmckit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for argv in (["check-spec", str(ws.a)], ["methods", "--json"]):
        gone.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=_env(ws), timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "working folder no longer exists" in proc.stderr and "libtorch" not in proc.stderr
        assert "Traceback" not in proc.stderr
        if "--json" in argv:
            assert json.loads(proc.stdout)["exit_code"] == 2


def test_checkpoint_through_a_path_that_is_not_utf8_loads(tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    folder = Path(os.fsdecode(os.fsencode(str(ws.inp)) + b"/run-\xff\xfe"))
    folder.mkdir()
    a = folder / "model.safetensors"
    a.write_bytes(ws.a.read_bytes())
    rc, out, err = run_cli(["check-spec", a, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)
    proc = subprocess.run(
        [sys.executable, "-m", "lmckit.cli", "check-spec", os.fsencode(str(folder))],
        capture_output=True,
        env=_env(ws),
        timeout=120,
    )
    assert proc.returncode == 0 and b"function preserved" in proc.stdout, proc.stderr


GOOD_JSON: dict[str, Callable[[Workspace], list]] = {
    "models": lambda ws: ["models", "--json"],
    "methods": lambda ws: ["methods", "--json"],
    "data-list": lambda ws: ["data", "list", "--json"],
    "data-info": lambda ws: ["data", "info", "synthetic", "--json"],
    "data-download-dry-run": lambda ws: ["data", "download", "mnist", "--dry-run", "--json", "--root", ws.out / "d"],
    "train": lambda ws: [
        "train",
        "--model",
        "mlp_tiny",
        "--dataset",
        "synthetic",
        "--out",
        ws.out / "runs",
        "--epochs",
        "1",
        "--json",
        "--quiet",
    ],
    "check-spec": lambda ws: ["check-spec", ws.a, "--json"],
    "match": lambda ws: ["match", ws.a, _b(ws), "--out", ws.out / "p.json", "--json", "--quiet"],
    "barrier": lambda ws: [
        "barrier",
        ws.a,
        _b(ws),
        "--dataset",
        "synthetic",
        "--points",
        "3",
        "--limit",
        "50",
        "--json",
        "--quiet",
    ],
    "analyze": lambda ws: ["analyze", ws.a, _b(ws), "--no-data", "--json", "--quiet"],
    "merge": lambda ws: ["merge", ws.a, _b(ws), "--out", ws.out / "m", "--dataset", "synthetic", "--json", "--quiet"],
    "landscape": lambda ws: [
        "landscape",
        ws.a,
        _b(ws),
        ws.ckpt("c.safetensors", seed=2),
        "--dataset",
        "synthetic",
        "--grid",
        "3",
        "--limit",
        "20",
        "--plot",
        ws.out / "l.png",
        "--json",
        "--quiet",
    ],
    "reproduce-list": lambda ws: ["reproduce", "--list", "--json"],
    "reproduce-show": lambda ws: ["reproduce", "--show", "tiny", "--json"],
    "reproduce-dry-run": lambda ws: [
        "reproduce",
        "--recipe",
        "tiny",
        "--dry-run",
        "--out",
        ws.out / "r",
        "--cache",
        ws.out / "c",
        "--json",
    ],
}


@pytest.mark.parametrize("name", list(GOOD_JSON))
def test_every_json_command_prints_one_document_on_success(name, tmp_path, monkeypatch, capsys):
    """The good half of the --json check (the bad half: the ``json-*`` rows above, one per subcommand)."""
    ws = Workspace(tmp_path / "ws", monkeypatch)
    rc, out, err = run_cli(GOOD_JSON[name](ws), capsys)
    assert rc == 0, err
    doc = json.loads(out)  # raises on text around the document or on two documents
    assert doc not in (None, "", [], {}) and not (isinstance(doc, dict) and "error" in doc)


def test_every_subcommand_with_json_is_covered_good_and_bad():
    from lmckit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    with_json = set()
    for name, p in sub.choices.items():
        if any("--json" in a.option_strings for a in p._actions):
            with_json.add(name)
        for a in p._actions:  # `data list|info|download`
            if getattr(a, "choices", None) and isinstance(a.choices, dict):
                with_json |= {
                    f"{name}-{k}" for k, q in a.choices.items() if any("--json" in b.option_strings for b in q._actions)
                }
    good = {k.split("-dry")[0].replace("-list", "").replace("-show", "") for k in GOOD_JSON} | set(GOOD_JSON)
    bad = (
        {k.rsplit("-", 1)[0] for k in JSON_BAD}
        | {"-".join(k.split("-")[:2]) for k in JSON_BAD}
        | {k.split("-")[0] for k in JSON_BAD}
    )
    missing = {c for c in with_json if c not in good or c not in bad}
    assert not missing, f"subcommands with --json lacking a good or a bad case: {sorted(missing)}"


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """A kill (here: KeyboardInterrupt) during the write: the old content stays, no temp file is left."""
    from lmckit import store

    p = tmp_path / "f.json"
    p.write_text("old\n")

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        store.atomic_write_text(p, "new\n")
    assert p.read_text() == "old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]


SEQUENCE = [  # good and bad --json commands, each printing one document (state left by one must not reach the next)
    ["methods", "--json"],
    ["models", "--json", "--bogus"],
    ["data", "info", "nosuchdata", "--json"],
    ["reproduce", "--list", "--json"],
    ["reproduce", "--show", "nosuchrecipe", "--json"],
    ["nosuchcommand", "--json"],
    ["data", "list", "--json"],
    ["methods", "--json", "--bogus"],
]

_RUN_SEQUENCE = """
import contextlib, io, json, sys
from lmckit.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    out.append([rc, o.getvalue(), e.getvalue()])
sys.__stdout__.write(json.dumps(out))
"""


def test_commands_in_one_process_print_what_they_print_alone(tmp_path, monkeypatch):
    """Module state (the --json document counter, the last usage error) is reset per call of ``main``:
    a sequence run in one process gives each command's output (stdout, stderr, exit status) byte for byte."""
    ws = Workspace(tmp_path / "ws", monkeypatch)

    def run(argvs):
        proc = subprocess.run(
            [sys.executable, "-c", _RUN_SEQUENCE, json.dumps(argvs)],
            capture_output=True,
            text=True,
            env=_env(ws),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    together = run(SEQUENCE)
    alone = [run([argv])[0] for argv in SEQUENCE]
    for argv, t, a in zip(SEQUENCE, together, alone):
        assert t == a, f"{argv}: in a sequence {t!r}, alone {a!r}"
        json.loads(t[1])  # one document each


# --------------------------------------------------------------------------- a trailing '/' on a path argument
SLASHED = [  # every path argument that may name a folder, written with a trailing '/'
    ["train", "--out", "runs/", "--data-dir", "data/"],
    ["check-spec", "runs/train/abc/"],
    ["match", "runs/a/", "runs/b/", "--out", "p.json"],
    ["match", "runs/a/", "runs/b/", "runs/c//", "--multi", "anchor", "--out", "p.json"],
    ["barrier", "runs/a/", "runs/b/", "--data-dir", "data/"],
    ["analyze", "runs/a/", "runs/b/", "--plot", "figs/"],
    ["merge", "runs/a/", "runs/b/", "--out", "m/"],
    ["landscape", "runs/a/", "runs/b/", "runs/c/", "--plot", "l.png"],
    ["reproduce", "--recipe", "tiny", "--out", "r/", "--cache", "c/", "--data-dir", "data/"],
    ["data", "info", "mnist", "--data-dir", "data/"],
    ["data", "download", "mnist", "--root", "d/"],
]


@pytest.mark.parametrize("argv", SLASHED, ids=lambda a: "-".join(a[:2]))
def test_a_trailing_slash_parses_as_the_same_argument(argv):
    """``runs/a/`` and ``runs/a`` are one argument (common.path_arg), so messages, JSON, perm files, provenance
    and the report cannot differ; a file output keeps its '/' (refused: a row above)."""
    from lmckit.cli import build_parser

    def bare(a: str) -> str:
        return a.rstrip("/") if "/" in a and a != "p.json" else a

    with_slash = vars(build_parser().parse_args(argv))
    without = vars(build_parser().parse_args([bare(a) for a in argv]))
    assert with_slash == without
    assert build_parser().parse_args(["data", "download", "mnist", "--root", "/"]).root == "/"


def test_a_trailing_slash_changes_no_output(tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    a, b = ws.a, _b(ws)
    docs = []
    for suffix in ("", "/"):
        run_folder = ws.inp / "run-a"
        run_folder.mkdir(exist_ok=True)
        if not (run_folder / "model.safetensors").exists():
            (run_folder / "model.safetensors").write_bytes(a.read_bytes())
        argv = ["barrier", f"{run_folder}{suffix}", b, "--dataset", "synthetic", "--points", "3", "--limit", "50"]
        rc, out, err = run_cli([*argv, "--json", "--quiet"], capsys)
        assert rc == 0, err
        doc = json.loads(out)
        docs.append({k: v for k, v in doc.items() if "seconds" not in k and k != "timings"})
    assert docs[0] == docs[1] and docs[0]["a"] == str(ws.inp / "run-a")


def test_unseen_pass_counts_match_the_docs():
    """docs/reliability.md "Round three: unseen pass" counts the u-* rows and the API cases kept here."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    section = doc.split("## Round three: unseen pass", 1)[1]
    assert f"{len(UNSEEN_CLASS)} through the CLI" in section
    assert f"{len(API_CASES)} kept as `test_api_refuses_paths_with_lmc_error`" in section
    assert all(rid in {r.id for r in ROWS} for rid in UNSEEN_CLASS)


def test_unseen_part_two_counts_match_the_docs():
    """docs/reliability.md "Round three, part two" counts the v-* rows and the API cases by class."""
    import collections

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    section = doc.split("## Round three, part two: unseen pass", 1)[1]
    by_class = collections.Counter(UNSEEN2_CLASS.values())
    rows = sum(n for c, n in by_class.items() if c != "api")
    assert f"{rows} through the CLI" in section and f"{by_class['api']} calls of the Python API" in section
    assert len(API2_CASES) == by_class["api"]
    assert all(rid in {r.id for r in ROWS} for rid in UNSEEN2_CLASS if rid.startswith("v-"))
    tried = {"checkpoints": 54, "hf": 43, "recipes": 35, "perms": 6, "outputs": 3, "environment": 1, "api": 12}
    assert dict(by_class) == tried, "update the table in docs/reliability.md"


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_sigterm_during_merge_then_rerun_completes(fraction, tmp_path, monkeypatch):
    """Part two, kills: SIGTERM a `merge` at a fraction of its run time; the rerun of the same command exits 0
    with every output and a merged checkpoint that loads (nothing half-written is reused or left)."""
    import signal
    import time

    ws = Workspace(tmp_path / "ws", monkeypatch)
    argv = [sys.executable, "-m", "lmckit.cli", "merge", str(ws.a), str(_b(ws)), "--dataset", "synthetic", "--quiet"]
    env = _env(ws)
    t0 = time.monotonic()
    full = subprocess.run([*argv, "--out", str(tmp_path / "ref")], capture_output=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([*argv, "--out", str(tmp_path / "m")], stderr=subprocess.PIPE, env=env)
    time.sleep(fraction * (time.monotonic() - t0))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err and proc.returncode in (0, 143, 128 + signal.SIGTERM, -signal.SIGTERM), err
    rerun = subprocess.run([*argv, "--out", str(tmp_path / "m")], capture_output=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ref").iterdir())
    from lmckit import load

    load(tmp_path / "m" / "merged.safetensors")
    assert json.loads((tmp_path / "m" / "perm_1.json").read_text()) == json.loads(
        (tmp_path / "ref" / "perm_1.json").read_text()
    )
