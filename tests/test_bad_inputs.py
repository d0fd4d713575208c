"""Table-driven bad-input suite: every row must end in exit status 2, a one-paragraph message naming the
file or setting (a regex), no traceback, and an unchanged workspace (inputs and output folder: file list and
sha256 of every file, lock and temp files included).

Rows cover checkpoints (corrupt, truncated, empty, foreign, pickled, other architecture or width, NaN/inf,
missing or misshapen tensors), permutation JSON (not a permutation, wrong groups, not JSON, not an object),
dataset files (IDX and CIFAR: wrong magic, wrong counts, truncated), recipes (unknown keys with "did you
mean", wrong types, negative sizes, bad --set), training settings and missing datasets. Most rows run
``lmckit.cli.main`` in process; a few run the real executable to check the process exit status.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests.helpers.data_files import (
    IDX_NAMES,
    idx_bytes,
    planted_images,
    py3_cifar_pickle,
    write_cifar_dataset,
    write_idx_dataset,
)
from tests.helpers.reliability import (
    disk_full,
    fingerprint,
    foreign_safetensors,
    good_perms,
    hostile_pickle,
    hostile_torch_save,
    make_checkpoint,
    make_run_folder,
    read_only_dir,
    run_cli,
    run_subprocess,
    snapshot,
    snapshot_diff,
    subprocess_env,
    write_perms,
)


class Workspace:
    """One row's sandbox: ``in/`` holds inputs, ``out/`` is the output folder (with an earlier file in it)."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.inp = root / "in"
        self.out = root / "out"
        self.inp.mkdir(parents=True)
        self.out.mkdir()
        (self.out / "earlier-result.txt").write_text("must survive a failed command\n")
        self.marker = root.parent / f"{root.name}-PWNED"  # outside the snapshot: its absence is checked separately
        self.empty = root / "empty"
        self.empty.mkdir()
        self.monkeypatch = monkeypatch
        # an empty user cache outside the snapshot (matplotlib may put its font cache there: not our output)
        monkeypatch.setenv("XDG_CACHE_HOME", str(root.parent / "xdg"))
        monkeypatch.setenv("LMCKIT_DATA", str(self.empty))
        monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
        self._a: Path | None = None

    @property
    def a(self) -> Path:
        if self._a is None:
            self._a = make_checkpoint(self.inp / "a.safetensors", seed=0)
        return self._a

    def ckpt(self, filename: str, **kw) -> Path:
        return make_checkpoint(self.inp / filename, **kw)

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.inp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def barrier(self, a: Path, b: Path, *extra) -> list:
        return [
            "barrier",
            a,
            b,
            "--dataset",
            "synthetic",
            "--points",
            "3",
            "--limit",
            "50",
            "--plot",
            self.out / "curve.png",
            *extra,
        ]

    def perm_row(self, obj) -> list:
        return self.barrier(self.a, self.ckpt("b.safetensors", seed=1), "--perm", write_perms(self.inp / "p.json", obj))

    def train_on(self, dataset: str, data_dir: Path) -> list:
        return [
            "train",
            "--model",
            "mlp_tiny",
            "--dataset",
            dataset,
            "--data-dir",
            data_dir,
            "--out",
            self.out,
            "--epochs",
            "1",
            "--quiet",
        ]

    def recipe(self, text: str, *sets: str) -> list:
        p = self.file("recipe.toml", text)
        return [
            "reproduce",
            "--recipe",
            p,
            "--out",
            self.out / "report",
            "--cache",
            self.out / "cache",
            *[f"--set={s}" for s in sets],
        ]


TINY_RECIPE = (Path(__file__).resolve().parents[1] / "src/lmckit/recipes/tiny.toml").read_text()


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[Workspace], list]
    pattern: str  # regex that stderr must match (re.S | re.I)
    xfail: str | None = None  # a known bug in a file still being written by another helper (reported)


ROWS: list[Row] = []


def row(id: str, pattern: str, xfail: str | None = None):
    def deco(fn):
        ROWS.append(Row(id, fn, pattern, xfail))
        return fn

    return deco


# --------------------------------------------------------------------------- checkpoints
def _valid_bytes(ws: Workspace) -> bytes:
    return make_checkpoint(ws.root / "tmp-valid.safetensors", seed=1).read_bytes()


@row("ckpt-corrupt-header", r"b\.safetensors.*(corrupt|not a safetensors)")
def _(ws):
    data = bytearray(_valid_bytes(ws))
    (ws.root / "tmp-valid.safetensors").unlink()
    n = int.from_bytes(data[:8], "little")
    data[8 + 1 : 8 + n - 1] = b"#" * (n - 2)  # keep the braces and length, garble the JSON header
    return ws.barrier(ws.a, ws.file("b.safetensors", bytes(data)))


@row("ckpt-corrupt-body-offsets", r"b\.safetensors.*(corrupt|not a safetensors)")
def _(ws):
    data = _valid_bytes(ws)
    (ws.root / "tmp-valid.safetensors").unlink()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6  # points far past the end of the file
    h = json.dumps(header).encode()
    return ws.barrier(ws.a, ws.file("b.safetensors", len(h).to_bytes(8, "little") + h + data[8 + n :]))


