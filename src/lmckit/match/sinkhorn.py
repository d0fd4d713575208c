"""Sinkhorn re-basin: permutations learned by gradient through the Sinkhorn operator.

The method (Pena, Medeiros, Dubail, Aminbeidokhti, Granger, Pedersoli,
"Re-basin via implicit Sinkhorn differentiation", CVPR 2023) relaxes each
permutation group ``g`` to a doubly stochastic matrix

.. math::

    S_g = \\mathrm{Sinkhorn}(M_g / \\tau), \\qquad
    \\log S \\leftarrow \\log S - \\mathrm{logsumexp}_{\\text{rows}}(\\log S), \\;
    \\log S \\leftarrow \\log S - \\mathrm{logsumexp}_{\\text{cols}}(\\log S)

(``iters`` alternating normalisations in the log domain, starting from
``M_g / tau``; ``tau`` is the temperature: smaller is closer to a hard
permutation). ``S_g`` acts on B like a permutation matrix,
``W_l -> S_l W_l S_{l-1}^T`` on every axis the spec assigns to ``g``
(``S[i, j]``: weight of B's unit ``j`` at position ``i``, so a hard ``S`` with
``S[i, p[i]] = 1`` is exactly ``apply_permutation`` with ``p``). The
parameters ``M_g`` are trained by Adam on one of two losses:

- ``"distance"`` (data-free, the paper's weight-distance objective):
  ``||theta_a - S(theta_b)||^2 / (||theta_a||^2 + ||theta_b||^2)`` over the
  entries of the weight-matching objective
  (:func:`lmckit.match.weight.objective_keys`: parameters, no BN statistics);
- ``"midpoint"`` (data): the cross-entropy of the model at
  ``(theta_a + S(theta_b)) / 2`` on training minibatches (BatchNorm models
  use batch statistics, as in STE's training forward).

The hard permutation is the linear assignment maximising ``sum_i M_g[i, p[i]]``,
which equals the assignment of ``log S_g`` (Sinkhorn only adds row and column
constants to ``M_g / tau``), solved by :func:`lmckit.match.weight._lap`.

Implementation choices (the project's, documented here)
-------------------------------------------------------
* Gradients flow through the unrolled Sinkhorn iterations (autograd), not the
  paper's implicit differentiation; both give the gradient of the same
  operator as ``iters`` grows, the unrolled one at ``iters`` times the memory
  of one ``n x n`` matrix per group, which is small for the zoo's widths.
* ``M_g`` starts at ``init_scale * I`` plus seeded Gaussian noise of standard
  deviation ``noise`` (``init="identity"``), or at the noise alone
  (``init="uniform"``, close to the uniform doubly stochastic matrix). The
  run is deterministic for its seed on a given device.
* Groups the objective cannot see (and groups of one unit) keep the identity,
  as in weight matching. A spec that declares structure constraints on its
  groups (``spec.structures``, e.g. attention heads or segments that must move
  as blocks) is refused with :class:`LmcError`: Sinkhorn here relaxes free
  permutations only.
* ``MatchResult.objective`` is ``[J(identity), J(final)]`` with
  ``J = sum_k <A_k, pi(B)_k>_F`` (higher is better, comparable with weight
  matching); the relaxed loss every ``check_every`` steps is in
  ``extra["loss_history"]``, the number of units whose hard assignment
  changed at each check in ``extra["hard_changes"]``. ``converged`` is True
  when the hard permutation did not change over the last check interval.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..device import resolve_device
from ..errors import LmcError
from ..perm.spec import Perms, PermutationSpec, apply_permutation, identity_permutation, is_segmented
from ..progress import Progress
from ..tied import drop_tied
from .result import MatchResult
from .sinkhorn_options import INITS, LOSSES, SinkhornOptions  # noqa: F401  (the options live there)
from .weight import _lap, check_pair, objective_keys


# --------------------------------------------------------------------------- operators
def sinkhorn_log(m: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """``log S`` for ``S = Sinkhorn(m / tau)``: ``iters`` row-then-column normalisations in the log domain.

    Parameters
    ----------
    m:
        ``(n, n)`` scores.
    tau:
        Temperature (> 0).
    iters:
        Rounds; after the last one every column of ``S`` sums to 1 exactly and
        every row approximately (Sinkhorn and Knopp 1967).
    """
    log_s = m / tau
    for _ in range(iters):
        log_s = log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=0, keepdim=True)
    return log_s


def soft_apply(
    spec: PermutationSpec, soft: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], keys: list[str]
) -> dict[str, torch.Tensor]:
    """``S(theta)`` on ``keys``: every axis of group ``g`` multiplied by ``soft[g]`` (``(n, n)``).

    With hard one-hot matrices ``S[i, p[i]] = 1`` this equals
    :func:`lmckit.perm.apply_permutation` with ``p``. Groups absent from
    ``soft`` are left as they are (identity).
    """
    out = {}
    for k in keys:
        w = state[k]
        for a, g in enumerate(spec.axes[k]):
            if g is None or g not in soft:
                continue
            x = w.movedim(a, 0)
            shp = x.shape
            w = (soft[g] @ x.reshape(shp[0], -1)).reshape(shp).movedim(0, a)
        out[k] = w
    return out


def _check_structures(spec: PermutationSpec) -> None:
    """Refuse specs whose groups carry structure this relaxation does not model.

    Sinkhorn re-basin relaxes each group to a free doubly-stochastic matrix acting on
    a whole axis. Attention-head constraints (``spec.heads``: heads move as wholes,
    one head mapping shared by the Q/K and V/O groups) and block axes (an axis
    moved by several segments: ``torch.cat``, ``F.pad``, LSTM gate blocks,
    ``flatten`` into a Linear) are not modelled, so such specs raise
    :class:`LmcError` instead of returning a permutation that changes the function.
    """
    bad = [f"head structure {name!r}" for name in getattr(spec, "heads", {}) or {}]
    bad += [f"block axis {k}[{a}]" for k, ax in spec.axes.items() for a, e in enumerate(ax) if is_segmented(e)]
    structures = getattr(spec, "structures", None)
    if isinstance(structures, Mapping):
        bad += [str(g) for g, s in structures.items() if s]
    elif structures:
        bad.append("(unnamed structure)")
    if bad:
        raise LmcError(
            f"Sinkhorn re-basin relaxes free whole-axis permutations only; this architecture's spec has "
            f"{len(bad)} structured parts ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})",
            "use --method weight or --method activation, which honour attention heads and block axes",
        )


def _inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: list[str]) -> float:
    return float(sum(torch.sum(a[k].double() * b[k].double()) for k in keys)) if keys else 0.0


def sinkhorn_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    *,
    model: torch.nn.Module | None = None,
    dataset=None,
    options: SinkhornOptions | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MatchResult:
    """Permutations of B aligning it to A by Sinkhorn re-basin (Pena et al., CVPR 2023).

    Parameters
    ----------
    spec:
        Permutation spec of the architecture (free permutations only).
    sd_a, sd_b:
        State dicts of A (reference) and B (to be permuted); never modified.
    model:
        Module of the architecture (template for forward passes; ``loss="midpoint"`` only).
    dataset:
        :class:`lmckit.data.Dataset` (``loss="midpoint"`` only).
    options:
        :class:`SinkhornOptions` (default: the defaults).
    seed:
        Seeds the initial noise of ``M`` and the minibatch order.
    device:
        Where to compute (default: the device of ``sd_a``'s tensors).
    progress:
        Show a progress line.

    Returns
    -------
    MatchResult
        ``method="sinkhorn"``; ``perms`` (CPU LongTensors, apply to B);
        ``objective = [J(identity), J(pi)]`` (``J = sum_k <A_k, pi(B)_k>_F``,
        higher is better); ``sweeps`` the Adam steps; ``extra`` the options,
        the relaxed-loss history and the hard-assignment changes per check.

    Raises
    ------
    LmcError
        Bad options, state dicts that do not fit the spec or hold NaN/inf, a
        spec with structure constraints, ``loss="midpoint"`` without model or data.
    """
    t0 = time.perf_counter()
    opts = SinkhornOptions() if options is None else options
    if not isinstance(opts, SinkhornOptions):
        raise LmcError(f"options must be SinkhornOptions, got {type(opts).__name__}")
    _check_structures(spec)
    check_pair(spec, sd_a, sd_b)
    midpoint = opts.loss == "midpoint"
    if midpoint and (model is None or dataset is None):
        raise LmcError(
            "Sinkhorn re-basin with loss=midpoint needs a model and a dataset",
            "pass --dataset NAME (CLI), or use loss=distance (data-free)",
        )
    if device is None:
        first = next((v for v in sd_a.values() if isinstance(v, torch.Tensor)), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)

    keys = objective_keys(spec, sd_a)
    dtype = torch.float64 if any(sd_a[k].dtype == torch.float64 for k in keys) else torch.float32
    A = {k: sd_a[k].detach().to(dev, dtype) for k in keys}
    B = {k: sd_b[k].detach().to(dev, dtype) for k in keys}
    seen = {g for k in keys for g in spec.axes[k] if g is not None}
    groups = [g for g in spec.sizes if g in seen and spec.sizes[g] > 1]
    norm = sum(float(A[k].double().pow(2).sum() + B[k].double().pow(2).sum()) for k in keys) or 1.0

    gen = torch.Generator().manual_seed(int(seed))
    params: dict[str, torch.Tensor] = {}
    for g in groups:
        n = spec.sizes[g]
        m = opts.noise * torch.randn(n, n, generator=gen, dtype=torch.float64)
        if opts.init == "identity":
            m += opts.init_scale * torch.eye(n, dtype=torch.float64)
        params[g] = m.to(dev, dtype).requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=opts.lr) if params else None

    loss_fn = (
        _distance_loss(spec, A, B, keys, norm)
        if not midpoint
        else _midpoint_loss(spec, model, sd_a, sd_b, dataset, opts, gen, dev)
    )

    def hard() -> Perms:
        return {g: torch.from_numpy(_lap(params[g].detach().double().cpu().numpy())).long() for g in groups}

    losses: list[float] = []
    changes: list[int] = []
    current = hard()
    converged = True
    bar = None
    if progress and params:
        bar = Progress(opts.steps, "sinkhorn re-basin", unit="step")
    try:
        for step in range(1, opts.steps + 1 if params else 1):
            opt.zero_grad(set_to_none=True)
            soft = {g: sinkhorn_log(params[g], opts.tau, opts.iters).exp() for g in groups}
            loss = loss_fn(soft)
            loss.backward()
            opt.step()
            if step % opts.check_every == 0 or step == opts.steps:
                new = hard()
                changed = int(sum(int((new[g] != current[g]).sum()) for g in groups))
                losses.append(float(loss.detach()))
                changes.append(changed)
                converged = changed == 0
                current = new
            if bar is not None:
                bar.update(1, loss=float(loss.detach()))
    finally:
        if bar is not None:
            bar.close()

    perms = identity_permutation(spec)
    perms.update(current)

    j0 = _inner(sd_a, sd_b, keys)
    j1 = _inner(sd_a, apply_permutation(spec, perms, {k: sd_b[k] for k in sd_b}), keys)
    extra: dict[str, Any] = {
        "seed": int(seed),
        "options": opts.to_dict(),
        "device": str(dev),
        "loss_history": losses,
        "hard_changes": changes,
        "check_every": opts.check_every,
        "objective_entries": len(keys),
    }
    unmatched = [g for g in spec.sizes if g not in seen]
    if unmatched:
        extra["unmatched_groups"] = unmatched
    return MatchResult(
        perms=perms,
        objective=[j0, j1],
        sweeps=opts.steps if params else 0,
        seconds=time.perf_counter() - t0,
        method="sinkhorn",
        converged=converged,
        extra=extra,
    )


def _distance_loss(
    spec: PermutationSpec, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], keys: list[str], norm: float
):
    """``S -> ||A - S(B)||^2 / (||A||^2 + ||B||^2)`` over the objective entries."""

    def loss(soft: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sb = soft_apply(spec, soft, B, keys)
        return sum((A[k] - sb[k]).pow(2).sum() for k in keys) / norm

    return loss


def _midpoint_loss(
    spec: PermutationSpec,
    model: torch.nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    dataset,
    opts: SinkhornOptions,
    gen: torch.Generator,
    dev: torch.device,
):
    """``S -> CE(f((theta_a + S(theta_b)) / 2; x), y)`` on the next seeded training minibatch."""

    net = copy.deepcopy(model).to(dev)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    net.train(has_bn)  # batch statistics for BatchNorm (as in STE); other models in eval mode
    a = {k: v.detach().to(dev) for k, v in sd_a.items()}
    b = {k: v.detach().to(dev) for k, v in sd_b.items()}
    float_keys = [k for k, v in a.items() if v.is_floating_point()]
    permuted = [k for k in float_keys if any(g is not None for g in spec.axes[k])]
    if "train" not in dataset.splits():
        raise LmcError(f"dataset {getattr(dataset, 'name', '?')} has no train split for the midpoint loss")
    n = dataset.size("train") if opts.train_limit is None else min(opts.train_limit, dataset.size("train"))
    state = {"order": torch.randperm(n, generator=gen), "pos": 0}

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["pos"] + opts.batch_size > n and state["pos"] > 0:
            state["order"], state["pos"] = torch.randperm(n, generator=gen), 0
        idx = state["order"][state["pos"] : state["pos"] + opts.batch_size]
        state["pos"] += opts.batch_size
        x = dataset.normalize(dataset.images["train"][idx].to(dev))
        return x, dataset.labels["train"][idx].to(dev)

    def loss(soft: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sb = soft_apply(spec, {g: s.to(b[permuted[0]].dtype) for g, s in soft.items()}, b, permuted) if permuted else {}
        mid = {k: (0.5 * (a[k] + sb.get(k, b[k])) if k in float_keys else a[k].clone()) for k in a}
        x, y = batch()
        return F.cross_entropy(functional_call(net, drop_tied(net, mid), (x,)), y)

    return loss
