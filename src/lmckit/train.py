"""Seeded, resumable training of zoo models into hashed run folders.

A training run is a pure function of a :class:`TrainConfig` (model, dataset,
seed, optimiser, schedule, ...). Its output folder is
``ROOT/train/<config_hash>`` (:func:`lmckit.store.stage_dir` of the fully
resolved config, model defaults included) and holds

* ``model.safetensors``: the final weights, self-describing (model config in
  the metadata, so :func:`lmckit.load` rebuilds the model);
* ``config.json``: the resolved config, the model config, the final metrics and
  provenance (lmckit/torch versions, dataset checksums, device, wall time);
* ``metrics.jsonl``: one JSON line per epoch.

How to run (device, threads, progress, data folder, output root) never enters
the hash.

Determinism
-----------
The model is initialised under ``torch.manual_seed(seed)`` inside
:func:`torch.random.fork_rng` (the caller's global RNG state is untouched);
the batch order and augmentation draw from a private ``torch.Generator``
seeded with ``seed``. On CPU the same config therefore gives bit-identical
weights (for one torch thread count: threaded float sums may round
differently). Work happens in ``<hash>.partial/``; after every epoch a checkpoint
(model, optimiser state, generator state, epoch, metrics; safetensors + JSON
metadata, no pickles) is written atomically, so a killed run resumes from its
last finished epoch and ends with the same weights as an uninterrupted run.

The config (:class:`~lmckit.train_config.TrainConfig`, presets, the learning-rate
schedule) lives in :mod:`lmckit.train_config`, the run folder's files
(checkpoints, the result record) in :mod:`lmckit.train_store`; their public
names are importable from here as well.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .checkpoint import save_model
from .data import random_crop_flip
from .device import autocast, channels_last_wanted, resolve_device, tf32_allowed, tf32_scope
from .errors import LmcError
from .evaluate import evaluate
from .presets import OPTIMIZERS, PRESETS, SCHEDULES  # noqa: F401  (re-exported; plain data, see lmckit.presets)
from .progress import NullProgress, Progress
from .store import (
    SCHEMA_VERSION,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    file_lock,
    finalize_dir,
    is_complete,
    load_state,
    partial_dir,
    save_state,
)
from .train_config import (  # noqa: F401  (re-exported: importable from lmckit.train as before the split)
    DATASET_OPTIONS,
    HASH_DEFAULTS,
    KEEP_EPOCHS,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_INT,
    MODEL_OPTION_KEYS,
    TrainConfig,
    build_untrained,
    check_training_size,
    dataset_of,
    lr_at,
    make_config,
    make_optimizer,
    preset_for,
)
from .train_store import (  # noqa: F401  (re-exported as well)
    BEST,
    CHECKPOINT,
    IN_FOLDER_RECORD,
    TrainResult,
    _cached_or_target,
    check_run_store,
    data_fingerprint,
    is_complete_run,
    load_checkpoint_into,
    load_result,
    run_dir_for,
    save_checkpoint,
)


# --------------------------------------------------------------------------- training
def train(
    config: TrainConfig,
    out_root: str | os.PathLike = "runs",
    device: str | torch.device = "auto",
    progress: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train ``config`` into ``out_root/train/<hash>`` (or return the finished run).

    Parameters
    ----------
    config:
        What to train.
    out_root:
        Root of the run store.
    device:
        ``auto``, ``cpu``, ``cuda``, ... (not part of the hash; bit-identical
        results are guaranteed on CPU only).
    progress:
        Per-epoch progress lines / bar (see :mod:`lmckit.progress`).
    data_dir:
        Where to look for the dataset first.
    threads:
        ``torch.set_num_threads`` for the run (restored afterwards).
    callback:
        ``callback(epoch, metrics)`` after each epoch's checkpoint is written
        (epochs count from 1). An exception raised there stops training; the
        checkpoint stays and a rerun resumes after that epoch.
    channels_last, tf32:
        GPU settings (how to run: not hashed, recorded in the run's
        ``config.json`` under ``provenance``). ``None``: channels_last for
        convolutional models on CUDA, TF32 allowed on CUDA
        (:func:`lmckit.device.channels_last_wanted`, :func:`lmckit.device.tf32_allowed`);
        neither on CPU.

    Returns
    -------
    TrainResult
        Final test metrics (of the last epoch's evaluation), train metrics
        (a clean evaluation pass over the training split in eval mode), wall
        seconds spent training (summed over resumes), and ``cached``.

    Notes
    -----
    Determinism on CUDA: a rerun on the same GPU model, driver and torch
    gives the same weights up to cuDNN/cuBLAS kernel choices and atomics;
    lmckit does not force deterministic algorithms, so CUDA runs are not
    promised to be bit-identical (and never equal CPU runs bit for bit).
    """

    check_run_store(Path(out_root))  # the store itself before the data is loaded (a file, a FIFO, a link loop)

    # Everything is validated before anything is written under out_root (no lock or .partial is left
    # behind by a bad device, model option or dataset).
    if threads is not None and not 1 <= int(threads) <= 4096:
        raise LmcError(f"--threads must be between 1 and 4096, got {threads}")
    ds = _validated_dataset(config, device, data_dir)
    final = _cached_or_target(run_dir_for(config, out_root), ds)
    if is_complete(final):
        return load_result(final, cached=True)
    if final.exists():
        raise LmcError(f"{final} exists but is not a finished run (no config.json)", "delete that folder and run again")
    check_run_store(Path(out_root), config)
    lock = final.with_name(final.name + ".lock")
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock_created, partial = not lock.exists(), partial_dir(final)
    partial_created = not partial.exists()
    try:
        with file_lock(lock, what="training run"):
            if is_complete(final):  # another process finished it while we waited
                return load_result(final, cached=True)
            old_threads = torch.get_num_threads()
            if threads:
                torch.set_num_threads(int(threads))
            try:
                return _train_locked(config, final, partial, device, progress, data_dir, callback, channels_last, tf32)
            finally:
                if threads:
                    torch.set_num_threads(old_threads)
    except Exception:  # a failure before the first epoch's checkpoint removes what this call created
        # (an interrupted run keeps its .partial folder and resumes; a diverged run keeps its last checkpoint)
        if partial_created and not (partial / CHECKPOINT).exists() and not is_complete(final):
            shutil.rmtree(partial, ignore_errors=True)
            if lock_created:
                lock.unlink(missing_ok=True)
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty
        raise