@row("ckpt-truncated", r"b\.safetensors.*(truncated|not a safetensors|corrupt)")
def _(ws):
    data = _valid_bytes(ws)
    (ws.root / "tmp-valid.safetensors").unlink()
    return ws.barrier(ws.a, ws.file("b.safetensors", data[: len(data) // 2]))


@row("ckpt-truncated-to-5-bytes", r"b\.safetensors.*truncated")
def _(ws):
    return ws.barrier(ws.a, ws.file("b.safetensors", b"\x10\x00\x00\x00\x00"))


@row("ckpt-empty", r"b\.safetensors.*empty")
def _(ws):
    return ws.barrier(ws.a, ws.file("b.safetensors", b""))


@row("ckpt-missing", r"nothere\.safetensors.*does not exist")
def _(ws):
    return ws.barrier(ws.a, ws.inp / "nothere.safetensors")


@row("ckpt-folder-without-model", r"runfolder.*(not a finished|no model\.safetensors)")
def _(ws):
    (ws.inp / "runfolder").mkdir()
    return ws.barrier(ws.a, ws.inp / "runfolder")


@row("ckpt-foreign-safetensors", r"b\.safetensors.*no lmckit model config")
def _(ws):
    return ws.barrier(ws.a, foreign_safetensors(ws.inp / "b.safetensors"))


@row("ckpt-pickle", r"b\.pt.*pickle")
def _(ws):
    return ws.barrier(ws.a, hostile_pickle(ws.inp / "b.pt", ws.marker))


@row("ckpt-pickle-protocol-0", r"b\.pkl.*(pickle|not a safetensors)")
def _(ws):
    return ws.barrier(ws.a, hostile_pickle(ws.inp / "b.pkl", ws.marker, protocol=0))


@row("ckpt-torch-save-zip", r"b\.pth.*pickle")
def _(ws):
    return ws.barrier(ws.a, hostile_torch_save(ws.inp / "b.pth", ws.marker))


@row("ckpt-pickle-to-match", r"b\.pt.*pickle")
def _(ws):
    return ["match", ws.a, hostile_pickle(ws.inp / "b.pt", ws.marker), "--out", ws.out / "perm.json"]


@row("ckpt-pickle-to-check-spec", r"m\.pt.*pickle")
def _(ws):
    return ["check-spec", hostile_pickle(ws.inp / "m.pt", ws.marker)]


@row("ckpt-other-architecture", r"b\.safetensors.*different architectures.*vgg_tiny")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", name="vgg_tiny", seed=1))


@row("ckpt-other-width", r"b\.safetensors.*different architectures.*width_mult': 2\.0")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, width_mult=2.0))


@row("ckpt-other-width-to-match", r"b\.safetensors are different models.*width_mult=2\.0")
def _(ws):
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1, width_mult=2.0), "--out", ws.out / "perm.json"]


@row("ckpt-nan-weights", r"b\.safetensors.*NaN")
def _(ws):
    def edit(sd):
        k = next(iter(sd))
        sd[k][0] = float("nan")
        return sd

    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=edit))


@row("ckpt-inf-weights-to-analyze", r"b\.safetensors.*(NaN|inf)")
def _(ws):
    def edit(sd):
        k = list(sd)[-1]
        sd[k][-1] = float("inf")
        return sd

    return ["analyze", ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=edit), "--no-data", "--plot", ws.out / "plots"]


@row("ckpt-missing-tensor", r"b\.safetensors.*missing 1 entries.*fc0\.weight")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=lambda sd: dict(list(sd.items())[1:])))


@row("ckpt-misshapen-tensor", r"b\.safetensors.*fc0\.weight.*shape \(17, 784\).*expects \(16, 784\)")
def _(ws):
    def edit(sd):
        k = next(iter(sd))
        sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
        return sd

    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=edit))


def _with_model_config(ws: Workspace, **cfg) -> Path:
    """A checkpoint whose tensors are mlp_tiny's but whose metadata claims another model config."""
    from lmckit.store import load_state, save_state

    sd, meta = load_state(make_checkpoint(ws.root / "tmp-src.safetensors", seed=1))
    (ws.root / "tmp-src.safetensors").unlink()
    return save_state(ws.inp / "b.safetensors", sd, {"lmckit_model": {**meta["lmckit_model"], **cfg}})


@row("ckpt-metadata-huge-model", r"b\.safetensors.*(cannot be built|expects)")
def _(ws):
    return ws.barrier(_with_model_config(ws, width_mult=1e4), ws.a)  # would allocate ~100 GB if built blindly


@row("ckpt-metadata-absurd-model", r"b\.safetensors.*cannot be built")
def _(ws):
    return ws.barrier(_with_model_config(ws, width_mult=1e9), ws.a)


@row("ckpt-metadata-code-as-option", r"unknown activation")
def _(ws):
    code = f"__import__('pathlib').Path({str(ws.marker)!r}).touch()"
    return ws.barrier(_with_model_config(ws, activation=code), ws.a)


@row("ckpt-metadata-unknown-model", r"unknown model 'os\.system'")
def _(ws):
    return ws.barrier(_with_model_config(ws, name="os.system"), ws.a)


# --------------------------------------------------------------------------- permutation JSON
def _perm(ws: Workspace, edit) -> dict:
    perms = good_perms(ws.a)
    edit(perms)
    return {"format": "lmckit.permutation", "version": 1, "perms": perms}


def _first(p: dict) -> str:
    return next(iter(p))


@row("perm-duplicates", r"p\.json.*not a permutation")
def _(ws):
    def edit(p):
        g = _first(p)
        p[g][1] = p[g][0]

    return ws.perm_row(_perm(ws, edit))


@row("perm-out-of-range", r"p\.json.*outside")
def _(ws):
    def edit(p):
        g = _first(p)
        p[g][0] = len(p[g])

    return ws.perm_row(_perm(ws, edit))


@row("perm-negative", r"p\.json.*outside")
def _(ws):
    def edit(p):
        g = _first(p)
        p[g][0] = -1

    return ws.perm_row(_perm(ws, edit))


@row("perm-wrong-length", r"p\.json.*entries.*units")
def _(ws):
    def edit(p):
        g = _first(p)
        p[g] = p[g][:-1]

    return ws.perm_row(_perm(ws, edit))


@row("perm-unknown-group", r"p\.json.*unknown groups")
def _(ws):
    return ws.perm_row(_perm(ws, lambda p: p.__setitem__("no_such_layer", [0, 1])))


@row("perm-missing-group", r"p\.json.*missing groups")
def _(ws):
    return ws.perm_row(_perm(ws, lambda p: p.pop(_first(p))))


@row("perm-other-model-groups", r"p\.json.*(unknown|missing) groups")
def _(ws):
    other = good_perms(ws.ckpt("vgg.safetensors", name="vgg_tiny"))
    return ws.perm_row({"format": "lmckit.permutation", "version": 1, "perms": other})


@row("perm-floats", r"p\.json.*non-integer")
def _(ws):
    def edit(p):
        g = _first(p)
        p[g] = [float(i) + 0.5 for i in p[g]]

    return ws.perm_row(_perm(ws, edit))


@row("perm-not-a-list", r"p\.json.*expected a list")
def _(ws):
    return ws.perm_row(_perm(ws, lambda p: p.__setitem__(_first(p), "0 1 2")))


@row("perm-not-json", r"p\.json.*not valid JSON")
def _(ws):
    return ws.perm_row("{'perms': [0, 1, 2]")


