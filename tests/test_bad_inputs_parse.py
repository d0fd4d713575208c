"""Round three of the bad-input table (issue 28): inputs that break the parsers, the numbers, the sizes or the API.

Each class is fixed through one shared mechanism, and each has rows here that go through it:

* outside files (safetensors headers and metadata, run configs, permutation files, recipes): one untrusted
  JSON/TOML reader, :func:`lmckit.store.parse_json` / :func:`~lmckit.store.parse_toml` (nesting, numbers
  outside int64, overflow to inf, duplicate keys, top-level type, ``format``/``version``);
* non-finite losses: :func:`lmckit.evaluate.evaluate` raises :class:`~lmckit.evaluate.NonFiniteLoss` naming
  the model and lambda (barrier, landscape, analyze, merge, pipeline stages);
* sizes: :func:`lmckit.models.registry.check_size_options` (bounds of ``lmckit.model_index.SIZE_LIMITS``)
  and the training size check that recipe validation (so ``reproduce --dry-run``) runs too;
* the Python API: :mod:`lmckit.checks` (permutations, state dicts, modules, numbers, devices).

CLI rows reuse the Row/Workspace runner of ``tests/test_bad_inputs.py`` (exit 2, one paragraph naming the
file/key/argument, no traceback, workspace unchanged); API cases assert :class:`LmcError`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from lmckit.errors import LmcError
from tests.helpers.data_files import write_idx_dataset
from tests.helpers.reliability import good_perms, make_checkpoint, write_perms
from tests.test_bad_inputs import TINY_RECIPE, Row, Workspace
from tests.test_bad_inputs import test_bad_input as _run_row

ROWS: list[Row] = []


def row(id: str, pattern: str):
    def deco(fn):
        ROWS.append(Row(id, fn, pattern))
        return fn

    return deco


# --------------------------------------------------------------------------- helpers
def _edit_header(ws: Workspace, edit: Callable[[bytes], bytes], name: str = "b.safetensors") -> Path:
    """A checkpoint whose JSON header text is replaced by ``edit(header)`` (the tensor bytes kept)."""
    tmp = make_checkpoint(ws.root / "tmp-valid.safetensors", seed=1)
    data = tmp.read_bytes()
    tmp.unlink()
    n = int.from_bytes(data[:8], "little")
    h = edit(data[8 : 8 + n])
    return ws.file(name, len(h).to_bytes(8, "little") + h + data[8 + n :])


def _header_obj(ws: Workspace, edit: Callable[[dict], None], name: str = "b.safetensors") -> Path:
    def go(raw: bytes) -> bytes:
        h = json.loads(raw)
        edit(h)
        return json.dumps(h).encode()

    return _edit_header(ws, go, name)


def _add_raw(key: str, raw: str) -> Callable[[bytes], bytes]:
    """Append ``"key": raw`` (raw JSON text) to the header object."""
    return lambda h: h.rstrip()[:-1] + f',"{key}":{raw}}}'.encode()


def _meta_edit(**kv: str) -> Callable[[dict], None]:
    def edit(h: dict) -> None:
        h["__metadata__"].update(kv)

    return edit


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _check_spec(path: Path) -> list:
    return ["check-spec", path]


def _perm_file(ws: Workspace, text: str | bytes) -> list:
    p = ws.file("p.json", text)
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", p)


def _perm_obj(ws: Workspace, **over) -> list:
    obj = {"format": "lmckit.permutation", "version": 1, "perms": good_perms(ws.a)}
    obj.update(over)
    return _perm_file(ws, json.dumps(obj))


def _huge(state: dict) -> dict:
    return {k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()}


def _dry(ws: Workspace, *sets: str) -> list:
    return [*ws.recipe(TINY_RECIPE, *sets), "--dry-run"]


def _recipe_with(ws: Workspace, extra: str) -> list:
    return [*ws.recipe(TINY_RECIPE + "\n" + extra + "\n"), "--dry-run"]


def _run_folder_with_config(ws: Workspace, text: str | bytes) -> Path:
    folder = ws.inp / "run"
    folder.mkdir()
    make_checkpoint(folder / "model.safetensors", seed=1)
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


# =========================================================================== 1. outside files: the JSON/TOML reader
# ---- safetensors header
@row("p3-header-nested-5000", r"b\.safetensors: safetensors header is nested more than 64 levels")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("x", _deep(5000))))


@row("p3-header-nested-100", r"b\.safetensors: safetensors header at x.*nested more than 64 levels")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("x", _deep(100))))


@row("p3-header-nested-objects", r"b\.safetensors: safetensors header .*nested more than 64")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("x", '{"a":' * 3000 + "1" + "}" * 3000)))


@row("p3-header-duplicate-tensor-key", r"b\.safetensors: safetensors header: the key 'fc0\.weight' is given twice")
def _(ws):
    def edit(raw: bytes) -> bytes:
        h = json.loads(raw)
        dup = json.dumps(h["fc0.weight"])
        return raw.rstrip()[:-1] + f',"fc0.weight":{dup}}}'.encode()

    return _check_spec(_edit_header(ws, edit))


@row("p3-header-duplicate-metadata", r"b\.safetensors: safetensors header: the key '__metadata__' is given twice")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("__metadata__", '{"lmckit_model": "{}"}')))


@row("p3-header-offset-beyond-int64", r"b\.safetensors: safetensors header at fc0\.weight\.data_offsets\[1\].*64 bits")
def _(ws):
    return _check_spec(_header_obj(ws, lambda h: h["fc0.weight"].__setitem__("data_offsets", [0, 10**30])))


@row("p3-header-offset-500-digits", r"b\.safetensors: safetensors header at .*does not fit in 64 bits")
def _(ws):
    return _check_spec(_header_obj(ws, lambda h: h["fc0.weight"].__setitem__("data_offsets", [0, 10**500])))


@row("p3-header-float-overflow", r"b\.safetensors: safetensors header at x: the number 1e400 overflows to infinity")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("x", "1e400")))


@row("p3-header-nan-literal", r"b\.safetensors: safetensors header at x: must be finite")
def _(ws):
    return _check_spec(_edit_header(ws, _add_raw("x", "NaN")))


@row("p3-header-top-level-list", r"b\.safetensors: safetensors header holds a list, expected an object")
def _(ws):
    return _check_spec(_edit_header(ws, lambda raw: b"[" + raw + b"]"))


@row("p3-header-metadata-number", r"b\.safetensors: safetensors header: __metadata__ must map names to strings")
def _(ws):
    return _check_spec(_header_obj(ws, lambda h: h["__metadata__"].__setitem__("dataset", 5)))


@row("p3-header-metadata-list", r"b\.safetensors: safetensors header: __metadata__ must map names to strings")
def _(ws):
    return _check_spec(_header_obj(ws, lambda h: h.__setitem__("__metadata__", ["a"])))


@row("p3-header-invalid-utf8", r"b\.safetensors.*(corrupt|not a safetensors)")
def _(ws):
    return _check_spec(_edit_header(ws, lambda raw: raw.replace(b'"dataset"', b'"d\xff\xfeset"')))


@row("p3-header-trailing-garbage", r"b\.safetensors.*(corrupt|not a safetensors)")
def _(ws):
    return _check_spec(_edit_header(ws, lambda raw: raw.rstrip() + b"}}"))


# ---- safetensors metadata values (JSON inside the header's strings)
@row("p3-meta-nested-5000", r"b\.safetensors: metadata 'deep' is nested more than 64 levels")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(deep=_deep(5000))))


@row("p3-meta-model-nested-100", r"b\.safetensors: metadata 'lmckit_model'.*nested more than 64")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='{"name": "mlp_tiny", "x": ' + _deep(100) + "}")))


@row("p3-meta-model-duplicate-key", r"b\.safetensors: metadata 'lmckit_model': the key 'name' is given twice")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='{"name": "mlp_tiny", "name": "vgg11"}')))


@row("p3-meta-model-width-beyond-int64", r"b\.safetensors: metadata 'lmckit_model' at width.*64 bits")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='{"name": "mlp_tiny", "width": 1' + "0" * 30 + "}")))


@row("p3-meta-model-float-overflow", r"b\.safetensors: metadata 'lmckit_model' at width_mult.*overflows")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='{"name": "mlp_tiny", "width_mult": 1e999}')))


@row("p3-meta-model-is-list", r"b\.safetensors carries no lmckit model config")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='["mlp_tiny"]')))


@row("p3-meta-model-depth-100000", r"depth must be at most 256")
def _(ws):
    return _check_spec(_header_obj(ws, _meta_edit(lmckit_model='{"name": "mlp_tiny", "depth": 100000}')))


@row("p3-meta-barrier-nested", r"b\.safetensors: metadata 'deep' is nested")
def _(ws):
    return ws.barrier(ws.a, _header_obj(ws, _meta_edit(deep=_deep(3000))))


@row("p3-meta-match-nested", r"b\.safetensors: metadata 'deep' is nested")
def _(ws):
    b = _header_obj(ws, _meta_edit(deep=_deep(3000)))
    return ["match", ws.a, b, "--out", ws.out / "p.json"]


@row("p3-meta-analyze-nested", r"a2\.safetensors: metadata 'deep' is nested")
def _(ws):
    a2 = _header_obj(ws, _meta_edit(deep=_deep(3000)), "a2.safetensors")
    return ["analyze", a2, ws.ckpt("b.safetensors", seed=1), "--no-data"]


# ---- run folder config.json
@row("p3-config-nested", r"run config .*config\.json is nested more than 64")
def _(ws):
    return _check_spec(_run_folder_with_config(ws, _deep(5000)))


@row("p3-config-duplicate-key", r"run config .*config\.json: the key 'kind' is given twice")
def _(ws):
    return _check_spec(_run_folder_with_config(ws, '{"kind": "lmckit.train", "kind": "x"}'))


@row("p3-config-top-level-list", r"run config .*config\.json holds a list, expected an object")
def _(ws):
    return _check_spec(_run_folder_with_config(ws, "[1, 2]"))


@row("p3-config-giant-int", r"run config .*config\.json at seed.*64 bits")
def _(ws):
    return _check_spec(_run_folder_with_config(ws, '{"kind": "lmckit.train", "seed": 1' + "0" * 40 + "}"))


@row("p3-config-not-utf8", r"run config .*config\.json is not UTF-8")
def _(ws):
    return _check_spec(_run_folder_with_config(ws, b'{"kind": "\xff\xfe"}'))


# ---- permutation files
@row("p3-perm-nested-5000", r"p\.json is nested more than 64 levels")
def _(ws):
    return _perm_file(ws, _deep(5000))


@row("p3-perm-nested-100-in-perms", r"p\.json at perms.*nested more than 64 levels")
def _(ws):
    return _perm_file(ws, '{"perms": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}")


@row("p3-perm-duplicate-group", r"p\.json at perms: the key 'P0' is given twice")
def _(ws):
    perms = good_perms(ws.a)
    text = json.dumps({"perms": perms})
    dup = '"P0": ' + json.dumps(perms["P0"]) + ", "
    return _perm_file(ws, text.replace('{"perms": {', '{"perms": {' + dup, 1))


@row("p3-perm-duplicate-perms-key", r"p\.json: the key 'perms' is given twice")
def _(ws):
    perms = json.dumps(good_perms(ws.a))
    return _perm_file(ws, '{"perms": ' + perms + ', "perms": ' + perms + "}")


@row("p3-perm-entry-beyond-int64", r"p\.json at perms\.P0\[3\]: the integer .* does not fit in 64 bits")
def _(ws):
    perms = good_perms(ws.a)
    text = json.dumps({"perms": perms})
    first = json.dumps(perms["P0"])
    bad = first.replace(", 3,", ", 99999999999999999999999,", 1)
    return _perm_file(ws, text.replace(first, bad, 1))


@row("p3-perm-entry-overflow", r"p\.json at perms\.P0\[0\]: the number 1e400 overflows")
def _(ws):
    perms = good_perms(ws.a)
    text = json.dumps({"perms": perms})
    first = json.dumps(perms["P0"])
    return _perm_file(ws, text.replace(first, "[1e400" + first[2:], 1))


@row("p3-perm-entry-nan", r"p\.json at perms\.P0\[0\]: must be finite")
def _(ws):
    perms = good_perms(ws.a)
    text = json.dumps({"perms": perms})
    first = json.dumps(perms["P0"])
    return _perm_file(ws, text.replace(first, "[NaN" + first[2:], 1))


@row("p3-perm-entry-infinity", r"p\.json at perms\.P0\[0\]: must be finite")
def _(ws):
    perms = good_perms(ws.a)
    text = json.dumps({"perms": perms})
    first = json.dumps(perms["P0"])
    return _perm_file(ws, text.replace(first, "[-Infinity" + first[2:], 1))


@row("p3-perm-other-format", r"p\.json: format is 'lmckit\.ste_state', expected 'lmckit\.permutation'")
def _(ws):
    return _perm_obj(ws, format="lmckit.ste_state")


@row("p3-perm-format-not-string", r"p\.json: format is .*expected 'lmckit\.permutation'")
def _(ws):
    return _perm_obj(ws, format=["lmckit.permutation"])


@row("p3-perm-version-2", r"p\.json: version is '2'; this lmckit reads version 1")
def _(ws):
    return _perm_obj(ws, version=2)


@row("p3-perm-version-string", r"p\.json: version is '1'; this lmckit reads version 1")
def _(ws):
    return _perm_obj(ws, version="1")


@row("p3-perm-version-bool", r"p\.json: version is 'True'")
def _(ws):
    return _perm_obj(ws, version=True)


@row("p3-perm-version-float", r"p\.json: version is '1\.0'")
def _(ws):
    return _perm_obj(ws, version=1.0)


@row("p3-perm-hash-not-string", r"p\.json: model_b_sha256 must be a string")
def _(ws):
    return _perm_obj(ws, model_b_sha256=12345)


@row("p3-perm-hash-list", r"p\.json: model_a_sha256 must be a string")
def _(ws):
    return _perm_obj(ws, model_a_sha256=["sha256:00"])


@row("p3-perm-null", r"p\.json holds a JSON NoneType, not an object with a 'perms' key")
def _(ws):
    return _perm_file(ws, "null")


@row("p3-perm-string", r"p\.json holds a JSON str, not an object")
def _(ws):
    return _perm_file(ws, '"perms"')


@row("p3-perm-number", r"p\.json holds a JSON int, not an object")
def _(ws):
    return _perm_file(ws, "42")


@row("p3-perm-not-utf8", r"p\.json is not UTF-8")
def _(ws):
    return _perm_file(ws, b'{"perms": {"\xff": [0]}}')


@row("p3-perm-analyze-nested", r"p\.json is nested more than 64")
def _(ws):
    p = ws.file("p.json", _deep(3000))
    return ["analyze", ws.a, ws.ckpt("b.safetensors", seed=1), "--perm", p, "--no-data"]


@row("p3-perm-landscape-dup", r"pb\.json: the key 'perms' is given twice")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2)
    perms = json.dumps(good_perms(ws.a))
    pb = ws.file("pb.json", '{"perms": ' + perms + ', "perms": ' + perms + "}")
    pc = write_perms(ws.inp / "pc.json", {"perms": good_perms(ws.a)})
    return ["landscape", ws.a, b, c, "--perm", pb, "--perm", pc, "--plot", ws.out / "l.png", "--dataset", "synthetic"]


# ---- recipes (TOML) and --set
@row("p3-recipe-nested-arrays", r"recipe .*recipe\.toml is nested more than 64 levels")
def _(ws):
    return _recipe_with(ws, "[extra]\nx = " + _deep(3000))


@row("p3-recipe-nested-inline-tables", r"recipe .*recipe\.toml.*nested more than 64")
def _(ws):
    return _recipe_with(ws, "[extra]\nx = " + "{a = " * 100 + "1" + "}" * 100)


@row("p3-recipe-dotted-key-deep", r"recipe .*recipe\.toml.*nested more than 64")
def _(ws):
    return _recipe_with(ws, "[extra]\n" + "a." * 3000 + "b = 1")


@row("p3-recipe-giant-int-model-option", r"recipe .*recipe\.toml at models\[0\]\.options\.width.*64 bits")
def _(ws):
    return ws.recipe(
        TINY_RECIPE.replace('name = "mlp_tiny"', 'name = "mlp_tiny"\noptions = {width = 99999999999999999999}')
    )


@row("p3-recipe-inf-ste-lr", r"recipe .*recipe\.toml at match\.ste\.lr: must be finite, got inf")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace("lr = 1e-2", "lr = inf"))


@row("p3-recipe-nan-model-option", r"recipe .*recipe\.toml at models\[0\]\.options\.width_mult: must be finite")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace('name = "mlp_tiny"', 'name = "mlp_tiny"\noptions = {width_mult = nan}'))


@row("p3-recipe-duplicate-key", r"recipe .*recipe\.toml is not valid TOML")
def _(ws):
    return ws.recipe(TINY_RECIPE.replace('dataset = "synthetic"', 'dataset = "synthetic"\ndataset = "mnist"'))


@row("p3-recipe-set-nested", r"--set value .* is nested more than 64 levels")
def _(ws):
    return ws.recipe(TINY_RECIPE, "barrier.splits=" + _deep(2000))


@row("p3-recipe-set-nested-100", r"--set value .* is nested more than 64 levels")
def _(ws):
    return ws.recipe(TINY_RECIPE, "barrier.splits=" + _deep(100))


# =========================================================================== 2. non-finite results
@row(
    "p3-nonfinite-barrier-b",
    r"lambda=0\.5 between model A .*a\.safetensors.* and model B .*b\.safetensors.*not a finite",
)
def _(ws):
    return ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=_huge))


@row("p3-nonfinite-barrier-a", r"model A \(.*a2\.safetensors\): the mean loss on the test split is (nan|inf)")
def _(ws):
    return ws.barrier(ws.ckpt("a2.safetensors", seed=3, state_edit=_huge), ws.ckpt("b.safetensors", seed=1))


@row("p3-nonfinite-barrier-train-split", r"(model A|lambda).*on the train split is (nan|inf)")
def _(ws):
    return [*ws.barrier(ws.ckpt("a2.safetensors", seed=3, state_edit=_huge), ws.a), "--split", "train"]


@row("p3-nonfinite-barrier-json", r"not a finite number")
def _(ws):
    return [*ws.barrier(ws.a, ws.ckpt("b.safetensors", seed=1, state_edit=_huge)), "--json"]


@row("p3-nonfinite-landscape", r"the landscape point .* x model C.*not a finite")
def _(ws):
    b, c = ws.ckpt("b.safetensors", seed=1), ws.ckpt("c.safetensors", seed=2, state_edit=_huge)
    return [
        "landscape",
        ws.a,
        b,
        c,
        "--grid",
        "3",
        "--limit",
        "50",
        "--plot",
        ws.out / "l.png",
        "--dataset",
        "synthetic",
    ]


@row("p3-nonfinite-analyze", r"(the midpoint of A and B|model A).*not a finite")
def _(ws):
    b = ws.ckpt("b.safetensors", seed=1, state_edit=_huge)
    return ["analyze", ws.a, b, "--dataset", "synthetic", "--limit", "50"]


@row("p3-nonfinite-merge", r"model 1: the mean loss.*not a finite")
def _(ws):
    b = ws.ckpt("b.safetensors", seed=1, state_edit=_huge)
    return ["merge", ws.a, b, "--dataset", "synthetic", "--limit", "50", "--out", ws.out / "m"]


# =========================================================================== 3. sizes bounded before work
@row("p3-size-train-depth-100000", r"depth must be at most 256 .*got 100,000")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--depth", "100000", "--out", ws.out, "--quiet"]


@row("p3-size-train-width-1e6", r"width must be at most 65,536")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--width", "1000000", "--out", ws.out]


@row("p3-size-train-width-mult-1e6", r"width_mult must be at most 256")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--width-mult", "1e6", "--out", ws.out]


@row("p3-size-train-vit-depth", r"model 'vit': depth must be at most 256")
def _(ws):
    return ["train", "--model", "vit", "--dataset", "synthetic", "--depth", "5000", "--out", ws.out]


@row("p3-size-train-lstm-width", r"model 'lstm': width must be at most")
def _(ws):
    return ["train", "--model", "lstm", "--dataset", "synthetic", "--width", "10000000", "--out", ws.out]


@row("p3-size-train-width-params", r"would have [\d,]+ parameters, more than")
def _(ws):
    return ["train", "--model", "mlp_tiny", "--dataset", "synthetic", "--width", "60000", "--out", ws.out, "--quiet"]


@row("p3-size-dry-run-width", r"recipe .*models\.0 .*width must be at most 65,536")
def _(ws):
    return _dry(ws, "models.0.options.width=1000000")


@row("p3-size-dry-run-params", r"recipe .*models\.0 .*would have [\d,]+ parameters")
def _(ws):
    return _dry(ws, "models.0.options.width=60000")


@row("p3-size-dry-run-depth", r"recipe .*models\.0 .*depth must be at most 256")
def _(ws):
    return _dry(ws, "models.0.options.depth=5000")


@row("p3-size-dry-run-width-mult", r"recipe .*models\.0 .*width_mult must be at most 256")
def _(ws):
    return _dry(ws, "models.0.width_mult=1000")


@row("p3-size-dry-run-vit-heads-0", r"recipe .*heads must be an integer >= 1")
def _(ws):
    return _dry(ws, "models.0.name=vit", "models.0.options.heads=0")


@row("p3-size-dry-run-vit-patch", r"recipe .*patch_size .* larger than image_size")
def _(ws):
    return _dry(ws, "models.0.name=vit", "models.0.options.patch_size=100")


@row("p3-size-dry-run-mlp-ratio-inf", r"recipe .*(mlp_ratio must be a positive number|must be finite)")
def _(ws):
    return _dry(ws, "models.0.name=vit", "models.0.options.mlp_ratio=inf")


@row("p3-size-dry-run-model-kwargs-depth", r"recipe .*depth must be at most 256")
def _(ws):
    return _dry(ws, "train.overrides.model_kwargs={depth = 100000}")


@row("p3-size-dry-run-width-sweep", r"recipe .*would have [\d,]+ parameters")
def _(ws):
    return _dry(
        ws,
        "models.0.options.width=4096",
        "width_sweep.enabled=true",
        "width_sweep.widths=[1, 200]",
        "width_sweep.methods=['naive']",
    )


@row("p3-size-dry-run-val-size", r"recipe .*train\.overrides\.val_size: val_size 100000 must be between 0 and .* 2000")
def _(ws):
    return _dry(ws, "train.overrides.val_size=100000")


@row("p3-size-check-spec-width-mult", r"width_mult|--width-mult")
def _(ws):
    return ["check-spec", "mlp_tiny", "--width-mult", "100000"]


@row("p3-size-idx-giant-dims", r"train-images-idx3-ubyte")
def _(ws):
    folder = ws.inp / "mnist"
    write_idx_dataset(folder, n_train=20, n_test=10, size=8)
    f = folder / "train-images-idx3-ubyte"
    data = bytearray(f.read_bytes())
    data[4:8] = (2**32 - 1).to_bytes(4, "big")  # 4 billion images claimed
    f.write_bytes(bytes(data))
    return ws.train_on("mnist", folder)


# --------------------------------------------------------------------------- the CLI table
def test_parse_table_has_enough_rows():
    assert len(ROWS) >= 70
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("case", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input_parse(case: Row, tmp_path, monkeypatch, capsys):
    _run_row(case, tmp_path, monkeypatch, capsys)


# =========================================================================== the shared mechanisms, directly
def test_parse_json_accepts_what_lmckit_writes(tmp_path):
    """The one reader changes nothing for lmckit's own files: a perm file and a result record round-trip."""
    from lmckit.perm import load_perms, save_perms
    from lmckit.store import atomic_write_json, read_json

    perms = {"P0": torch.randperm(16), "P1": torch.randperm(16)}
    save_perms(tmp_path / "p.json", perms, model_a_sha256="sha256:0")
    back = load_perms(tmp_path / "p.json")
    assert all(torch.equal(back[g], perms[g]) for g in perms)
    rec = {"loss": [0.5, float("nan")], "nested": {"a": [[1, 2], [3]]}, "seed": 2**63 - 1, "neg": -(2**63)}
    atomic_write_json(tmp_path / "r.json", rec)
    got = read_json(tmp_path / "r.json", "result", expect=dict)
    assert got["seed"] == 2**63 - 1 and got["neg"] == -(2**63) and math.isnan(got["loss"][1])
    assert got["nested"] == rec["nested"]


