"""Run folders, safetensors I/O, config hashing and atomic writes.

Conventions
-----------
* A stage's output folder is ``ROOT/<kind>/<hash>`` where ``hash`` is
  :func:`config_hash` of the fully resolved config (defaults included, plus
  :data:`SCHEMA_VERSION`). The folder exists only when complete: work happens
  in ``<hash>.partial`` and is renamed into place at the end, so a killed
  stage never leaves a folder that looks complete.
* Checkpoints are safetensors files plus JSON. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:  # torch is imported where tensors are handled: the CLI's light commands never load it
    import torch

from .errors import LmcError
from .untrusted import (  # noqa: F401  (re-exported: the readers import them from lmckit.store)
    INT64_MAX,
    INT64_MIN,
    MAX_NESTING,
    check_format,
    check_parsed,
    parse_json,
    parse_toml,
)

SCHEMA_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")  # raw pickle protocol >= 2, torch.save zip archive

#: upper bounds on the size of the files lmckit reads whole (a device such as /dev/zero never ends)
MAX_JSON_BYTES = 256 * 2**20  # permutation files, run configs, results
MAX_TEXT_BYTES = 4 * 2**20  # recipes

#: operating-system errors caused by the user's paths or machine (not bugs): reported as LmcError
USER_ERRNOS = {
    errno.ENAMETOOLONG,
    errno.EROFS,
    errno.ENOSPC,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EMFILE,
    errno.ENFILE,
    errno.EXDEV,
    errno.EFBIG,
    errno.ENOENT,
    errno.EEXIST,
    errno.EIO,
    errno.ENXIO,
    errno.ENODEV,
    errno.EBUSY,
    errno.ETXTBSY,
}


def os_error(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> LmcError:
    """An :class:`LmcError` naming the path for an operating-system error on a user's file."""
    where = path if path is not None else (e.filename or "?")
    why = e.strerror or str(e)
    hints = {
        errno.ENOSPC: "free some disk space or choose another output folder",
        errno.EDQUOT: "free some disk space or choose another output folder",
        errno.EROFS: "choose an output folder on a writable file system",
        errno.EACCES: "choose a folder you may write to, or fix its permissions",
        errno.EPERM: "choose a folder you may write to, or fix its permissions",
        errno.ENAMETOOLONG: "use a shorter file name (at most 255 bytes per name)",
    }
    return LmcError(f"cannot {action} {where}: {why} (errno {e.errno})", hints.get(e.errno, "check the path"))


def check_input_file(path: str | os.PathLike, what: str, max_bytes: int) -> int:
    """Check that ``path`` is a regular file of at most ``max_bytes`` before reading it; return its size.

    Raises :class:`LmcError` naming the file when it is missing, a folder, a device, pipe or socket
    (``/dev/zero`` would be read until memory runs out), or larger than ``max_bytes``.
    """
    import stat

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LmcError(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _loop_error(what, path) from None
        raise os_error(e, path, "read") from None
    if stat.S_ISDIR(st.st_mode):
        raise LmcError(f"{what} {path} is a folder, not a file", "pass a file")
    if not stat.S_ISREG(st.st_mode):
        raise LmcError(f"{what} {path} is not a regular file (a device, pipe or socket)", "pass a regular file")
    if st.st_size > max_bytes:
        raise LmcError(
            f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} bytes such a file can be",
            "pass the file lmckit wrote; this one is not it",
        )
    return st.st_size


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of :func:`config_hash`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def config_hash(config: Mapping[str, Any], length: int = 16) -> str:
    """Stable hash of a resolved config (schema version included)."""
    payload = canonical_json({"schema": SCHEMA_VERSION, "config": config})
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- atomic writes
def _file_kind(mode: int) -> str | None:
    """``None`` for a regular file, else what the path is (``"folder"``, ``"character device"``, ...)."""
    import stat

    if stat.S_ISREG(mode):
        return None
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file (``"folder"``, ``"named pipe (FIFO)"``, ...); None for a
    regular file or a missing path."""
    try:
        return _file_kind(os.stat(path).st_mode)
    except OSError:
        return None


def check_replaceable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse to write ``path`` unless it is missing or a regular file: :class:`LmcError` naming it.

    The one check behind every file lmckit writes (:func:`atomic_write_bytes`, :func:`replace_file`,
    :func:`check_output_path`, lock files): a write goes to a temporary file that is then renamed over
    ``path``, and a rename would silently replace a device (``/dev/full``, ``/dev/null``), a named pipe,
    a socket or a folder with a regular file. A symbolic link is judged by what it points to (the link
    itself is replaced, its target left alone).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:  # missing (or a dangling link): free to write
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES):
            raise os_error(e, path) from None
        return
    kind = _file_kind(st.st_mode)
    if kind == "folder":
        raise LmcError(
            f"cannot write {what} {path}: it is a folder", "give a file name (e.g. a name inside that folder)"
        )
    if kind is not None:
        raise LmcError(
            f"cannot write {what} {path}: it is a {kind}, not a regular file (lmckit writes a temporary file "
            "and renames it into place, which would replace it)",
            "give the path of a regular file or of a file that does not exist yet",
        )


def replace_file(src: str | os.PathLike, dst: str | os.PathLike, what: str = "output") -> None:
    """``os.replace(src, dst)`` after :func:`check_replaceable` on ``dst`` (only a regular file is replaced)."""
    check_replaceable(dst, what)
    os.replace(src, dst)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    Refuses (:class:`LmcError` naming ``path``, nothing written) when ``path`` is a folder, a device, a
    named pipe or a socket (:func:`check_replaceable`, checked before and again just before the rename).
    """
    path = Path(path)
    check_replaceable(path, what)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise os_error(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path, what)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:
            raise os_error(e, path) from None
        raise
    return path


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p``; an operating-system error (read-only, too long, a file in the way) is an LmcError naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LmcError(
            f"cannot create the folder {folder}: a file of that name (or above it) is in the way", "choose another path"
        ) from None
    except OSError as e:
        raise os_error(e, folder, "create the folder") from None
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True) + "\n"
    )