@row("perm-empty-file", r"p\.json.*not valid JSON")
def _(ws):
    return ws.perm_row("")


@row("perm-not-an-object", r"p\.json.*'perms'")
def _(ws):
    return ws.perm_row([[0, 1, 2]])


@row("perm-perms-not-a-mapping", r"p\.json.*(mapping|expected)")
def _(ws):
    return ws.perm_row({"perms": [[0, 1, 2]]})


@row("perm-missing-file", r"nope\.json.*does not exist")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", ws.inp / "nope.json")


# --------------------------------------------------------------------------- dataset files (IDX, CIFAR)
def _idx(ws: Workspace, edit=None) -> list:
    folder = ws.inp / "mnist"
    write_idx_dataset(folder, n_train=20, n_test=10, size=8)
    if edit is not None:
        edit(folder)
    return ws.train_on("mnist", folder)


@row("idx-wrong-magic", r"train-images-idx3-ubyte.*magic")
def _(ws):
    def edit(f):
        p = f / IDX_NAMES["train"][0]
        p.write_bytes(b"\x08\x03\x00\x00" + p.read_bytes()[4:])

    return _idx(ws, edit)


@row("idx-wrong-counts", r"(t10k-images|t10k-labels).*(images but|labels)")
def _(ws):
    def edit(f):
        x, y = planted_images(7, 8, 1, 0)
        (f / IDX_NAMES["test"][1]).write_bytes(idx_bytes(y))

    return _idx(ws, edit)


@row("idx-truncated-body", r"train-labels-idx1-ubyte.*truncated")
def _(ws):
    def edit(f):
        p = f / IDX_NAMES["train"][1]
        p.write_bytes(p.read_bytes()[:-3])

    return _idx(ws, edit)


@row("idx-truncated-gzip", r"t10k-images-idx3-ubyte\.gz.*(corrupt|truncated)")
def _(ws):
    def edit(f):
        p = f / IDX_NAMES["test"][0]
        g = gzip.compress(p.read_bytes())
        p.unlink()
        (f / (IDX_NAMES["test"][0] + ".gz")).write_bytes(g[: len(g) // 2])

    return _idx(ws, edit)


@row("idx-dims-overflow", r"train-images-idx3-ubyte.*(truncated|header)")
def _(ws):
    def edit(f):
        p = f / IDX_NAMES["train"][0]
        d = p.read_bytes()
        p.write_bytes(d[:4] + struct.pack(">I", 2**31) + d[8:])

    return _idx(ws, edit)


@row("idx-labels-out-of-range", r"labels.*span")
def _(ws):
    def edit(f):
        x, y = planted_images(10, 8, 1, 1000)
        y[3] = 200
        (f / IDX_NAMES["test"][1]).write_bytes(idx_bytes(y))

    return _idx(ws, edit)


def _cifar(ws: Workspace, edit) -> list:
    write_cifar_dataset(ws.inp / "c", per_batch=4, layout="python", py2=True)
    edit(ws.inp / "c" / "cifar-10-batches-py")
    return ws.train_on("cifar10", ws.inp / "c")


@row("cifar-hostile-pickle", r"data_batch_2.*(not allowed|refus|forbidden|global)")
def _(ws):
    return _cifar(ws, lambda f: hostile_pickle(f / "data_batch_2", ws.marker))


@row("cifar-wrong-label-count", r"data_batch_3.*(labels|count|images)")
def _(ws):
    def edit(f):
        x, y = planted_images(4, 32, 3, 0)
        (f / "data_batch_3").write_bytes(py3_cifar_pickle(x.reshape(4, -1), list(y[:3])))

    return _cifar(ws, edit)


@row("cifar-truncated-pickle", r"test_batch.*(truncated|corrupt|pickle)")
def _(ws):
    def edit(f):
        p = f / "test_batch"
        p.write_bytes(p.read_bytes()[:100])

    return _cifar(ws, edit)


@row("cifar-bin-truncated", r"data_batch_1\.bin.*(3073|record|truncated|multiple)")
def _(ws):
    write_cifar_dataset(ws.inp / "c", per_batch=4, layout="binary")
    p = ws.inp / "c" / "cifar-10-batches-bin" / "data_batch_1.bin"
    p.write_bytes(p.read_bytes()[:-10])
    return ws.train_on("cifar10", ws.inp / "c")


# --------------------------------------------------------------------------- missing datasets, training settings
@row("data-missing-mnist-train", r"dataset mnist not found.*empty")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "mnist", "--data-dir", ws.empty, "--out", ws.out, "--quiet"]


@row("data-missing-cifar10-reproduce", r"cifar10.*not available")
def _(ws):
    return ws.recipe(TINY_RECIPE, 'data.dataset="cifar10"')


@row("data-dir-not-a-folder", r"--data-dir .*not a folder")
def _(ws):
    return ws.train_on("mnist", ws.inp / "no-such-dir")


@row("train-unknown-dataset", r"unknown dataset 'fashion_mnist'.*did you mean 'fashion-mnist'")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "fashion_mnist", "--out", ws.out, "--quiet"]


@row("train-unknown-model", r"mlp_tinyy.*mlp_tiny")
def _(ws):
    return ["train", "--model", "mlp_tinyy", "--dataset", "synthetic", "--out", ws.out, "--quiet"]


@row("train-negative-epochs", r"epochs must be positive")
def _(ws):
    return ["train", "--preset", "tiny", "--epochs", "-1", "--out", ws.out, "--quiet"]


@row("train-zero-batch-size", r"batch_size must be positive")
def _(ws):
    return ["train", "--preset", "tiny", "--batch-size", "0", "--out", ws.out, "--quiet"]


@row("train-negative-lr", r"learning rate")
def _(ws):
    return ["train", "--preset", "tiny", "--lr", "-0.1", "--out", ws.out, "--quiet"]


@row("train-val-size-too-big", r"validation size")
def _(ws):
    return ["train", "--preset", "tiny", "--val-size", "999999", "--out", ws.out, "--quiet"]


# --------------------------------------------------------------------------- recipes
@row("recipe-unknown-key-did-you-mean", r"recipe\.toml.*unknown key 'train\.seed'.*did you mean train\.'seeds'")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("seeds = [0, 1, 2]", "seed = [0, 1, 2]"))


@row("recipe-unknown-section", r"recipe\.toml.*unknown key 'trian'.*did you mean 'train'")
def _(ws):
    return ws.recipe(TINY_RECIPE + "\n[trian]\nseeds = [0, 1]\n")


