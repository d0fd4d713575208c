"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

#: documented upper bounds of the count and size options (see the README's reliability section)
from ..limits import (  # noqa: F401  (re-exported: the commands import them from here)
    MAX_BATCH,
    MAX_BATCHES,
    MAX_EPOCHS,
    MAX_GRID,
    MAX_ITER,
    MAX_POINTS,
    MAX_RESTARTS,
    MAX_SAMPLES,
    MAX_SEED,
)
from ..store import check_output_path, state_fingerprint  # noqa: F401  (re-exported: commands import them here)
from .argtypes import (  # noqa: F401  (re-exported: the commands import them from here)
    DefaultsHelpFormatter,
    DeprecatedAlias,
    LazyChoices,
    float_in,
    int_in,
    path_arg,
)
from .method_flags import METHOD_FLAGS, add_method_flags, add_option_flag, method_options  # noqa: F401  (likewise)

# torch, the model zoo and the store are imported inside the functions that need them, so that
# `lmckit --help` and argument errors answer without loading torch (benchmarks/bench_cli.py).


def model_config_with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`lmckit.models.registry.model_config_with_defaults`, imported on first use (keeps start-up light)."""
    from ..models.registry import model_config_with_defaults as _full

    return _full(cfg)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default auto)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress lines on stderr (sets ``LMCKIT_NO_PROGRESS`` for the command; errors still print)."""
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr (errors and warnings still print)")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=path_arg,
        default=None,
        help="folder holding the dataset (default: search LMCKIT_DATA, the system folders, then the user cache)",
    )


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


#: JSON documents printed on stdout by :func:`print_json` since :func:`lmckit.cli.main` started (``--json``
#: prints exactly one: the result, or on failure :func:`lmckit.cli.main`'s error object)
JSON_PRINTED = [0]


