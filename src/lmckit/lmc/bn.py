"""BatchNorm statistics reset and REPAIR for interpolated networks.

BN reset (:func:`lmckit.evaluate.reset_bn_stats`, re-exported here)
--------------------------------------------------------------------
The running statistics of an interpolated network are not the interpolation
of its endpoints' statistics. Before evaluating a point of a linear path, a
BatchNorm model gets its statistics recomputed (Jordan et al. 2023, "RESET"):
every BN layer's running mean/var is reset, its ``momentum`` set to ``None``
(a cumulative average), and a fixed, seeded set of training batches is
forwarded in train mode under ``no_grad``. With equal-size batches the
running mean is then the mean of the BN inputs over those images and the
running variance the average of the (unbiased) per-batch variances.

REPAIR
------
Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair", ICLR 2023. Interpolated networks suffer
"variance collapse": hidden units' activations shrink. For every hidden unit
``c`` at a correction site (see :func:`repair_sites`) let ``mu_a, sd_a``,
``mu_b, sd_b`` be the per-unit mean and standard deviation of the site's
output in the two endpoint models on training batches. REPAIR rescales the
interpolated network's unit so that its statistics match the interpolation

    mu_t = (1 - lambda) mu_a + lambda mu_b,   sd_t = (1 - lambda) sd_a + lambda sd_b

i.e. ``z' = (z - mu) * sd_t / sqrt(sd^2 + eps) + mu_t`` where ``mu, sd`` are
the interpolated network's own statistics. The per-unit affine is folded into
the module that produces ``z``:

* models without normalisation: the site is the Linear / Conv whose output
  units are a permutation group; ``W <- diag(s) W``, ``b <- s b + t``;
* models with BatchNorm / LayerNorm / GroupNorm: the site is each norm
  layer's output (in eval mode); ``gamma <- s gamma``, ``beta <- s beta + t``.

Sites are corrected one at a time in forward-execution order, each measured
after all earlier corrections, so on the measurement batches every corrected
unit matches its target statistics exactly (up to ``eps``). This covers MLP,
VGG and ResNet of the zoo (for ResNet every BN, shortcuts included, is a
site); architectures whose hidden units cannot be corrected this way raise
:class:`LmcError`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import LmcError
from ..evaluate import batchnorm_layers, has_batchnorm, model_device, module_mode, reset_bn_stats, training_batches
from ..perm import spec_for
from .interpolate import copy_state, interpolate_states

__all__ = [
    "batchnorm_layers",  # the BN reset lives in lmckit.evaluate (matching uses it too); re-exported here
    "has_batchnorm",
    "reset_bn_stats",
    "training_batches",
    "repair_sites",
    "site_stats",
    "repair_interpolation",
]

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- REPAIR
def _is_affine_norm(m: nn.Module) -> bool:
    if isinstance(m, _BatchNorm):
        return m.affine
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine and m.weight is not None and m.weight.dim() == 1 and m.bias is not None
    if isinstance(m, nn.GroupNorm):
        return m.affine
    return False


def repair_sites(model: nn.Module, spec=None) -> list[tuple[str, nn.Module]]:
    """The modules whose output units REPAIR rescales (see the module docstring).

    Returns ``(name, module)`` pairs in registration order; :class:`Repairer`
    re-sorts them into forward-execution order.

    Raises
    ------
    LmcError
        When the model mixes normalised and unnormalised hidden layers, has
        norm layers without a per-unit affine, or hidden Linear/Conv layers
        without a bias (no place to fold the shift).
    """

    spec = spec if spec is not None else spec_for(model)
    arch = type(model).__name__
    hidden_linear = []
    for name, m in model.named_modules():
        if isinstance(m, LINEAR_TYPES):
            ax = spec.axes.get(f"{name}.weight")
            if ax is not None and ax[0] is not None:
                hidden_linear.append((name, m))
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    if norms:
        bad = [n for n, m in norms if not _is_affine_norm(m)]
        if bad:
            raise LmcError(
                f"REPAIR is not supported for {arch}: norm layers {bad[:3]} have no per-unit affine "
                "to fold the correction into",
                "use --bn-reset on/off for this model",
            )
        if len(norms) != len(hidden_linear):
            raise LmcError(
                f"REPAIR is not supported for {arch}: it has {len(norms)} norm layers but "
                f"{len(hidden_linear)} hidden Linear/Conv layers "
                "(only models whose every hidden layer is normalised, or none is, are supported)",
                "use --bn-reset on/off for this model",
            )
        return norms
    nobias = [n for n, m in hidden_linear if getattr(m, "bias", None) is None]
    if nobias:
        raise LmcError(
            f"REPAIR is not supported for {arch}: hidden layers {nobias[:3]} have no bias to fold the mean shift into",
            "use --bn-reset off for this model",
        )
    if not hidden_linear:
        raise LmcError(
            f"REPAIR is not supported for {arch}: found no hidden Linear/Conv/norm layers with permuted units",
            "use --bn-reset on/off for this model",
        )
    return hidden_linear


class _StopForward(Exception):
    pass


def _unit_view(y: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N * ..., C): one row per sample and position, one column per unit."""
    if y.dim() == 2:
        return y
    return y.movedim(1, -1).reshape(-1, y.shape[1])


