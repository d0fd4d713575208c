"""Options and helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence


# torch, the model zoo and the store are imported inside the functions that need them, so that
# `lmckit --help` and argument errors answer without loading torch (benchmarks/bench_cli.py).


def model_config_with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`lmckit.models.registry.model_config_with_defaults`, imported on first use (keeps start-up light)."""
    from ..models.registry import model_config_with_defaults as _full

    return _full(cfg)


class LazyChoices:
    """argparse ``choices`` read from ``lmckit.<module>.<name>`` when first checked or shown.

    Building the parser then imports nothing heavy; pass a ``metavar`` with it
    (argparse would otherwise list the choices, i.e. import them, at once).
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _load(self) -> list:
        import importlib

        return list(getattr(importlib.import_module(f"lmckit.{self.module}"), self.name))

    def __contains__(self, value: object) -> bool:
        return value in self._load()

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (else LMCKIT_DATA, system folders, user cache)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def print_json(obj: Any) -> None:
    from ..store import _json_default

    json.dump(obj, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> None:
    """Print rows of dicts as an aligned plain-text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[(floatfmt.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# --------------------------------------------------------------------------- user architectures (--arch)
def add_arch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                   help="your own architecture: import MODULE (a dotted name on sys.path / PYTHONPATH, or a .py file) "
                        "and call CALLABLE() for the nn.Module; the checkpoints are then plain safetensors state dicts "
                        "of it. THIS RUNS YOUR CODE. Give the module an `example_input` tensor attribute (or method) "
                        "for tracing, or a permutation_spec() method (default: none, checkpoints must be lmckit's)")


def load_arch(arch: str):
    """Build the user's model from ``"module:callable"`` (imports and runs the user's code, explicitly asked for).

    ``module`` is a dotted module name or a path to a ``.py`` file. Raises :class:`LmcError` when it cannot be
    imported, has no such callable, or the callable does not return an ``nn.Module``.
    """
    import importlib
    import importlib.util

    import torch.nn as nn

    from ..errors import LmcError

    if not isinstance(arch, str) or ":" not in arch:
        raise LmcError(f"--arch {arch!r} is not MODULE:CALLABLE", "e.g. --arch mymodels:build_net or --arch ./net.py:Net")
    mod_name, fn_name = arch.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if spec is None or spec.loader is None or not Path(mod_name).exists():
                raise ImportError(f"no file {mod_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001  (the user's module may raise anything)
        raise LmcError(f"--arch: cannot import {mod_name!r}: {type(e).__name__}: {e}",
                       "check the module name and PYTHONPATH (or pass a path to a .py file)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LmcError(f"--arch: {mod_name!r} has no callable {fn_name!r}", "name a function or class that builds the model")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise LmcError(f"--arch: {arch}() failed: {type(e).__name__}: {e}", "the factory must build the model without arguments") from None
    if not isinstance(model, nn.Module):
        raise LmcError(f"--arch: {arch}() returned a {type(model).__name__}, not an nn.Module")
    # registered for this process only, so that code rebuilding models from their config finds it
    from ..models.registry import _REGISTRY, create_model, register_model

    name = f"arch:{arch}"
    if name not in _REGISTRY:
        register_model(name, f"user architecture {arch} (--arch)")(lambda: fn())
    model.lmckit_config = {"name": name}
    return model


def _load_arch_checkpoints(paths: Sequence[str | Path], names: list[str], arch: str):
    from ..checkpoint import checkpoint_file
    from ..errors import LmcError
    from ..perm import spec_for
    from ..store import load_state

    model = load_arch(arch)
    example = getattr(model, "example_input", None)
    example = example() if callable(example) else example
    spec = spec_for(model, example)
    states, infos = [], []
    for path, name in zip(paths, names):
        if not Path(path).exists():
            raise LmcError(f"checkpoint {path} does not exist", "pass a run folder or a .safetensors file")
        sd, meta = load_state(checkpoint_file(path))
        spec.check_state(sd, name)
        states.append(sd)
        infos.append({"path": str(path), "model": {"name": f"arch:{arch}"}, **({"dataset": meta["dataset"]} if "dataset" in meta else {})})
    model.load_state_dict(dict(states[0]))
    return states, infos, model, spec


# --------------------------------------------------------------------------- checkpoint inputs
def describe_model(cfg: Mapping[str, Any]) -> str:
    """A model config as one short line, e.g. ``mlp_tiny(width_mult=2.0, norm=batchnorm)``."""
    opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "name")
    return f"{cfg.get('name')}({opts})"


def architecture_difference(cfg_a: Mapping[str, Any], cfg_b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Options in which two model configs differ once defaults are spelled out: ``{key: (a, b)}``.

    Empty when both configs build the same architecture (see :func:`model_config_with_defaults`).
    """
    full_a, full_b = model_config_with_defaults(cfg_a), model_config_with_defaults(cfg_b)
    keys = list(full_a) + [k for k in full_b if k not in full_a]
    return {k: (full_a.get(k), full_b.get(k)) for k in keys if full_a.get(k) != full_b.get(k)}


def load_checkpoints(paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                     hint: str = "pass checkpoints of the same architecture and width", arch: str | None = None):
    """Load checkpoints that must hold one architecture: ``(states, infos, model, spec)``.

    Each path must exist and load with :func:`lmckit.checkpoint.load_checkpoint`; the model of the first
    is built with its weights (``model``, on the CPU) and ``spec = spec_for(model)``; every other
    checkpoint must record the same architecture (configs equal once defaults are spelled out) and
    hold tensors that fit ``spec``. Every failure is an :class:`LmcError` naming the file.

    Parameters
    ----------
    paths : run folders or ``.safetensors`` files.
    arch : ``"module:callable"`` building the user's own model (then the files are plain state dicts of it).
    labels : optional names of the inputs (``"model A"``, ...); errors then say ``model A (PATH)``.
    hint : the fix suggested when two checkpoints are different models.
    """
    from ..checkpoint import build_model, load_checkpoint
    from ..errors import LmcError
    from ..perm import spec_for

    names = [str(p) if labels is None else f"{labels[i]} ({p})" for i, p in enumerate(paths)]
    if arch is not None:  # the user's own architecture, plain state dicts (see add_arch)
        return _load_arch_checkpoints(paths, names, arch)
    states, infos = [], []
    for path in paths:
        if not Path(path).exists():
            raise LmcError(f"checkpoint {path} does not exist", "pass a run folder or a .safetensors file")
        sd, info = load_checkpoint(path)
        states.append(sd)
        infos.append(info)
    # the first model is built first, so a damaged config in it is reported as such, not as a mismatch
    ref = infos[0]["model"]
    model = build_model(ref, states[0], names[0])
    spec = spec_for(model)
    for name, sd, info in zip(names[1:], states[1:], infos[1:]):
        diff = architecture_difference(ref, info["model"])
        if diff:
            detail = "" if "name" in diff else (f" (settings that differ: {({k: a for k, (a, _) in diff.items()})} "
                                                 f"vs {({k: b for k, (_, b) in diff.items()})})")
            raise LmcError(f"{names[0]} and {name} are different models with different architectures: "
                           f"{describe_model(ref)} vs {describe_model(info['model'])}{detail}", hint)
        spec.check_state(sd, name)
    return states, infos, model, spec


def recorded_dataset(info: Mapping[str, Any]) -> str | None:
    """The dataset name a checkpoint records (run config first, then the file's metadata), else ``None``."""
    for cand in ((info.get("config") or {}).get("dataset") if isinstance(info.get("config"), dict) else None,
                 info.get("dataset")):
        if isinstance(cand, dict):
            cand = cand.get("name")
        if isinstance(cand, str) and cand:
            return cand
    return None


def dataset_name(given: str | None, info: Mapping[str, Any]) -> str:
    """``given`` if set, else the dataset the checkpoint records; :class:`LmcError` when there is none."""
    from ..errors import LmcError

    name = given or recorded_dataset(info)
    if name:
        return name
    raise LmcError(f"checkpoint {info['path']} records no dataset", "pass --dataset NAME (e.g. fashion-mnist)")