def train_in_folder(
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "auto",
    progress: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    keep: frozenset[str] = frozenset({"log.txt"}),
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train ``config`` inside ``folder``, a work folder the caller has locked and will publish itself.

    This is how the pipeline's model stage trains: the stage's own folder is the model's only folder
    (no second run folder under ``ROOT/train/``). The training is the one :func:`train` runs, epoch
    for epoch (same weights for the same config, data, threads and device); the files differ in one
    name only: the run record is ``train.json`` (``config.json`` marks a finished stage folder).
    The folder receives ``model.safetensors``, ``metrics.jsonl`` and ``train.json``; while training,
    ``checkpoint.safetensors`` after each epoch, from which a call on the same folder resumes (a
    killed stage keeps its ``.partial`` folder). A fresh start removes what an earlier attempt left
    in ``folder`` except the names in ``keep`` (the caller's log). Nothing is locked or renamed here.

    Returns the :class:`TrainResult` with ``run_dir = folder``. Raises :class:`LmcError` as
    :func:`train` does (bad device, model option, dataset; a checkpoint of another config or data).
    """
    _validated_dataset(config, device, data_dir)
    folder = Path(folder)
    run = _setup(config, folder, folder, device, data_dir, channels_last, tf32)
    run.keep, run.record, run.publish = frozenset(keep), IN_FOLDER_RECORD, False
    _resume_or_clean(run)
    _run_epochs(run, progress, callback)
    return _finish(run)


def _validated_dataset(config: TrainConfig, device: str | torch.device, data_dir: str | os.PathLike | None):
    """Check the device, load the dataset (cached per process) and check the model's size: the dataset."""
    resolve_device(device)
    ds = dataset_of(config, data_dir)
    check_training_size(config, ds.in_channels, ds.image_size, ds.num_classes)
    return ds


@dataclass
class _Run:
    """A training run in progress: what it trains, where it writes, and what it has done so far."""

    config: TrainConfig
    final: Path  # the finished run's folder
    partial: Path  # where it is built (renamed to ``final`` when done)
    dev: torch.device
    ds: Any  # the loaded dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # batch order and augmentation
    gpu: dict[str, Any]  # precision, channels_last, tf32 (how it runs: recorded, not hashed)
    cfg_dict: dict[str, Any]
    h: str  # the config hash
    start_epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # training seconds, summed over resumes
    resumed: list[int] = field(default_factory=list)  # epochs after which earlier processes stopped
    resume_note: str | None = None
    keep: frozenset[str] = frozenset()  # names a fresh start leaves in ``partial`` (train_in_folder: the log)
    record: str = "config.json"  # the run record's file name
    publish: bool = True  # rename ``partial`` to ``final`` when done (train_in_folder: the caller does)
    best: dict[str, Any] | None = None  # keep_epoch = best-*: {"epoch", "metric", "value"} of the best epoch so far

    @property
    def ckpt(self) -> Path:
        return self.partial / CHECKPOINT

    def write_metrics(self) -> None:
        atomic_write_text(
            self.partial / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.metrics)
        )


def _train_locked(
    config: TrainConfig,
    final: Path,
    partial: Path,
    device: str | torch.device,
    progress: bool,
    data_dir: str | os.PathLike | None,
    callback,
    channels_last: bool | None = None,
    tf32: bool | None = None,
) -> TrainResult:
    """Train under the run's lock: set up, resume (or start clean), run the epochs, finish the folder."""
    run = _setup(config, final, partial, device, data_dir, channels_last, tf32)
    _resume_or_clean(run)
    _run_epochs(run, progress, callback)
    return _finish(run)


def _setup(
    config: TrainConfig,
    final: Path,
    partial: Path,
    device: str | torch.device,
    data_dir: str | os.PathLike | None,
    channels_last: bool | None,
    tf32: bool | None,
) -> _Run:
    """Load the data, build the untrained model and its optimizer on the device, seed the generator."""
    dev = resolve_device(device)
    cfg_dict = config.to_dict()
    h = config_hash(cfg_dict)
    ds = dataset_of(config, data_dir)
    model = build_untrained(config, ds).to(dev)
    use_cl = channels_last_wanted(model, dev, channels_last)
    use_tf32 = tf32_allowed(dev, tf32)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    gpu = {"precision": config.precision, "channels_last": use_cl, "tf32": use_tf32}
    optimizer = make_optimizer(config, model.parameters())
    gen = torch.Generator().manual_seed(config.seed)
    return _Run(config, final, partial, dev, ds, model, optimizer, gen, gpu, cfg_dict, h)


def _resume_or_clean(run: _Run) -> None:
    """Resume from the ``.partial`` folder's checkpoint (same config and data, else an error), or clear it.

    A fresh start removes leftovers of a run killed before its first checkpoint. Raises :class:`LmcError`
    for a checkpoint of another config, of other data files, or one that cannot be read.
    """
    run.partial.mkdir(parents=True, exist_ok=True)
    ckpt, partial, ds = run.ckpt, run.partial, run.ds
    if not ckpt.exists():
        for p in partial.iterdir():
            if p.name not in run.keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    try:
        meta = load_checkpoint_into(ckpt, run.model, run.optimizer, run.gen)
    except LmcError as e:
        raise LmcError(f"cannot resume from {ckpt}: {e.message}", f"delete {partial} to restart this run") from None
    if meta.get("config_hash") != run.h:
        raise LmcError(
            f"checkpoint {ckpt} belongs to another config ({meta.get('config_hash')})",
            f"delete {partial} to restart this run",
        )
    if meta.get("data_checksums", dict(ds.checksums)) != dict(ds.checksums):
        raise LmcError(
            f"the unfinished run {partial} was started on other {run.config.dataset} files than the "
            "ones found now (their checksums differ)",
            f"point --data-dir at the data it started on, or delete {partial} to restart on this data",
        )
    run.start_epoch, run.metrics, run.elapsed = int(meta["epoch"]), list(meta["metrics"]), float(meta["elapsed"])
    run.best = meta.get("best")
    if run.best is not None and not (partial / BEST).exists():
        raise LmcError(
            f"cannot resume from {ckpt}: the best epoch's weights ({BEST}) are missing",
            f"delete {partial} to restart this run",
        )
    run.resumed = list(meta.get("resumed", [])) + [run.start_epoch]
    where = _where(run.dev, run.gpu)
    if meta.get("where", where) != where:  # still correct, but float sums may round differently
        run.resume_note = (
            f"[train] note: resuming on {where} but epochs 1-{run.start_epoch} ran on {meta['where']}; "
            "the weights will not be bit-identical to an uninterrupted run"
        )


def _run_epochs(run: _Run, progress: bool, callback) -> None:
    """Train the remaining epochs; after each, evaluate, checkpoint, append its metrics and call ``callback``.

    Raises :class:`LmcError` when the training loss is not finite (the last good checkpoint stays).
    """
    config, ds, dev, model = run.config, run.ds, run.dev, run.model
    x_u8, y_all = ds.on_device("train", dev)  # the whole split on the device, copied once
    n = int(x_u8.shape[0])
    # Whole split normalised once (no per-batch conversion) unless batches are augmented.
    x_all = None if config.augment else ds.normalize(x_u8)
    if run.gpu["channels_last"] and x_all is not None:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(n / config.batch_size)
    bar = (
        Progress(config.epochs, f"train {config.model} seed={config.seed}", every=0.0, unit="epoch")
        if progress
        else NullProgress()
    )
    if run.start_epoch:
        bar.write(f"[train] resuming {run.final.name} after epoch {run.start_epoch}")
        if run.resume_note:
            bar.write(run.resume_note)
        bar.update(run.start_epoch)
    try:
        for epoch in range(run.start_epoch, config.epochs):
            t0 = time.perf_counter()
            model.train()
            with tf32_scope(run.gpu["tf32"]):
                train_loss, train_acc, lr = _train_epoch(
                    model, run.optimizer, config, run.gen, x_all, x_u8, y_all, ds, dev, epoch, steps_per_epoch
                )
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise LmcError(
                    f"training diverged in epoch {epoch + 1} (loss {train_loss})",
                    f"lower the learning rate (now {config.lr}); the last good checkpoint is in {run.partial}",
                )
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
            if "val" in ds.images:
                row["val_loss"], row["val_acc"] = evaluate(
                    model, ds, "val", batch_size=config.eval_batch_size, device=dev
                )
            row["test_loss"], row["test_acc"] = evaluate(
                model, ds, "test", batch_size=config.eval_batch_size, device=dev
            )
            row["seconds"] = train_seconds
            row["eval_seconds"] = time.perf_counter() - t0 - train_seconds
            run.metrics.append(row)
            _keep_if_best(run, row)
            run.elapsed += time.perf_counter() - t0
            _checkpoint(run, epoch + 1)
            bar.update(1, loss=train_loss, test_acc=row["test_acc"])
            if callback is not None:
                callback(epoch + 1, row)
    finally:
        bar.close()


def _keep_if_best(run: _Run, row: dict[str, Any]) -> None:
    """``keep_epoch = best-*``: save this epoch's weights (atomically) when its accuracy beats every earlier one.

    Strictly higher only, so ties keep the earlier epoch, as Lightning's ``ModelCheckpoint(mode='max')``
    does (its comparison is ``torch.gt``) in the STE-MM authors' ``srcs/train.py``. Written before the
    epoch's checkpoint, which records ``run.best``: a kill between the two resumes from the previous
    checkpoint and repeats the epoch.
    """
    keep = run.config.keep_epoch
    if keep == "last":
        return
    metric = "test_acc" if keep == "best-test" else "val_acc"
    value = float(row[metric])
    if run.best is None or value > run.best["value"]:
        save_state(
            run.partial / BEST,
            {k: v.detach().to("cpu").contiguous() for k, v in run.model.state_dict().items()},
            {"epoch": int(row["epoch"]), "metric": metric, "value": value},
        )
        run.best = {"epoch": int(row["epoch"]), "metric": metric, "value": value}


def _checkpoint(run: _Run, epoch: int) -> None:
    """Write the resumable checkpoint after ``epoch`` (1-based), then the metrics so far."""
    save_checkpoint(
        run.ckpt,
        run.model,
        run.optimizer,
        run.gen,
        epoch,
        {
            "metrics": run.metrics,
            "elapsed": run.elapsed,
            "config_hash": run.h,
            "resumed": run.resumed,
            "data_checksums": dict(run.ds.checksums),
            "where": _where(run.dev, run.gpu),
            **({"best": run.best} if run.best is not None else {}),
        },
    )
    run.write_metrics()


def _finish(run: _Run) -> TrainResult:
    """Evaluate on the training split, save the model and its record, and rename ``.partial`` to the run folder."""
    config, ds, dev, model, partial = run.config, run.ds, run.dev, run.model, run.partial
    t0 = time.perf_counter()
    last = run.metrics[-1]
    if config.keep_epoch != "last":  # the kept epoch's weights replace the last epoch's
        if run.best is None:
            raise LmcError(f"the run in {partial} has no best epoch recorded", f"delete {partial} to restart this run")
        tensors, _ = load_state(partial / BEST)
        model.load_state_dict({k: v.to(dev) for k, v in tensors.items()})
        last = run.metrics[run.best["epoch"] - 1]
    train_eval = evaluate(model, ds, "train", batch_size=config.eval_batch_size, device=dev)
    run.elapsed += time.perf_counter() - t0
    result = {
        "test_loss": last["test_loss"],
        "test_accuracy": last["test_acc"],
        "train_loss": train_eval[0],
        "train_accuracy": train_eval[1],
        "epochs": config.epochs,
    }
    if config.keep_epoch != "last":
        result["kept_epoch"] = int(last["epoch"])
    if "val_loss" in last:
        result["val_loss"], result["val_accuracy"] = last["val_loss"], last["val_acc"]
    save_model(
        partial / "model.safetensors", model, dataset=config.dataset, lmckit_train=run.cfg_dict, config_hash=run.h
    )
    # metrics.jsonl again: a kill between the last checkpoint and its metrics line must not lose that line
    run.write_metrics()
    run.ckpt.unlink(missing_ok=True)
    (partial / BEST).unlink(missing_ok=True)
    for p in partial.glob(".*.tmp"):  # temp files of writes interrupted by an earlier kill
        p.unlink(missing_ok=True)
    atomic_write_json(partial / run.record, _run_record(run, result))
    final = finalize_dir(partial, run.final) if run.publish else partial
    return TrainResult(
        final,
        float(result["test_loss"]),
        float(result["test_accuracy"]),
        float(result["train_loss"]),
        float(result["train_accuracy"]),
        run.elapsed,
        False,
        config,
    )


def _run_record(run: _Run, result: dict[str, Any]) -> dict[str, Any]:
    """The run folder's ``config.json``: config, model, result and provenance (versions, device, data)."""
    ds = run.ds
    return {
        "kind": "lmckit.train",
        "schema": SCHEMA_VERSION,
        "hash": run.h,
        "config": run.cfg_dict,
        "model": run.model.lmckit_config,
        "dataset": run.config.dataset,
        "seed": run.config.seed,
        "result": result,
        "provenance": {
            "lmckit_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "device": str(run.dev),
            "threads": torch.get_num_threads(),
            **run.gpu,
            "wall_seconds": run.elapsed,
            "resumed_after_epochs": run.resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset": {
                "name": ds.name,
                "checksums": dict(ds.checksums),
                "sources": dict(ds.source),
                "sizes": {s: ds.size(s) for s in ds.splits()},
            },
        },
    }


