"""Merging several models (lmckit.merge) and the merge / landscape / match --method ste commands."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.cli import main
from lmckit.evaluate import evaluate
from lmckit.perm import apply_permutation, load_perms, spec_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three tiny MLPs trained (2 epochs) on the synthetic data; run folders."""
    from lmckit.train import make_config, train

    root = tmp_path_factory.mktemp("runs")
    return [
        str(
            train(
                make_config(model="mlp_tiny", dataset="synthetic", epochs=2, batch_size=100, seed=s),
                out_root=root,
                device="cpu",
                progress=False,
            ).run_dir
        )
        for s in range(3)
    ]


def _run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_merge_cli_writes_loadable_checkpoint_with_reported_accuracy(ckpts, tmp_path, capsys, synthetic):
    import lmckit
    from lmckit.checkpoint import load_checkpoint

    out = tmp_path / "m"
    d = _run_json(
        capsys,
        [
            "merge",
            *ckpts,
            "--method",
            "weight",
            "--out",
            str(out),
            "--points",
            "5",
            "--json",
            "--device",
            "cpu",
            "--plot",
            str(tmp_path / "curve.png"),
        ],
    )
    for k in ("model_accuracies", "merged_accuracy", "merged_loss", "pairwise_barriers"):
        assert k in d
    # the merged checkpoint loads and scores exactly what was reported
    merged = lmckit.load(out / "merged.safetensors")
    loss, acc = evaluate(merged, synthetic, "test")
    assert acc == pytest.approx(d["merged_accuracy"], abs=1e-9) and loss == pytest.approx(d["merged_loss"], rel=1e-6)
    # individual accuracies are those of the checkpoints
    for path, a in zip(ckpts, d["model_accuracies"]):
        assert evaluate(lmckit.load(path), synthetic, "test")[1] == pytest.approx(a, abs=1e-9)
    # merged = uniform average of the aligned models (no BN here), perm 0 the identity
    spec = spec_for(merged)
    states = [load_checkpoint(p)[0] for p in ckpts]
    perms = [load_perms(out / f"perm_{i}.json", spec) for i in range(3)]
    assert all(torch.equal(p, torch.arange(p.numel())) for p in perms[0].values())
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states)]
    msd = merged.state_dict()
    for k in msd:
        assert torch.allclose(msd[k], sum(a[k] for a in aligned) / 3, atol=1e-6)
    # barriers: the non-anchor pair, plus the anchor pairs separately
    assert [b["models"] for b in d["pairwise_barriers"]] == [[1, 2]]
    assert [b["models"] for b in d["anchor_barriers"]] == [[0, 1], [0, 2]]
    for b in d["pairwise_barriers"] + d["anchor_barriers"]:
        assert b["loss_barrier"] >= 0 and -1e-12 <= b["accuracy_barrier"] <= 1
    # curve for the method and the naive average, n = 2..3; its n = 3 point is the merged model
    curve = d["merged_accuracy_curve"]
    assert set(curve) == {"weight", "naive"} and [r["n"] for r in curve["weight"]] == [2, 3]
    assert curve["weight"][-1]["accuracy"] == pytest.approx(d["merged_accuracy"], abs=1e-9)
    assert json.loads((out / "merge.json").read_text())["merged_accuracy"] == d["merged_accuracy"]
    # the PNG only where --plot asked for it, not in the output folder unasked
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG and d["merged_accuracy_plot"] == str(tmp_path / "curve.png")
    assert not (out / "merged_accuracy.png").exists()


