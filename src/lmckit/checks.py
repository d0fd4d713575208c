"""Argument validators of the public Python API: one place for what the CLI's parser checks.

Every public function that takes a permutation, a state dict, a model, an interpolation weight, a count
or a device checks it here first, so a bad argument raises :class:`~lmckit.errors.LmcError` (a
``ValueError``) naming the argument and what is expected, instead of a raw ``AttributeError``,
``IndexError``, ``KeyError`` or ``AssertionError`` from deep inside torch, or a silently malformed result
(a 15-entry permutation applied to a 16-unit layer gives a 15x784 weight).

Accepted forms (documented once, here):

* a permutation of ``n`` units: a 1-D integer ``torch.Tensor``, a list/tuple of Python ints, or a 1-D
  numpy integer array (converted to an int64 tensor; a tensor keeps its device). Floats (even 3.0),
  bools, ``-1``, indices ``>= n`` and repeated indices are refused;
* a state dict: a mapping of ``str`` to ``torch.Tensor``;
* an interpolation weight / lambda: a finite real number (``bool`` is refused; numpy scalars are fine);
* a count: an integer (numpy integers too) within the documented bounds;
* a device: what :func:`lmckit.device.resolve_device` accepts (``"cuda"`` without CUDA is refused).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import LmcError


def check_int(value: Any, arg: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted), within ``[lo, hi]``; else :class:`LmcError`."""
    if isinstance(value, bool) or isinstance(value, float):
        raise LmcError(f"{arg} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise LmcError(f"{arg} must be an integer, got {type(value).__name__} {str(value)[:40]!r}") from None
    if lo is not None and v < lo:
        raise LmcError(f"{arg} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise LmcError(f"{arg} must be at most {hi:,}, got {v:,}")
    return v


def check_real(value: Any, arg: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite Python float (ints and numpy scalars accepted) within ``[lo, hi]``."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise LmcError(f"{arg} must be a finite number, got {value!r}")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise LmcError(f"{arg} must be a number, got a tensor of shape {tuple(value.shape)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LmcError(f"{arg} must be a finite number, got {type(value).__name__} {str(value)[:40]!r}") from None
    if not math.isfinite(v):
        raise LmcError(f"{arg} must be a finite number, got {v}")
    if lo is not None and v < lo:
        raise LmcError(f"{arg} must be at least {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise LmcError(f"{arg} must be at most {hi:g}, got {v:g}")
    return v


def check_state(state: Any, arg: str = "state") -> Mapping[str, torch.Tensor]:
    """A state dict: a mapping of ``str`` to tensors (``model.state_dict()``); else :class:`LmcError`."""
    if not isinstance(state, Mapping):
        raise LmcError(f"{arg} must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise LmcError(
                f"{arg} must map names to tensors; entry {str(k)[:40]!r} is a {type(v).__name__}",
                "pass model.state_dict() or a dict loaded by lmckit",
            )
    return state


def check_module(model: Any, arg: str = "model") -> nn.Module:
    """A ``torch.nn.Module`` with parameters; else :class:`LmcError`."""
    if not isinstance(model, nn.Module):
        raise LmcError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise LmcError(f"{arg} ({type(model).__name__}) has no parameters")
    return model


def check_device(device: Any, arg: str = "device") -> torch.device:
    """Resolve a device argument (``"auto"``, ``"cpu"``, ``"cuda:N"``, a ``torch.device``); else :class:`LmcError`."""
    from .device import resolve_device

    if device is not None and not isinstance(device, (str, torch.device)):
        raise LmcError(f"{arg} must be a device name or torch.device, got {type(device).__name__}")
    try:
        return resolve_device(device)
    except LmcError as e:
        raise LmcError(f"{arg}: {e.message}", e.hint) from None


def as_perm(value: Any, n: int | None, where: str) -> torch.Tensor:
    """``value`` as a permutation of ``range(n)`` (``n=None``: of its own length), an int64 1-D tensor.

    Accepts a 1-D integer tensor (kept on its device), a list/tuple of ints or a numpy integer array.
    Raises :class:`LmcError` naming ``where`` for another type, float or bool entries, another shape or
    length, indices outside ``0..n-1`` and repeated indices. The value check costs one sort (O(n log n)).
    """
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            bad = next(i for i in value if not (isinstance(i, int) and not isinstance(i, bool)))
            raise LmcError(f"{where}: entries must be integers, found {bad!r}")
        t = torch.tensor(list(value), dtype=torch.long)
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if value.dtype.kind not in "iu":
            raise LmcError(f"{where}: a numpy array of {value.dtype}, expected integers")
        t = torch.as_tensor(value.astype("int64"))
    else:
        raise LmcError(f"{where}: a {type(value).__name__}, expected a list or tensor of unit indices")
    if t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise LmcError(f"{where}: a tensor of {t.dtype}, expected an integer tensor (torch.long)")
    if t.dim() != 1:
        raise LmcError(f"{where}: shape {tuple(t.shape)}, expected one index per unit (a 1-D tensor)")
    m = t.numel()
    if n is not None and m != n:
        raise LmcError(
            f"{where}: {m} entries, but the group has {n} units", "use a permutation computed for models of this width"
        )
    t = t.long()
    if m and not torch.equal(torch.sort(t).values, torch.arange(m, device=t.device)):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= m:
            raise LmcError(f"{where}: indices must lie in 0..{m - 1}, found {lo if lo < 0 else hi}")
        raise LmcError(f"{where}: not a permutation (an index appears twice)")
    return t


def as_perms(perms: Any, where: str = "perms", sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A permutation set ``{group: permutation}`` checked with :func:`as_perm` (a new dict).

    With ``sizes`` (``spec.sizes``) the groups must be exactly those, each of its size; unknown and
    missing groups are named. Raises :class:`LmcError`.
    """
    if not isinstance(perms, Mapping):
        raise LmcError(f"{where} must be a mapping of group name to permutation, got {type(perms).__name__}")
    if sizes is not None:
        unknown = [g for g in perms if g not in sizes]
        missing = [g for g in sizes if g not in perms]
        if unknown or missing:
            parts = ([f"unknown groups {unknown[:4]}"] if unknown else []) + (
                [f"missing groups {missing[:4]}"] if missing else []
            )
            raise LmcError(
                f"{where} does not fit the model: {', '.join(parts)} (the model has groups "
                f"{list(sizes)[:6]}{'...' if len(sizes) > 6 else ''})",
                "use permutations computed for this architecture (lmckit match, or spec_for(model))",
            )
    return {g: as_perm(p, None if sizes is None else int(sizes[g]), f"{where}[{g!r}]") for g, p in perms.items()}


def same_groups(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: tuple[str, str]) -> None:
    """Two checked permutation sets have the same groups, each of the same length; else :class:`LmcError`."""
    if set(a) != set(b):
        raise LmcError(
            f"{names[0]} and {names[1]} have different groups ({sorted(set(a) ^ set(b))[:4]} in one only)",
            "pass permutations of the same model",
        )
    for g in a:
        if a[g].numel() != b[g].numel():
            raise LmcError(f"group {g!r} has {a[g].numel()} units in {names[0]} but {b[g].numel()} in {names[1]}")