@row("recipe-wrong-type", r"recipe\.toml.*match\.searches must be an integer")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("searches = 2", 'searches = "two"'))


@row("recipe-wrong-type-list", r"recipe\.toml.*train\.seeds must be a list")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("seeds = [0, 1, 2]", "seeds = 3"))


@row("recipe-negative-size", r"recipe\.toml.*barrier\.lambdas must be at least 2")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("lambdas = 5", "lambdas = -5"))


@row("recipe-negative-limit", r"recipe\.toml.*barrier\.limit must be at least 0")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("limit = 500", "limit = -1"))


@row("recipe-bad-choice", r"recipe\.toml.*match\.methods.*did you mean 'weight'")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace('methods = ["naive", "weight", "activation", "ste"]', 'methods = ["wieght"]'))


@row("recipe-not-toml", r"recipe\.toml.*not valid TOML")
def _(ws):
    return ws.recipe("[train\nseeds = [0, 1]\n")


@row("recipe-missing-file", r"nope\.toml does not exist")
def _(ws):
    return ["reproduce", "--recipe", ws.inp / "nope.toml", "--out", ws.out / "r", "--cache", ws.out / "c"]


@row("recipe-set-unknown-key", r"unknown key 'match\.serches'.*did you mean match\.'searches'")
def _(ws):
    return ws.recipe(TINY_RECIPE, "match.serches=3")


@row("recipe-set-not-key-value", r"--set 'train\.seeds' is not key=value")
def _(ws):
    return ws.recipe(TINY_RECIPE, "train.seeds")


@row("recipe-set-one-seed", r"train\.seeds needs at least two seeds")
def _(ws):
    return ws.recipe(TINY_RECIPE, "train.seeds=[0]")


@row("recipe-set-nan", r"must be finite")
def _(ws):
    return ws.recipe(TINY_RECIPE, "match.ste.lr=nan")


@row("recipe-set-bad-list-index", r"models\.5.*not an index")
def _(ws):
    return ws.recipe(TINY_RECIPE, "models.5.width_mult=2.0")


@row("recipe-negative-width", r"width must be an integer >= 1, got -1")
def _(ws):
    return ws.recipe(TINY_RECIPE, "models.0.options={width=-1}")


@row("recipe-zero-width-mult", r"models\.0\.width_mult must be at least")
def _(ws):
    return ws.recipe(TINY_RECIPE, "models.0.width_mult=0")


@row("train-negative-width", r"width must be an integer >= 1, got -5")
def _(ws):
    return ["train", "--preset", "tiny", "--width", "-5", "--out", ws.out, "--quiet"]


# --------------------------------------------------------------------------- output paths, merge, landscape, STE
@row("match-out-is-a-folder", r"cannot write .*out: it is a folder")
def _(ws):
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1), "--out", ws.out]


@row("barrier-plot-is-a-folder", r"cannot write .*out: it is a folder")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1))[:-2] + ["--plot", ws.out]


@row("analyze-plots-is-a-file", r"--plot .*earlier-result\.txt is a file")
def _(ws):
    return ["analyze", ws.a, ws.ckpt("b.safetensors", seed=1), "--no-data", "--plot", ws.out / "earlier-result.txt"]


@row("train-out-is-a-file", r"run store --out .*earlier-result\.txt is a file")
def _(ws):
    return ["train", "--preset", "tiny", "--out", ws.out / "earlier-result.txt", "--quiet"]


@row("reproduce-out-is-a-file", r"earlier-result\.txt")
def _(ws):
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "earlier-result.txt", "--cache", ws.out / "cache"]


@row("merge-pickle", r"b\.pt.*pickle")
def _(ws):
    return ["merge", ws.a, hostile_pickle(ws.inp / "b.pt", ws.marker), "--out", ws.out / "merged"]


@row("merge-one-model", r"at least two checkpoints")
def _(ws):
    return ["merge", ws.a, "--out", ws.out / "merged"]


@row("merge-bad-split", r"no 'tset' split")
def _(ws):
    return [
        "merge",
        ws.a,
        ws.ckpt("b.safetensors", seed=1),
        "--out",
        ws.out / "merged",
        "--split",
        "tset",
        "--dataset",
        "synthetic",
    ]


@row("landscape-bad-perm", r"pb\.json.*not a permutation")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    perms = good_perms(ws.a)
    g = _first(perms)
    bad = write_perms(ws.inp / "pb.json", {"perms": {**perms, g: [0] * len(perms[g])}})
    good = write_perms(ws.inp / "pc.json", {"perms": perms})
    return [
        "landscape",
        ws.a,
        b,
        c,
        "--perm",
        bad,
        "--perm",
        good,
        "--plot",
        ws.out / "l.png",
        "--dataset",
        "synthetic",
    ]


@row("landscape-grid-too-small", r"--grid: must be between 2 and 201")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    return ["landscape", ws.a, b, c, "--grid", "1", "--plot", ws.out / "l.png", "--dataset", "synthetic"]


@row("ste-missing-dataset", r"dataset mnist not found")
def _(ws):
    return [
        "match",
        ws.a,
        ws.ckpt("b.safetensors", seed=1),
        "--method",
        "ste",
        "--dataset",
        "mnist",
        "--out",
        ws.out / "p.json",
    ]


@row("barrier-wrong-dataset-for-model", r"(--dataset|dataset).*(fit|shape|trained)")
def _(ws):
    return ["barrier", ws.a, ws.ckpt("b.safetensors", seed=1), "--dataset", "synthetic-rgb", "--points", "3"]


# =========================================================================== round two (issue 16)
# ------------------------------------------------------------------ data loss: outputs that are, or are inside, inputs
def _run_a(ws: Workspace) -> Path:
    return make_run_folder(ws.inp / "runA", seed=0)


@row("r2-match-out-inside-run-folder", r"--out .*runA/model\.safetensors is inside model A")
def _(ws):
    return ["match", _run_a(ws), ws.ckpt("b.safetensors", seed=1), "--out", ws.inp / "runA" / "model.safetensors"]


@row("r2-match-out-is-checkpoint-b", r"--out .*b\.safetensors is model B")
def _(ws):
    b = ws.ckpt("b.safetensors", seed=1)
    return ["match", ws.a, b, "--out", b]