@pytest.mark.parametrize(
    "text, allow_nan, message",
    [
        ("[" * 65 + "]" * 65, True, r"f at \[0\]\[0\]\[0\]\.\.\..*nested more than 64"),
        ("[" * 64 + "]" * 64, True, None),  # 64 levels: allowed
        ("[" * 100000 + "]" * 100000, True, r"f is nested more than 64"),
        ('{"a": 1, "b": {"c": 2, "c": 3}}', True, r"f at b: the key 'c' is given twice"),
        ('{"a": 9223372036854775808}', True, r"at a: the integer 9223372036854775808 does not fit"),
        ('{"a": -9223372036854775809}', True, r"does not fit in 64 bits"),
        ('{"a": -9223372036854775808}', True, None),
        ('{"a": 1' + "0" * 5000 + "}", True, r"at a: the integer 10000.*\.\.\. does not fit"),
        ('{"a": [1e308, -1e309]}', True, r"at a\[1\]: the number -1e309 overflows"),
        ('{"a": NaN}', True, None),
        ('{"a": NaN}', False, r"at a: must be finite, got nan"),
        ('{"a": Infinity}', True, None),
        ("[1, 2]", True, r"f holds a list, expected an object"),
        ("{'a': 1}", True, r"f is not valid JSON"),
    ],
)
def test_parse_json_refuses_by_class(text, allow_nan, message):
    from lmckit.store import parse_json

    if message is None:
        parse_json(text, "f", allow_nan=allow_nan)
        return
    with pytest.raises(LmcError, match=message):
        parse_json(text, "f", expect=dict if text.startswith("[1") else None, allow_nan=allow_nan)