def test_merge_mergemany_and_anchor_ste_run(ckpts, tmp_path, capsys):
    d = _run_json(
        capsys,
        [
            "merge",
            *ckpts,
            "--multi",
            "mergemany",
            "--out",
            str(tmp_path / "mm"),
            "--points",
            "3",
            "--no-curve",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert d["multi"] == "mergemany" and d["match"]["method"] == "mergemany"
    assert [b["models"] for b in d["pairwise_barriers"]] == [[0, 1], [0, 2], [1, 2]] and d["anchor_barriers"] == []
    assert not (tmp_path / "mm" / "merged_accuracy.png").exists()
    d = _run_json(
        capsys,
        [
            "merge",
            *ckpts,
            "--method",
            "ste",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "ste"),
            "--points",
            "3",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert set(d["merged_accuracy_curve"]) == {"ste", "naive"}
    assert (tmp_path / "ste" / "ste" / "model_1" / "drift.json").exists()
    assert [p["method"] for p in d["match"]["pairwise"][1:]] == ["ste", "ste"]


def test_merge_errors(ckpts, tmp_path, capsys):
    assert main(["merge", ckpts[0], "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", *ckpts, "--method", "ste", "--multi", "mergemany", "--out", str(tmp_path / "y")]) == 2
    assert "MergeMany" in capsys.readouterr().err


def test_merged_accuracy_curve_planted(ckpts, synthetic):
    """Averages of identical copies are the model itself; a curve of copies is flat at its accuracy."""
    import lmckit
    from lmckit.checkpoint import load_checkpoint
    from lmckit.merge import average_states, merged_accuracy_curve

    model = lmckit.load(ckpts[0])
    sd = load_checkpoint(ckpts[0])[0]
    loss, acc = evaluate(model, synthetic, "test")
    curve = merged_accuracy_curve(model, [sd, sd, sd, sd], synthetic)
    assert [r["n"] for r in curve] == [2, 3, 4]
    for r in curve:
        assert r["accuracy"] == pytest.approx(acc, abs=1e-9) and r["loss"] == pytest.approx(loss, rel=1e-5)
    a = {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    avg = average_states([a, b, b])
    assert torch.allclose(avg["w"], torch.tensor([2.0, 5.0])) and int(avg["n"]) == 5


def test_merged_state_resets_batchnorm(synthetic):
    from lmckit.lmc import reset_bn_stats, training_batches
    from lmckit.merge import merged_state
    from lmckit.models import create_model

    torch.manual_seed(0)
    m = create_model("vgg_tiny", in_channels=1, image_size=28, num_classes=10, norm="batchnorm")
    sd = {k: v.clone() for k, v in m.state_dict().items()}  # running stats 0 / 1: wrong for this data
    out = merged_state(m, [sd, sd], synthetic, seed=4)
    assert torch.equal(m.state_dict()["norms.0.running_mean"], sd["norms.0.running_mean"])  # template untouched
    ref = create_model("vgg_tiny", in_channels=1, image_size=28, num_classes=10, norm="batchnorm")
    ref.load_state_dict(sd)
    reset_bn_stats(ref, batches=training_batches(synthetic, seed=4))
    for k in ("norms.0.running_mean", "norms.2.running_var"):
        assert not torch.allclose(out[k], sd[k]) and torch.allclose(out[k], ref.state_dict()[k])


def test_landscape_cli_writes_png(ckpts, tmp_path, capsys):
    mdir = tmp_path / "m"
    assert main(["merge", *ckpts, "--out", str(mdir), "--points", "3", "--no-curve", "--json", "--device", "cpu"]) == 0
    plot = tmp_path / "land.png"
    d = _run_json(
        capsys,
        [
            "landscape",
            *ckpts,
            "--perm",
            str(mdir / "perm_1.json"),
            "--perm",
            str(mdir / "perm_2.json"),
            "--grid",
            "4",
            "--plot",
            str(plot),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert plot.read_bytes()[:8] == PNG and (tmp_path / "land-accuracy.png").read_bytes()[:8] == PNG
    assert len(d["loss"]) == 4 and all(len(r) == 4 for r in d["loss"]) and len(d["accuracy"]) == 4
    assert main(["landscape", *ckpts, "--grid", "1", "--plot", str(plot)]) == 2


def test_match_cli_method_ste(ckpts, tmp_path, capsys):
    from lmckit.perm import validate_perms

    out = tmp_path / "p.json"
    d = _run_json(
        capsys,
        [
            "match",
            ckpts[0],
            ckpts[1],
            "--method",
            "ste",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--ste-state",
            str(tmp_path / "state"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert d["method"] == "ste" and d["objective"] <= d["objective_before"]
    raw = json.loads(out.read_text())
    assert raw["method"] == "ste" and raw["ste_preset"] == "adam"
    import lmckit

    validate_perms(spec_for(lmckit.load(ckpts[0])), raw["perms"])
    assert (tmp_path / "state" / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r03 = json.loads((tmp_path / "state" / "drift.json").read_text())["r03"]
    assert len(r03) == 2 and all(r is not None and -1.0 <= r <= 1.0 for r in r03)  # the CLI tracks R(0.3)


def test_merge_models_activation_library(ckpts, synthetic):
    """Library path with activation matching: anchor gets the identity, every perm is valid."""
    import lmckit
    from lmckit.checkpoint import load_checkpoint
    from lmckit.merge import merge_models
    from lmckit.perm import validate_perms

    model = lmckit.load(ckpts[0])
    states = [load_checkpoint(p)[0] for p in ckpts]
    res = merge_models(model, states, synthetic, method="activation", points=3, curve=False, progress=False)
    spec = spec_for(model)
    for p in res.perms:
        validate_perms(spec, {g: v.tolist() for g, v in p.items()})
    assert all(torch.equal(v, torch.arange(v.numel())) for v in res.perms[0].values())
    d = res.to_dict()
    assert d["match"]["method"] == "anchor-activation" and len(d["model_accuracies"]) == 3
    assert [b["models"] for b in d["pairwise_barriers"]] == [[1, 2]]
