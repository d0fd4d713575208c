"""The pipeline's model stage trains in its own folder: one trained model, one folder.

The stage must train exactly what ``lmckit train`` trains (same weights for the same config and
threads), resume from its ``.partial`` checkpoint, and still read caches of the older layout in
which the stage folder pointed at a ``ROOT/train/<hash>`` run.
"""

from __future__ import annotations

import json
import shutil

import torch

from lmckit.checkpoint import load_state
from lmckit.pipeline.stages import StageContext, partial_dir, run_stage, stage_path
from lmckit.pipeline.tasks import load_model_of, load_trained, train_stage
from lmckit.train import IN_FOLDER_RECORD, train


def _stage(seed: int = 0):
    return train_stage("tiny", {"model": "mlp_tiny", "dataset": "synthetic", "seed": seed})


def test_model_stage_is_the_only_folder_and_equals_lmckit_train(tmp_path):
    spec = _stage()
    out = run_stage(spec, tmp_path)
    assert out.status == "ran", out
    folder = stage_path(tmp_path, spec)
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "metrics.jsonl", IN_FOLDER_RECORD, "result.json", "config.json"} <= names
    assert "checkpoint.safetensors" not in names  # the resumable checkpoint is gone once finished
    assert not (tmp_path / "train").exists()  # no second run folder
    assert [d.name for d in tmp_path.iterdir() if not d.name.startswith(".")] == ["model"]

    # the same config trained by lmckit train gives the same weights and the same record
    ref = train(spec.train_config(), out_root=tmp_path / "cli", progress=False)
    w_stage, _ = load_state(folder / "model.safetensors")
    w_cli, _ = load_state(ref.run_dir / "model.safetensors")
    assert w_stage.keys() == w_cli.keys()
    for k in w_cli:
        assert torch.equal(w_stage[k], w_cli[k]), k
    rec, rec_cli = (
        json.loads((folder / IN_FOLDER_RECORD).read_text()),
        json.loads((ref.run_dir / "config.json").read_text()),
    )
    assert rec["config"] == rec_cli["config"] and rec["result"]["test_loss"] == rec_cli["result"]["test_loss"]
    result = json.loads((folder / "result.json").read_text())
    assert result["test_loss"] == ref.test_loss and "run_dir" not in result

    ctx = StageContext(spec, tmp_path, tmp_path / "x")
    sd, model_cfg, cfg = load_model_of(ctx, spec)
    assert model_cfg["name"] == "mlp_tiny" and cfg == spec.train_config()
    for k in w_cli:
        assert torch.equal(sd[k], w_cli[k]), k


def test_model_stage_resumes_from_its_partial_checkpoint(tmp_path):
    """A stage killed after epoch 1 (simulated: the finished stage's folder turned back into a
    ``.partial`` with epoch 1's checkpoint) resumes there and ends with the uninterrupted weights."""
    spec = _stage(1)
    full = tmp_path / "full"
    assert run_stage(spec, full).status == "ran"
    w_full, _ = load_state(stage_path(full, spec) / "model.safetensors")

    calls = []

    def stop_after_first(epoch, row):
        calls.append(epoch)
        raise KeyboardInterrupt  # a kill after the first epoch's checkpoint

    from lmckit.train import train_in_folder

    root = tmp_path / "killed"
    work = partial_dir(stage_path(root, spec))
    work.mkdir(parents=True)
    (work / "log.txt").write_text("== earlier attempt\n")
    try:
        train_in_folder(spec.train_config(), work, progress=False, callback=stop_after_first)
    except KeyboardInterrupt:
        pass
    assert calls == [1] and (work / "checkpoint.safetensors").exists()
    assert run_stage(spec, root).status == "ran"
    folder = stage_path(root, spec)
    assert "earlier attempt" in (folder / "log.txt").read_text()  # the caller's log is kept
    assert [json.loads(x)["epoch"] for x in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((folder / IN_FOLDER_RECORD).read_text())["provenance"]["resumed_after_epochs"] == [1]
    w, _ = load_state(folder / "model.safetensors")
    for k in w_full:
        assert torch.equal(w[k], w_full[k]), k


def test_cache_of_the_older_layout_is_still_read(tmp_path):
    """Older caches: the stage folder's result.json points at ROOT/train/<hash> (no weights inside)."""
    spec = _stage(2)
    assert run_stage(spec, tmp_path).status == "ran"
    folder = stage_path(tmp_path, spec)
    run = train(spec.train_config(), out_root=tmp_path, progress=False)
    rec = json.loads((folder / "result.json").read_text())
    rec["run_dir"] = str(run.run_dir.relative_to(tmp_path))
    (folder / "result.json").write_text(json.dumps(rec))
    shutil.copy(folder / "model.safetensors", tmp_path / "weights-were-here")
    (folder / "model.safetensors").unlink()
    sd, model_cfg = load_trained(folder, tmp_path)
    w, _ = load_state(tmp_path / "weights-were-here")
    assert model_cfg["name"] == "mlp_tiny"
    for k in w:
        assert torch.equal(sd[k], w[k]), k
