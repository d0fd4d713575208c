"""The GPU path, checked CPU-side (and on CUDA where present): device-held data, bf16 autocast,
channels_last, TF32, and what each run records.

The CUDA tests skip without a GPU; ``benchmarks/gpu_check.sh`` runs them on one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmckit.data import random_crop_flip
from lmckit.device import autocast, channels_last_wanted, check_device_name, resolve_device, tf32_allowed, tf32_scope
from lmckit.errors import LmcError
from lmckit.evaluate import evaluate
from lmckit.store import load_state
from lmckit.train import TrainConfig, make_config, train

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (benchmarks/gpu_check.sh runs these)"
)
CONV = dict(
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
    epochs=1,
)


def _record(run: Path) -> dict:
    return json.loads((Path(run) / "config.json").read_text())


# --------------------------------------------------------------------------- CPU
def test_batches_on_cpu_are_the_old_index_gather(synthetic_rgb):
    """The device-held batching gives exactly the CPU batches of before (same generator stream)."""
    ds = synthetic_rgb
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = list(ds.batches("train", 64, shuffle=True, generator=g1, augment=True, limit=300))
    x_all, y_all = ds.images["train"], ds.labels["train"]
    order = torch.randperm(300, generator=g2)
    for i, (x, y) in enumerate(got):
        idx = order[i * 64 : (i + 1) * 64]
        assert torch.equal(x, ds.normalize(random_crop_flip(x_all[idx], g2))) and torch.equal(y, y_all[idx])
    assert ds.on_device("train", "cpu")[0] is ds.images["train"]  # no copy on CPU


def test_evaluate_sums_on_device_like_python_floats(synthetic):
    from lmckit.models import create_model

    torch.manual_seed(0)
    m = create_model(
        "mlp_tiny",
        in_channels=synthetic.in_channels,
        image_size=synthetic.image_size,
        num_classes=synthetic.num_classes,
    ).eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in synthetic.batches("test", 70):
            out = m(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    assert evaluate(m, synthetic, "test", batch_size=70) == (loss_sum / n, correct / n)


def test_gpu_settings_are_off_on_cpu_and_validated(monkeypatch):
    from lmckit.models import create_model

    cpu = torch.device("cpu")
    conv = create_model("vgg_tiny", in_channels=3, image_size=8, num_classes=10)
    mlp = create_model("mlp_tiny", in_channels=1, image_size=8, num_classes=10)
    assert not tf32_allowed(cpu) and not tf32_allowed(cpu, True)
    assert not channels_last_wanted(conv, cpu) and channels_last_wanted(conv, cpu, True)
    assert not channels_last_wanted(mlp, cpu, True)  # no convolutions: nothing to reorder
    monkeypatch.setenv("LMCKIT_TF32", "maybe")
    with pytest.raises(LmcError, match="LMCKIT_TF32"):
        tf32_allowed(torch.device("cuda"))
    with pytest.raises(LmcError):
        check_device_name("gpu0")
    check_device_name("cuda:1")  # parses even where there is no GPU (a Ray worker may have one)
    with pytest.raises(LmcError, match="precision"):
        autocast(cpu, "fp16")
    with pytest.raises(LmcError, match="precision"):
        TrainConfig(precision="fp8")
    prev = torch.backends.cuda.matmul.allow_tf32
    with tf32_scope(not prev):
        assert torch.backends.cuda.matmul.allow_tf32 == (not prev)
    assert torch.backends.cuda.matmul.allow_tf32 == prev


def test_precision_enters_the_hash_only_when_not_fp32():
    base = make_config("tiny")
    assert base.hash() == "08780837adfdf405"  # the pinned v0.1 hash: fp32 runs keep their folders
    assert "precision" not in base.to_dict()
    bf = base.replace(precision="bf16")
    assert bf.to_dict()["precision"] == "bf16" and bf.hash() != base.hash()
    assert TrainConfig.from_dict(bf.to_dict()) == bf and TrainConfig.from_dict(base.to_dict()) == base


def test_bf16_training_keeps_float32_weights_and_records_it(tmp_path):
    cfg32 = make_config(None, **CONV)
    r32 = train(cfg32, out_root=tmp_path, device="cpu", progress=False, threads=1)
    r16 = train(cfg32.replace(precision="bf16"), out_root=tmp_path, device="cpu", progress=False, threads=1)
    assert r16.run_dir != r32.run_dir
    w32, _ = load_state(r32.run_dir / "model.safetensors")
    w16, _ = load_state(r16.run_dir / "model.safetensors")
    assert all(v.dtype == torch.float32 for k, v in w16.items() if v.is_floating_point())
    diff = max(float((w16[k] - w32[k]).abs().max()) for k in w32 if w32[k].is_floating_point())
    assert 0 < diff < 0.5  # autocast really ran (other rounding), and trained the same model
    rec = _record(r16.run_dir)
    assert rec["config"]["precision"] == "bf16"
    assert {k: rec["provenance"][k] for k in ("precision", "channels_last", "tf32")} == {
        "precision": "bf16",
        "channels_last": False,
        "tf32": False,
    }
    assert abs(r16.test_accuracy - r32.test_accuracy) < 0.2


def test_channels_last_on_request_trains_the_same_model(tmp_path):
    cfg = make_config(None, **CONV)
    ref = train(cfg, out_root=tmp_path / "a", device="cpu", progress=False, threads=1)
    cl = train(cfg, out_root=tmp_path / "b", device="cpu", progress=False, threads=1, channels_last=True)
    assert _record(cl.run_dir)["provenance"]["channels_last"] is True
    assert _record(ref.run_dir)["provenance"]["channels_last"] is False
    wa, _ = load_state(ref.run_dir / "model.safetensors")
    wb, _ = load_state(cl.run_dir / "model.safetensors")
    for k in wa:  # same computation in another memory layout: equal up to rounding (grown over an epoch of SGD)
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=5e-3, rtol=1e-2), k
        assert wb[k].is_contiguous()
    assert abs(ref.test_loss - cl.test_loss) < 1e-2


# --------------------------------------------------------------------------- CUDA (skipped here)
@cuda
def test_auto_is_cuda_and_data_stays_on_the_device(synthetic_rgb):
    dev = resolve_device("auto")
    assert dev.type == "cuda"
    x, y = synthetic_rgb.on_device("train", dev)
    assert x.is_cuda and y.is_cuda and synthetic_rgb.on_device("train", "cuda")[0] is x  # copied once
    g = torch.Generator().manual_seed(0)
    for xb, yb in synthetic_rgb.batches("train", 50, shuffle=True, generator=g, device=dev, augment=True):
        assert xb.is_cuda and yb.is_cuda
    # same batches as on the CPU (integer gathers are exact)
    a = next(
        synthetic_rgb.batches(
            "train", 50, shuffle=True, generator=torch.Generator().manual_seed(1), device=dev, augment=True
        )
    )
    b = next(synthetic_rgb.batches("train", 50, shuffle=True, generator=torch.Generator().manual_seed(1), augment=True))
    assert torch.equal(a[1].cpu(), b[1]) and torch.allclose(a[0].cpu(), b[0])


@cuda
def test_cuda_training_bf16_channels_last_tf32(tmp_path):
    cfg = make_config(None, **CONV).replace(precision="bf16")
    r = train(cfg, out_root=tmp_path, device="cuda", progress=False)
    prov = _record(r.run_dir)["provenance"]
    assert prov["device"].startswith("cuda") and prov["channels_last"] is True and prov["tf32"] is True
    w, _ = load_state(r.run_dir / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in w.values() if v.is_floating_point())
    ref = train(cfg.replace(precision="fp32"), out_root=tmp_path, device="cpu", progress=False)
    assert abs(r.test_accuracy - ref.test_accuracy) < 0.25


@cuda
def test_cuda_evaluation_and_matching_agree_with_cpu(synthetic):
    from lmckit.match import weight_matching
    from lmckit.models import create_model
    from lmckit.perm import apply_permutation, random_permutation, spec_for

    torch.manual_seed(0)
    m = create_model(
        "mlp_tiny",
        in_channels=synthetic.in_channels,
        image_size=synthetic.image_size,
        num_classes=synthetic.num_classes,
    )
    lc, ac = evaluate(m, synthetic, "test", device="cpu")
    lg, ag = evaluate(m.cuda(), synthetic, "test", device="cuda")
    assert abs(lc - lg) < 1e-4 and abs(ac - ag) < 1e-3
    spec = spec_for(m.cpu())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    planted = random_permutation(spec, seed=5)
    sd_b = apply_permutation(spec, planted, sd)
    res = weight_matching(spec, sd, sd_b, device="cuda")
    back = apply_permutation(spec, res.perms, sd_b)
    for k in sd:
        assert torch.allclose(back[k], sd[k]), k


def test_train_cli_precision_and_gpu_flags(tmp_path, capsys):
    from lmckit.cli import main

    rc = main(
        [
            "train",
            "--model",
            "mlp_tiny",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--precision",
            "bf16",
            "--no-channels-last",
            "--tf32",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    rec = _record(run)
    assert rec["config"]["precision"] == "bf16"
    assert rec["provenance"]["tf32"] is False and rec["provenance"]["channels_last"] is False  # CPU: never TF32
    assert main(["train", "--model", "mlp_tiny", "--precision", "fp16"]) == 2  # argparse usage error: exit 2