def print_json(obj: Any) -> None:
    from ..store import _json_default

    text = json.dumps(obj, indent=2, default=_json_default)  # serialise first: a failure prints nothing
    sys.stdout.write(text + "\n")
    JSON_PRINTED[0] += 1


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> None:
    """Print rows of dicts as an aligned plain-text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [
        [(floatfmt.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# --------------------------------------------------------------------------- user architectures (--arch)
def add_arch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        default=None,
        metavar="MODULE:CALLABLE",
        help="your own architecture: import MODULE (a dotted name on sys.path / PYTHONPATH, or a .py file) "
        "and call CALLABLE() for the nn.Module; the checkpoints are then plain safetensors state dicts "
        "of it. THIS RUNS YOUR CODE. Give the module an `example_input` tensor attribute (or method) "
        "for tracing, or a permutation_spec() method (default: none, checkpoints must be lmckit's)",
    )


def add_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hf",
        action="store_true",
        help="the MODEL arguments are local Hugging Face model folders (config.json + model.safetensors or a "
        "sharded model.safetensors.index.json); needs pip install 'lmckit[hf]'. Local files only, never a "
        "download; pickles (pytorch_model.bin) are refused",
    )


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
        raise LmcError(
            f"--arch {arch!r} is not MODULE:CALLABLE", "e.g. --arch mymodels:build_net or --arch ./net.py:Net"
        )
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
        raise LmcError(
            f"--arch: cannot import {mod_name!r}: {type(e).__name__}: {e}",
            "check the module name and PYTHONPATH (or pass a path to a .py file)",
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LmcError(
            f"--arch: {mod_name!r} has no callable {fn_name!r}", "name a function or class that builds the model"
        )
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise LmcError(
            f"--arch: {arch}() failed: {type(e).__name__}: {e}", "the factory must build the model without arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise LmcError(f"--arch: {arch}() returned a {type(model).__name__}, not an nn.Module")
    # registered for this process only, so that code rebuilding models from their config finds it
    from ..models.registry import _REGISTRY, register_model

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
        infos.append(
            {
                "path": str(path),
                "model": {"name": f"arch:{arch}"},
                **({"dataset": meta["dataset"]} if "dataset" in meta else {}),
            }
        )
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


def load_checkpoints(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    hint: str = "pass checkpoints of the same architecture and width",
    arch: str | None = None,
    hf: bool = False,
):
    """Load checkpoints that must hold one architecture: ``(states, infos, model, spec)``.

    Each path must exist and load with :func:`lmckit.checkpoint.load_checkpoint`; the model of the first
    is built with its weights (``model``, on the CPU) and ``spec = spec_for(model)``; every other
    checkpoint must record the same architecture (configs equal once defaults are spelled out) and
    hold tensors that fit ``spec``. Every failure is an :class:`LmcError` naming the file.

    Parameters
    ----------
    paths : run folders or ``.safetensors`` files.
    arch : ``"module:callable"`` building the user's own model (then the files are plain state dicts of it).
    hf : the paths are local Hugging Face model folders (:func:`lmckit.hf.load_checkpoints`).
    labels : optional names of the inputs (``"model A"``, ...); errors then say ``model A (PATH)``.
    hint : the fix suggested when two checkpoints are different models.
    """
    from ..checkpoint import build_model, load_checkpoint
    from ..errors import LmcError
    from ..perm import spec_for

    names = [str(p) if labels is None else f"{labels[i]} ({p})" for i, p in enumerate(paths)]
    if arch is not None and hf:
        raise LmcError("--arch and --hf both say what the models are", "pass one of them")
    if arch is not None:  # the user's own architecture, plain state dicts (see add_arch)
        return _load_arch_checkpoints(paths, names, arch)
    if hf:  # Hugging Face folders (the optional lmckit.hf module converts them at the edge)
        from ..hf import load_checkpoints as load_hf_checkpoints

        return load_hf_checkpoints(paths, names)
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
    check_dtypes(model, states[0], names[0])
    spec = spec_for(model)
    for name, sd, info in zip(names[1:], states[1:], infos[1:]):
        diff = architecture_difference(ref, info["model"])
        if diff:
            detail = (
                ""
                if "name" in diff
                else (
                    f" (settings that differ: { ({k: a for k, (a, _) in diff.items()}) } "
                    f"vs { ({k: b for k, (_, b) in diff.items()}) })"
                )
            )
            raise LmcError(
                f"{names[0]} and {name} are different models with different architectures: "
                f"{describe_model(ref)} vs {describe_model(info['model'])}{detail}",
                hint,
            )
        spec.check_state(sd, name)
        check_dtypes(model, sd, name)
    return states, infos, model, spec


def check_dtypes(model, state: Mapping[str, Any], where: str) -> None:
    """One checkpoint rule for every command: each tensor has the dtype the model itself uses for it.

    (Loading would otherwise cast silently, so a float64 or int32 file would be matched by one command and
    refused by another.) :class:`LmcError` naming the file and the first tensor that differs.
    """
    from ..errors import LmcError

    own = model.state_dict()
    for k, v in state.items():
        if k in own and v.dtype != own[k].dtype:
            raise LmcError(
                f"{where}: tensor {k!r} is {v.dtype}, but {describe_model(model.lmckit_config)} holds "
                f"{own[k].dtype} there",
                "save the checkpoint with the model's own dtypes "
                "(lmckit.checkpoint.save_model of the model after model.float())",
            )


def recorded_dataset(info: Mapping[str, Any]) -> str | None:
    """The dataset name a checkpoint records (run config first, then the file's metadata), else ``None``."""
    for cand in (
        (info.get("config") or {}).get("dataset") if isinstance(info.get("config"), dict) else None,
        info.get("dataset"),
    ):
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


# --------------------------------------------------------------------------- outputs never overwrite inputs
def _real(p: str | Path, what: str = "path") -> Path:
    from ..store import real_path

    return real_path(p, what)


def check_folder_outputs(what: str, folder: str | Path, files: Sequence[str], folders: Sequence[str] = ()) -> None:
    """Refuse, before any work, an output folder whose files (``files``) or sub-folders (``folders``) cannot be
    written: each name already there as a device, pipe, socket or folder (a file where a folder goes) is an
    :class:`LmcError` naming it (:func:`lmckit.store.check_replaceable`,
    :func:`lmckit.store.check_output_path`). Without it a command writing several files stops at the first
    bad one and leaves the earlier ones behind.
    """
    from ..store import check_replaceable

    for name in files:
        check_replaceable(Path(folder) / name, what)
    for name in folders:
        check_output_path(what, Path(folder) / name, folder=True)


def refuse_outputs_in_inputs(
    outputs: Sequence[tuple[str, str | Path | None]], inputs: Sequence[tuple[str, str | Path | None]]
) -> None:
    """Refuse, before any work, an output path that is an input or lies inside one.

    ``outputs`` and ``inputs`` are ``(what, path)`` pairs (e.g. ``("--out", "perm.json")``,
    ``("model A", "runs/train/abc")``); ``None`` paths are skipped. An output equal to an input (also via
    a symbolic or hard link), or inside an input folder (a run folder), would overwrite or change that
    input: :class:`LmcError` naming both.
    """
    from ..errors import LmcError

    real_in = [(w, p, _real(p, w)) for w, p in inputs if p is not None]
    for what, out in outputs:
        if out is None:
            continue
        o = _real(out, what)
        for iwhat, inp, i in real_in:
            same = o == i
            if not same and o.exists() and i.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(o, i)
            if same or i in o.parents:
                rel = "is" if same else "is inside"
                raise LmcError(
                    f"{what} {out} {rel} {iwhat} ({inp}): writing it would change that input",
                    "choose an output path outside the input files and run folders",
                )


# --------------------------------------------------------------------------- model identities in perm files
def add_force_perm(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force-perm",
        action="store_true",
        help="apply a perm file even when it records other models than the ones given",
    )


def load_perm_file(
    path: str | Path,
    spec,
    permuted: tuple[str, Mapping[str, Any]],
    reference: tuple[str, Mapping[str, Any]],
    force: bool = False,
):
    """Read a perm file for ``spec`` and check it was computed for these two models.

    ``permuted``/``reference`` are ``(label, state_dict)`` of the model the permutation applies to and of
    the model it aligns to. Files written by ``lmckit match`` / ``merge`` record both models' content
    hashes (:func:`state_fingerprint`); a mismatch raises :class:`LmcError` unless ``force``. Files
    without hashes (older lmckit) are accepted with a note on stderr.
    """
    from ..errors import LmcError
    from ..perm import load_perms
    from ..store import read_json

    perms = load_perms(path, spec)
    d = read_json(path, "permutation file", expect=dict)
    for key in ("model_b_sha256", "model_sha256", "model_a_sha256", "reference_sha256"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise LmcError(
                f"permutation file {path}: {key} must be a string (a content hash), not {type(d[key]).__name__}",
                "pass a file written by lmckit match",
            )
    rec_perm = d.get("model_b_sha256") or d.get("model_sha256")
    rec_ref = d.get("model_a_sha256") or d.get("reference_sha256")
    if not rec_perm and not rec_ref:
        print(
            f"note: permutation file {path} records no model identities (written by an older lmckit); "
            "it is applied unchecked",
            file=sys.stderr,
        )
        return perms
    for (label, sd), rec, role in (
        (permuted, rec_perm, "the permuted model"),
        (reference, rec_ref, "the reference model"),
    ):
        if rec and rec != state_fingerprint(sd):
            msg = (
                f"permutation file {path} was computed for another {role} than {label} "
                f"(it records {rec[:19]}..., {label} is {state_fingerprint(sd)[:19]}...)"
            )
            if force:
                print(f"warning: {msg}; applied anyway (--force-perm)", file=sys.stderr)
                continue
            raise LmcError(
                msg,
                "pass the models the perm file was computed for (in the same order), "
                "recompute it with lmckit match, or add --force-perm",
            )
    return perms


def check_symmetry_flags(args: Any) -> None:
    """Flags that cannot go with ``--symmetry signed|orthogonal`` (``match``, ``merge``): ``--hf`` (the export-traced
    specs of Hugging Face models are permutation-only) and ``--restarts`` (matching under a class starts once)."""
    from ..errors import LmcError

    if args.hf:
        raise LmcError(
            f"--symmetry {args.symmetry} is not available for Hugging Face models (their export-traced specs "
            "are permutation-only)",
            "drop --symmetry",
        )
    if (getattr(args, "restarts", None) or 1) > 1:
        raise LmcError(
            f"--restarts is not used under --symmetry {args.symmetry}: weight matching under a class starts "
            "once, from permutation WM's optimum",
            "drop --restarts (or vary --seed)",
        )


def is_transform_file(path: str | Path | None) -> bool:
    """A transform file (``lmckit match --symmetry``) rather than a perm JSON: named ``*.safetensors``."""
    return path is not None and str(path).endswith(".safetensors")


def load_transform_file(
    path: str | Path,
    spec,
    model,
    permuted: tuple[str, Mapping[str, Any]],
    reference: tuple[str, Mapping[str, Any]],
    force: bool = False,
):
    """Read a transform file and apply it: ``(folded A state, folded B state, aligned folded B state, header)``.

    Checked like a perm file (:func:`load_perm_file`): both models' content hashes must match (unless
    ``force``), every entry must be an element of its class (:func:`lmckit.perm.symmetry.load_transform`),
    and each group's class must be the one the model admits under the file's symmetry. The norms are folded
    in both models as when the file was computed (the interpolation path is between folded models).
    """
    from ..errors import LmcError
    from ..perm.symmetry import apply_transform, derive_symmetry, fold_states, load_transform

    transform, head = load_transform(path, spec)
    for (label, sd), rec, role in (
        (permuted, head.get("model_b_sha256"), "the transformed model"),
        (reference, head.get("model_a_sha256"), "the reference model"),
    ):
        if rec and rec != state_fingerprint(sd):
            msg = f"transform file {path} was computed for other models: {label} is not {role} it records"
            if force:
                print(f"warning: {msg}; applied anyway (--force-perm)", file=sys.stderr)
                continue
            raise LmcError(msg, "pass the models the file was computed for (in the same order), or add --force-perm")
    fa, (fsa, fsb), _ = fold_states(model, [reference[1], permuted[1]])
    sym = derive_symmetry(spec, fsa, head.get("symmetry", "permutation"), model=fa)
    for g, s in sym.items():
        want = head["groups"][g]["class"]
        if s.cls != want:
            raise LmcError(
                f"transform file {path}: group {g!r} is {want} in the file but the model admits {s.cls}"
                + (f" ({s.limit})" if s.limit else "")
            )
        # what the model needs, not what the header says: a LayerNorm stream keeps its function only under
        # maps with Q 1 = 1 (checked even with --force-perm, which waives the models' identity only)
        if s.fix_ones and transform[g].dim() == 2 and float((transform[g].sum(1) - 1).abs().max()) > 1e-6:
            raise LmcError(
                f"transform file {path}: group {g!r} does not fix the all-ones direction (Q 1 != 1), which this "
                "model's LayerNorm stream needs: applied, it would change model B's function",
                "use a transform computed for these models (lmckit match A B --symmetry ...); a file computed for "
                "a model without LayerNorm does not apply to one with it",
            )
    return fsa, fsb, apply_transform(spec, sym, transform, fsb), head


# --------------------------------------------------------------------------- datasets named by a checkpoint
def load_named_dataset(
    given: str | None, info: Mapping[str, Any], data_dir: str | None, label: str = "model A", val_size: int = 0
):
    """Load ``given`` or the dataset ``info``'s checkpoint records; errors say where the name came from."""
    from ..data import load_dataset
    from ..errors import LmcError

    name = dataset_name(given, info)
    # the preprocessing the model was trained with (lmckit.train.TrainConfig.preprocess; absent: the default)
    pre = (info.get("train") or {}).get("preprocess", "standardize")
    try:
        kw = {"preprocess": pre} if pre != "standardize" else {}
        return load_dataset(name, data_dir, val_size=val_size, **kw) if val_size else load_dataset(name, data_dir, **kw)
    except LmcError as e:
        if given:
            raise
        raise LmcError(
            f"{e.message} (the dataset name {name!r} comes from the config of {label}, {info['path']})",
            (e.hint + "; " if e.hint else "") + "or pass --dataset NAME",
        ) from None


# --------------------------------------------------------------------------- outputs checked before any work
@contextlib.contextmanager
def staged_outputs(out: Path, *, keep: bool = False, lock: Path | None = None):
    """Write a command's files into a hidden temp folder inside ``out``; move them into ``out`` at the end.

    Yields the temp folder. On success each file is renamed into ``out`` (created if missing; folders are
    merged), so all files appear together. On any failure the temp folder is removed, ``lock`` too when
    this call found it missing, and ``out`` when this call created it (with ``keep``: only when nothing
    else is in it, so state written directly into ``out``, such as STE's resumable ``out/ste``, survives
    for the next run). A failed command leaves no ``perm_*.json`` without its ``summary.json``.
    """
    import shutil
    import tempfile

    from ..store import make_dirs, os_error, replace_file

    created = not out.exists()
    lock_created = lock is not None and not lock.exists()
    make_dirs(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".lmckit-tmp-", dir=out))
    except OSError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise os_error(e, out) from None
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            if f.is_dir():
                if (out / f.name).is_dir():
                    _merge_dir(f, out / f.name)
                else:
                    os.replace(f, out / f.name)  # a folder over a missing path (a file in the way fails: ENOTDIR)
            else:
                replace_file(f, out / f.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock_created:
            lock.unlink(missing_ok=True)
        if created and not keep:
            shutil.rmtree(out, ignore_errors=True)
        elif created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_dir(src: Path, dst: Path) -> None:
    from ..store import replace_file

    for f in src.iterdir():
        target = dst / f.name
        if f.is_dir() and target.is_dir():
            _merge_dir(f, target)
        elif f.is_dir():
            os.replace(f, target)
        else:
            replace_file(f, target)


def draw_ste_drift(folder: str | os.PathLike | None) -> list[Path]:
    """Draw ``drift.png`` beside every STE ``drift.json`` under ``folder`` (a ``--ste-state`` folder).

    The figure is the report's (:func:`lmckit.report.figures.ste_drift`) with one run; epochs
    without an R(0.3) value are left out of that panel. Returns the files written (none when
    ``folder`` is ``None`` or holds no drift record).
    """
    if folder is None or not Path(folder).is_dir():
        return []
    from ..report.figures import ste_drift  # matplotlib: only for commands that ran STE

    out = []
    for rec in sorted(Path(folder).rglob("drift.json")):
        from ..store import read_json

        drift = read_json(rec, "STE drift record", expect=dict)
        run = {
            k: [float("nan") if v is None else v for v in vals] for k, vals in drift.items() if isinstance(vals, list)
        }
        out.append(ste_drift({"runs": [{"label": "STE", **run}]}, rec.with_name("drift.png")))
    return out
