"""Shared helpers of the reliability tests: folder snapshots, CLI runners, tiny checkpoints and hostile files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# --------------------------------------------------------------------------- snapshots
def snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> sha256 of its bytes ("<dir>" for folders).

    Two equal snapshots mean nothing was created, deleted, renamed or rewritten
    with other content (lock files and temp files included).
    """
    root = Path(folder)
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "<link>" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "<dir>"
        elif not p.is_file():  # a FIFO or device: never read it (a FIFO would block)
            out[rel] = f"<special {p.stat().st_mode:o}>"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def snapshot_diff(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Human-readable list of what changed between two :func:`snapshot` results."""
    diff = [f"+ {k}" for k in sorted(set(after) - set(before))]
    diff += [f"- {k}" for k in sorted(set(before) - set(after))]
    diff += [f"~ {k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return diff


# --------------------------------------------------------------------------- running the CLI
def run_cli(argv: Sequence[str], capsys) -> tuple[int, str, str]:
    """``lmckit.cli.main(argv)`` in process; returns (status, stdout, stderr).

    argparse errors (``SystemExit``) are returned as their exit status.
    """
    from lmckit.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m lmckit.cli`` child: one torch thread, no progress bars."""
    env = dict(os.environ)
    env.update({"LMCKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    env.update(extra)
    return env


def lmckit_cmd(*args: Any) -> list[str]:
    return [PYTHON, "-m", "lmckit.cli", *(str(a) for a in args)]


def run_subprocess(
    args: Sequence[Any],
    cwd: str | os.PathLike | None = None,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        lmckit_cmd(*args), cwd=cwd, env=dict(env or subprocess_env()), capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- checkpoints
def make_checkpoint(
    path: Path, name: str = "mlp_tiny", seed: int = 0, dataset: str = "synthetic", state_edit=None, **model_kw: Any
) -> Path:
    """A self-describing safetensors checkpoint of an untrained zoo model (synthetic-data sized).

    ``state_edit(state) -> state`` may damage the weights before saving (NaN, missing keys, ...).
    """
    from lmckit.models import create_model

    channels, size = (3, 32) if dataset == "synthetic-rgb" else (1, 28)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, in_channels=channels, image_size=size, num_classes=10, **model_kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if state_edit is not None:
        state = state_edit(state)
    # save_state (not save_model) so damaged states are written as they are, with the same metadata
    from lmckit.store import save_state

    return save_state(path, state, {"lmckit_model": model.lmckit_config, "dataset": dataset})


def foreign_safetensors(path: Path) -> Path:
    """A valid safetensors file that lmckit did not write (no model config in its metadata)."""
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(4, 4), "bias": torch.zeros(4)}, str(path), metadata={"producer": "someone else"})
    return path


class MarkerPayload:
    """Unpickling this object creates the file ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def hostile_pickle(path: Path, marker: Path, protocol: int = 2) -> Path:
    """A raw pickle file whose loading would create ``marker``."""
    path.write_bytes(pickle.dumps({"weight": MarkerPayload(marker)}, protocol=protocol))
    return path


def hostile_torch_save(path: Path, marker: Path) -> Path:
    """A ``torch.save`` zip archive whose (full, non-weights-only) loading would create ``marker``."""
    torch.save({"weight": torch.zeros(2), "payload": MarkerPayload(marker)}, str(path))
    return path


def write_perms(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON, or as raw text when it is a ``str``."""
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def good_perms(checkpoint: Path) -> dict[str, list[int]]:
    """The identity permutation of a checkpoint's model as a JSON-ready dict."""
    from lmckit.checkpoint import load
    from lmckit.perm import identity_permutation, spec_for

    spec = spec_for(load(checkpoint))
    return {g: p.tolist() for g, p in identity_permutation(spec).items()}


# --------------------------------------------------------------------------- a pre-imported process that forks CLI runs
class Zygote:
    """A Python process that imports lmckit and torch once, then forks one ``lmckit`` CLI run per request.

    Every run is a real, separate process (``os.fork`` of the zygote) executing
    ``lmckit.cli.main(argv)``, so a ``SIGKILL`` hits it exactly as it would hit
    ``lmckit ...`` started from a shell, without paying the interpreter and
    torch start-up (seconds on a loaded machine) for each of many kill points.

    Protocol (one run at a time): the test writes a JSON request, the zygote
    forks and answers the child's pid, waits for the child to exit *without
    reaping it* (``waitid(..., WNOWAIT)``: a zombie keeps its pid, so a late
    ``kill`` can never hit a recycled pid), and reaps it only after the test
    writes ``reap``, answering the exit code.
    """

    def __init__(self, env: Mapping[str, str] | None = None):
        self.proc = subprocess.Popen(
            [PYTHON, __file__, "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(env or subprocess_env()),
            bufsize=1,
        )
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"zygote failed to start: {ready!r}")

    def start(self, argv: Sequence[Any], cwd: str | os.PathLike, log: str | os.PathLike) -> int:
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    @staticmethod
    def running(pid: int) -> bool:
        """True while the child runs (a zombie, i.e. finished but not reaped, counts as not running)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def finish(self, pid: int) -> int:
        """Reap the child (after it exited or was killed); returns its exit code (``-9`` for SIGKILL)."""
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        pid_back, code = self.proc.stdout.readline().split()
        assert int(pid_back) == pid
        return int(code)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _zygote_main() -> None:  # pragma: no cover - runs in the zygote process
    import signal
    import traceback

    os.environ.setdefault("LMCKIT_NO_PROGRESS", "1")
    import torch as _torch  # noqa: F401 - the point is to import before forking
    import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (seconds)

    import lmckit.cli
    import lmckit.data
    import lmckit.reproduce  # noqa: F401
    import lmckit.train  # noqa: F401

    _torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                os.chdir(req["cwd"])
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                sys.stdin = open(os.devnull)
                try:
                    code = lmckit.cli.main(req["argv"])
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        print(pid, flush=True)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        ack = sys.stdin.readline()
        _, status = os.waitpid(pid, 0)
        print(pid, os.waitstatus_to_exitcode(status), flush=True)
        if not ack:
            break


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["zygote"]:
        _zygote_main()


# --------------------------------------------------------------------------- round two: run folders, identities, faults
def make_run_folder(folder: Path, seed: int = 0, **kw: Any) -> Path:
    """A run folder as ``lmckit train`` leaves it: ``model.safetensors`` and ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    make_checkpoint(folder / "model.safetensors", seed=seed, **kw)
    (folder / "config.json").write_text(json.dumps({"kind": "lmckit.train", "dataset": kw.get("dataset", "synthetic")}))
    return folder


def fingerprint(checkpoint: Path) -> str:
    """The content hash lmckit records for a checkpoint's model in perm files."""
    from lmckit.commands.common import state_fingerprint
    from lmckit.store import load_state

    return state_fingerprint(load_state(checkpoint)[0])


def disk_full(monkeypatch) -> None:
    """From now on every ``fsync`` (the last step of each atomic write) fails as on a full disk."""
    import errno

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)


def read_only_dir(monkeypatch, folder: Path) -> None:
    """Make writes under ``folder`` fail with EROFS (root ignores chmod, so the file system call is patched)."""
    import errno
    import tempfile

    real_mkstemp, real_access = tempfile.mkstemp, os.access
    prefix = str(folder.resolve())

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(Path(dir).resolve()).startswith(prefix):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*a, dir=dir, **k)

    def access(path, mode, *a, **k):
        if mode & os.W_OK and str(Path(path).resolve()).startswith(prefix):
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", access)