@torch.no_grad()
def site_stats(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    sites: Sequence[tuple[str, nn.Module]],
    stop_after: str | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and (population) standard deviation of each site's output.

    The model is run in eval mode on ``batches`` with its current weights.
    Statistics pool all samples (and spatial positions for convolutions).
    With ``stop_after`` the forward pass is cut after that site (speed).
    Returns float64 tensors ``{name: (mean, std)}``.
    """
    acc: dict[str, list] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_mod, _inp, out):
            z = _unit_view(out.detach()).to(torch.float64)
            s = acc.setdefault(name, [0, 0.0, 0.0])
            s[0] += z.shape[0]
            s[1] = s[1] + z.sum(0)
            s[2] = s[2] + (z * z).sum(0)
            if name == stop_after:
                raise _StopForward

        return hook

    for name, m in sites:
        hooks.append(m.register_forward_hook(make_hook(name)))
    try:
        with module_mode(model):
            for x in batches:
                try:
                    model(x)
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (n, s1, s2) in acc.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        out[name] = (mean, var.sqrt())
    return out


def _execution_order(
    model: nn.Module, sites: Sequence[tuple[str, nn.Module]], x: torch.Tensor
) -> list[tuple[str, nn.Module]]:
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n)) for n, m in sites]
    try:
        with torch.no_grad(), module_mode(model):
            model(x[:2])
    finally:
        for h in hooks:
            h.remove()
    seen = list(dict.fromkeys(order))
    by_name = dict(sites)
    missing = [n for n in by_name if n not in seen]
    if missing:
        raise LmcError(
            f"REPAIR: layers {missing[:3]} of {type(model).__name__} are never called in forward",
            "use --bn-reset on/off for this model",
        )
    return [(n, by_name[n]) for n in seen]


class Repairer:
    """REPAIR for a fixed set of endpoint models: measures their statistics once.

    Parameters
    ----------
    model:
        A module of the architecture, used as a workspace (its weights are
        overwritten by every call; callers that care restore them).
    states:
        The endpoint state dicts (two for a linear path, three for a plane;
        all aligned to the first). They must not alias ``model``'s own
        tensors (pass copies).
    batches:
        Training input batches (see :func:`training_batches`), reused for
        every measurement.
    eps:
        Added to the interpolated network's variance before dividing.
    """

    def __init__(
        self,
        model: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        batches: Sequence[torch.Tensor],
        eps: float = 1e-5,
    ):
        if not batches:
            raise LmcError("REPAIR needs at least one batch")
        self.model, self.batches, self.eps = model, list(batches), eps
        sites = repair_sites(model)
        self.sites = _execution_order(model, sites, self.batches[0])
        self.stats = []
        for st in states:
            model.load_state_dict(dict(st))
            self.stats.append(site_stats(model, self.batches, self.sites))

    def _weights(self, weights: float | Sequence[float]) -> list[float]:
        if isinstance(weights, (int, float)):
            if len(self.stats) != 2:
                raise LmcError("a single lambda needs exactly two endpoint models")
            return [1.0 - float(weights), float(weights)]
        w = [float(x) for x in weights]
        if len(w) != len(self.stats):
            raise LmcError(f"{len(w)} weights for {len(self.stats)} endpoint models")
        return w

    def target(self, weights: float | Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Target statistics per site: ``(sum_i w_i mu_i, max(0, sum_i w_i sd_i))``.

        A float ``weights`` is lambda on a two-model path: ``w = (1 - lambda, lambda)``.
        """
        w = self._weights(weights)
        out = {}
        for n, _ in self.sites:
            mu = sum(wi * st[n][0] for wi, st in zip(w, self.stats))
            sd = sum(wi * st[n][1] for wi, st in zip(w, self.stats))
            out[n] = (mu, sd.clamp_min(0.0))
        return out

    @torch.no_grad()
    def __call__(self, state: Mapping[str, torch.Tensor], weights: float | Sequence[float]) -> dict[str, torch.Tensor]:
        """Return a REPAIRed copy of ``state``, the mixture of the endpoints at ``weights``."""
        model = self.model
        model.load_state_dict(dict(state))
        target = self.target(weights)
        for name, mod in self.sites:
            mean, std = site_stats(model, self.batches, [(name, mod)], stop_after=name)[name]
            t_mean, t_std = target[name]
            scale = t_std / torch.sqrt(std * std + self.eps)
            shift = t_mean - mean * scale
            w = mod.weight
            scale_w = scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
            # y' = s * y + t, folded: norm (gamma, beta) or Linear/Conv (W rows, b) alike.
            w.mul_(scale_w)
            mod.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def repair_interpolation(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    lam: float,
    dataset=None,
    *,
    num_batches: int = 10,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
    batches: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Interpolate ``sd_a`` and ``sd_b`` at ``lam`` and REPAIR the result.

    One-shot convenience around :class:`Repairer` (which a curve reuses to
    measure the endpoints once). ``model`` is used as a workspace and
    restored to its original weights afterwards.
    """

    if batches is None:
        if dataset is None:
            raise LmcError("repair_interpolation needs a dataset or pre-drawn batches")
        batches = training_batches(dataset, num_batches, batch_size, seed, device or model_device(model))
    saved = copy_state(model.state_dict())
    sd_a, sd_b = copy_state(sd_a), copy_state(sd_b)  # they may alias the workspace's own tensors
    try:
        rep = Repairer(model, [sd_a, sd_b], batches, eps)
        return rep(interpolate_states(sd_a, sd_b, lam), lam)
    finally:
        model.load_state_dict(saved)