def test_parse_toml_refuses_by_class():
    from lmckit.store import parse_toml

    assert parse_toml("a = 1\n[b]\nc = [1, 2]", "r") == {"a": 1, "b": {"c": [1, 2]}}
    for text, message in [
        ("a = " + "[" * 2000 + "]" * 2000, r"r is nested more than 64"),
        ("a = 99999999999999999999", r"r at a: the integer .* does not fit in 64 bits"),
        ("a = 1e400", r"r at a: must be finite, got inf"),
        ("a = -inf", r"must be finite"),
        ("a = 1\na = 2", r"r is not valid TOML"),
    ]:
        with pytest.raises(LmcError, match=message):
            parse_toml(text, "r")


def test_size_limits_are_checked_before_building(monkeypatch):
    from lmckit.model_index import SIZE_LIMITS
    from lmckit.models import create_model, registry

    built = []
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    entry = registry._REGISTRY["mlp_tiny"]
    monkeypatch.setitem(
        registry._REGISTRY, "mlp_tiny", registry.ModelEntry("mlp_tiny", lambda **k: built.append(k), "", True)
    )
    for key, (lo, hi) in SIZE_LIMITS.items():
        with pytest.raises(LmcError, match=rf"{key} must be at most {hi:,}"):
            create_model("mlp_tiny", **{key: hi + 1})
        with pytest.raises(LmcError, match=rf"{key} must be an integer >= {lo}"):
            create_model("mlp_tiny", **{key: lo - 1})
    assert built == []  # nothing was built for a refused size
    monkeypatch.setitem(registry._REGISTRY, "mlp_tiny", entry)
    assert create_model("mlp_tiny", depth=SIZE_LIMITS["depth"][1] // 64, width=4) is not None


def test_train_help_shows_the_limits(capsys):
    from lmckit.cli import main

    try:
        rc = main(["train", "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    assert "0..256" in text and "1..65536" in text and "(0, 256]" in text and "1..100,000" in text


def test_nonfinite_loss_names_model_and_lambda():
    """The one check: evaluate raises NonFiniteLoss; barrier_curve names the lambda of the first bad point."""
    from lmckit.data import load_dataset
    from lmckit.evaluate import NonFiniteLoss, evaluate
    from lmckit.lmc import barrier_curve
    from lmckit.models import create_model

    ds = load_dataset("synthetic")
    m = create_model("mlp_tiny")
    sa = {k: v.clone() for k, v in m.state_dict().items()}
    sb = _huge(create_model("mlp_tiny").state_dict())
    loss, _ = evaluate(m, ds, "test", limit=20)
    assert math.isfinite(loss)
    m.load_state_dict(sb)
    with pytest.raises(NonFiniteLoss, match=r"model X: the mean loss on the test split is (nan|inf)"):
        evaluate(m, ds, "test", limit=20, where="model X")
    m.load_state_dict(sa)
    with pytest.raises(NonFiniteLoss, match=r"lambda=0\.5 between A and B"):
        barrier_curve(m, sa, sb, ds, points=3, limit=20, progress=False, names=("A", "B"))
    with pytest.raises(NonFiniteLoss, match=r"^B: the mean loss"):
        barrier_curve(m, sb, sb, ds, lambdas=[1.0, 0.5, 0.0], limit=20, progress=False, names=("A", "B"))
    assert isinstance(NonFiniteLoss("x"), ValueError)


# =========================================================================== 4. the Python API: lmckit.checks
@pytest.fixture(scope="module")
def api():
    from lmckit.data import load_dataset
    from lmckit.models import create_model
    from lmckit.perm import identity_permutation, spec_for

    torch.manual_seed(0)
    m = create_model("mlp_tiny")
    spec = spec_for(m)
    sa = {k: v.clone() for k, v in m.state_dict().items()}
    sb = {k: v.clone() for k, v in create_model("mlp_tiny").state_dict().items()}
    ident = identity_permutation(spec)
    g0 = next(iter(spec.sizes))

    def P(value):
        d = {g: p.clone() for g, p in ident.items()}
        d[g0] = value
        return d

    return dict(m=m, spec=spec, sa=sa, sb=sb, ident=ident, g0=g0, n0=spec.sizes[g0], P=P, ds=load_dataset("synthetic"))


def _api_cases():
    from lmckit import load
    from lmckit.analysis import distances, midpoint_state, rank_sweep, svd_alignment, truncate_state
    from lmckit.lmc import (
        accuracy_barrier,
        barrier_curve,
        check_compatible,
        copy_state,
        float_keys,
        interpolate_states,
        lambda_grid,
        loss_barrier,
        mix_states,
        plane_landscape,
        state_vector,
    )
    from lmckit.match import (
        activation_matching,
        anchor_matching,
        l2_distance,
        merge_many,
        ste_matching,
        weight_matching,
    )
    from lmckit.models import create_model
    from lmckit.perm import (
        apply_permutation,
        compose_permutations,
        identity_permutation,
        invert_permutation,
        perm_changed_units,
        perms_to_json,
        random_permutation,
        validate_perms,
    )

    nocuda = not torch.cuda.is_available()
    c = {}
    # permutations (apply_permutation: the silently malformed 15x784 case first)
    c["apply-short-perm"] = (
        r"perms\['P0'\]: 15 entries, but the group has 16 units",
        lambda t: apply_permutation(t["spec"], t["P"](torch.arange(15)), t["sa"]),
    )
    c["apply-long-perm"] = (r"17 entries", lambda t: apply_permutation(t["spec"], t["P"](torch.arange(17)), t["sa"]))
    c["apply-float-tensor"] = (
        r"torch\.float32, expected an integer tensor",
        lambda t: apply_permutation(t["spec"], t["P"](torch.arange(16.0)), t["sa"]),
    )
    c["apply-float-list"] = (
        r"entries must be integers, found 0\.0",
        lambda t: apply_permutation(t["spec"], t["P"]([float(i) for i in range(16)]), t["sa"]),
    )
    c["apply-bool-tensor"] = (
        r"torch\.bool",
        lambda t: apply_permutation(t["spec"], t["P"](torch.ones(16, dtype=torch.bool)), t["sa"]),
    )
    c["apply-minus-one"] = (
        r"indices must lie in 0\.\.15, found -1",
        lambda t: apply_permutation(t["spec"], t["P"](torch.tensor([-1] + list(range(1, 16)))), t["sa"]),
    )
    c["apply-index-too-big"] = (
        r"found 16",
        lambda t: apply_permutation(t["spec"], t["P"](torch.tensor(list(range(1, 17)))), t["sa"]),
    )
    c["apply-duplicate"] = (
        r"not a permutation",
        lambda t: apply_permutation(t["spec"], t["P"](torch.zeros(16, dtype=torch.long)), t["sa"]),
    )
    c["apply-2d"] = (
        r"shape \(4, 4\)",
        lambda t: apply_permutation(t["spec"], t["P"](torch.arange(16).reshape(4, 4)), t["sa"]),
    )
    c["apply-numpy-float"] = (
        r"numpy array of float64",
        lambda t: apply_permutation(t["spec"], t["P"](np.arange(16.0)), t["sa"]),
    )
    c["apply-string"] = (
        r"a str, expected a list or tensor",
        lambda t: apply_permutation(t["spec"], t["P"]("0123"), t["sa"]),
    )
    c["apply-unknown-group"] = (
        r"unknown groups \['nope'\]",
        lambda t: apply_permutation(t["spec"], {**t["ident"], "nope": torch.arange(2)}, t["sa"]),
    )
    c["apply-missing-group"] = (r"missing groups", lambda t: apply_permutation(t["spec"], {}, t["sa"]))
    c["apply-perms-none"] = (r"perms must be a mapping", lambda t: apply_permutation(t["spec"], None, t["sa"]))
    c["apply-perms-list"] = (
        r"perms must be a mapping",
        lambda t: apply_permutation(t["spec"], [torch.arange(16)], t["sa"]),
    )
    c["apply-state-none"] = (r"state must be a state dict", lambda t: apply_permutation(t["spec"], t["ident"], None))
    c["apply-state-values"] = (
        r"state must map names to tensors; entry 'fc0\.weight' is a list",
        lambda t: apply_permutation(t["spec"], t["ident"], {"fc0.weight": [1]}),
    )
    c["apply-spec-none"] = (r"spec must be a PermutationSpec", lambda t: apply_permutation(None, t["ident"], t["sa"]))
    c["invert-duplicate"] = (r"perms\['a'\]: not a permutation", lambda t: invert_permutation({"a": [0, 0, 1]}))
    c["invert-none"] = (r"perms must be a mapping", lambda t: invert_permutation(None))
    c["compose-groups"] = (r"first and then have different groups", lambda t: compose_permutations(t["ident"], {}))
    c["compose-lengths"] = (
        r"group 'P0' has 16 units in first but 3 in then",
        lambda t: compose_permutations(t["ident"], t["P"](torch.arange(3))),
    )
    c["changed-units-groups"] = (r"a and b have different groups", lambda t: perm_changed_units(t["ident"], {}))
    c["identity-cuda"] = (
        r"device: device 'cuda' requested but CUDA is not available",
        lambda t: identity_permutation(t["spec"], "cuda"),
    )
    c["identity-device-int"] = (r"device must be a device name", lambda t: identity_permutation(t["spec"], 3))
    c["random-seed-float"] = (r"seed must be an integer, got 1\.5", lambda t: random_permutation(t["spec"], 1.5))
    c["random-seed-negative"] = (r"seed must be at least 0", lambda t: random_permutation(t["spec"], -1))
    c["perms-to-json-string"] = (r"a str, expected", lambda t: perms_to_json({"a": "x"}))
    c["perms-to-json-duplicate"] = (r"not a permutation", lambda t: perms_to_json({"a": [1, 1]}))
    c["validate-none"] = (r"expected a mapping", lambda t: validate_perms(t["spec"], None))
    c["validate-numpy-short"] = (
        r"has 15 entries, the model has 16",
        lambda t: validate_perms(t["spec"], t["P"](np.arange(15))),
    )
    # state arithmetic and lambdas
    c["interp-nan"] = (
        r"lam must be a finite number, got nan",
        lambda t: interpolate_states(t["sa"], t["sb"], float("nan")),
    )
    c["interp-inf"] = (
        r"lam must be a finite number, got inf",
        lambda t: interpolate_states(t["sa"], t["sb"], float("inf")),
    )
    c["interp-string"] = (r"lam must be a finite number, got 'x'", lambda t: interpolate_states(t["sa"], t["sb"], "x"))
    c["interp-bool"] = (r"lam must be a finite number, got True", lambda t: interpolate_states(t["sa"], t["sb"], True))
    c["interp-tensor"] = (
        r"lam must be a number, got a tensor of shape \(2,\)",
        lambda t: interpolate_states(t["sa"], t["sb"], torch.tensor([0.1, 0.2])),
    )
    c["interp-none-state"] = (r"model B must be a state dict", lambda t: interpolate_states(t["sa"], None, 0.5))
    c["mix-nan-weight"] = (
        r"weights\[0\] must be a finite number, got nan",
        lambda t: mix_states([t["sa"], t["sb"]], [float("nan"), 1.0]),
    )
    c["mix-weights-string"] = (r"weights must be a list of numbers", lambda t: mix_states([t["sa"], t["sb"]], "ab"))
    c["mix-states-none"] = (r"expected a list of state dicts", lambda t: mix_states(None, [1.0]))
    c["mix-states-dict"] = (r"expected a list of state dicts, got dict", lambda t: mix_states(t["sa"], [1.0]))
    c["copy-state-none"] = (r"state must be a state dict", lambda t: copy_state(None))
    c["state-vector-key"] = (r"keys: \['nope'\] are not entries", lambda t: state_vector(t["sa"], ["nope"]))
    c["check-compatible-dict"] = (r"expected a list of state dicts, got dict", lambda t: check_compatible(t["sa"]))
    c["midpoint-nan"] = (r"lam must be a finite number", lambda t: midpoint_state(t["sa"], t["sb"], float("nan")))
    c["midpoint-mismatch"] = (r"different state-dict entries", lambda t: midpoint_state(t["sa"], {}))
    c["loss-barrier-nan"] = (
        r"the value at lambda=0\.5 is nan",
        lambda t: loss_barrier([0, 0.5, 1], [1.0, float("nan"), 1.0]),
    )
    c["loss-barrier-string"] = (r"the value at lambda=0 is 'a'", lambda t: loss_barrier([0, 0.5, 1], ["a", 1, 2]))
    c["loss-barrier-nan-lambda"] = (
        r"lambdas: nan is not a finite number",
        lambda t: loss_barrier([0, float("nan"), 1], [1, 1, 1]),
    )
    c["acc-barrier-lengths"] = (r"3 lambdas but 2 values", lambda t: accuracy_barrier([0, 0.5, 1], [1, 2]))
    c["lambda-grid-bool"] = (r"points must be an integer >= 2", lambda t: lambda_grid(True))
    # barriers and landscapes
    c["barrier-cuda"] = (
        r"device: device 'cuda' requested but CUDA is not available",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], points=3, device="cuda", progress=False),
    )
    c["barrier-nan-lambda"] = (
        r"lambdas must be a finite number, got nan",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], lambdas=[0, float("nan"), 0.5, 1], progress=False),
    )
    c["barrier-limit-negative"] = (
        r"limit must be at least 1, got -1",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], points=3, limit=-1, progress=False),
    )
    c["barrier-limit-float"] = (
        r"limit must be an integer, got 2\.5",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], points=3, limit=2.5, progress=False),
    )
    c["barrier-batch-zero"] = (
        r"batch_size must be at least 1",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], points=3, batch_size=0, progress=False),
    )
    c["barrier-model-none"] = (
        r"model must be a torch\.nn\.Module, got NoneType",
        lambda t: barrier_curve(None, t["sa"], t["sb"], t["ds"], points=3, progress=False),
    )
    c["barrier-state-list"] = (
        r"model A must be a state dict",
        lambda t: barrier_curve(t["m"], [1], t["sb"], t["ds"], points=3, progress=False),
    )
    c["barrier-points-huge"] = (
        r"points must be at most 1001",
        lambda t: barrier_curve(t["m"], t["sa"], t["sb"], t["ds"], points=10**9, progress=False),
    )
    c["landscape-cuda"] = (
        r"device 'cuda' requested",
        lambda t: plane_landscape(t["m"], t["sa"], t["sb"], t["sb"], t["ds"], grid=3, device="cuda", progress=False),
    )
    c["landscape-grid-string"] = (
        r"grid must be an integer >= 2",
        lambda t: plane_landscape(t["m"], t["sa"], t["sb"], t["sb"], t["ds"], grid="3", progress=False),
    )
    c["landscape-grid-huge"] = (
        r"grid must be at most 201",
        lambda t: plane_landscape(t["m"], t["sa"], t["sb"], t["sb"], t["ds"], grid=10**6, progress=False),
    )
    c["landscape-margin-nan"] = (
        r"margin must be a finite number",
        lambda t: plane_landscape(
            t["m"], t["sa"], t["sb"], t["sb"], t["ds"], grid=3, margin=float("nan"), progress=False
        ),
    )
    # matching
    c["wm-state-none"] = (r"model B must be a state dict", lambda t: weight_matching(t["spec"], t["sa"], None))
    c["wm-spec-none"] = (r"spec must be a PermutationSpec", lambda t: weight_matching(None, t["sa"], t["sb"]))
    c["wm-init-short"] = (
        r"has 3 entries, the model has 16",
        lambda t: weight_matching(t["spec"], t["sa"], t["sb"], init_perms=t["P"](torch.arange(3))),
    )
    c["wm-seed-nan"] = (
        r"seed must be an integer, got nan",
        lambda t: weight_matching(t["spec"], t["sa"], t["sb"], seed=float("nan")),
    )
    c["wm-restarts-float"] = (
        r"restarts must be an integer",
        lambda t: weight_matching(t["spec"], t["sa"], t["sb"], restarts=1.5),
    )
    c["wm-max-iter-huge"] = (
        r"max_iter must be at most",
        lambda t: weight_matching(t["spec"], t["sa"], t["sb"], max_iter=10**9),
    )
    c["wm-cuda"] = (r"CUDA is not available", lambda t: weight_matching(t["spec"], t["sa"], t["sb"], device="cuda"))
    c["l2-state-none"] = (r"model B must be a state dict", lambda t: l2_distance(t["spec"], t["sa"], None))
    c["l2-mismatch"] = (r"model B does not match the model architecture", lambda t: l2_distance(t["spec"], t["sa"], {}))
    c["am-cuda"] = (
        r"CUDA is not available",
        lambda t: activation_matching(t["m"], create_model("mlp_tiny"), t["ds"], device="cuda"),
    )
    c["am-model-none"] = (r"model_a must be a torch\.nn\.Module", lambda t: activation_matching(None, t["m"], t["ds"]))
    c["am-batches-zero"] = (
        r"num_batches must be at least 1",
        lambda t: activation_matching(t["m"], create_model("mlp_tiny"), t["ds"], num_batches=0),
    )
    c["am-batch-negative"] = (
        r"batch_size must be at least 1",
        lambda t: activation_matching(t["m"], create_model("mlp_tiny"), t["ds"], batch_size=-1),
    )
    c["ste-model-none"] = (
        r"model must be a torch\.nn\.Module",
        lambda t: ste_matching(None, t["sa"], t["sb"], t["ds"], progress=False),
    )
    c["ste-cuda"] = (
        r"device: device 'cuda' requested",
        lambda t: ste_matching(t["m"], t["sa"], t["sb"], t["ds"], device="cuda", progress=False),
    )
    c["ste-epochs-negative"] = (
        r"epochs must be at least 0",
        lambda t: ste_matching(t["m"], t["sa"], t["sb"], t["ds"], epochs=-1, progress=False),
    )
    c["ste-lr-zero"] = (
        r"lr must be positive",
        lambda t: ste_matching(t["m"], t["sa"], t["sb"], t["ds"], lr=0.0, progress=False),
    )
    c["ste-batch-float"] = (
        r"batch_size must be an integer",
        lambda t: ste_matching(t["m"], t["sa"], t["sb"], t["ds"], batch_size=2.5, progress=False),
    )
    c["merge-many-dict"] = (r"states must be a list of state dicts, got dict", lambda t: merge_many(t["spec"], t["sa"]))
    c["merge-many-max-iter"] = (
        r"max_iter must be at least 1",
        lambda t: merge_many(t["spec"], [t["sa"], t["sb"]], max_iter=0),
    )
    c["merge-many-cuda"] = (
        r"CUDA is not available",
        lambda t: merge_many(t["spec"], [t["sa"], t["sb"]], device="cuda"),
    )
    c["anchor-float"] = (
        r"anchor must be an integer",
        lambda t: anchor_matching(t["spec"], [t["sa"], t["sb"]], anchor=0.5),
    )
    c["anchor-range"] = (
        r"anchor index 5 is out of range",
        lambda t: anchor_matching(t["spec"], [t["sa"], t["sb"]], anchor=5),
    )
    # analysis
    c["svd-gamma-2"] = (r"gammas must be at most 1", lambda t: svd_alignment(t["spec"], t["sa"], t["sb"], gammas=[2.0]))
    c["svd-gamma-string"] = (
        r"gammas must be a finite number",
        lambda t: svd_alignment(t["spec"], t["sa"], t["sb"], gammas="a"),
    )
    c["svd-perms-short"] = (
        r"1 entries, but the group has 16",
        lambda t: svd_alignment(t["spec"], t["sa"], t["sb"], perms=t["P"]([0])),
    )
    c["svd-state-none"] = (r"model B must be a state dict", lambda t: svd_alignment(t["spec"], t["sa"], None))
    c["distances-perms-short"] = (
        r"1 entries, but the group has 16",
        lambda t: distances(t["spec"], t["sa"], t["sb"], perms=t["P"]([0])),
    )
    c["rank-sweep-fraction"] = (
        r"fraction must lie in \(0, 1\]",
        lambda t: rank_sweep(t["m"], t["sa"], t["ds"], fractions=[2.0], limit=10),
    )
    c["truncate-gamma-nan"] = (
        r"gamma must lie in \[0, 1\]",
        lambda t: truncate_state(t["spec"], t["sa"], gamma=float("nan")),
    )
    # models and loading
    c["create-depth-huge"] = (r"depth must be at most 256", lambda t: create_model("mlp_tiny", depth=10**6))
    c["create-width-string"] = (
        r"width must be an integer >= 1, got '16'",
        lambda t: create_model("mlp_tiny", width="16"),
    )
    c["create-vit-heads-0"] = (r"heads must be an integer >= 1, got 0", lambda t: create_model("vit", heads=0))
    c["create-vit-patch"] = (
        r"patch_size 100",
        lambda t: create_model("vit", patch_size=100),
    )
    c["create-vit-mlp-ratio-inf"] = (
        r"mlp_ratio must be a positive number, got inf",
        lambda t: create_model("vit", mlp_ratio=float("inf")),
    )
    c["create-width-mult-big"] = (r"width_mult must be at most 256", lambda t: create_model("mlp_tiny", width_mult=1e6))
    c["load-path-int"] = (r"path must be a file or folder path, got int", lambda t: load(5))
    c["load-device-int"] = (
        r"device must be a device name or torch\.device, got int",
        lambda t: load("x.safetensors", device=3),
    )
    # found by the unseen pass over the rest of the public API (data, analysis, lmc, merge)
    from lmckit.analysis import (
        analyze_pair,
        input_projections,
        layer_svd,
        layers_of,
        matrix_alignment,
        state_svds,
        taylor_midpoint,
    )
    from lmckit.data import dataset_info, load_dataset, random_crop_flip
    from lmckit.lmc import resolve_bn_mode, training_batches
    from lmckit.merge import evaluate_state, merge_models

    c["data-name-int"] = (r"dataset name must be a string, got int", lambda t: load_dataset(5))
    c["data-info-none"] = (r"dataset name must be a string, got NoneType", lambda t: dataset_info(None))
    c["data-val-float"] = (r"val_size must be an integer, got 2\.5", lambda t: load_dataset("synthetic", val_size=2.5))
    c["data-val-negative"] = (r"val_size must be at least 0", lambda t: load_dataset("synthetic", val_size=-1))
    c["data-batches-limit-negative"] = (
        r"limit must be at least 0, got -5",
        lambda t: list(t["ds"].batches("test", 10, limit=-5)),
    )
    c["data-batches-size-float"] = (r"batch_size must be an integer", lambda t: list(t["ds"].batches("test", 2.5)))
    c["data-tensors-limit-float"] = (r"limit must be an integer", lambda t: t["ds"].tensors("test", limit=2.5))
    c["data-crop-none"] = (r"x must be a 4-D image batch", lambda t: random_crop_flip(None, torch.Generator()))
    c["svd-layer-list"] = (r"w must be a floating-point weight tensor", lambda t: layer_svd([[1.0, 2.0]]))
    c["svd-layer-nan"] = (r"w has NaN/inf entries", lambda t: layer_svd(torch.full((3, 3), float("nan"))))
    c["svd-matrix-shapes"] = (
        r"w_a and w_b have shapes \(3, 3\) and \(4, 4\)",
        lambda t: matrix_alignment(torch.eye(3), torch.eye(4)),
    )
    c["svd-matrix-gamma"] = (
        r"gamma must be at most 1",
        lambda t: matrix_alignment(torch.eye(3), torch.eye(3), gamma=5),
    )
    c["svd-state-svds-none"] = (r"sd must be a state dict", lambda t: state_svds(t["spec"], None))
    c["layers-of-spec-none"] = (r"spec must be a PermutationSpec", lambda t: layers_of(None))
    c["distances-spec-none"] = (r"spec must be a PermutationSpec", lambda t: distances(None, t["sa"], t["sb"]))
    c["rank-sweep-sd-none"] = (r"sd must be a state dict", lambda t: rank_sweep(t["m"], None, t["ds"], fractions=[0.5]))
    c["rank-sweep-model-none"] = (
        r"model must be a torch\.nn\.Module",
        lambda t: rank_sweep(None, t["sa"], t["ds"], fractions=[0.5]),
    )
    c["taylor-samples-zero"] = (
        r"num_samples must be at least 1, got 0",
        lambda t: taylor_midpoint(t["m"], t["spec"], t["sa"], t["sb"], t["ds"], num_samples=0),
    )
    c["taylor-mismatch"] = (
        r"different state-dict entries",
        lambda t: taylor_midpoint(t["m"], None, t["sa"], {}, t["ds"]),
    )
    c["taylor-cuda"] = (
        r"CUDA is not available",
        lambda t: taylor_midpoint(t["m"], t["spec"], t["sa"], t["sb"], t["ds"], device="cuda"),
    )
    c["projections-batches-zero"] = (
        r"num_batches must be at least 1",
        lambda t: input_projections(t["m"], t["spec"], t["sa"], t["ds"], num_batches=0),
    )
    c["projections-spec-dict"] = (
        r"spec must be a PermutationSpec, got (Ordered)?[dD]ict",
        lambda t: input_projections(t["m"], t["sa"], t["sa"], t["ds"]),
    )
    c["analyze-pair-model-none"] = (
        r"model must be a torch\.nn\.Module",
        lambda t: analyze_pair(None, t["spec"], t["sa"], t["sb"], dataset=t["ds"]),
    )
    c["analyze-pair-perms-short"] = (
        r"1 entries, but the group has 16",
        lambda t: analyze_pair(t["m"], t["spec"], t["sa"], t["sb"], {"P0": [0], "P1": list(range(16))}),
    )
    c["bn-mode-model-none"] = (r"model must be a torch\.nn\.Module", lambda t: resolve_bn_mode(None, "auto"))
    c["bn-batches-cuda"] = (r"CUDA is not available", lambda t: training_batches(t["ds"], 2, 10, 0, "cuda"))
    c["merge-eval-cuda"] = (r"CUDA is not available", lambda t: evaluate_state(t["m"], t["sa"], t["ds"], device="cuda"))
    c["merge-eval-state-none"] = (
        r"the merged model must be a state dict",
        lambda t: evaluate_state(t["m"], None, t["ds"]),
    )
    c["merge-models-states-none"] = (
        r"states must be a list of state dicts, got NoneType",
        lambda t: merge_models(t["m"], None, t["ds"]),
    )
    c["merge-models-model-none"] = (
        r"model must be a torch\.nn\.Module",
        lambda t: merge_models(None, [t["sa"], t["sb"]], t["ds"]),
    )
    from lmckit.match import objective_keys
    from lmckit.models import list_models, model_entry, model_from_config
    from lmckit.perm import head_block_perm, split_head_perm, warn_low_coverage

    c["heads-block-none"] = (r"head: a NoneType", lambda t: head_block_perm(None, torch.zeros(2, 2, dtype=torch.long)))
    c["heads-block-within-1d"] = (
        r"within must be a tensor of shape \(heads=2, d\)",
        lambda t: head_block_perm(torch.arange(2), torch.arange(4)),
    )
    c["heads-block-within-dup"] = (
        r"within\[1\]: not a permutation",
        lambda t: head_block_perm(torch.arange(2), torch.tensor([[0, 1], [1, 1]])),
    )
    c["heads-split-zero"] = (r"n_heads must be at least 1, got 0", lambda t: split_head_perm(torch.arange(4), 0))
    c["heads-split-not-perm"] = (
        r"p: not a permutation",
        lambda t: split_head_perm(torch.zeros(4, dtype=torch.long), 2),
    )
    c["models-list-int"] = (r"pattern must be a string", lambda t: list_models(5))
    c["models-entry-none"] = (r"model name must be a string, got NoneType", lambda t: model_entry(None))
    c["models-create-none"] = (r"model name must be a string", lambda t: create_model(None))
    c["models-config-none"] = (r"model config must be a mapping", lambda t: model_from_config(None))
    c["models-config-list"] = (r"model config must be a mapping", lambda t: model_from_config([1]))
    c["coverage-spec-none"] = (r"spec must be a PermutationSpec", lambda t: warn_low_coverage(None, "x"))
    c["objective-keys-none"] = (r"spec must be a PermutationSpec", lambda t: objective_keys(None))
    c["float-keys-none"] = (r"state must be a state dict", lambda t: float_keys(None))
    if nocuda:
        c["load-cuda"] = (
            r"device: device 'cuda' requested but CUDA is not available",
            lambda t: load("x.safetensors", device="cuda"),
        )
    if not nocuda:  # the device cases only hold where CUDA is missing
        c = {k: v for k, v in c.items() if "CUDA is not available" not in v[0] and "'cuda' requested" not in v[0]}
    return c


