"""Round two of the reliability work (issue 16): behaviour that is right when the command succeeds.

* perm files record the content hashes of the models they were computed for; applied to those models
  they work, to others they are refused unless ``--force-perm``;
* a cached training run is returned only for the data it was trained on (``--data-dir`` to other files
  trains anew, into another folder);
* a dry run lists the stages and creates nothing;
* bounds are documented in ``--help``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.data_files import IDX_NAMES, idx_bytes, planted_images, write_idx_dataset
from tests.helpers.reliability import fingerprint, make_checkpoint, run_cli, snapshot, snapshot_diff


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_perm_files_record_model_hashes_and_are_checked(env, capsys):
    a, b, c = (make_checkpoint(env / f"{n}.safetensors", seed=i) for i, n in enumerate("abc"))
    rc, _, err = run_cli(["match", a, b, "--out", env / "p.json"], capsys)
    assert rc == 0, err
    d = json.loads((env / "p.json").read_text())
    assert d["model_a_sha256"] == fingerprint(a) and d["model_b_sha256"] == fingerprint(b)
    assert d["model_a_sha256"].startswith("sha256:") and d["model_a_sha256"] != d["model_b_sha256"]
    base = ["--dataset", "synthetic", "--points", "3", "--limit", "20", "--json"]
    rc, _, err = run_cli(["barrier", a, b, "--perm", env / "p.json", *base], capsys)
    assert rc == 0, err
    # the same weights through another file name are the same model
    (env / "copy").mkdir()
    b2 = env / "copy" / "b.safetensors"
    b2.write_bytes(b.read_bytes())
    rc, _, err = run_cli(["barrier", a, b2, "--perm", env / "p.json", *base], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["barrier", a, c, "--perm", env / "p.json", *base], capsys)
    assert rc == 2 and "computed for another the permuted model than model B" in err, err
    rc, _, err = run_cli(["barrier", a, c, "--perm", env / "p.json", "--force-perm", *base], capsys)
    assert rc == 0 and "applied anyway (--force-perm)" in err, err


def test_multi_and_merge_perm_files_record_hashes(env, capsys):
    ckpts = [make_checkpoint(env / f"m{i}.safetensors", seed=i) for i in range(3)]
    rc, _, err = run_cli(["match", *ckpts, "--multi", "anchor", "--out", env / "multi"], capsys)
    assert rc == 0, err
    for i, ck in enumerate(ckpts):
        d = json.loads((env / "multi" / f"perm_{i}.json").read_text())
        assert d["model_sha256"] == fingerprint(ck) and d["reference_sha256"] == fingerprint(ckpts[0])
    assert not [p for p in (env / "multi").iterdir() if p.name.startswith(".")], "temp files left"
    rc, _, err = run_cli(
        [
            "landscape",
            *ckpts,
            "--perm",
            env / "multi" / "perm_1.json",
            "--perm",
            env / "multi" / "perm_2.json",
            "--grid",
            "2",
            "--limit",
            "20",
            "--dataset",
            "synthetic",
            "--plot",
            env / "l.png",
            "--json",
        ],
        capsys,
    )
    assert rc == 0, err
    rc, _, err = run_cli(
        [
            "landscape",
            *ckpts,
            "--perm",
            env / "multi" / "perm_2.json",
            "--perm",
            env / "multi" / "perm_1.json",
            "--grid",
            "2",
            "--limit",
            "20",
            "--dataset",
            "synthetic",
            "--plot",
            env / "l2.png",
        ],
        capsys,
    )
    assert rc == 2 and "computed for another" in err, err


def test_perm_file_without_hashes_is_applied_with_a_note(env, capsys):
    from tests.helpers.reliability import good_perms

    a, b = make_checkpoint(env / "a.safetensors", seed=0), make_checkpoint(env / "b.safetensors", seed=1)
    (env / "old.json").write_text(json.dumps({"perms": good_perms(a)}))
    rc, _, err = run_cli(
        [
            "barrier",
            a,
            b,
            "--perm",
            env / "old.json",
            "--dataset",
            "synthetic",
            "--points",
            "3",
            "--limit",
            "20",
            "--json",
        ],
        capsys,
    )
    assert rc == 0 and "records no model identities" in err, err


def _mnist(folder: Path, seed: int) -> Path:
    write_idx_dataset(folder, n_train=40, n_test=20, size=8)
    x, y = planted_images(40, 8, 1, seed)
    (folder / IDX_NAMES["train"][0]).write_bytes(idx_bytes(x.reshape(40, 8, 8)))
    return folder


def test_cached_run_is_keyed_by_the_data_too(env, capsys):
    d1, d2 = _mnist(env / "d1", 1), _mnist(env / "d2", 2)
    args = [
        "train",
        "--model",
        "mlp_tiny",
        "--dataset",
        "mnist",
        "--out",
        env / "runs",
        "--epochs",
        "1",
        "--json",
        "--quiet",
    ]
    runs = []
    for d in (d1, d2, d1, d2):
        rc, out, err = run_cli(args + ["--data-dir", d], capsys)
        assert rc == 0, err
        runs.append(json.loads(out))
    assert not runs[0]["cached"] and not runs[1]["cached"], "other data must not reuse the first run"
    assert runs[0]["run_dir"] != runs[1]["run_dir"]
    assert runs[2]["cached"] and runs[2]["run_dir"] == runs[0]["run_dir"]
    assert runs[3]["cached"] and runs[3]["run_dir"] == runs[1]["run_dir"]
    recs = [json.loads((Path(r["run_dir"]) / "config.json").read_text()) for r in runs[:2]]
    assert recs[0]["provenance"]["dataset"]["checksums"] != recs[1]["provenance"]["dataset"]["checksums"]


def test_dry_run_creates_nothing(env, capsys):
    before = snapshot(env)
    rc, out, err = run_cli(
        ["reproduce", "--recipe", "tiny", "--out", env / "r", "--cache", env / "c", "--dry-run"], capsys
    )
    assert rc == 0, err
    assert "to run" in out
    assert snapshot_diff(before, snapshot(env)) == []


@pytest.mark.parametrize(
    "cmd,flag,bound",
    [
        ("barrier", "--points", "1001"),
        ("landscape", "--grid", "201"),
        ("match", "--restarts", "10000"),
        ("reproduce", "--jobs", "256"),
    ],
)
def test_bounds_are_documented_in_help(capsys, cmd, flag, bound):
    rc, out, _ = run_cli([cmd, "--help"], capsys)
    assert rc == 0
    text = " ".join(out.split())
    assert flag in text and f"at most {bound}" in text, text