@row("r2-match-out-is-symlink-to-a", r"--out .*link\.json is model A")
def _(ws):
    (ws.out / "link.json").symlink_to(ws.a)
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1), "--out", ws.out / "link.json"]


@row("r2-match-multi-out-is-run-folder", r"--out .*runA is model A")
def _(ws):
    return [
        "match",
        _run_a(ws),
        ws.ckpt("b.safetensors", seed=1),
        ws.ckpt("c.safetensors", seed=2),
        "--multi",
        "anchor",
        "--out",
        ws.inp / "runA",
    ]


@row("r2-match-ste-state-inside-input", r"--ste-state .*runA/ste is inside model A")
def _(ws):
    return [
        "match",
        _run_a(ws),
        ws.ckpt("b.safetensors", seed=1),
        "--method",
        "ste",
        "--dataset",
        "synthetic",
        "--ste-state",
        ws.inp / "runA" / "ste",
        "--out",
        ws.out / "p.json",
    ]


@row("r2-merge-out-is-run-folder", r"--out .*runA is model 0")
def _(ws):
    return ["merge", _run_a(ws), ws.ckpt("b.safetensors", seed=1), "--out", ws.inp / "runA"]


@row("r2-merge-out-would-overwrite-an-input", r"--out .*merged\.safetensors is model 1")
def _(ws):
    return ["merge", ws.a, ws.ckpt("merged.safetensors", seed=1), "--out", ws.inp]


@row("r2-barrier-plot-is-perm-file", r"--plot .*p\.json is --perm")
def _(ws):
    p = write_perms(ws.inp / "p.json", {"perms": good_perms(ws.a)})
    return ["barrier", ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", p, "--plot", p, "--dataset", "synthetic"]


@row("r2-landscape-plot-inside-run-folder", r"--plot .*runA/l\.png is inside model A")
def _(ws):
    return [
        "landscape",
        _run_a(ws),
        ws.ckpt("b.safetensors", seed=1),
        ws.ckpt("c.safetensors", seed=2),
        "--plot",
        ws.inp / "runA" / "l.png",
        "--dataset",
        "synthetic",
    ]


@row("r2-analyze-plots-is-run-folder", r"--plot .*runA is model A")
def _(ws):
    return ["analyze", _run_a(ws), ws.ckpt("b.safetensors", seed=1), "--no-data", "--plot", ws.inp / "runA"]


@row("r2-reproduce-out-is-cache", r"--out .*shared is the stage cache")
def _(ws):
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "shared", "--cache", ws.out / "shared"]


@row("r2-reproduce-cache-inside-report", r"--cache .*report/c is inside the report folder")
def _(ws):
    return ["reproduce", "--recipe", "tiny", "--out", ws.out / "report", "--cache", ws.out / "report" / "c"]


@row("r2-reproduce-out-is-recipe-file", r"--out .*recipe\.toml is --recipe")
def _(ws):
    argv = ws.recipe(TINY_RECIPE)
    return argv[:4] + [ws.inp / "recipe.toml"] + argv[5:]


# ---------------------------------------------------------- unbounded work: bounds checked first; dry runs do nothing
@row("r2-reproduce-dry-run-huge-searches", r"match\.searches must be at most 100")
def _(ws):
    return ws.recipe(TINY_RECIPE, "match.searches=100000000000") + ["--dry-run"]


@row("r2-reproduce-too-many-seeds", r"train\.seeds has 65 entries, more than the 64")
def _(ws):
    return ws.recipe(TINY_RECIPE, f"train.seeds={list(range(65))}") + ["--dry-run"]


@row("r2-reproduce-stage-budget", r"about \d+ stages, more than the 20000")
def _(ws):
    return ws.recipe(TINY_RECIPE, f"train.seeds={list(range(64))}", 'match.pairs="all"', "match.searches=100") + [
        "--dry-run"
    ]


@row("r2-barrier-points-1e12", r"--points: must be between 2 and 1001, got 1e12")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1))[:5] + ["--points", "1e12"]


@row("r2-landscape-grid-100000", r"--grid: must be between 2 and 201")
def _(ws):
    return [
        "landscape",
        ws.a,
        ws.ckpt("b.safetensors", seed=1),
        ws.ckpt("c.safetensors", seed=2),
        "--grid",
        "100000",
        "--plot",
        ws.out / "l.png",
        "--dataset",
        "synthetic",
    ]


@row("r2-merge-points-huge", r"--points: must be between 2 and 1001")
def _(ws):
    return ["merge", ws.a, ws.ckpt("b.safetensors", seed=1), "--out", ws.out / "m", "--points", "99999999"]


@row("r2-match-restarts-huge", r"--restarts: must be between 1 and 10000")
def _(ws):
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1), "--restarts", "10000000", "--out", ws.out / "p.json"]


# ------------------------------------------------------------------- non-finite numbers and integers beyond int64
@row("r2-train-weight-decay-nan", r"weight_decay must be a finite number")
def _(ws):
    return ["train", "--preset", "tiny", "--weight-decay", "nan", "--out", ws.out, "--quiet"]


@row("r2-train-momentum-inf", r"momentum must be a finite number")
def _(ws):
    return ["train", "--preset", "tiny", "--momentum", "inf", "--out", ws.out, "--quiet"]


@row("r2-train-warmup-nan", r"warmup_epochs must be a finite number")
def _(ws):
    return ["train", "--preset", "tiny", "--warmup-epochs", "nan", "--out", ws.out, "--quiet"]


@row("r2-recipe-override-weight-decay-inf", r"recipe\.toml.*train\.overrides\.weight_decay.*finite")
def _(ws):
    return ws.recipe(TINY_RECIPE, "train.overrides.weight_decay=inf")


@row("r2-train-seed-beyond-int64", r"seed .*(out of range|between 0 and).*9223372036854775807")
def _(ws):
    return ["train", "--preset", "tiny", "--seed", "99999999999999999999999", "--out", ws.out, "--quiet"]


@row("r2-recipe-seed-beyond-int64", r"recipe\.toml.*train\.seeds\[1\].*(64 bits|at most)")
def _(ws):
    return ws.recipe(TINY_RECIPE, "train.seeds=[0, 99999999999999999999999, 2]")


@row("r2-match-seed-beyond-int64", r"--seed: must be between 0 and")
def _(ws):
    return [
        "match",
        ws.a,
        ws.ckpt("b.safetensors", seed=1),
        "--seed",
        "99999999999999999999999",
        "--out",
        ws.out / "p.json",
    ]


