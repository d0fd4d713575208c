"""``lmckit data list|info``: what was found where, sizes, class counts, checksum status."""

from __future__ import annotations

import json

import pytest

from lmckit.cli import main
from lmckit.data import find_dataset
from lmckit.errors import LmcError
from tests.helpers.data_files import write_cifar_dataset, write_idx_dataset

pytestmark = pytest.mark.usefixtures("isolated_data")  # tests/conftest.py


def _info(capsys, *argv):
    rc = main(["data", "info", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_info_uncompressed_mnist_has_unknown_checksums(tmp_path, capsys):
    write_idx_dataset(tmp_path / "mnist", n_train=30, n_test=10)
    rc, rep = _info(capsys, "mnist", "--data-dir", str(tmp_path), "--val-size", "5")
    assert rc == 0 and rep["ok"] and rep["folder"] == str(tmp_path / "mnist")
    assert rep["searched"][0] == {"dir": str(tmp_path / "mnist"), "exists": True, "complete": True}
    # only the md5 of the published .gz archives is known for MNIST: a decompressed copy cannot be checked
    assert {f["status"] for f in rep["files"]} == {"unknown"} and len(rep["files"]) == 4
    assert rep["splits"]["train"]["size"] == 25 and rep["splits"]["val"]["size"] == 5
    assert rep["splits"]["test"]["class_counts"] == [1] * 10  # labels (1000 + i) % 10, i < 10
    assert sum(rep["splits"]["train"]["class_counts"]) == 25
    assert rep["image_shape"] == [1, 8, 8]


def test_info_reports_mismatch_against_known_checksums(tmp_path, capsys):
    write_idx_dataset(tmp_path / "fashion-mnist", gz=True)  # stand-ins for the real files
    rc, rep = _info(capsys, "fashion-mnist", "--data-dir", str(tmp_path))
    assert rc == 2 and not rep["ok"] and rep["exit_code"] == 2  # data that is not the published one: exit 2
    assert (
        "4 of the 4 files of fashion-mnist" in rep["error"] and "t10k-images-idx3-ubyte.gz (mismatch)" in rep["error"]
    )
    assert {(f["status"], f["algo"], f["checksum_of"]) for f in rep["files"]} == {("mismatch", "sha256", "content")}
    assert rep["splits"]["train"]["size"] == 20  # it still loads; the mismatch is reported
    rc = main(["data", "info", "fashion-mnist", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and "mismatch" in out and "warning" in out and "class counts" in out  # the report, then
    assert err.startswith("lmckit data info: error: 4 of the 4 files") and len(err.strip().splitlines()) == 2


def test_info_cifar_and_corrupt_file(tmp_path, capsys):
    write_cifar_dataset(tmp_path / "cifar10")
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    rc, rep = _info(capsys, "cifar10", "--data-dir", str(tmp_path))
    assert rep["folder"] == str(folder) and len(rep["files"]) == 6
    assert {f["status"] for f in rep["files"]} == {"mismatch"} and rc == 2  # tiny batches are not the published ones
    assert rep["image_shape"] == [3, 32, 32] and rep["splits"]["test"]["size"] == 4
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    rc, rep = _info(capsys, "cifar10", "--data-dir", str(tmp_path), "--no-checksums")
    assert rc == 2 and "test_batch" in rep["error"] and "splits" not in rep  # a user error: exit 2 (issue 16)


def test_info_not_found_lists_search_path(tmp_path, capsys):
    rc, rep = _info(capsys, "mnist", "--data-dir", str(tmp_path))
    assert rc == 2 and rep["folder"] is None and "not found" in rep["error"]  # exit 2, error on stderr (issue 16)
    assert [s["dir"] for s in rep["searched"][:2]] == [str(tmp_path / "mnist"), str(tmp_path)]
    assert rep["searched"][-1]["dir"].startswith(str(tmp_path / "xdg-cache"))
    assert main(["data", "info", "no-such-set"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_list(tmp_path, capsys):
    write_idx_dataset(tmp_path / "mnist")
    assert main(["data", "list", "--data-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mnist"]["found"] == str(tmp_path / "mnist") and rows["synthetic"]["found"] == "generated"
    assert {"fashion-mnist", "mnist", "cifar10", "synthetic", "synthetic-rgb"} <= set(rows)


def test_info_real_fashion_mnist(capsys):
    try:
        find_dataset("fashion-mnist")
    except LmcError:
        pytest.skip("Fashion-MNIST not installed")
    rc, rep = _info(capsys, "fashion-mnist")
    assert rc == 0 and {f["status"] for f in rep["files"]} == {"match"}
    assert (
        rep["splits"]["train"]["class_counts"] == [6000] * 10 and rep["splits"]["test"]["class_counts"] == [1000] * 10
    )