def read_json(
    path: str | os.PathLike, what: str = "JSON file", *, expect: type | None = None, allow_nan: bool = True
) -> Any:
    """Read and :func:`parse_json` a file of at most :data:`MAX_JSON_BYTES` (a device or folder is refused)."""
    path = Path(path)
    check_input_file(path, what, MAX_JSON_BYTES)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmcError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise LmcError(f"cannot read {what} {path}: {e}") from None
    return parse_json(data, f"{what} {path}", expect=expect, allow_nan=allow_nan, what=what)


# --------------------------------------------------------------------------- safetensors
def save_state(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save a state dict as safetensors (atomically). ``metadata`` values are JSON-encoded.

    Tied tensors (one storage under two names, e.g. GPT-2's ``transformer.wte.weight`` and
    ``lm_head.weight``) are written as separate copies, which safetensors requires.
    """
    from safetensors.torch import save

    tensors, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        tensors[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def _sniff(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LmcError(
            f"checkpoint {path} does not exist", "pass a run folder or a .safetensors file written by lmckit"
        ) from None
    except OSError as e:
        raise os_error(e, path, "read") from None
    if path.is_dir():
        raise LmcError(
            f"{path} is a folder without model.safetensors", "pass a finished run folder (lmckit train prints it)"
        )
    if not path.is_file():
        raise LmcError(
            f"checkpoint {path} is not a regular file (a device, pipe or socket)",
            "pass a run folder or a .safetensors file written by lmckit",
        )
    if size == 0:
        raise LmcError(
            f"checkpoint {path} is empty (0 bytes)",
            "the file was truncated; re-create it (lmckit train resumes killed runs)",
        )
    with open(path, "rb") as f:
        head = f.read(8)
        first = f.read(1)
    if len(head) == 8 and first == b"{" and 8 + int.from_bytes(head, "little") <= size:
        return  # a safetensors header (its length's low byte may well be 0x80, like a pickle's first byte)
    if any(head.startswith(m) for m in _PICKLE_MAGICS):
        raise LmcError(
            f"checkpoint {path} looks like a pickle / torch.save file; lmckit never unpickles files "
            "(they can run arbitrary code)",
            "convert it yourself in a trusted session with "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')",
        )
    if len(head) < 8:
        raise LmcError(f"checkpoint {path} is truncated ({size} bytes)", "re-create it")
    n = int.from_bytes(head, "little")
    if n <= 1 or 8 + n > size:
        raise LmcError(
            f"checkpoint {path} is not a safetensors file (bad header length {n} for a {size}-byte file)",
            "pass a .safetensors file written by lmckit; it may be truncated or of another format",
        )


@contextlib.contextmanager
def _utf8_path(path: Path) -> Iterator[str]:
    """A name of ``path`` that safetensors (which takes UTF-8 strings only) can open.

    ``str(path)`` itself when it is valid UTF-8; else the file is opened here and ``/proc/self/fd/N`` given
    instead, so a file reached through a folder whose name is not UTF-8 loads like any other (rather than
    failing as "corrupt").
    """
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise os_error(e, path, "read") from None
    try:
        proc = f"/proc/self/fd/{fd}"
        if not os.path.exists(proc):
            raise LmcError(
                f"cannot open {os.fsdecode(path)!r}: its name is not valid UTF-8 and this system has no /proc",
                "rename the file or folder to a UTF-8 name",
            )
        yield proc
    finally:
        os.close(fd)


#: safetensors refuses headers above 100 MB itself
MAX_HEADER_BYTES = 100 * 2**20


def _check_header(path: Path) -> None:
    """Parse a safetensors file's JSON header with :func:`parse_json` before safetensors does.

    safetensors (serde) keeps the last of two equal keys and its messages name no key; here a header
    that is nested too deeply, holds duplicate keys, numbers outside int64 or is not an object raises
    :class:`LmcError` naming the file and the key. (Length and magic were checked by :func:`_sniff`.)
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise LmcError(
                f"checkpoint {path} is not a safetensors file (its header claims {n} bytes, more than "
                f"{MAX_HEADER_BYTES})",
                "pass a .safetensors file written by lmckit",
            )
        raw = f.read(n)
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmcError(
            f"checkpoint {path} is corrupt or not a safetensors file (its header is not valid JSON: {e})",
            "re-create it",
        ) from None
    except RecursionError:
        pass  # parse_json says so
    header = parse_json(raw, f"checkpoint {path}: safetensors header", expect=dict, allow_nan=False, what="checkpoint")
    meta = header.get("__metadata__", {})
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LmcError(
            f"checkpoint {path}: safetensors header: __metadata__ must map names to strings",
            "pass a .safetensors file written by lmckit",
        )


def load_state(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors checkpoint and its JSON metadata, refusing anything else.

    Raises :class:`LmcError` for missing, empty, truncated, pickled, corrupt or
    non-finite checkpoints.
    """
    from safetensors import safe_open

    path = Path(path)
    _sniff(path)
    _check_header(path)
    try:
        state: dict[str, torch.Tensor] = {}
        with _utf8_path(path) as name, safe_open(name, framework="pt") as f:
            raw_meta = f.metadata() or {}
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except LmcError:
        raise
    except OSError as e:
        raise os_error(e, path, "read") from None
    except Exception as e:  # safetensors raises several types for corrupt files
        raise LmcError(
            f"checkpoint {path} is corrupt or not a safetensors file ({type(e).__name__}: {e})", "re-create it"
        ) from None
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:  # lmckit JSON-encodes its metadata values; a foreign file's plain strings stay strings
            json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
            continue
        except RecursionError:
            pass  # parse_json says so, naming the key
        meta[k] = parse_json(v, f"checkpoint {path}: metadata {k!r}", what="checkpoint")
    if check_finite:
        check_state_finite(state, str(path))
    return state, meta


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict: sha256 over every tensor's name, dtype, shape and bytes (sorted by name).

    Identifies a model by its weights, whatever file or folder they were loaded from; recorded in every
    perm file (``lmckit match``/``merge`` and the pipeline's match stages) so that a permutation is never
    applied to a model it was not computed for. Returns ``"sha256:<64 hex digits>"``.
    """
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def check_state_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`LmcError` naming the first tensor with NaN or inf values."""
    import torch

    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise LmcError(
                f"{where}: tensor {k!r} has {bad} NaN/inf values",
                "the model diverged or the file is damaged; retrain it or use another checkpoint",
            )


# --------------------------------------------------------------------------- run folders
def stage_dir(root: str | os.PathLike, kind: str, config: Mapping[str, Any]) -> Path:
    """``ROOT/kind/hash`` for a resolved config (the folder may not exist yet)."""
    return Path(root) / kind / config_hash(config)


def is_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / "config.json").is_file() and not folder.name.endswith(".partial")


def partial_dir(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def finalize_dir(partial: Path, final: Path) -> Path:
    """Atomically publish a finished ``.partial`` folder under its final name."""
    if final.exists():  # someone finished it meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        return final
    os.replace(partial, final)
    return final


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike, wait: bool = True, what: str = "output folder", owner: str | None = None
) -> Iterator[None]:
    """An advisory exclusive lock (``fcntl.flock``) on ``path``.

    The holder writes its pid, ``owner`` (what it locked it for) and its command line into the lock file.
    With ``wait=False`` a held lock raises :class:`LmcError` naming that holder; with ``wait=True`` a line
    on stderr says who is being waited for (which process, which run) before blocking, so a run that waits
    on another never sits silent.
    """
    path = Path(path)
    make_dirs(path.parent)
    check_replaceable(path, "lock file")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_error(e, path, "create the lock file") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            if not wait:
                raise LmcError(
                    f"another lmckit process is using the {what} {path.parent} ({holder})",
                    "wait for it to finish, or use another --out folder",
                ) from None
            print(f"lmckit: waiting for the {what} lock {path}, held by {holder}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        os.write(fd, f"{os.getpid()}\n{owner or what}\n{cmd}\n".encode(errors="replace"))
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds the lock file ``path``, as its holder wrote it: ``"pid 123 (stage model/ab12: reproduce ...)"``."""
    try:
        with open(path, "rb") as f:
            lines = f.read(4096).decode(errors="replace").splitlines()
    except OSError:
        lines = []
    if not lines or not lines[0].strip().isdigit():
        return "a process that did not say which"
    what = "; ".join(x.strip() for x in lines[1:3] if x.strip())
    text = f"pid {lines[0].strip()}" + (f" ({what})" if what else "")
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


#: the most symbolic links the kernel follows while resolving one path (Linux MAXSYMLINKS)
MAX_LINKS = 40


def _loop_error(what: str, path: str | os.PathLike) -> LmcError:
    return LmcError(
        f"cannot use {what} {path}: its symbolic links form a loop (or a chain of more than {MAX_LINKS} links)",
        "fix or remove the link, or pass the real path",
    )


def real_path(path: str | os.PathLike, what: str = "path") -> Path:
    """The absolute path with every symbolic link resolved (``~`` expanded); a missing tail is kept as given.

    The one resolver for user paths (comparing outputs with inputs, recording where a model came from,
    confining report files): a symbolic-link loop, a cyclic path or a chain of links longer than the kernel
    follows is :class:`LmcError` naming ``what`` and ``path``, never a ``RuntimeError`` or
    ``RecursionError`` (Python's resolver recurses once per link).
    """
    text = os.path.abspath(os.path.expanduser(os.fsdecode(path)))
    try:
        os.stat(text)  # the kernel stops at MAX_LINKS links: a loop or an endless chain fails here, cheaply
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _loop_error(what, path) from None
    try:
        return Path(text).resolve()
    except (RuntimeError, RecursionError):  # "Symlink loop from ..." (a loop below a missing name)
        raise _loop_error(what, path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _loop_error(what, path) from None
        raise os_error(e, path, "resolve") from None


def check_no_link_loop(what: str, path: str | os.PathLike) -> None:
    """Raise :class:`LmcError` naming ``what`` when ``path`` or a folder above it is a symbolic-link loop (or a
    chain of more than :data:`MAX_LINKS` links), which ``Path.exists`` would report as a missing path."""
    for q in (Path(path), *Path(path).parents):
        try:
            os.stat(q)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _loop_error(what, path) from None


def check_output_path(what: str, path: str | Path | None, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: :class:`LmcError` naming it.

    Checks that no name in the path is longer than the file system allows, that a file output is not a
    folder (and a folder output not a file), that nothing above it is a file, and that the first existing
    folder above it is writable (a read-only folder or file system fails here, not after the work).
    """
    if path is None:
        return
    p = Path(path)
    if not folder and str(path).endswith(("/", os.sep)):
        raise LmcError(
            f"cannot write {what} {path}: a name ending in '/' is a folder's", "give a file name (without the '/')"
        )
    try:
        name_max = os.pathconf(_existing_parent(p), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in p.parts:
        if len(os.fsencode(part)) > name_max:
            raise LmcError(
                f"cannot write {what} {path}: the name {part[:40]}... is longer than the file system "
                f"allows ({len(os.fsencode(part))} > {name_max} bytes)",
                "use a shorter name",
            )
    if str(path) == "":
        raise LmcError(f"{what} is an empty string", f"give {what} a path")
    check_no_link_loop(what, path)
    for q in (p, *p.parents) if folder else p.parents:  # mkdir -p cannot go through a link to nowhere
        if q.is_symlink() and not q.exists():
            raise LmcError(
                f"{what} {path} cannot be created: {q} is a symbolic link to {os.readlink(q)}, which does not exist",
                "create the link's target folder, or remove the link",
            )
    if p.exists():
        if folder and not p.is_dir():
            kind = _file_kind(p.stat().st_mode) or "file"
            raise LmcError(f"{what} {path} is a {kind}, not a folder", "pass a folder path")
        if not folder:
            check_replaceable(p, what)
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise LmcError(
                f"{what} {path} cannot be created: {parent} is a {file_kind(parent) or 'file'}",
                "pass a path under a folder",
            )
    base = p if (p.exists() and p.is_dir()) else _existing_parent(p)
    if not os.access(base, os.W_OK | os.X_OK):
        raise LmcError(
            f"cannot write {what} {path}: {base} is not writable (read-only folder or file system)",
            "choose an output path you may write to",
        )


def _existing_parent(p: Path) -> Path:
    q = Path(os.path.abspath(p)).parent
    while not q.exists() and q != q.parent:
        q = q.parent
    return q
