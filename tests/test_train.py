"""Training: config hashing, presets, schedules, determinism, resume, caching, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.store import load_state
from lmckit.train import PRESETS, TrainConfig, lr_at, make_config, run_dir_for, train

# Every run here uses threads=1: bit-identity holds for one device and thread count, and
# one thread is much faster for tiny models on a loaded 2-core machine.


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_state(Path(run_dir) / "model.safetensors")[0]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# A conv net with BatchNorm, SGD + momentum, warm-up + linear decay and augmentation:
# every piece of state a resume must restore (BN buffers, momentum, generator).
BN_CFG = dict(
    model="vgg_tiny",
    dataset="synthetic-rgb",
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="linear",
    warmup_epochs=1,
    augment=True,
    batch_size=100,
    epochs=2,
)


# --------------------------------------------------------------------------- config and hash
def test_pinned_hashes():
    # A changed default (here or in a model factory) must not silently reuse old runs:
    # if this fails on purpose, bump the pins and say why in the commit.
    assert make_config("tiny").hash() == "08780837adfdf405"
    assert make_config("mlp-fmnist").hash() == make_config("mlp-fmnist", seed=0, width=512, depth=3).hash()


def test_hash_changes_with_every_setting():
    base = make_config("tiny")
    changed = dict(
        model="mlp",
        dataset="synthetic-rgb",
        val_size=100,
        seed=1,
        epochs=3,
        batch_size=50,
        optimizer="sgd",
        lr=0.02,
        momentum=0.5,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=1.0,
        augment=True,
        eval_batch_size=250,
        precision="bf16",
        preprocess="scale01",
        keep_epoch="best-test",
    )
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs", "nesterov"}
    assert set(changed) == fields
    hashes = {base.hash()}
    for k, v in changed.items():
        h = base.replace(**{k: v}).hash()
        assert h not in hashes, k
        hashes.add(h)
    for opt in (dict(width=17), dict(norm="layernorm"), dict(width_mult=2.0), dict(depth=3), dict(activation="gelu")):
        h = base.replace(**opt).hash()
        assert h not in hashes, opt
        hashes.add(h)
    h = base.replace(optimizer="sgd", nesterov=True).hash()
    assert h != base.replace(optimizer="sgd").hash()


def test_config_normalises_equal_values():
    a = make_config("tiny")
    assert make_config("tiny", lr=0.01, width_mult=1).hash() == a.hash()
    assert make_config("tiny", model_kwargs={"width": 16, "depth": 2}).hash() == a.hash()
    assert TrainConfig.from_dict(a.to_dict()) == a
    assert make_config("tiny", warmup_epochs=0).warmup_epochs == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        dict(optimizer="rmsprop"),
        dict(schedule="step"),
        dict(epochs=0),
        dict(lr=-1.0),
        dict(width_mult="x"),
        dict(in_channels=3),
        dict(model="vgg_tiny", width=4),
        dict(warmup_epochs=5),
        dict(nesterov=True),
        dict(batch_size=2.5),
        dict(model="nope"),
    ],
)
def test_bad_settings_raise_lmcerror(bad):
    with pytest.raises(LmcError):
        make_config("tiny", **bad)


def test_unknown_preset_suggests():
    with pytest.raises(LmcError, match="mlp-fmnist"):
        make_config("mlp-fmnst")


def test_presets_follow_the_paper():
    mlp = make_config("mlp-fmnist")
    assert (mlp.model, mlp.dataset, mlp.optimizer, mlp.lr, mlp.batch_size, mlp.epochs, mlp.augment) == (
        "mlp",
        "fashion-mnist",
        "adam",
        1e-3,
        500,
        5,
        False,
    )
    assert (mlp.model_options["depth"], mlp.model_options["width"]) == (3, 512)
    for name, wm in (("vgg11-cifar10", 4.0), ("resnet20-cifar10", 16.0)):
        c = make_config(name)
        assert (
            c.optimizer,
            c.lr,
            c.momentum,
            c.weight_decay,
            c.schedule,
            c.warmup_epochs,
            c.epochs,
            c.batch_size,
            c.augment,
        ) == ("sgd", 0.4, 0.9, 5e-4, "linear", 5.0, 100, 500, True)
        assert c.model_options["width_mult"] == wm
    for name in ("vgg11-fmnist", "resnet20-fmnist"):
        c = make_config(name)
        assert c.dataset == "fashion-mnist" and c.model_options == {"width_mult": 1.0, "norm": "batchnorm"}
        assert c.optimizer == "sgd" and 0.05 <= c.lr <= 0.1 and c.warmup_epochs > 0
    assert set(PRESETS) >= {
        "mlp-fmnist",
        "vgg11-cifar10",
        "resnet20-cifar10",
        "vgg11-fmnist",
        "resnet20-fmnist",
        "tiny",
    }


def test_lr_schedules_hand_computed():
    c = make_config("tiny", lr=0.4, epochs=4, warmup_epochs=1, schedule="linear")
    # 10 steps per epoch: warm-up over steps 0..9, then linear from 0.4 at step 10 to 0 at step 40.
    assert lr_at(c, 0, 10) == pytest.approx(0.04)
    assert lr_at(c, 9, 10) == pytest.approx(0.4)
    assert lr_at(c, 10, 10) == pytest.approx(0.4)
    assert lr_at(c, 25, 10) == pytest.approx(0.2)
    assert lr_at(c, 39, 10) == pytest.approx(0.4 / 30)
    cos = c.replace(schedule="cosine")
    assert lr_at(cos, 25, 10) == pytest.approx(0.2)
    assert lr_at(cos, 10, 10) == pytest.approx(0.4)
    assert lr_at(cos, 17.5, 10) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    const = c.replace(schedule="constant", warmup_epochs=0)
    assert {lr_at(const, t, 10) for t in range(40)} == {0.4}


# --------------------------------------------------------------------------- training
def test_train_deterministic_and_seed_sensitive(tmp_path, synthetic):
    cfg = make_config("tiny", lr=1e-3)
    rng = torch.get_rng_state()
    a = train(cfg, tmp_path / "a", device="cpu", progress=False, threads=1)
    assert torch.equal(torch.get_rng_state(), rng), "training must not touch the global RNG"
    b = train(cfg, tmp_path / "b", device="cpu", progress=False, threads=1)
    assert not a.cached and not b.cached
    _assert_same_weights(a.run_dir, b.run_dir)
    assert (a.test_loss, a.train_loss) == (b.test_loss, b.train_loss)
    c = train(cfg.replace(seed=1), tmp_path / "a", device="cpu", progress=False, threads=1)
    wa, wc = _weights(a.run_dir), _weights(c.run_dir)
    assert not torch.equal(wa["fc0.weight"], wc["fc0.weight"])


def test_bn_conv_run_deterministic(tmp_path, synthetic_rgb):
    cfg = make_config(None, **BN_CFG)
    a = train(cfg, tmp_path / "a", device="cpu", progress=False, threads=1)
    b = train(cfg, tmp_path / "b", device="cpu", progress=False, threads=1)
    _assert_same_weights(a.run_dir, b.run_dir)
    assert any(k.endswith("running_mean") for k in _weights(a.run_dir))


def test_run_folder_contents_metrics_and_cache(tmp_path, synthetic):
    cfg = make_config("tiny", lr=1e-3, epochs=3, schedule="linear", warmup_epochs=1, val_size=200)
    r = train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    assert r.run_dir == run_dir_for(cfg, tmp_path) == tmp_path / "train" / cfg.hash()
    assert sorted(p.name for p in r.run_dir.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert not (tmp_path / "train" / f"{cfg.hash()}.partial").exists()
    rows = _metrics(r.run_dir)
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert {
            "epoch",
            "lr",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "val_loss",
            "val_acc",
            "seconds",
        } <= set(m)
        assert 0 <= m["train_acc"] <= 1 and m["seconds"] > 0
    steps = math.ceil(1800 / 100)  # 2000 synthetic train images minus 200 held out
    assert [m["lr"] for m in rows] == pytest.approx([lr_at(cfg, (e + 1) * steps - 1, steps) for e in range(3)])
    assert rows[0]["train_loss"] > rows[-1]["train_loss"]
    assert (rows[-1]["test_loss"], rows[-1]["test_acc"]) == (r.test_loss, r.test_accuracy)
    info = json.loads((r.run_dir / "config.json").read_text())
    assert info["config"] == cfg.to_dict() and info["hash"] == cfg.hash() and info["seed"] == 0
    assert info["model"]["name"] == "mlp_tiny" and info["model"]["in_channels"] == 1
    prov = info["provenance"]
    assert prov["device"] == "cpu" and prov["torch_version"] == torch.__version__
    assert prov["dataset"]["sizes"] == {"train": 1800, "val": 200, "test": 500}
    # Cached rerun: returns at once with the same numbers and leaves the folder alone.
    mtime = (r.run_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    assert again.cached and time.perf_counter() - t0 < 1.0
    assert (again.run_dir, again.test_accuracy, again.train_loss, again.seconds) == (
        r.run_dir,
        r.test_accuracy,
        r.train_loss,
        r.seconds,
    )
    assert (r.run_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_device_not_in_hash_and_load_back(tmp_path, synthetic):
    import lmckit
    from lmckit.evaluate import evaluate

    cfg = make_config("tiny", lr=1e-3, epochs=1)
    r = train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    again = train(cfg, tmp_path, device="auto", progress=False, threads=2)
    assert again.cached and again.run_dir == r.run_dir
    model = lmckit.load(r.run_dir)
    loss, acc = evaluate(model, synthetic, "test", batch_size=cfg.eval_batch_size)
    assert acc == r.test_accuracy and loss == pytest.approx(r.test_loss, rel=1e-6)
    assert 0.2 < acc < 1.0  # learnt something, not everything: the comparison is not vacuous


class _Stop(Exception):
    pass


def _stop_after(epoch: int):
    def cb(e, _row):
        if e == epoch:
            raise _Stop

    return cb


@pytest.mark.parametrize("kind", ["bn-sgd-augment", "adam"])
def test_interrupted_run_resumes_bit_identical(tmp_path, synthetic, synthetic_rgb, kind):
    cfg = make_config(None, **BN_CFG) if kind != "adam" else make_config("tiny", lr=1e-3, epochs=3)
    full = train(cfg, tmp_path / "full", device="cpu", progress=False, threads=1)
    with pytest.raises(_Stop):
        train(cfg, tmp_path / "cut", device="cpu", progress=False, threads=1, callback=_stop_after(1))
    final = run_dir_for(cfg, tmp_path / "cut")
    partial = final.with_name(final.name + ".partial")
    assert not final.exists() and (partial / "checkpoint.safetensors").is_file()
    assert len(_metrics(partial)) == 1
    resumed_epochs = []
    r = train(
        cfg, tmp_path / "cut", device="cpu", progress=False, threads=1, callback=lambda e, _: resumed_epochs.append(e)
    )
    assert resumed_epochs == list(range(2, cfg.epochs + 1))
    _assert_same_weights(full.run_dir, r.run_dir)
    strip = lambda rows: [{k: v for k, v in m.items() if "seconds" not in k} for m in rows]  # noqa: E731
    assert strip(_metrics(r.run_dir)) == strip(_metrics(full.run_dir))
    assert json.loads((r.run_dir / "config.json").read_text())["provenance"]["resumed_after_epochs"] == [1]


def test_sigkill_mid_run_then_resume(tmp_path, synthetic):
    cfg = make_config("tiny", lr=1e-3, epochs=5)
    script = (
        "import sys, time\n"
        "from lmckit.train import make_config, train\n"
        "cfg = make_config('tiny', lr=1e-3, epochs=5)\n"
        "def cb(e, row):\n"
        "    print('EPOCH', e, flush=True); time.sleep(0.5)\n"
        "train(cfg, sys.argv[1], device='cpu', progress=False, threads=1, callback=cb)\n"
    )
    env = dict(os.environ, LMCKIT_NO_PROGRESS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "cut")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.strip() == "EPOCH 2" or not line:
                break
        assert line.strip() == "EPOCH 2", "subprocess did not reach epoch 2"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    final = run_dir_for(cfg, tmp_path / "cut")
    assert not final.exists() and final.with_name(final.name + ".partial").is_dir()
    seen = []
    r = train(cfg, tmp_path / "cut", device="cpu", progress=False, threads=1, callback=lambda e, _: seen.append(e))
    assert seen and seen[0] >= 3 and seen[-1] == 5
    full = train(cfg, tmp_path / "full", device="cpu", progress=False, threads=1)
    _assert_same_weights(full.run_dir, r.run_dir)


def test_concurrent_same_config_waits_on_lock(tmp_path, synthetic):
    cfg = make_config("tiny", lr=1e-3, epochs=3)
    started = threading.Event()
    out: dict = {}

    def slow(e, _row):
        started.set()
        time.sleep(0.3)

    t = threading.Thread(
        target=lambda: out.setdefault("a", train(cfg, tmp_path, device="cpu", progress=False, threads=1, callback=slow))
    )
    t.start()
    assert started.wait(30)
    b = train(cfg, tmp_path, device="cpu", progress=False, threads=1)  # blocks on the lock, then finds the finished run
    t.join(60)
    assert not out["a"].cached and b.cached and b.run_dir == out["a"].run_dir
    assert len(_metrics(b.run_dir)) == 3


def test_divergence_is_a_user_error(tmp_path, synthetic):
    cfg = make_config("tiny", optimizer="sgd", lr=1e6, epochs=1)
    with pytest.raises(LmcError, match="diverged"):
        train(cfg, tmp_path, device="cpu", progress=False, threads=1)
    assert not run_dir_for(cfg, tmp_path).exists()


# --------------------------------------------------------------------------- CLI
def test_cli_last_line_and_json(tmp_path, synthetic, capsys):
    from lmckit.cli import main

    argv = [
        "train",
        "--preset",
        "tiny",
        "--lr",
        "0.001",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(lines[-1])
    assert run_dir.is_dir() and (run_dir / "model.safetensors").is_file()
    assert run_dir == run_dir_for(make_config("tiny", lr=1e-3, epochs=1), tmp_path)
    assert main(argv + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["run_dir"] == str(run_dir) and d["cached"] is True
    assert {"test_accuracy", "test_loss", "seconds"} <= set(d) and 0 <= d["test_accuracy"] <= 1


def test_cli_defaults_to_paper_mlp_recipe():
    from lmckit.cli import build_parser
    from lmckit.commands.train import config_from_args

    args = build_parser().parse_args(["train", "--model", "mlp", "--dataset", "fashion-mnist", "--seed", "2"])
    cfg, preset = config_from_args(args)
    assert preset == "mlp-fmnist" and cfg == make_config("mlp-fmnist", seed=2)
    args = build_parser().parse_args(["train", "--model", "vgg11", "--dataset", "fashion-mnist", "--width-mult", "2"])
    cfg, preset = config_from_args(args)
    assert preset == "vgg11-fmnist" and cfg.model_options["width_mult"] == 2.0 and cfg.optimizer == "sgd"


def test_cli_bad_option_exits_2(tmp_path, capsys):
    from lmckit.cli import main

    assert (
        main(["train", "--model", "vgg_tiny", "--dataset", "synthetic-rgb", "--width", "3", "--out", str(tmp_path)])
        == 2
    )
    assert "width" in capsys.readouterr().err


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_mlp_fmnist_one_epoch_learns(tmp_path):
    r = train(make_config("mlp-fmnist", epochs=1), tmp_path, progress=False)
    assert r.test_accuracy > 0.8 and r.train_accuracy > 0.8
