"""An STE run's files: its resumable state (no pickles) and its drift history.

A run given a ``state_dir`` keeps ``ste_state.safetensors`` there after
every epoch (``theta~``, the optimiser and generator state, the permutations
and the history; :func:`_save_state` / :func:`_load_state`), keyed by a
fingerprint of the models, data and settings so that a rerun resumes only
the same run; at the end it writes ``drift.json`` (:func:`drift_history`,
:func:`write_drift`), which the CLI draws as ``drift.png``. The search
itself is :mod:`lmckit.match.ste`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LmcError
from ..perm import (
    Perms,
    PermutationSpec,
    validate_perms,
)
from ..store import atomic_write_json, load_state, save_state

__all__ = ["STATE_FILE", "DRIFT_JSON", "DRIFT_PLOT", "drift_history", "write_drift"]

STATE_FILE = "ste_state.safetensors"
DRIFT_JSON = "drift.json"
DRIFT_PLOT = "drift.png"  # drawn from drift.json by the CLI (lmckit.commands.common.draw_ste_drift)
STATE_VERSION = 1


def _state_digest(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- resumable state
def _save_state(
    path: Path,
    fingerprint: dict,
    tilde: dict,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    param_keys: list[str],
    hist: dict,
    cur: Perms,
    best: Perms,
    best_loss: float,
    epoch: int,
    pi_wm: Perms,
) -> None:
    tensors: dict[str, torch.Tensor] = {f"tilde.{k}": tilde[k].detach().clone() for k in param_keys}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = v.detach().clone()
    for tag, perms in (("cur", cur), ("best", best), ("wm", pi_wm)):
        for g, p in perms.items():
            tensors[f"perm.{tag}.{g}"] = p.to(torch.long).clone()
    tensors["generator"] = gen.get_state()
    meta = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "history": hist,
        "best_loss": best_loss,
        "format": "lmckit.ste_state",
    }
    save_state(path, tensors, meta)


def _load_state(
    path: Path,
    fingerprint: dict,
    tilde: dict,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    param_keys: list[str],
    spec: PermutationSpec,
):
    tensors, meta = load_state(path)
    if meta.get("format") != "lmckit.ste_state":
        raise LmcError(f"{path} is not an lmckit STE state file", "use another state folder")
    missing = [f"tilde.{k}" for k in param_keys if f"tilde.{k}" not in tensors]
    if not isinstance(meta.get("fingerprint") or {}, dict) or missing:
        raise LmcError(
            f"STE state file {path} is damaged ("
            + (f"missing tensors {missing[:3]}" if missing else "its fingerprint is not an object")
            + ")",
            "delete the state folder to start over, or use another one",
        )
    # states written before train_limit / protocol / the projection approximations existed
    old = {
        "train_limit": None,
        "protocol": "heldout-best",
        "project_sweeps": 0,
        "project_every": 1,
        **(meta.get("fingerprint") or {}),
    }
    if old != fingerprint:
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise LmcError(
            f"STE state in {path.parent} belongs to another run (differs in: {', '.join(diff)})",
            "use another state folder, or delete it to start over",
        )
    with torch.no_grad():
        for k in param_keys:
            tilde[k].copy_(tensors[f"tilde.{k}"].to(tilde[k].device))
    sd = opt.state_dict()
    new_state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, idx, field = name.split(".", 2)
            new_state.setdefault(int(idx), {})[field] = v
    sd["state"] = new_state
    opt.load_state_dict(sd)
    gen.set_state(tensors["generator"])

    def perms(tag: str) -> Perms:
        raw = {g: tensors[f"perm.{tag}.{g}"] for g in spec.sizes if f"perm.{tag}.{g}" in tensors}
        return validate_perms(spec, raw, f"STE state {path} ({tag})")

    return meta["history"], perms("cur"), perms("best"), float(meta["best_loss"]), int(meta["epoch"]), perms("wm")


# --------------------------------------------------------------------------- drift report
def drift_history(hist: Mapping[str, Any]) -> dict[str, list]:
    """Per-epoch drift series (epoch 0 = the start, theta~ = theta_a, pi = WM)."""
    ini = hist["initial"]
    rows = [
        {
            "epoch": 0,
            "train_midpoint_loss": None,
            "heldout_loss": ini["heldout_loss"],
            "changed_vs_wm": 0.0,
            "tilde_dist": 0.0,
            "tilde_rel_dist": 0.0,
            "r03": ini["r03"],
        }
    ] + list(hist["epochs"])
    keys = ["epoch", "train_midpoint_loss", "heldout_loss", "changed_vs_wm", "tilde_dist", "tilde_rel_dist", "r03"]
    out = {k: [r.get(k) for r in rows] for k in keys}
    out["identity_heldout_loss"] = ini["identity_heldout_loss"]
    return out


def write_drift(folder: str | Path, drift: Mapping[str, Any]) -> None:
    """Write ``drift.json`` (see :func:`drift_history`); the CLI draws it as ``drift.png``."""

    atomic_write_json(Path(folder) / DRIFT_JSON, dict(drift))
