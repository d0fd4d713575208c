"""Optional download of datasets into the user cache, with checksum checks.

Each file is streamed into a hidden temp file (``.<name>.<random>.part``) in
the target folder, verified, and only then renamed to its final name, so an
interrupted or failed download never leaves a file that looks complete.
Checksums are compared on the decompressed content where one is known
(:mod:`lmckit.data.checksums`), else on the archive as published. Offline, the
first connection fails within ``timeout`` seconds with an :class:`LmcError`
that says what to do instead.

The URL base can be replaced by a mirror (``mirror=`` or the
``LMCKIT_DATA_MIRROR`` environment variable): each file is then fetched from
``<mirror>/<file name>``; ``file://`` URLs work too.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LmcError
from ..progress import Progress
from ..store import atomic_write_bytes, check_output_path, check_replaceable, file_lock, replace_file
from .checksums import ARCHIVE_CHECKSUMS, KNOWN_CHECKSUMS, Checksum, digest
from .registry import cache_root, dataset_info

DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch.

    ``name`` is the published file name (appended to the base URL or mirror).
    ``archive`` checks the downloaded bytes; ``content`` checks them after
    gunzip (IDX ``.gz`` files). A tarball lists ``members``: member path in
    the archive -> (path under the dataset folder, content checksum or None);
    only those regular files are extracted, nothing else is touched.
    """

    name: str
    archive: Checksum | None = None
    content: Checksum | None = None
    members: dict[str, tuple[str, Checksum | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class DownloadSpec:
    base_url: str
    files: tuple[RemoteFile, ...]


def _idx_files(dataset: str) -> tuple[RemoteFile, ...]:
    known = KNOWN_CHECKSUMS[dataset]
    out = []
    for stem, ck in known.items():
        out.append(
            RemoteFile(
                f"{stem}.gz", archive=ck if ck.of == "archive" else None, content=ck if ck.of == "content" else None
            )
        )
    return tuple(out)


def _cifar_files() -> tuple[RemoteFile, ...]:
    from .cifar import PY_DIR, PY_FILES

    names = PY_FILES["train"] + PY_FILES["test"]
    members = {f"{PY_DIR}/{n}": (f"{PY_DIR}/{n}", KNOWN_CHECKSUMS["cifar10"][n]) for n in names}
    return (RemoteFile("cifar-10-python.tar.gz", archive=ARCHIVE_CHECKSUMS["cifar-10-python.tar.gz"], members=members),)


SOURCES: dict[str, DownloadSpec] = {
    "fashion-mnist": DownloadSpec(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _idx_files("fashion-mnist")
    ),
    "mnist": DownloadSpec("https://ossci-datasets.s3.amazonaws.com/mnist/", _idx_files("mnist")),
    "cifar10": DownloadSpec("https://www.cs.toronto.edu/~kriz/", _cifar_files()),
}


def base_url(spec: DownloadSpec, mirror: str | None = None) -> str:
    """The URL the files are fetched under: ``mirror``, else ``LMCKIT_DATA_MIRROR``, else the official one.

    Raises :class:`LmcError` naming the setting when the URL is not ``http://``, ``https://`` or ``file://``
    (urllib would raise ``ValueError: unknown url type`` mid-download).
    """
    from urllib.parse import urlsplit

    given, where = (mirror, "--mirror") if mirror else (os.environ.get("LMCKIT_DATA_MIRROR"), "LMCKIT_DATA_MIRROR")
    url = given or spec.base_url
    if given and (
        urlsplit(url).scheme.lower() not in ("http", "https", "file") or not urlsplit(url).path + urlsplit(url).netloc
    ):
        raise LmcError(
            f"{where} {url!r} is not an http://, https:// or file:// URL",
            "give the mirror's base URL, e.g. https://example.org/mnist/ or file:///srv/datasets/mnist/",
        )
    return url.rstrip("/") + "/"


def _offline_hint(name: str) -> str:
    return (
        f"check the network (or set LMCKIT_DATA_MIRROR to a reachable mirror); offline, copy the files of {name} "
        f"into a folder and pass --data-dir (or set LMCKIT_DATA); `lmckit data info {name}` shows where lmckit looks"
    )


def _fetch(url: str, folder: Path, timeout: float, dataset: str) -> tuple[Path, str, str]:
    """Stream ``url`` into a temp file in ``folder``; returns (temp path, md5, sha256) of the bytes."""
    req = urllib.request.Request(url, headers={"User-Agent": "lmckit"})
    fd, tmp = tempfile.mkstemp(prefix=f".{url.rsplit('/', 1)[-1]}.", suffix=".part", dir=folder)
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    got = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s)/file by design
            except urllib.error.HTTPError as e:
                raise LmcError(f"download of {url} failed: HTTP {e.code} {e.reason}", _offline_hint(dataset)) from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise LmcError(
                    f"cannot download {dataset} from {url}: {reason} (no answer within {timeout:g} s or no network)",
                    _offline_hint(dataset),
                ) from None
            with resp:
                total = resp.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with Progress(total, f"download {url.rsplit('/', 1)[-1]}", unit="B") as bar:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except (TimeoutError, socket.timeout, ConnectionError, OSError) as e:
                            raise LmcError(
                                f"download of {url} broke off after {got} bytes: {e}", _offline_hint(dataset)
                            ) from None
                        if not chunk:
                            break
                        out.write(chunk)
                        md5.update(chunk)
                        sha.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            if total is not None and got != total:
                raise LmcError(f"download of {url} is incomplete: {got} of {total} bytes", "run the download again")
        return Path(tmp), md5.hexdigest(), sha.hexdigest()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check(ck: Checksum | None, data_md5: str | None, data_sha: str | None, data: bytes | None, what: str) -> None:
    if ck is None:
        return
    if ck.algo == "md5" and data_md5 is not None:
        actual = data_md5
    elif ck.algo == "sha256" and data_sha is not None:
        actual = data_sha
    else:
        actual = digest(data if data is not None else b"", ck.algo)
    if actual != ck.digest.lower():
        raise LmcError(
            f"checksum mismatch for {what}: {ck.algo} {actual}, expected {ck.digest}",
            "the download is corrupt or the mirror serves other files; nothing was kept, "
            "try again or use another mirror",
        )


def _gunzip(path: Path, what: str) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise LmcError(f"{what} is not a valid gzip file ({e})", "the download is corrupt; try again") from None


def _already_there(rf: RemoteFile, folder: Path) -> bool:
    """True when the final files exist and pass their checksums (so a rerun downloads nothing)."""
    try:
        if rf.members:
            for dest, ck in rf.members.values():
                p = folder / dest
                if not p.is_file():
                    return False
                _check(ck, None, None, p.read_bytes(), str(p))
            return True
        p = folder / rf.name
        if not p.is_file():
            return False
        if rf.archive:
            _check(rf.archive, None, None, p.read_bytes(), str(p))
        if rf.content:
            _check(rf.content, None, None, _gunzip(p, str(p)) if p.name.endswith(".gz") else p.read_bytes(), str(p))
        return True
    except LmcError:
        return False


def _extract(tar_path: Path, rf: RemoteFile, folder: Path, url: str) -> list[Path]:
    """Extract exactly ``rf.members`` (regular files only) from the tarball, each verified, written atomically."""
    written = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member, (dest, ck) in rf.members.items():
                try:
                    info = tar.getmember(member)
                except KeyError:
                    raise LmcError(
                        f"archive {url} lacks {member}", "the mirror serves another file; use the official archive"
                    ) from None
                if not info.isfile():
                    raise LmcError(f"{member} in {url} is not a regular file", "the archive is not the official one")
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                _check(ck, None, None, data, f"{member} from {url}")
                written.append(atomic_write_bytes(folder / dest, data))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise LmcError(f"archive {url} is corrupt ({e})", "try the download again") from None
    return written


def download_target(name: str, root: str | os.PathLike | None = None, spec: DownloadSpec | None = None) -> Path:
    """The folder a download of ``name`` fills (``<root>/<name>``, default root the user cache), checked.

    Raises :class:`LmcError` naming the path, before anything is fetched or created (a dry run checks it
    too): ``root`` empty, not a folder (a file, device, pipe), a symbolic-link loop or a link to nowhere,
    under a file, or not writable; ``<root>/<name>`` not a folder; a file the download would replace
    (a published file name or the lock) that is a folder, device, pipe or socket.
    """
    spec = spec or SOURCES.get(name)
    if spec is None:
        download_plan(name)  # the unknown-dataset / no-source error
    if root is not None:
        check_output_path("--root", root, folder=True)
    folder = (Path(root) if root is not None else cache_root()) / name
    check_output_path("dataset folder", folder, folder=True)
    for rf in spec.files:
        check_replaceable(folder / rf.name, "dataset file")
    check_replaceable(folder / ".download.lock", "lock file")
    return folder


def download_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    force: bool = False,
    spec: DownloadSpec | None = None,
) -> Path:
    """Download ``name`` into ``<root>/<name>`` (default root: the user cache) and return that folder.

    Parameters
    ----------
    name:
        A registered dataset with a download source (``fashion-mnist``, ``mnist``, ``cifar10``).
    root:
        Folder to hold ``<name>/``; default :func:`~lmckit.data.cache_root`, which is on the search path.
    mirror:
        Base URL replacing the official one (else ``LMCKIT_DATA_MIRROR``, else the official URL).
    timeout:
        Seconds to wait for a connection or for each read before giving up.
    force:
        Download again even when verified files are present.
    spec:
        Override the files and checksums (tests, private mirrors).

    Notes
    -----
    Files that are present and verify are skipped. Each new file is verified
    before it gets its final name; on any failure nothing partial remains.
    """
    info = dataset_info(name)
    spec = spec or SOURCES.get(name)
    if spec is None:
        raise LmcError(
            f"dataset {name} has no download source" + (" (it is generated in memory)" if info.generated else ""),
            f"datasets that can be downloaded: {', '.join(SOURCES)}",
        )
    base = base_url(spec, mirror)
    if not isinstance(timeout, (int, float)) or not (0 < timeout <= 3600):
        raise LmcError(f"--timeout must be between 0 and 3600 seconds, got {timeout}")
    folder = download_target(name, root, spec)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    lock = folder / ".download.lock"
    lock_created = not lock.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmcError(f"cannot create the dataset folder {folder}: {e}", "pass another folder with --root") from None
    try:
        _download_locked(spec, folder, lock, base, timeout, name, force)
    except BaseException:  # a failed download removes the lock and the folders it created
        if lock_created:
            with contextlib.suppress(OSError):
                lock.unlink()
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty
        raise
    if not info.is_present(folder) and not any(info.is_present(folder / s) for s in info.subdirs):
        raise LmcError(
            f"after the download {folder} still lacks files of {name}",
            "the download spec does not match the dataset layout",
        )
    return folder


