"""STE-MM: the straight-through estimator over many models at once (Ito, Yamada and Kumagai's code).

The method of github e5-a/STE-MM, ``srcs/search/mult/ste.py``, function ``ste`` (the first
author's code of Ito, Yamada, Kumagai, "Linear Mode Connectivity between Multiple Models modulo
Permutation Symmetries", ICML 2024), with ``mid: False`` (``protocol="ste-mm-random"``) or
``mid: True`` (``protocol="ste-mm-midpoint"``). Model 0 is the anchor ``theta_0``; every other
model ``i = 1..N-1`` gets a learned copy ``theta~_i`` that starts at ``theta_0``. At every
training step:

.. math::

    \\pi_i = \\mathrm{WM}(\\tilde\\theta_i, \\theta_i) \\quad (i = 1..N-1), \\qquad
    \\theta_{pt} = l_0 \\theta_0 + \\sum_{i \\ge 1} l_i \\big[\\pi_i(\\theta_i) + \\tilde\\theta_i
        - \\mathrm{sg}(\\tilde\\theta_i)\\big],

    (\\tilde\\theta_i)_i \\leftarrow \\mathrm{Adam}\\big((\\tilde\\theta_i)_i,
        \\nabla L(\\theta_{pt}; x_t, y_t)\\big),

with ``l = u / sum(u)``, ``u ~ U[0, 1)^N`` drawn per step (their ``np.random.rand(N + 1)``,
where their N counts the models besides the anchor) or ``l_i = 1/N`` (``mid``). All copies are
trained at once by one Adam (learning rate 1e-3, default betas; their ``torchopt.adam``, which
is elementwise, so one optimiser over all copies equals theirs), batch 256, 10 epochs (their
``configs/rebasin/method/ste.yaml``). The returned permutations are the projections of the last
training step (their ``wms`` after the loop); there is no selection. With N = 2 this is the
pairwise protocol of the same name (:mod:`lmckit.match.ste`).

Implementation choices (the project's, documented here)
-------------------------------------------------------
* Each projection is weight matching (:func:`lmckit.match.weight.weight_matching`'s descent)
  warm-started at the model's previous permutation, kept per model by
  :func:`lmckit.match.projection.ste_projector` (theirs keeps each ``weight_matching_uv``
  object's permutation and LAP potentials between steps: the same warm start). The first
  projection is plain weight matching of ``theta_0`` and ``theta_i`` from the identity.
* Only parameters are learned; buffers (BatchNorm statistics) are combined with the same
  weights and used in train mode (their ``model_a.train()``), on fresh tensors.
* Seeds: the batch order (``seed``), each step's weights and projections (derived from
  ``seed``, the epoch and the step), so a run is deterministic for its seed. Not resumable
  (the pairwise protocols are).
* Data: the training split, normalised as the dataset defines it (their Fashion-MNIST inputs
  are scaled to [0, 1] only; that is a property of the models' training recipe, not of STE).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..device import resolve_device
from ..errors import LmcError
from ..perm import Perms, PermutationSpec, apply_permutation, identity_permutation, spec_for
from ..progress import Progress
from ..tied import drop_tied
from .multi import _check_states
from .projection import ste_projector
from .result import MultiMatchResult
from .ste import PRESETS, PROTOCOLS, _project, _step_seed, ste_mm_point, ste_mm_weights
from .ste_protocols import STE_MM_PROTOCOLS


def ste_mm(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    dataset,
    spec: PermutationSpec | None = None,
    *,
    protocol: str = "ste-mm-random",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    wm_max_iter: int = 100,
    train_limit: int | None = None,
    project_sweeps: int = 0,
    project_every: int = 1,
    progress: bool = False,
) -> MultiMatchResult:
    """Bring ``N >= 2`` models into model 0's unit order by the joint STE of Ito et al. (module docstring).

    Parameters
    ----------
    model:
        A module of the architecture (a functional template; not modified).
    states:
        The models' state dicts, the anchor first (not modified).
    dataset:
        :class:`lmckit.data.Dataset` whose training split the loss is taken on.
    spec:
        Permutation spec (default ``spec_for(model)``).
    protocol:
        ``"ste-mm-random"`` (weights ``rand(N)/sum``) or ``"ste-mm-midpoint"`` (``1/N`` each).
    epochs, lr, batch_size:
        Default 10, 1e-3, 256 (their ``ste.yaml``; the ``adam`` preset).
    seed, device:
        Randomness and where to compute (default CPU).
    wm_max_iter:
        Sweep limit of each projection.
    train_limit:
        Train on the first ``train_limit`` training images only (tests, quick runs).
    project_sweeps, project_every:
        The documented approximations of the per-step projection (0 and 1: off; see
        :func:`lmckit.match.projection.ste_projector`).
    progress:
        Show a progress bar with the loss.

    Returns
    -------
    MultiMatchResult
        ``method="ste-mm"``; ``perms[i]`` aligns model ``i`` to model 0 (identity for model 0),
        the projections of the last step; ``objective``: the mean training loss at the combined
        point per epoch (lower is better; empty without epochs); ``passes``: epochs;
        ``extra``: ``protocol``, ``settings``, ``steps``, ``wm_perms`` (the first projections:
        weight matching to the anchor).

    Raises
    ------
    LmcError
        Fewer than two models, states that do not fit, an unknown protocol, bad settings, or a
        diverging run.
    """
    t0 = time.time()
    if protocol not in STE_MM_PROTOCOLS:
        raise LmcError(f"STE-MM protocol must be one of {', '.join(STE_MM_PROTOCOLS)}, got {protocol!r}")
    pre = PRESETS[PROTOCOLS[protocol]]
    epochs = pre.epochs if epochs is None else int(epochs)
    lr = pre.lr if lr is None else float(lr)
    batch_size = pre.batch_size if batch_size is None else int(batch_size)
    if epochs < 0 or not (lr > 0 and math.isfinite(lr)) or batch_size < 1 or int(wm_max_iter) < 1:
        raise LmcError(
            f"STE-MM needs epochs >= 0, a positive learning rate, batch size and wm_max_iter, got {epochs}, {lr}, "
            f"{batch_size}, {wm_max_iter}"
        )
    if train_limit is not None and int(train_limit) < 1:
        raise LmcError(f"STE-MM train_limit must be positive, got {train_limit}")
    dev = resolve_device(device if device is not None else "cpu")
    spec = spec if spec is not None else spec_for(model)
    _check_states(spec, states, minimum=2)
    mid = protocol == "ste-mm-midpoint"
    n_models = len(states)
    sd_a = {k: v.detach().to(dev) for k, v in states[0].items()}
    others = [{k: v.detach().to(dev) for k, v in sd.items()} for sd in states[1:]]
    net = copy.deepcopy(model).to(dev)
    param_keys = [k for k, p in net.named_parameters() if p.is_floating_point()]
    missing = [k for k in param_keys if k not in sd_a]
    if missing:
        raise LmcError(f"the model's parameters {missing[:3]} are not in the state dicts", "pass states of this model")
    tildes = [{k: sd_a[k].clone().requires_grad_(True) for k in param_keys} for _ in others]
    opt = torch.optim.Adam([t[k] for t in tildes for k in param_keys], lr=lr)
    projectors = [
        ste_projector(spec, sd, int(wm_max_iter), dev, every=int(project_every), step_sweeps=int(project_sweeps))
        for sd in others
    ]
    cur: list[Perms] = [
        _project(spec, sd_a, sd, None, _step_seed(seed + 7 * i, -1, 0), int(wm_max_iter), dev)
        for i, sd in enumerate(others, start=1)
    ]
    wm_perms = [dict(p) for p in cur]
    gen = torch.Generator().manual_seed(int(seed))
    n_train = dataset.size("train") if train_limit is None else min(int(train_limit), dataset.size("train"))
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    history: list[float] = []
    steps = 0

    def full_state(t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(sd_a)
        out.update({k: t[k].detach() for k in param_keys})
        return out

    with Progress(epochs * steps_per_epoch if progress else 0, "ste-mm") as bar:
        for epoch in range(epochs):
            net.train()
            loss_sum, seen = 0.0, 0
            for step, (x, y) in enumerate(
                dataset.batches("train", batch_size, shuffle=True, generator=gen, device=dev, limit=n_train)
            ):
                with torch.no_grad():
                    cur = [
                        projectors[i](full_state(tildes[i]), cur[i], _step_seed(seed + 7 * (i + 1), epoch, step))
                        for i in range(len(others))
                    ]
                    pbs = [apply_permutation(spec, cur[i], others[i]) for i in range(len(others))]
                lams = ste_mm_weights(n_models, mid, _step_seed(seed + 130363, epoch, step))
                out = functional_call(net, drop_tied(net, ste_mm_point(sd_a, pbs, tildes, lams)), (x,))
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise LmcError(f"STE-MM diverged (loss {lv}) at epoch {epoch + 1}", "lower the learning rate")
                loss_sum += lv * int(y.shape[0])
                seen += int(y.shape[0])
                steps += 1
                if progress:
                    bar.update(1, epoch=epoch + 1, loss=lv)
            history.append(loss_sum / max(seen, 1))
    perms = [identity_permutation(spec)] + [{g: p[g].to("cpu").clone() for g in spec.sizes} for p in cur]
    return MultiMatchResult(
        perms=perms,
        objective=history,
        passes=epochs,
        seconds=time.time() - t0,
        method="ste-mm",
        converged=True,
        pairwise=[None] * n_models,
        extra={
            "protocol": protocol,
            "settings": {"optimizer": "adam", "lr": lr, "batch_size": batch_size, "epochs": epochs},
            "steps": steps,
            "wm_perms": [identity_permutation(spec)] + wm_perms,
            "anchor": 0,
            "seed": int(seed),
        },
    )
