"""Transform files (`lmckit match --symmetry`) and `--symmetry` on `lmckit landscape` and `lmckit analyze`,
run in-process on a tiny LayerNorm ViT trio: the folded plane keeps each model's function, a planted
orthogonal map is undone exactly, and transforms for other models or another symmetry are refused."""

from __future__ import annotations

import json

import pytest
import torch

from lmckit.cli import main

VIT = dict(width=16, depth=1, heads=4, norm="layernorm")


def _vit(seed: int):
    from lmckit.models import create_model

    torch.manual_seed(seed)
    m = create_model("vit", **VIT)
    with torch.no_grad():  # non-trivial LayerNorm gains and biases, so folding matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three tiny ViTs (A, B, C), their raw test losses on `synthetic`, and transform files B->A, C->A."""
    from lmckit.checkpoint import save_model
    from lmckit.data import load_dataset
    from lmckit.evaluate import evaluate

    d = tmp_path_factory.mktemp("symland")
    ds = load_dataset("synthetic")
    paths, losses = [], []
    for s in (0, 1, 2):
        m = _vit(s)
        paths.append(save_model(d / f"m{s}.safetensors", m))
        losses.append(evaluate(m, ds, "test")[0])
    a, b, c = (str(p) for p in paths)
    tb, tc = d / "tb.safetensors", d / "tc.safetensors"
    for other, t in ((b, tb), (c, tc)):
        assert main(["match", a, other, "--symmetry", "orthogonal", "--max-iter", "20", "--out", str(t)]) == 0
    return d, (a, b, c), losses, (str(tb), str(tc))


def _landscape(d, models, *extra):
    return ["landscape", *models, "--plot", str(d / "l.png"), "--dataset", "synthetic", *extra]


def _check_vertices(rep, raw_losses):
    """Grid points that are (to rounding) one of the three models have that model's raw loss.

    With --margin 0 and --grid 2 the grid's corners are the bounding box of the triangle, so at least two
    of the three models are corners.
    """
    found = 0
    for i, row in enumerate(rep["weights"]):
        for j, w in enumerate(row):
            for k in range(3):
                if abs(w[k] - 1) < 1e-9 and all(abs(w[m]) < 1e-9 for m in range(3) if m != k):
                    assert rep["loss"][i][j] == pytest.approx(raw_losses[k], abs=1e-4)
                    found += 1
    assert found >= 2


def test_landscape_with_transform_files_keeps_each_models_function(trio, capsys):
    d, models, raw, (tb, tc) = trio
    capsys.readouterr()
    grid = ["--grid", "2", "--margin", "0"]
    assert main(_landscape(d, models, "--perm", tb, "--perm", tc, *grid, "--json")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameterisation"] == "folded" and rep["symmetry"] == "orthogonal"
    assert rep["alignment"] == "files" and rep["perm_files"] and len(rep["folded"]) == 3
    assert rep["classes"]["patch"] == "orthogonal"
    _check_vertices(rep, raw)
    # the same with --symmetry named (it matches the files) and as text
    assert main(_landscape(d, models, "--perm", tb, "--perm", tc, *grid, "--symmetry", "orthogonal")) == 0
    out = capsys.readouterr().out
    assert "orthogonal-aligned folded" in out and "parameterisation: folded (3 norms" in out


def test_landscape_symmetry_computes_the_transforms(trio, capsys):
    d, models, raw, _ = trio
    capsys.readouterr()
    args = _landscape(d, models, "--symmetry", "orthogonal", "--grid", "2", "--margin", "0", "--json")
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameterisation"] == "folded" and rep["alignment"] == "weight matching"
    for label in "BC":
        m = rep["matching"][label]
        assert m["relative_l2_after"] < m["relative_l2_before"]
    _check_vertices(rep, raw)


def test_landscape_refusals(trio, tmp_path, capsys):
    d, models, _, (tb, tc) = trio
    capsys.readouterr()
    # transforms for other models: B's file given for C and C's for B
    assert main(_landscape(d, models, "--perm", tc, "--perm", tb)) == 2
    assert "was computed for other models" in capsys.readouterr().err
    # --symmetry other than the files' own
    assert main(_landscape(d, models, "--perm", tb, "--perm", tc, "--symmetry", "signed")) == 2
    assert "--symmetry signed does not match the transform files, which align under orthogonal" in (
        capsys.readouterr().err
    )
    # a perm JSON mixed with a transform file
    pj = tmp_path / "p.json"
    assert main(["match", models[0], models[2], "--out", str(pj), "--max-iter", "5"]) == 0
    capsys.readouterr()
    assert main(_landscape(d, models, "--perm", tb, "--perm", str(pj))) == 2
    assert "mixes a permutation JSON with a transform file" in capsys.readouterr().err
    # --symmetry orthogonal with perm JSONs; --symmetry permutation alone
    assert main(_landscape(d, models, "--perm", str(pj), "--perm", str(pj), "--symmetry", "orthogonal")) == 2
    assert "permutation JSONs align under permutation" in capsys.readouterr().err
    assert main(_landscape(d, models, "--symmetry", "permutation")) == 2
    assert "computes nothing" in capsys.readouterr().err


def test_analyze_undoes_a_planted_orthogonal_map(trio, tmp_path, capsys):
    from lmckit.checkpoint import save_model
    from lmckit.perm import spec_for
    from lmckit.perm.symmetry import apply_transform, derive_symmetry, fold_norms, random_transform

    _, (a, _, _), _, _ = trio
    fa = fold_norms(_vit(0))[0]
    spec = spec_for(fa)
    sym = derive_symmetry(spec, fa.state_dict(), "orthogonal", model=fa)
    assert sym["patch"].cls == "orthogonal"
    planted = apply_transform(spec, sym, random_transform(spec, sym, seed=3), fa.state_dict())
    c = str(save_model(tmp_path / "c.safetensors", fa, state=planted))
    t = tmp_path / "t.safetensors"
    capsys.readouterr()
    assert main(["match", a, c, "--symmetry", "orthogonal", "--out", str(t), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["relative_l2_after"] < 1e-6
    assert main(["analyze", a, c, "--perm", str(t), "--no-data", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameterisation"] == "folded" and rep["symmetry"] == "orthogonal"
    assert rep["l2_after"] < 1e-5 * rep["l2_before"] and rep["reduction"] == pytest.approx(1.0, abs=1e-5)
    assert rep["R"]["0"]["after"] == pytest.approx(1.0, abs=1e-4) and rep["R"]["0"]["before"] < 0.5
    # the data-dependent analyses run on the folded, transformed states too; the text says which
    args = ["analyze", a, c, "--perm", str(t), "--dataset", "synthetic", "--rank-fractions", "0.5"]
    assert main(args + ["--projection-batches", "1", "--limit", "100", "--taylor", "--taylor-samples", "50"]) == 0
    out = capsys.readouterr().out
    assert f"transform: {t} (orthogonal; parameterisation: folded)" in out and "Taylor" in out
    # the file is refused for other models (the swapped pair)
    assert main(["analyze", c, a, "--perm", str(t), "--no-data"]) == 2
    assert "was computed for other models" in capsys.readouterr().err