# --------------------------------------------------------------------------- sizes that cannot be allocated
@row("r2-check-spec-width-mult-1e9", r"--width-mult: must be in \(0, 1024\]")
def _(ws):
    return ["check-spec", "mlp", "--width-mult", "1e9"]


@row("r2-check-spec-in-channels-1e8", r"--in-channels: must be between 1 and 4096")
def _(ws):
    return ["check-spec", "mlp", "--in-channels", "100000000"]


@row("r2-check-spec-too-many-parameters", r"would have [\d,]+ parameters")
def _(ws):
    return ["check-spec", "mlp", "--in-channels", "4096", "--image-size", "4096"]


@row("r2-train-width-mult-1e12", r"(cannot be built|parameters|width_mult must be at most 256, got 1000000000000)")
def _(ws):
    return ["train", "--preset", "tiny", "--width-mult", "1e12", "--out", ws.out, "--quiet"]


@row("r2-train-activation-unknown-leaves-no-lock", r"activation")
def _(ws):
    return ["train", "--preset", "tiny", "--activation", "foo", "--out", ws.out, "--quiet"]


# --------------------------------------------------------------------------- devices torch parses but lmckit cannot use
@row("r2-train-device-meta", r"device 'meta' cannot run")
def _(ws):
    return ["train", "--preset", "tiny", "--device", "meta", "--out", ws.out, "--quiet"]


@row("r2-train-device-mps", r"device 'mps'.*not available")
def _(ws):
    return ["train", "--preset", "tiny", "--device", "mps", "--out", ws.out, "--quiet"]


@row("r2-merge-device-meta", r"device 'meta' cannot run")
def _(ws):
    return ["merge", ws.a, ws.ckpt("b.safetensors", seed=1), "--device", "meta", "--out", ws.out / "m"]


@row("r2-check-spec-device-meta", r"device 'meta' cannot run")
def _(ws):
    return ["check-spec", "mlp_tiny", "--device", "meta"]


@row("r2-barrier-device-meta", r"device 'meta' cannot run")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1), "--device", "meta")


@row("r2-reproduce-device-meta", r"device 'meta' cannot run")
def _(ws):
    return ws.recipe(TINY_RECIPE) + ["--device", "meta"]


# --------------------------------------------------------------------------- datasets
@row("r2-idx-non-square-images", r"train-images-idx3-ubyte holds 8 x 12 images")
def _(ws):
    folder = ws.inp / "mnist"
    write_idx_dataset(folder, n_train=20, n_test=10, size=8)
    (folder / IDX_NAMES["train"][0]).write_bytes(idx_bytes(np.zeros((20, 8, 12), dtype=np.uint8)))
    return ws.train_on("mnist", folder)


@row("r2-idx-zero-by-zero-images", r"holds 0 x 0 images")
def _(ws):
    folder = ws.inp / "mnist"
    write_idx_dataset(folder, n_train=20, n_test=10, size=8)
    (folder / IDX_NAMES["train"][0]).write_bytes(idx_bytes(np.zeros((20, 0, 0), dtype=np.uint8)))
    return ws.train_on("mnist", folder)


@row("r2-idx-file-is-a-fifo", r"mnist not found.*missing train-labels-idx1-ubyte")
def _(ws):
    import os

    folder = ws.inp / "mnist"
    write_idx_dataset(folder, n_train=20, n_test=10, size=8)
    (folder / IDX_NAMES["train"][1]).unlink()
    os.mkfifo(folder / IDX_NAMES["train"][1])
    return ws.train_on("mnist", folder)


# --------------------------------------------------------------------------- operating-system errors on outputs
@row(
    "r2-match-out-name-too-long", r"cannot (write|use) .*pppp.*(longer than the file system allows|File name too long)"
)
def _(ws):
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1), "--out", ws.out / ("p" * 300 + ".json")]


@row("r2-train-out-name-too-long", r"rrrr.*(longer than the file system allows|File name too long)")
def _(ws):
    return ["train", "--preset", "tiny", "--out", ws.out / ("r" * 300), "--quiet"]


@row("r2-barrier-plot-read-only-folder", r"cannot write --plot .*ro/c\.png.*not writable")
def _(ws):
    (ws.out / "ro").mkdir()
    read_only_dir(ws.monkeypatch, ws.out / "ro")
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1))[:-2] + ["--plot", ws.out / "ro" / "c.png"]


@row("r2-train-read-only-folder", r"ro.*not writable")
def _(ws):
    (ws.out / "ro").mkdir()
    read_only_dir(ws.monkeypatch, ws.out / "ro")
    return ["train", "--preset", "tiny", "--out", ws.out / "ro", "--quiet"]


@row("r2-merge-read-only-folder", r"ro.*not writable")
def _(ws):
    (ws.out / "ro").mkdir()
    b = ws.ckpt("b.safetensors", seed=1)
    read_only_dir(ws.monkeypatch, ws.out / "ro")
    return ["merge", ws.a, b, "--out", ws.out / "ro" / "m", "--dataset", "synthetic"]


@row("r2-match-disk-full", r"cannot write .*p\.json: No space left on device")
def _(ws):
    a, b = ws.a, ws.ckpt("b.safetensors", seed=1)  # both written before the disk fills
    disk_full(ws.monkeypatch)
    return ["match", a, b, "--out", ws.out / "p.json"]


@row("r2-merge-disk-full-leaves-nothing", r"cannot write .*No space left on device")
def _(ws):
    a, b = ws.a, ws.ckpt("b.safetensors", seed=1)  # both written before the disk fills
    disk_full(ws.monkeypatch)
    return ["merge", a, b, "--out", ws.out / "m", "--dataset", "synthetic", "--no-curve", "--limit", "50"]


@row("r2-merge-disk-full-existing-folder", r"cannot write .*No space left on device")
def _(ws):
    a, b = ws.a, ws.ckpt("b.safetensors", seed=1)  # both written before the disk fills
    disk_full(ws.monkeypatch)
    return ["merge", a, b, "--out", ws.out, "--dataset", "synthetic", "--no-curve", "--limit", "50"]


@row("r2-train-disk-full-leaves-no-lock", r"cannot write .*No space left on device")
def _(ws):
    disk_full(ws.monkeypatch)
    return ["train", "--preset", "tiny", "--out", ws.out, "--quiet"]