API_CASES = _api_cases()


def test_api_case_count():
    assert len(API_CASES) >= 140


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_argument(name, api):
    pattern, call = API_CASES[name]
    with pytest.raises(LmcError, match=pattern) as info:
        call(api)
    assert isinstance(info.value, ValueError)
    assert "\n" not in info.value.message


def test_api_accepts_numpy_and_lists_as_documented(api):
    """numpy integer arrays and lists of ints are permutations (converted); the result equals the tensor's."""
    from lmckit.perm import apply_permutation, invert_permutation

    p = torch.randperm(api["n0"])
    ref = apply_permutation(api["spec"], api["P"](p), api["sa"])
    for form in (p.numpy(), p.numpy().astype(np.int32), p.tolist(), tuple(p.tolist())):
        got = apply_permutation(api["spec"], api["P"](form), api["sa"])
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    # undoing a planted permutation restores the model exactly
    back = apply_permutation(api["spec"], invert_permutation(api["P"](p.numpy())), ref)
    assert all(torch.equal(back[k], api["sa"][k]) for k in ref)


def test_api_checks_live_in_one_module():
    """The validators are lmckit.checks' (one mechanism), and their messages name the argument."""
    from lmckit import checks

    with pytest.raises(LmcError, match=r"^init_perms\['x'\]: 2 entries, but the group has 3 units"):
        checks.as_perms({"x": [0, 1]}, "init_perms", {"x": 3})
    with pytest.raises(LmcError, match=r"^n_items must be at most 5, got 6"):
        checks.check_int(6, "n_items", 0, 5)
    assert checks.check_int(np.int64(3), "k") == 3 and checks.check_real(np.float32(0.5), "lam") == 0.5
    assert re.fullmatch(r"cpu", str(checks.check_device("cpu")))
