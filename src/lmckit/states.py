"""State-dict arithmetic: compatibility checks, copies, interpolation and affine mixing.

The linear path between two aligned networks is

    theta(lambda) = (1 - lambda) * theta_a + lambda * theta_b,   lambda in [0, 1]

applied entry by entry to every floating-point tensor of the state dicts
(parameters *and* float buffers such as BatchNorm running statistics).
Integer buffers (``num_batches_tracked``) cannot be averaged meaningfully;
they are taken from the first model at every interior point.

At ``lambda = 0`` and ``lambda = 1`` the functions return copies of the
endpoints themselves (not ``(1-0)*a + 0*b``, which need not be bitwise equal
to ``a`` when ``b`` holds inf/NaN or signed zeros), so the ends of a curve are
exactly the models that were given.

This module sits at the bottom of the package (it needs only torch), so every
layer mixes states with the same arithmetic: barriers and landscapes
(:mod:`lmckit.lmc`), merging, and STE's midpoint scoring (:mod:`lmckit.match.ste`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .checks import check_real, check_state
from .errors import LmcError

State = Mapping[str, torch.Tensor]


def check_compatible(states: Sequence[State], names: Sequence[str] | None = None) -> None:
    """Raise :class:`LmcError` unless all state dicts have the same keys, shapes and dtypes.

    Each must be a mapping of names to tensors (:func:`lmckit.checks.check_state`).
    """
    if isinstance(states, (str, bytes, Mapping)) or not isinstance(states, Sequence):
        raise LmcError(f"expected a list of state dicts, got {type(states).__name__}")
    if not states:
        raise LmcError("no state dicts given")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    for st, nm in zip(states, names):
        check_state(st, nm)
    ref = states[0]
    for st, nm in zip(states[1:], names[1:]):
        if set(st) != set(ref):
            miss = sorted(set(ref) - set(st))[:3]
            extra = sorted(set(st) - set(ref))[:3]
            raise LmcError(
                f"{nm} and {names[0]} have different state-dict entries (missing {miss}, extra {extra})",
                "interpolate only models of the same architecture",
            )
        for k, v in ref.items():
            w = st[k]
            if tuple(w.shape) != tuple(v.shape):
                raise LmcError(
                    f"{nm}: tensor {k!r} has shape {tuple(w.shape)}, {names[0]} has {tuple(v.shape)}",
                    "interpolate only models of the same architecture and width",
                )
            if w.dtype != v.dtype:
                raise LmcError(
                    f"{nm}: tensor {k!r} is {w.dtype}, {names[0]} has {v.dtype}",
                    "cast both models to the same dtype first",
                )


def copy_state(state: State) -> dict[str, torch.Tensor]:
    """A deep copy (new tensors) of a state dict."""
    check_state(state)
    return {k: v.detach().clone() for k, v in state.items()}


def interpolate_states(sd_a: State, sd_b: State, lam: float) -> dict[str, torch.Tensor]:
    """Return ``(1 - lam) * sd_a + lam * sd_b`` as a new state dict.

    Parameters
    ----------
    sd_a, sd_b:
        State dicts of one architecture (same keys, shapes, dtypes; same device).
    lam:
        Interpolation coefficient. Values outside ``[0, 1]`` extrapolate.

    Returns
    -------
    dict
        New tensors. Floating-point entries are ``(1 - lam) * a + lam * b``;
        integer entries (e.g. ``num_batches_tracked``) are copied from
        ``sd_a``. At ``lam == 0`` (``lam == 1``) a copy of ``sd_a``
        (``sd_b``) is returned, bitwise equal to it.
    """
    check_compatible([sd_a, sd_b], ["model A", "model B"])
    lam = check_real(lam, "lam")
    return mix_states([sd_a, sd_b], [1.0 - lam, lam], require_affine=False)


def mix_states(
    states: Sequence[State], weights: Sequence[float], *, require_affine: bool = True
) -> dict[str, torch.Tensor]:
    """Weighted combination ``sum_i w_i * theta_i`` of N state dicts.

    Parameters
    ----------
    states:
        N state dicts of one architecture.
    weights:
        N coefficients. With ``require_affine`` (default) they must sum to 1
        (|sum - 1| <= 1e-6): convex weights (all >= 0) give points inside the
        simplex of the models, affine ones (some < 0) points on the affine
        hull beyond it, as used by plane landscapes.
    require_affine:
        Set False to allow any linear combination.

    Returns
    -------
    dict
        New tensors. Float entries are the weighted sum; integer entries come
        from the first state dict. When one weight is exactly 1 and the others
        exactly 0, a bitwise copy of that model is returned.
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise LmcError(f"weights must be a list of numbers, got {type(weights).__name__}")
    check_compatible(states)
    if len(states) != len(weights):
        raise LmcError(f"{len(states)} state dicts but {len(weights)} weights")
    w = [check_real(x, f"weights[{i}]") for i, x in enumerate(weights)]
    if require_affine and abs(sum(w) - 1.0) > 1e-6:
        raise LmcError(f"weights must sum to 1 for an affine combination, got sum {sum(w)!r}")
    ones = [i for i, x in enumerate(w) if x == 1.0]
    if len(ones) == 1 and all(x == 0.0 for i, x in enumerate(w) if i != ones[0]):
        return copy_state(states[ones[0]])
    out: dict[str, torch.Tensor] = {}
    for k, a in states[0].items():
        if a.is_floating_point():
            acc = w[0] * a.detach()
            for wi, st in zip(w[1:], states[1:]):
                acc = acc + wi * st[k].detach().to(a.device)
            out[k] = acc.to(a.dtype)
        else:
            out[k] = a.detach().clone()
    return out


def float_keys(state: State) -> list[str]:
    """Keys of the floating-point entries, in state-dict order."""
    check_state(state)
    return [k for k, v in state.items() if v.is_floating_point()]


def state_vector(state: State, keys: Sequence[str] | None = None) -> torch.Tensor:
    """Flatten the float entries ``keys`` (default: all) into one float64 vector."""
    check_state(state)
    keys = float_keys(state) if keys is None else list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise LmcError(f"keys: {missing[:3]} are not entries of the state dict")
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])