@row("r2-match-multi-disk-full", r"cannot write .*No space left on device")
def _(ws):
    a, b, c = ws.a, ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)  # before the disk fills
    disk_full(ws.monkeypatch)
    return ["match", a, b, c, "--multi", "anchor", "--out", ws.out / "multi"]


# --------------------------------------------------------------- files that are not (small, regular, UTF-8) files
@row("r2-recipe-invalid-utf8", r"recipe\.toml.*(UTF-8|utf-8|decode)")
def _(ws):
    p = ws.file("recipe.toml", b'name = "\xff\xfe"\n')
    return ["reproduce", "--recipe", p, "--out", ws.out / "r", "--cache", ws.out / "c"]


@row("r2-recipe-is-a-folder", r"recipe .*sub is a folder")
def _(ws):
    (ws.inp / "sub").mkdir()
    return ["reproduce", "--recipe", ws.inp / "sub", "--out", ws.out / "r", "--cache", ws.out / "c"]


@row("r2-recipe-folder-named-toml", r"recipe .*x\.toml is a folder")
def _(ws):
    (ws.inp / "x.toml").mkdir()
    return ["reproduce", "--recipe", ws.inp / "x.toml", "--out", ws.out / "r", "--cache", ws.out / "c"]


@row("r2-recipe-dev-zero", r"/dev/zero is not a regular file")
def _(ws):
    return ["reproduce", "--recipe", "/dev/zero", "--out", ws.out / "r", "--cache", ws.out / "c"]


@row("r2-perm-dev-zero", r"/dev/zero is not a regular file")
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", "/dev/zero")


@row("r2-checkpoint-dev-zero", r"/dev/zero is not a regular file")
def _(ws):
    return ws.barrier(ws.a, Path("/dev/zero"))


@row("r2-perm-is-a-folder", r"permutation file .*sub is a folder")
def _(ws):
    (ws.inp / "sub").mkdir()
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", ws.inp / "sub")


# --------------------------------------------------------------------------- report combinations refused at validation
@row("r2-recipe-methods-only-naive", r"recipe\.toml.*match\.methods.*no matching method")
def _(ws):
    return ws.recipe(TINY_RECIPE, 'match.methods=["naive"]')


@row("r2-recipe-barrier-splits-empty", r"recipe\.toml.*barrier\.splits is empty")
def _(ws):
    return ws.recipe(TINY_RECIPE, "barrier.splits=[]")


@row("r2-recipe-rank-fraction-zero", r"recipe\.toml.*analysis\.rank_fractions\[0\] must be more than 0")
def _(ws):
    return ws.recipe(TINY_RECIPE, "analysis.rank_fractions=[0.0]")


@row("r2-recipe-val-split-without-val-size", r"recipe\.toml.*barrier\.splits includes 'val'")
def _(ws):
    return ws.recipe(TINY_RECIPE, 'barrier.splits=["val"]')


# --------------------------------------------------------------------------- wrong exit codes and false verdicts
@row("r2-check-spec-tol-nan", r"--tol: must be a finite number")
def _(ws):
    return ["check-spec", "mlp_tiny", "--tol", "nan"]


@row("r2-check-spec-tol-negative", r"--tol: must be in \(0, 1\]")
def _(ws):
    return ["check-spec", "mlp_tiny", "--tol=-1"]


@row("r2-data-info-missing-dataset", r"lmckit data info: error: dataset mnist not found")
def _(ws):
    return ["data", "info", "mnist", "--data-dir", ws.empty]


@row("r2-data-info-missing-dataset-json", r"lmckit data info: error: dataset mnist not found")
def _(ws):
    return ["data", "info", "mnist", "--data-dir", ws.empty, "--json"]


@row("r2-bare-lmckit", r"no command given")
def _(ws):
    return []


@row("r2-bare-lmckit-data", r"no action given")
def _(ws):
    return ["data"]


@row("r2-unknown-option-exit-2", r"lmckit barrier: error: unrecognized arguments: --pionts.*usage: lmckit barrier ")
def _(ws):
    return ["barrier", ws.a, ws.a, "--pionts", "3"]


@row("r2-match-int32-checkpoint", r"b\.safetensors: tensor 'fc0\.(weight|bias)' is torch\.int32")
def _(ws):
    return [
        "match",
        ws.a,
        ws.ckpt("b.safetensors", seed=1, state_edit=lambda sd: {k: v.to(torch.int32) for k, v in sd.items()}),
        "--out",
        ws.out / "p.json",
    ]


@row("r2-match-float64-checkpoint", r"b\.safetensors: tensor 'fc0\.(weight|bias)' is torch\.float64")
def _(ws):
    return [
        "match",
        ws.a,
        ws.ckpt("b.safetensors", seed=1, state_edit=lambda sd: {k: v.double() for k, v in sd.items()}),
        "--out",
        ws.out / "p.json",
    ]


@row("r2-check-spec-float64-checkpoint", r"m\.safetensors: tensor .* is torch\.float64")
def _(ws):
    return ["check-spec", ws.ckpt("m.safetensors", state_edit=lambda sd: {k: v.double() for k, v in sd.items()})]


# -------------------------------------------------------------- failed commands leave the output folder as it was
@row("r2-reproduce-jobs-zero", r"--jobs: must be between 1 and 256, got 0")
def _(ws):
    return ws.recipe(TINY_RECIPE) + ["--jobs", "0"]


@row("r2-reproduce-jobs-negative", r"--jobs: must be between 1 and 256, got -4")
def _(ws):
    return ws.recipe(TINY_RECIPE) + ["--jobs=-4"]


@row("r2-data-download-fails-leaves-no-lock", r"(download|connect|refused|fetch)")
def _(ws):
    return [
        "data",
        "download",
        "fashion-mnist",
        "--root",
        ws.out / "cache",
        "--mirror",
        "http://127.0.0.1:9/",
        "--timeout",
        "2",
    ]


@row("r2-data-download-fails-in-user-cache", r"(download|connect|refused|fetch)")
def _(ws):
    ws.monkeypatch.setenv("XDG_CACHE_HOME", str(ws.out / "xdg"))
    return ["data", "download", "fashion-mnist", "--mirror", "http://127.0.0.1:9/", "--timeout", "2"]