def _download_locked(
    spec: DownloadSpec, folder: Path, lock: Path, base: str, timeout: float, name: str, force: bool
) -> None:
    with file_lock(lock, what="dataset folder"):
        for rf in spec.files:
            if not force and _already_there(rf, folder):
                continue
            url = base + rf.name
            tmp, md5, sha = _fetch(url, folder, timeout, name)
            try:
                _check(rf.archive, md5, sha, None, f"{rf.name} from {url}")
                if rf.members:
                    _extract(tmp, rf, folder, url)
                    continue
                if rf.content:
                    content = _gunzip(tmp, f"{rf.name} from {url}") if rf.name.endswith(".gz") else tmp.read_bytes()
                    _check(rf.content, None, None, content, f"{rf.name} from {url} (decompressed)")
                replace_file(tmp, folder / rf.name, "dataset file")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def download_plan(name: str, mirror: str | None = None) -> list[dict[str, Any]]:
    """URLs and checksums a download of ``name`` would use (for ``lmckit data download --dry-run``)."""
    spec = SOURCES.get(name)
    if spec is None:
        dataset_info(name)
        raise LmcError(
            f"dataset {name} has no download source", f"datasets that can be downloaded: {', '.join(SOURCES)}"
        )
    base = base_url(spec, mirror)
    rows = []
    for rf in spec.files:
        ck = rf.archive or rf.content
        rows.append(
            {
                "url": base + rf.name,
                "checksum": f"{ck.algo}:{ck.digest} ({ck.of})" if ck else "none",
                "members": len(rf.members),
            }
        )
    return rows
