"""The STE-MM authors' training recipe as TrainConfig settings (issue 30): preprocessing and kept epoch.

* ``preprocess = "scale01"``: the model sees ``x / 255`` exactly (the authors' ``ToTensor``), every stage
  loads the data that way (:func:`lmckit.train.dataset_of`), and CLI commands read it from the checkpoint;
* ``keep_epoch = "best-test" | "best-val"``: the kept weights are exactly those after the best epoch
  (the same weights as a run stopped there), ties go to the earlier epoch, a killed run resumes to the
  same weights;
* the defaults leave every earlier hash as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmckit.checkpoint import load_checkpoint
from lmckit.commands.common import load_named_dataset
from lmckit.data import load_dataset
from lmckit.errors import LmcError
from lmckit.store import load_state
from lmckit.train import TrainConfig, dataset_of, make_config, run_dir_for, train


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_state(Path(run_dir) / "model.safetensors")[0]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_scale01_is_x_over_255_and_standardize_is_unchanged(synthetic):
    raw = synthetic.images["test"][:50]
    s01 = load_dataset("synthetic", preprocess="scale01")
    assert torch.equal(s01.normalize(raw), raw.to(torch.float32) / 255.0)
    assert torch.equal(s01.images["train"], synthetic.images["train"])  # same images, other preprocessing
    m, s = synthetic.mean[0], synthetic.std[0]
    assert s != 1.0 and torch.allclose(synthetic.normalize(raw), (raw.float() / 255.0 - m) / s)
    assert load_dataset("synthetic") is synthetic  # the default is still the cached standardised one
    with pytest.raises(LmcError, match="unknown preprocessing 'none'.*standardize, scale01"):
        load_dataset("synthetic", preprocess="none")


def test_defaults_keep_hashes_and_new_values_change_them():
    base = make_config("tiny")
    assert base.hash() == "08780837adfdf405"  # pinned v0.1 hash: the new settings are absent at their defaults
    assert "preprocess" not in base.to_dict() and "keep_epoch" not in base.to_dict()
    assert make_config("tiny", preprocess="standardize", keep_epoch="last").hash() == base.hash()
    hashes = {
        base.hash(),
        base.replace(preprocess="scale01").hash(),
        base.replace(keep_epoch="best-test").hash(),
        base.replace(keep_epoch="best-val", val_size=100).hash(),
        base.replace(val_size=100).hash(),
    }
    assert len(hashes) == 5
    cfg = base.replace(preprocess="scale01", keep_epoch="best-test")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(preprocess="minmax"), "unknown preprocessing 'minmax'"),
        (dict(keep_epoch="best"), "unknown keep_epoch 'best'"),
        (dict(keep_epoch="best-val"), "needs a validation split"),
    ],
)
def test_bad_settings_name_the_setting(bad, msg):
    with pytest.raises(LmcError, match=msg):
        make_config("tiny", **bad)


def test_scale01_run_trains_on_x_over_255(tmp_path, synthetic):
    cfg = make_config("tiny", preprocess="scale01", epochs=1)
    r = train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    assert dataset_of(cfg).mean == (0.0,) and dataset_of(cfg).std == (1.0,)
    other = train(make_config("tiny", epochs=1), tmp_path, device="cpu", progress=False, threads=1)
    assert r.run_dir != other.run_dir
    wa, wb = _weights(r.run_dir), _weights(other.run_dir)
    assert not torch.equal(wa["fc0.weight"], wb["fc0.weight"])  # the inputs differ, so do the weights
    # the CLI commands evaluate a checkpoint with the preprocessing it records
    _, info = load_checkpoint(r.run_dir)
    assert info["train"]["preprocess"] == "scale01"
    ds = load_named_dataset(None, info, None)
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    _, info_b = load_checkpoint(other.run_dir)
    assert load_named_dataset(None, info_b, None) is synthetic


def test_best_test_keeps_exactly_the_best_epochs_weights(tmp_path, synthetic):
    # lr 0.05 with Adam on the tiny task: the test accuracy goes up and down over the epochs
    cfg = make_config("tiny", lr=0.05, epochs=5, keep_epoch="best-test")
    r = train(cfg, tmp_path / "best", device="cpu", progress=False, threads=1)
    rows = _metrics(r.run_dir)
    accs = [m["test_acc"] for m in rows]
    k = accs.index(max(accs)) + 1  # first epoch reaching the maximum (ties: the earlier one)
    assert k < 5, f"the test needs a run whose best epoch is not the last: {accs}"
    rec = json.loads((r.run_dir / "config.json").read_text())["result"]
    assert rec["kept_epoch"] == k and rec["test_accuracy"] == max(accs) == r.test_accuracy
    assert not (r.run_dir / "best.safetensors").exists()
    # the same seed and constant rate stopped after epoch k: the same weights, bit for bit
    stopped = train(cfg.replace(epochs=k, keep_epoch="last"), tmp_path / "k", device="cpu", progress=False, threads=1)
    wa, wb = _weights(r.run_dir), _weights(stopped.run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    last = train(cfg.replace(keep_epoch="last"), tmp_path / "last", device="cpu", progress=False, threads=1)
    assert not torch.equal(_weights(last.run_dir)["fc0.weight"], wa["fc0.weight"])


def test_best_val_selects_on_the_validation_split(tmp_path, synthetic):
    cfg = make_config("tiny", lr=0.05, epochs=4, val_size=500, keep_epoch="best-val")
    r = train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    rows = _metrics(r.run_dir)
    vals = [m["val_acc"] for m in rows]
    rec = json.loads((r.run_dir / "config.json").read_text())["result"]
    assert rec["kept_epoch"] == vals.index(max(vals)) + 1
    assert rec["test_accuracy"] == rows[rec["kept_epoch"] - 1]["test_acc"]


class _Stop(Exception):
    pass


def test_best_epoch_run_resumes_to_the_same_weights(tmp_path, synthetic):
    cfg = make_config("tiny", lr=0.05, epochs=4, keep_epoch="best-test")
    full = train(cfg, tmp_path / "full", device="cpu", progress=False, threads=1)

    def stop(e, _row):
        if e == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, tmp_path / "cut", device="cpu", progress=False, threads=1, callback=stop)
    partial = run_dir_for(cfg, tmp_path / "cut").with_name(run_dir_for(cfg, tmp_path / "cut").name + ".partial")
    assert (partial / "best.safetensors").is_file()
    r = train(cfg, tmp_path / "cut", device="cpu", progress=False, threads=1)
    wa, wb = _weights(full.run_dir), _weights(r.run_dir)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    # a resumable checkpoint whose best weights went missing is refused, not silently wrong
    with pytest.raises(_Stop):
        train(cfg, tmp_path / "cut2", device="cpu", progress=False, threads=1, callback=stop)
    p2 = run_dir_for(cfg, tmp_path / "cut2").with_name(run_dir_for(cfg, tmp_path / "cut2").name + ".partial")
    (p2 / "best.safetensors").unlink()
    with pytest.raises(LmcError, match="best epoch's weights"):
        train(cfg, tmp_path / "cut2", device="cpu", progress=False, threads=1)


def test_generated_dataset_cache_ignores_the_working_directory(tmp_path, monkeypatch):
    """The in-process cache of a generated dataset is one object whatever the cwd (it has no folder)."""
    first = load_dataset("synthetic")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("synthetic") is first
