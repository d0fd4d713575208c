"""lmckit.data.download against a local HTTP server on 127.0.0.1 serving files the tests write."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from lmckit.cli import main
from lmckit.data import load_dataset
from lmckit.data.checksums import Checksum
from lmckit.data.download import SOURCES, DownloadSpec, RemoteFile, download_dataset
from lmckit.errors import LmcError
from tests.helpers.data_files import CIFAR_TRAIN, IDX_NAMES, write_cifar_dataset, write_idx_dataset

pytestmark = pytest.mark.usefixtures("isolated_data")  # tests/conftest.py


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.endswith("/short"):  # promises more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    log: list[str] = []
    handler = type("H", (_Handler,), {"requests": log})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/", log
    finally:
        srv.shutdown()
        srv.server_close()


def _idx_spec(folder: Path) -> DownloadSpec:
    """A spec for the tiny gz IDX files in ``folder``, with their true content sha256."""
    files = []
    for pair in IDX_NAMES.values():
        for stem in pair:
            content = gzip.decompress((folder / f"{stem}.gz").read_bytes())
            files.append(RemoteFile(f"{stem}.gz", content=Checksum("sha256", hashlib.sha256(content).hexdigest())))
    return DownloadSpec("http://unused.invalid/", tuple(files))


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.part")]


def test_download_verifies_then_loads_and_skips_second_time(tmp_path):
    src = tmp_path / "srv"
    want = write_idx_dataset(src, gz=True)
    spec = _idx_spec(src)
    with serve(src) as (url, log):
        folder = download_dataset("mnist", tmp_path / "root", mirror=url, spec=spec)
        assert folder == tmp_path / "root" / "mnist" and len(log) == 4
        download_dataset("mnist", tmp_path / "root", mirror=url, spec=spec)
        assert len(log) == 4  # verified files are not fetched again
        download_dataset("mnist", tmp_path / "root", mirror=url, spec=spec, force=True)
        assert len(log) == 8
    ds = load_dataset("mnist", data_dir=tmp_path / "root")
    assert torch.equal(ds.images["train"], torch.from_numpy(want["train"][0]))
    _no_leftovers(folder)


def test_default_root_is_the_searched_user_cache(tmp_path, monkeypatch):
    src = tmp_path / "srv"
    write_idx_dataset(src, gz=True)
    with serve(src) as (url, _):
        monkeypatch.setenv("LMCKIT_DATA_MIRROR", url)  # the env var replaces the official base URL
        folder = download_dataset("mnist", spec=_idx_spec(src))
    assert folder == tmp_path / "xdg-cache" / "lmckit" / "datasets" / "mnist"
    assert load_dataset("mnist").size("test") == 10  # found without --data-dir


def test_checksum_mismatch_keeps_nothing(tmp_path):
    """The real Fashion-MNIST checksums against tiny stand-in files: refused, nothing left that looks complete."""
    src = tmp_path / "srv"
    write_idx_dataset(src, gz=True)
    with serve(src) as (url, _):
        with pytest.raises(LmcError, match="checksum mismatch") as e:
            download_dataset("fashion-mnist", tmp_path / "root", mirror=url)
    assert "train-images-idx3-ubyte.gz" in e.value.message and "sha256" in e.value.message
    dest = tmp_path / "root" / "fashion-mnist"
    assert not dest.exists(), "a failed download removes the folders (and lock) it created"
    assert not (tmp_path / "root").exists()


def test_mnist_archive_md5_mismatch(tmp_path):
    src = tmp_path / "srv"
    write_idx_dataset(src, gz=True)
    with serve(src) as (url, _):
        with pytest.raises(LmcError, match="md5"):
            download_dataset("mnist", tmp_path / "root", mirror=url)
    assert not (tmp_path / "root" / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_http_errors_and_short_bodies(tmp_path):
    src = tmp_path / "srv"
    src.mkdir()
    with serve(src) as (url, _):
        with pytest.raises(LmcError, match="404"):
            download_dataset("mnist", tmp_path / "root", mirror=url)
        short = DownloadSpec(url, (RemoteFile("short"),))
        with pytest.raises(LmcError, match="incomplete|broke off"):
            download_dataset("mnist", tmp_path / "root", spec=short)
    _no_leftovers(tmp_path / "root")
    assert not (tmp_path / "root" / "mnist" / "short").exists()


def test_offline_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(LmcError, match="cannot download") as e:
        download_dataset("mnist", tmp_path / "root", mirror=f"http://127.0.0.1:{port}/")
    assert "--data-dir" in e.value.hint and time.time() - t0 < 5
    # a server that accepts the connection but never answers: the timeout applies
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t0 = time.time()
        with pytest.raises(LmcError, match="timed out|within"):
            download_dataset("mnist", tmp_path / "root", mirror=f"http://127.0.0.1:{s.getsockname()[1]}/", timeout=0.5)
        assert time.time() - t0 < 5


def _cifar_tarball(tmp_path: Path, evil: bool = True) -> tuple[Path, DownloadSpec]:
    """cifar-10-python.tar.gz holding tiny batches (plus an escaping member that must be ignored)."""
    build = tmp_path / "build"
    want = write_cifar_dataset(build)
    src = tmp_path / "srv"
    src.mkdir()
    members = {}
    with tarfile.open(src / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in CIFAR_TRAIN + ("test_batch",):
            p = build / "cifar-10-batches-py" / name
            tar.add(p, arcname=f"cifar-10-batches-py/{name}")
            members[f"cifar-10-batches-py/{name}"] = (
                f"cifar-10-batches-py/{name}",
                Checksum("md5", hashlib.md5(p.read_bytes()).hexdigest()),
            )
        if evil:
            data = b"escaped"
            info = tarfile.TarInfo("../../escaped")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive_md5 = hashlib.md5((src / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    spec = DownloadSpec(
        "http://unused.invalid/",
        (RemoteFile("cifar-10-python.tar.gz", archive=Checksum("md5", archive_md5, "archive"), members=members),),
    )
    return src, spec, want


def test_cifar_tarball_extracts_only_expected_members(tmp_path):
    src, spec, want = _cifar_tarball(tmp_path)
    with serve(src) as (url, _):
        folder = download_dataset("cifar10", tmp_path / "root", mirror=url, spec=spec)
        with pytest.raises(LmcError, match="md5"):  # the real archive checksum refuses the stand-in tarball
            download_dataset("cifar10", tmp_path / "root2", mirror=url)
    assert not list(tmp_path.rglob("escaped"))
    assert sorted(p.name for p in (folder / "cifar-10-batches-py").iterdir()) == sorted(CIFAR_TRAIN + ("test_batch",))
    assert not [p for p in folder.iterdir() if p.suffix in (".gz", ".part")]  # the archive is not kept
    ds = load_dataset("cifar10", data_dir=tmp_path / "root")
    assert torch.equal(ds.images["test"], torch.from_numpy(want["test"][0]))
    assert not (tmp_path / "root2" / "cifar10" / "cifar-10-batches-py").exists()


def test_cifar_member_checksum_mismatch(tmp_path):
    src, spec, _ = _cifar_tarball(tmp_path, evil=False)
    rf = spec.files[0]
    members = dict(rf.members)
    key = "cifar-10-batches-py/data_batch_4"
    members[key] = (members[key][0], Checksum("md5", "0" * 32))
    spec = DownloadSpec(spec.base_url, (RemoteFile(rf.name, archive=rf.archive, members=members),))
    with serve(src) as (url, _):
        with pytest.raises(LmcError, match="data_batch_4"):
            download_dataset("cifar10", tmp_path / "root", mirror=url, spec=spec)
    assert not (tmp_path / "root" / "cifar10" / "cifar-10-batches-py" / "data_batch_4").exists()


def test_real_fashion_mnist_checksums_via_mirror(tmp_path):
    """Serving the installed Debian files through the mirror verifies them against the recorded checksums."""
    deb = Path("/usr/share/datasets/fashion-mnist")
    if not (deb / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    with serve(deb) as (url, _):
        folder = download_dataset("fashion-mnist", tmp_path / "root", mirror=url)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        f"{n}.gz" for pair in IDX_NAMES.values() for n in pair
    )


def test_cli_download_errors_exit_2(tmp_path, capsys):
    assert main(["data", "download", "synthetic"]) == 2
    assert "no download source" in capsys.readouterr().err
    assert main(["data", "download", "mnist", "--dry-run"]) == 0
    assert "ossci-datasets" in capsys.readouterr().out
    assert set(SOURCES) == {"fashion-mnist", "mnist", "cifar10"}
