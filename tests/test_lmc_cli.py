"""``lmckit barrier`` in-process: JSON output, permutations, plots and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmckit.checkpoint import save_model
from lmckit.cli import main
from lmckit.models import create_model
from lmckit.perm import apply_permutation, invert_permutation, random_permutation, save_perms, spec_for
from lmckit.store import atomic_write_json


@pytest.fixture(scope="module")
def files(tmp_path_factory, synthetic):
    d = tmp_path_factory.mktemp("barrier_cli")
    torch.manual_seed(0)
    a = create_model("mlp_tiny")
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for x, y in synthetic.batches("train", 100, shuffle=True, generator=gen):
        opt.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt.step()
    spec = spec_for(a)
    perm = random_permutation(spec, seed=1)
    sd_b = apply_permutation(spec, perm, a.state_dict())  # B = A with shuffled units
    save_model(d / "a.safetensors", a, dataset="synthetic")
    save_model(d / "b.safetensors", a, state=sd_b, dataset="synthetic")
    save_perms(d / "undo.json", invert_permutation(perm))
    # a run folder whose dataset is recorded in config.json only
    run = d / "run_a"
    run.mkdir()
    save_model(run / "model.safetensors", a)
    atomic_write_json(run / "config.json", {"dataset": "synthetic", "model": a.lmckit_config})
    wide = create_model("mlp_tiny", width=20)
    save_model(d / "wide.safetensors", wide, dataset="synthetic")
    save_perms(d / "wide_perm.json", random_permutation(spec_for(wide), seed=0))
    save_model(d / "nodata.safetensors", a)
    return d


def _json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_cli_undo_planted_permutation(files, capsys, tmp_path):
    plot = tmp_path / "curves.png"
    d = _json(
        capsys,
        [
            "barrier",
            str(files / "a.safetensors"),
            str(files / "b.safetensors"),
            "--perm",
            str(files / "undo.json"),
            "--points",
            "5",
            "--compare-naive",
            "--plot",
            str(plot),
            "--limit",
            "300",
        ],
    )
    assert d["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert d["splits"] == ["test"] and d["bn_reset"] is False and d["dataset"] == "synthetic"
    for k in (
        "loss",
        "accuracy",
        "loss_barrier",
        "accuracy_barrier",
        "midpoint_loss",
        "midpoint_accuracy",
        "endpoint_loss",
        "endpoint_accuracy",
    ):
        assert k in d
    assert d["loss_barrier"] < 1e-6 and d["accuracy_barrier"] == 0.0
    assert len(d["loss"]) == 5 and d["endpoint_loss"][0] == pytest.approx(d["endpoint_loss"][1], abs=1e-6)
    assert d["naive"]["loss_barrier"] > 0.05  # the shuffled copy is not linearly connected without the permutation
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_both_splits_and_run_folder(files, capsys):
    d = _json(
        capsys,
        [
            "barrier",
            str(files / "run_a"),
            str(files / "a.safetensors"),
            "--split",
            "both",
            "--points",
            "3",
            "--limit",
            "200",
            "--device",
            "cpu",
        ],
    )
    assert d["splits"] == ["train", "test"] and d["dataset"] == "synthetic"
    assert set(d["loss"]) == {"train", "test"} and len(d["loss"]["train"]) == 3
    assert d["loss_barrier"]["train"] < 1e-6 and d["midpoint_accuracy"]["test"] == d["endpoint_accuracy"]["test"][0]


def test_cli_table_output(files, capsys):
    rc = main(
        ["barrier", str(files / "a.safetensors"), str(files / "b.safetensors"), "--points", "3", "--limit", "200"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "loss_barrier" in out and "naive" in out


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["b.safetensors", "--perm", "wide_perm.json"], "permutation file .* does not fit|has 20 entries"),
        (["wide.safetensors"], "different architectures"),
        (["b.safetensors", "--compare-naive"], "--compare-naive needs --perm"),
        (["b.safetensors", "--bn-reset", "on"], "no BatchNorm"),
        (["b.safetensors", "--dataset", "synthetic-rgb"], "does not fit the model"),
        (["b.safetensors", "--points", "1"], "points:? must be"),
    ],
)
def test_cli_errors(files, capsys, argv_tail, message):
    argv = ["barrier", str(files / "a.safetensors")] + [
        str(files / t) if t.endswith((".safetensors", ".json")) else t for t in argv_tail
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    import re

    assert re.search(message, err), err


def test_cli_dataset_required_without_metadata(files, capsys):
    rc = main(["barrier", str(files / "nodata.safetensors"), str(files / "b.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "--dataset" in err
    rc = main(
        [
            "barrier",
            str(files / "nodata.safetensors"),
            str(files / "b.safetensors"),
            "--dataset",
            "synthetic",
            "--points",
            "3",
            "--limit",
            "100",
            "--json",
        ]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["dataset"] == "synthetic"