def _where(dev: torch.device, gpu: Mapping[str, Any]) -> dict[str, Any]:
    """Where a checkpoint was computed (a resume elsewhere is noted: float sums may round differently)."""
    w: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        w.update(channels_last=gpu["channels_last"], tf32=gpu["tf32"])
    return w


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    gen: torch.Generator,
    x_all: torch.Tensor | None,
    x_u8: torch.Tensor,
    y_all: torch.Tensor,
    ds,
    dev: torch.device,
    epoch: int,
    steps_per_epoch: int,
) -> tuple[float, float, float]:
    """One pass over the shuffled training split; returns (mean loss, accuracy, last lr).

    Loss and correct counts are accumulated on the device and read once at
    the end (no per-step host sync).
    """

    n, bs = int(x_u8.shape[0]), config.batch_size
    order = torch.randperm(n, generator=gen)
    order_dev = order.to(dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    groups = optimizer.param_groups
    lr = config.lr
    model_cl = x_all is None and any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    for i, start in enumerate(range(0, n, bs)):
        idx = order_dev[start : start + bs]
        if x_all is not None:
            xb = x_all.index_select(0, idx)
        else:
            xb = ds.normalize(random_crop_flip(x_u8.index_select(0, idx), gen))
            if model_cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y_all.index_select(0, idx)
        lr = lr_at(config, epoch * steps_per_epoch + i, steps_per_epoch)
        for g in groups:
            g["lr"] = lr
        with autocast(dev, config.precision):
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach() * yb.shape[0]
            correct += (out.argmax(1) == yb).sum()
    per = int(y_all[0].numel()) if n else 1  # targets per item: 1 (a label), or T (a language model's tokens)
    return float(loss_sum) / n, int(correct) / (n * per), lr