# --------------------------------------------------------------------------- messages say where
@row("r2-cached-config-unknown-key", r"cached run record .*config\.json.*unknown training settings: foo")
def _(ws):
    from lmckit.train import make_config, run_dir_for

    run = run_dir_for(make_config("tiny"), ws.out)
    make_run_folder(run)
    rec = {"config": {**make_config("tiny").to_dict(), "foo": 1}, "result": {}, "provenance": {}}
    (run / "config.json").write_text(json.dumps(rec))
    return ["train", "--preset", "tiny", "--out", ws.out, "--quiet"]


@row("r2-recipe-override-epochs-zero", r"recipe\.toml.*train\.overrides\.epochs.*epochs must be positive")
def _(ws):
    return ws.recipe(TINY_RECIPE, "train.overrides={epochs=0}")


@row("r2-recipe-model-override-epochs-zero", r"recipe\.toml.*models\.0\.overrides\.epochs.*epochs must be positive")
def _(ws):
    return ws.recipe(TINY_RECIPE, "models.0.overrides={epochs=0}")


@row("r2-dataset-from-model-a-config", r"cifar10 not found.*comes from the config of model A")
def _(ws):
    return ["barrier", ws.ckpt("a10.safetensors", dataset="cifar10"), ws.ckpt("b.safetensors", seed=1), "--points", "3"]


@row("r2-dataset-from-model-0-config-merge", r"cifar10 not found.*comes from the config of model 0")
def _(ws):
    return [
        "merge",
        ws.ckpt("a10.safetensors", dataset="cifar10"),
        ws.ckpt("b.safetensors", seed=1),
        "--out",
        ws.out / "m",
    ]


# --------------------------------------------------------------------------- things a user would not expect
def _perm_for(ws: Workspace, model_a: Path, model_b: Path) -> Path:
    return write_perms(
        ws.inp / "p.json",
        {
            "format": "lmckit.permutation",
            "version": 1,
            "perms": good_perms(ws.a),
            "model_a_sha256": fingerprint(model_a),
            "model_b_sha256": fingerprint(model_b),
        },
    )


@row("r2-perm-computed-for-other-model-b", r"p\.json was computed for another the permuted model than model B")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    return ws.barrier(ws.a, b, "--perm", _perm_for(ws, ws.a, c))


@row("r2-perm-computed-for-other-model-a", r"p\.json was computed for another the reference model than model A")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    return ws.barrier(ws.a, b, "--perm", _perm_for(ws, c, b))


@row("r2-perm-swapped-models-analyze", r"p\.json was computed for another")
def _(ws):
    b = ws.ckpt("b.safetensors", seed=1)
    return ["analyze", b, ws.a, "--perm", _perm_for(ws, ws.a, b), "--no-data"]


@row("r2-perm-landscape-other-model", r"pc\.json was computed for another the permuted model than model C")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    perms = good_perms(ws.a)
    pb = write_perms(
        ws.inp / "pb.json", {"perms": perms, "model_sha256": fingerprint(b), "reference_sha256": fingerprint(ws.a)}
    )
    pc = write_perms(
        ws.inp / "pc.json", {"perms": perms, "model_sha256": fingerprint(b), "reference_sha256": fingerprint(ws.a)}
    )
    return ["landscape", ws.a, b, c, "--perm", pb, "--perm", pc, "--plot", ws.out / "l.png", "--dataset", "synthetic"]


@row("r2-match-ste-zero-epochs", r"--epochs: must be between 1 and")
def _(ws):
    return [
        "match",
        ws.a,
        ws.ckpt("b.safetensors", seed=1),
        "--method",
        "ste",
        "--epochs",
        "0",
        "--dataset",
        "synthetic",
        "--out",
        ws.out / "p.json",
    ]


@row("r2-match-epochs-without-ste", r"--epochs applies to --method ste only")
def _(ws):
    return ["match", ws.a, ws.ckpt("b.safetensors", seed=1), "--epochs", "3", "--out", ws.out / "p.json"]


@row("r2-merge-ste-zero-epochs", r"--epochs: must be between 1 and")
def _(ws):
    return ["merge", ws.a, ws.ckpt("b.safetensors", seed=1), "--method", "ste", "--epochs", "0", "--out", ws.out / "m"]


# --------------------------------------------------------------------------- the table
def test_table_has_enough_rows():
    assert len(ROWS) >= 30
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    "case",
    [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []) for r in ROWS],
)
def test_bad_input(case: Row, tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path / "ws", monkeypatch)
    argv = case.build(ws)
    before = snapshot(ws.root)
    rc, out, err = run_cli(argv, capsys)
    after = snapshot(ws.root)
    assert rc == 2, f"exit status {rc}, stderr:\n{err}\nstdout:\n{out[-2000:]}"
    assert re.search(case.pattern, err, re.S | re.I), f"message does not match {case.pattern!r}:\n{err}"
    assert re.match(r"lmckit[ :]", err) and "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, f"not one paragraph:\n{err}"
    assert snapshot_diff(before, after) == [], "the failed command changed files"
    assert not ws.marker.exists(), "a pickle was loaded: its payload ran"


# --------------------------------------------------------------------------- the real process
SUBPROCESS_ROWS = ["ckpt-pickle", "recipe-unknown-key-did-you-mean"]


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_bad_input_real_process(row_id, tmp_path, monkeypatch):
    case = next(r for r in ROWS if r.id == row_id)
    ws = Workspace(tmp_path / "ws", monkeypatch)
    argv = case.build(ws)
    before = snapshot(ws.root)
    env = subprocess_env(XDG_CACHE_HOME=str(ws.root.parent / "xdg"), LMCKIT_DATA=str(ws.empty))
    proc = run_subprocess(argv, cwd=ws.root, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(case.pattern, proc.stderr, re.S | re.I), proc.stderr
    assert snapshot_diff(before, snapshot(ws.root)) == []
    assert not ws.marker.exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Anything that is not an LmcError is a bug: the CLI must not swallow it into a status-2 message."""
    script = (
        "import sys, lmckit.commands.models as m\n"
        "def boom(args): raise ZeroDivisionError('planted bug')\n"
        "orig = m.register\n"
        "def register(sub):\n"
        "    orig(sub)\n"
        "    sub.choices['models'].set_defaults(func=boom)\n"
        "m.register = register\n"
        "from lmckit.cli import main\n"
        "sys.exit(main(['models']))\n"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "ZeroDivisionError: planted bug" in proc.stderr
