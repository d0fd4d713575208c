"""Straight-through estimator (STE) permutation search.

The method (Ainsworth, Hayase and Srinivasa, "Git Re-Basin", 2023, Sec. 3.3;
restated in docs/definitions.md) learns a dense copy ``theta~`` of model A
whose *projection* onto the permutation orbit of model B gives the
permutation:

.. math::

    \\pi_t = \\mathrm{WM}(\\tilde\\theta_t, \\theta_b)
         = \\arg\\max_\\pi \\langle \\tilde\\theta_t, \\pi(\\theta_b) \\rangle ,

    \\theta_{mid} = \\tfrac12\\big(\\theta_a + [\\pi_t(\\theta_b)
                    + \\tilde\\theta_t - \\mathrm{sg}(\\tilde\\theta_t)]\\big),

    \\tilde\\theta_{t+1} = \\mathrm{opt}\\big(\\tilde\\theta_t,
                    \\nabla_{\\tilde\\theta} L(\\theta_{mid}; x_t, y_t)\\big),

where ``sg`` stops the gradient: the bracket has the value ``pi_t(theta_b)``
while its gradient flows into ``theta~`` unchanged (the straight-through
trick). ``L`` is the cross-entropy of the model with parameters
``theta_mid`` on a training batch, evaluated with
:func:`torch.func.functional_call`.

Implementation choices (the project's, documented here)
-------------------------------------------------------
* ``theta~`` starts at ``theta_a``; only parameters are learned. Buffers
  (BatchNorm running statistics) are never trained: the training forward
  uses train-mode BatchNorm (batch statistics) on fresh copies of the
  midpoint buffers, so nothing of the callers' states is touched.
* The projection is warm-started from the previous permutation and seeded
  per step, so a run is deterministic for its seed.
* Protocols (``protocol``), the permutation a run returns:

  - ``"heldout-best"`` (lmckit's default, described in the next item):
    keep-best on a held-out set, identity and plain WM as candidates.
  - ``"git-re-basin"`` (the reference code of Ainsworth et al.; docs/definitions.md
    "What the literature's code does"): default optimiser SGD lr 1e-2,
    momentum 0.9, batch 1000; the permutation kept is the one with the
    lowest *minibatch* midpoint loss seen during training (the projection
    used at each step, scored by that step's training loss; the first step's
    projection is plain WM's, because ``theta~`` starts at ``theta_a``, and
    it competes only through its minibatch loss: no held-out scoring, no
    identity candidate). The raw midpoint cross-entropy is compared (the
    endpoints' mean loss the reference subtracts is a constant for the
    gradient, and is not subtracted here).
  - ``"random-mixing"`` (the STE-MM variant): the loss at
    ``(1 - l) theta_a + l [pi(theta_b) + theta~ - sg(theta~)]`` with
    ``l ~ U(0, 1)`` drawn per step (seeded per step, so resumable and
    deterministic) instead of ``l = 1/2``; default Adam lr 1e-3, batch 256;
    the final permutation (the projection after the last epoch) is returned.
  - ``"ste-mm-random"`` and ``"ste-mm-midpoint"``: the STE of Ito, Yamada and
    Kumagai's own code (github e5-a/STE-MM, ``srcs/search/mult/ste.py``,
    function ``ste``, ``mid: False`` / ``mid: True``; the many-model form is
    :func:`lmckit.match.ste_mm.ste_mm`). The loss is taken at
    ``l_0 theta_a + l_1 [pi(theta_b) + theta~ - sg(theta~)]`` with
    ``(l_0, l_1) = u / (u_0 + u_1)``, ``u ~ U[0, 1)^2`` drawn per step
    (``ste-mm-random``: their ``np.random.rand(N + 1)`` normalised, so
    ``l_1 = u_1 / (u_0 + u_1)``, concentrated around 1/2, not uniform on [0, 1])
    or ``l_0 = l_1 = 1/2`` (``ste-mm-midpoint``); default Adam lr 1e-3, batch
    256, 10 epochs (their ``configs/rebasin/method/ste.yaml``); the returned
    permutation is the projection used at the last training step (their
    ``wms`` after the loop: fitted before the step's update), with no selection.
    docs/definitions.md lists every difference from the other protocols.

  Every protocol still scores the end-of-epoch projection on the held-out
  set for the drift record; only ``heldout-best`` selects with it.
* Keep-best (``heldout-best``): the candidates are the identity permutation, the plain weight
  matching permutation ``WM(theta_a, theta_b)`` (which is also STE's first
  projection, since ``theta~`` starts at ``theta_a``) and the projection at
  the end of every epoch. Each is scored by the midpoint loss
  ``L((theta_a + pi(theta_b)) / 2)`` on a fixed held-out set (the ``val``
  split when the dataset has one, else a fixed, seeded subset of the
  training images), after a BatchNorm reset of the midpoint on training data
  for models with BatchNorm. The lowest wins; ties keep the earlier
  candidate. Hence the returned permutation is never worse on that set than
  the identity or plain WM.
* Resumable: with ``state_dir`` the full state (``theta~``, optimizer
  tensors, current and best permutations, the shuffling generator and the
  history) is written atomically after every epoch as one safetensors file
  whose metadata holds the JSON part; a killed run resumes from the last
  finished epoch and ends with exactly the result of an uninterrupted run.
  Asking for more epochs than a finished state holds continues it (the
  learning rate is constant, so this equals a longer run).
* Drift is recorded per epoch: the fraction of units whose assignment
  differs from plain WM's, ``||theta~ - theta_a||_2``, the SVD alignment
  score R(0.3) of the current permutation, and the training and held-out
  midpoint losses (``drift.json`` in ``state_dir``; the CLI draws it as ``drift.png`` with
  :func:`lmckit.report.figures.ste_drift`). R(0.3) is an analysis of the permutation
  (:mod:`lmckit.analysis`, a layer above matching), so it is computed by an ``alignment``
  function the caller passes in (:func:`lmckit.analysis.alignment_tracker`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..checks import check_device, check_int, check_module, check_real
from ..errors import LmcError
from ..evaluate import has_batchnorm, reset_bn_stats, training_batches
from ..limits import MAX_BATCH, MAX_EPOCHS
from ..perm import (
    Perms,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    perm_changed_units,
    spec_for,
)
from ..progress import Progress
from ..states import interpolate_states
from ..tied import drop_tied
from .projection import ste_projector
from .result import MatchResult, perms_equal
from .ste_presets import PRESETS, PROTOCOLS, StePreset, _make_optimizer, check_protocol, resolve_preset  # noqa: F401
from .ste_protocols import STE_MM_PROTOCOLS
from .ste_state import (  # noqa: F401  (re-exported: importable from here as before the split)
    DRIFT_JSON,
    DRIFT_PLOT,
    STATE_FILE,
    STATE_VERSION,
    _load_state,
    _save_state,
    _state_digest,
    drift_history,
    write_drift,
)
from .weight import weight_matching


# --------------------------------------------------------------------------- helpers
def ste_midpoint(
    sd_a: Mapping[str, torch.Tensor],
    pb: Mapping[str, torch.Tensor],
    tilde: Mapping[str, torch.Tensor],
    lam: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The straight-through midpoint ``(theta_a + [pi(theta_b) + theta~ - sg(theta~)]) / 2``.

    For every key of ``tilde`` (the learned parameters) the value equals
    ``(sd_a + pb) / 2`` while ``d mid / d theta~ = 1/2``; other entries
    (buffers) are fresh tensors without gradient: ``(sd_a + pb) / 2`` for
    floats (train-mode BatchNorm overwrites them in place, so they must not
    alias a caller's state) and copies of ``sd_a``'s integer entries.
    With ``lam`` (the random-mixing protocol) the point is
    ``(1 - lam) sd_a + lam [pb + theta~ - sg(theta~)]`` (gradient ``lam``).
    """
    lam = float(lam)
    mid: dict[str, torch.Tensor] = {}
    for k, v in sd_a.items():
        if k in tilde:
            t = tilde[k]
            mid[k] = (1.0 - lam) * v + lam * (pb[k] + t - t.detach())
        else:
            mid[k] = (1.0 - lam) * v + lam * pb[k] if v.is_floating_point() else v.clone()
    return mid


def ste_mm_point(
    sd_a: Mapping[str, torch.Tensor],
    pbs: list[Mapping[str, torch.Tensor]],
    tildes: list[Mapping[str, torch.Tensor]],
    lams: list[float],
) -> dict[str, torch.Tensor]:
    """The straight-through convex combination ``l_0 theta_a + sum_i l_i [pi_i(theta_i) + theta~_i - sg(theta~_i)]``.

    The point of Ito et al.'s STE (github e5-a/STE-MM, ``srcs/search/mult/ste.py``, function
    ``ste``: ``lerp_mult([model_a.state_dict(), *ste_states], lams)`` of
    ``srcs/utils/merge.py``, summed in that order). ``pbs[i]`` is model ``i + 1`` projected onto
    ``tildes[i]`` (its learned copy; keys: the learned parameters); ``lams`` has ``len(pbs) + 1``
    weights, ``lams[0]`` the anchor's. A learned entry has the value
    ``l_0 a + sum_i l_i pbs[i]`` and gradient ``l_i`` with respect to ``tildes[i]``; other float
    entries (buffers) are fresh tensors ``l_0 a + sum_i l_i pbs[i]`` without gradient; integer
    entries are copies of ``sd_a``'s. With two models and ``lams = (1 - l, l)`` this is
    :func:`ste_midpoint` up to rounding.
    """
    if len(lams) != len(pbs) + 1 or len(tildes) != len(pbs):
        raise LmcError(f"ste_mm_point: {len(lams)} weights for {len(pbs)} projected models and {len(tildes)} copies")
    ls = [float(v) for v in lams]
    out: dict[str, torch.Tensor] = {}
    for k, v in sd_a.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v * ls[0]
        for lam, pb, t in zip(ls[1:], pbs, tildes):
            acc = acc + lam * ((pb[k] + t[k] - t[k].detach()) if k in t else pb[k])
        out[k] = acc
    return out


def ste_mm_weights(n: int, mid: bool, seed: int) -> list[float]:
    """The convex weights of one STE-MM step over ``n`` points (the anchor first).

    ``mid``: ``1/n`` each (their ``np.ones(N + 1)`` normalised); otherwise ``u / sum(u)`` with
    ``u ~ U[0, 1)^n`` from a generator seeded by ``seed`` (their ``np.random.rand(N + 1)``
    normalised; github e5-a/STE-MM, ``srcs/search/mult/ste.py``, function ``ste``). For ``n = 2``
    the second weight ``u_1 / (u_0 + u_1)`` has density concentrated around 1/2 (not uniform).
    """
    if mid:
        return [1.0 / n] * n
    u = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    tot = float(u.sum())
    if not tot > 0:  # all draws exactly 0 (probability 2^-53n): the uniform mean
        return [1.0 / n] * n
    return [float(x) / tot for x in u]


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 10_007 + step) % (2**31 - 1)


def _project(
    spec: PermutationSpec,
    tilde_sd: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    init: Perms | None,
    seed: int,
    max_iter: int,
    device: torch.device,
    projector=None,
    full: bool = False,
) -> Perms:
    """``WM(theta~, theta_b)`` warm-started at ``init``.

    With a projector for ``(spec, sd_b)`` (from
    :func:`lmckit.match.projection.ste_projector`) the same descent runs with
    state kept between steps (see that module for the exact modes, chosen by
    ``LMCKIT_STE_PROJECTION``, and the approximations, which are STE options); ``full`` (the
    end-of-epoch projection) runs it to convergence whatever the approximations.
    """

    if projector is not None and init is not None:
        return projector(tilde_sd, init, seed, full=full)
    res = weight_matching(
        spec, tilde_sd, sd_b, seed=seed, max_iter=max_iter, init_perms=init, restarts=1, device=device
    )
    return {g: p.to("cpu") for g, p in res.perms.items()}


class _HeldOut:
    """The fixed held-out set on which candidate permutations are scored."""

    def __init__(self, dataset, seed: int, size: int, device: torch.device, batch_size: int = 1000):
        if "val" in dataset.splits():
            x, y = dataset.tensors("val", device, limit=size)
            self.source = f"val split ({int(y.shape[0])} images)"
        else:
            n = dataset.size("train")
            g = torch.Generator().manual_seed(int(seed) + 7919)
            idx = torch.randperm(n, generator=g)[: min(size, n)].sort().values
            x = dataset.normalize(dataset.images["train"][idx].to(device))
            y = dataset.labels["train"][idx].to(device)
            self.source = f"fixed seeded subset of the train split ({int(y.shape[0])} images)"
        self.x, self.y, self.batch_size = x, y, batch_size

    @torch.no_grad()
    def loss(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> float:
        model.eval()
        tot = 0.0
        for s in range(0, int(self.y.shape[0]), self.batch_size):
            out = functional_call(model, drop_tied(model, state), (self.x[s : s + self.batch_size],))
            tot += float(F.cross_entropy(out, self.y[s : s + self.batch_size], reduction="sum"))
        return tot / max(int(self.y.shape[0]), 1)


# --------------------------------------------------------------------------- main entry
def ste_matching(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    dataset,
    spec: PermutationSpec | None = None,
    preset: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    heldout_size: int = 5000,
    wm_max_iter: int = 100,
    track_alignment: bool = True,
    train_limit: int | None = None,
    protocol: str = "heldout-best",
    alignment: Callable[[Perms], float] | None = None,
    project_sweeps: int = 0,
    project_every: int = 1,
):
    """Find the permutation of model B by the straight-through estimator.

    Parameters
    ----------
    model:
        A module of the architecture of both state dicts (used as a functional
        template only; neither its weights nor its mode are changed).
    sd_a, sd_b:
        State dicts of models A and B (not modified).
    dataset:
        :class:`lmckit.data.Dataset` the models were trained on.
    spec:
        Permutation spec (default ``spec_for(model)``).
    preset, epochs, lr, batch_size:
        Optimiser preset (see :data:`PRESETS`; default: the protocol's, see
        :data:`PROTOCOLS`) and overrides.
    seed:
        Seeds the batch order, the projections and the held-out subset.
    device:
        Where to compute (default: CPU).
    state_dir:
        Folder for the resumable state and ``drift.json``.
    progress:
        Show a progress bar with the current midpoint loss.
    heldout_size:
        Images in the held-out set that scores candidate permutations.
    wm_max_iter:
        Sweep limit of each warm-started projection.
    track_alignment, alignment:
        With ``track_alignment`` and an ``alignment`` function (``perms -> R(0.3)``, e.g.
        :func:`lmckit.analysis.alignment_tracker`), R(0.3) of the current permutation is
        recorded every epoch in the drift history; otherwise its ``r03`` entries are ``None``.
    train_limit:
        Train on the first ``train_limit`` training images only (quick runs, tests).
    project_sweeps, project_every:
        Approximations of the per-step projection (off by default: 0 and 1): at most
        ``project_sweeps`` warm-started sweeps per step, and a projection at every
        ``project_every``-th step only (:func:`lmckit.match.projection.ste_projector`). The
        end-of-epoch projection STE scores and returns always runs to convergence.
    protocol:
        Which permutation is returned (module docstring): ``"heldout-best"``,
        ``"git-re-basin"``, ``"random-mixing"``, ``"ste-mm-random"`` or ``"ste-mm-midpoint"``.

    Returns
    -------
    MatchResult
        ``method="ste"``; ``perms`` the returned permutation (B -> A).
        ``objective``: ``heldout-best``: the best held-out midpoint loss so far
        after each scored candidate (identity, plain WM, then one per epoch;
        non-increasing, its last value is the returned permutation's);
        ``git-re-basin``: the lowest minibatch midpoint loss seen by the end of
        each epoch; ``random-mixing``: the held-out midpoint loss of the
        end-of-epoch projection (the last is the returned permutation's);
        ``ste-mm-*``: the held-out midpoint loss of the permutation kept after
        each epoch (that epoch's last step's projection).
        ``extra`` holds the protocol, the raw candidate losses, the drift
        history, the preset, the held-out set description and
        ``changed_vs_wm`` of the returned permutation.

    Raises
    ------
    LmcError
        Unknown protocol or preset, bad settings, a diverging run, or a state
        folder of another run.
    """

    t0 = time.time()
    check_module(model)
    dev = check_device(device if device is not None else "cpu")
    seed = check_int(seed, "seed")
    heldout_size = check_int(heldout_size, "heldout_size", 0)
    if epochs is not None:
        epochs = check_int(epochs, "epochs", 0, MAX_EPOCHS)  # 0: the WM start only (the API allows it)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", 1, MAX_BATCH)
    if lr is not None and check_real(lr, "lr") <= 0:
        raise LmcError(f"lr must be positive, got {lr}")
    spec = spec if spec is not None else spec_for(model)
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    check_protocol(protocol)
    preset = PROTOCOLS[protocol] if preset is None else preset
    cfg = resolve_preset(preset, epochs, lr, batch_size)
    run = _SteRun(
        model,
        sd_a,
        sd_b,
        dataset,
        spec,
        cfg,
        protocol,
        int(seed),
        dev,
        heldout_size,
        wm_max_iter,
        alignment if track_alignment else None,
        (int(project_sweeps), int(project_every)),
    )
    run.open(state_dir, train_limit)
    if run.start_epoch > cfg.epochs:
        raise LmcError(
            f"the STE state in {state_dir} already holds {run.start_epoch} epochs, "
            f"more than the {cfg.epochs} asked for",
            "ask for at least that many epochs, or use another state folder",
        )
    n_train = dataset.size("train") if train_limit is None else min(int(train_limit), dataset.size("train"))
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    todo = max(0, cfg.epochs - run.start_epoch) * steps_per_epoch
    with Progress(todo if progress else 0, "ste") as bar:
        for epoch in range(run.start_epoch, cfg.epochs):
            run.train_epoch(epoch, n_train, steps_per_epoch, bar if progress else None)
    return run.result(preset, state_dir, t0)


class _SteRun:
    """One STE run's state and its parts: set-up (fresh or resumed), one epoch, scoring, the result.

    The pieces of :func:`ste_matching` (see its docstring and the module's for
    what each computes); the order of every seeded draw is that of one loop.
    """

    def __init__(
        self,
        model: nn.Module,
        sd_a: Mapping[str, torch.Tensor],
        sd_b: Mapping[str, torch.Tensor],
        dataset,
        spec: PermutationSpec,
        cfg: StePreset,
        protocol: str,
        seed: int,
        dev: torch.device,
        heldout_size: int,
        wm_max_iter: int,
        alignment: Callable[[Perms], float] | None,
        approx: tuple[int, int] = (0, 1),
    ):
        self.spec, self.cfg, self.protocol, self.seed, self.dev = spec, cfg, protocol, seed, dev
        self.dataset, self.wm_max_iter, self.alignment = dataset, int(wm_max_iter), alignment
        self.project_sweeps, self.project_every = approx
        if self.project_sweeps < 0 or self.project_every < 1:
            raise LmcError(
                f"STE: project_sweeps must be >= 0 and project_every >= 1, got {self.project_sweeps}, "
                f"{self.project_every}"
            )
        self.heldout_size = int(heldout_size)
        self.step_perm: Perms | None = None  # the projection the last training step used (ste-mm-*)
        self.sd_a = {k: v.detach().to(dev) for k, v in sd_a.items()}
        self.sd_b = {k: v.detach().to(dev) for k, v in sd_b.items()}
        self.net = copy.deepcopy(model).to(dev)
        self.param_keys = [k for k, p in self.net.named_parameters() if p.is_floating_point()]
        missing = [k for k in self.param_keys if k not in self.sd_a]
        if missing:
            raise LmcError(
                f"the model's parameters {missing[:3]} are not in the state dicts",
                "pass state dicts of this model's architecture",
            )
        self.has_bn = has_batchnorm(self.net)
        self.heldout = _HeldOut(dataset, seed, heldout_size, dev)
        self.bn_batches = None
        if self.has_bn:
            self.bn_batches = training_batches(dataset, seed=int(seed), device=dev)

    # ------------------------------------------------------------------ scoring
    def score(self, perms: Perms) -> float:
        """Held-out loss of the midpoint (theta_a + pi(theta_b)) / 2 (after a BN reset)."""
        mid = interpolate_states(self.sd_a, apply_permutation(self.spec, perms, self.sd_b), 0.5)
        if self.has_bn:
            self.net.load_state_dict(mid)
            reset_bn_stats(self.net, batches=self.bn_batches)
            mid = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return self.heldout.loss(self.net, mid)

    def r03(self, perms: Perms) -> float | None:
        """R(0.3) of ``perms`` by the caller's ``alignment`` function (``None`` when not tracked)."""
        return None if self.alignment is None else float(self.alignment(perms))

    def tilde_state(self) -> dict[str, torch.Tensor]:
        """``theta~`` as a full state dict (buffers from A), without gradient."""
        out = dict(self.sd_a)
        out.update({k: self.tilde[k].detach() for k in self.param_keys})
        return out

    # ------------------------------------------------------------------ state (fresh or resumed)
    def open(self, state_dir: str | Path | None, train_limit: int | None) -> None:
        """Create ``theta~`` and the optimiser; resume from ``state_dir`` or score the first candidates."""
        cfg, seed, spec = self.cfg, self.seed, self.spec
        self.fingerprint = {
            "version": STATE_VERSION,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "momentum": cfg.momentum,
            "seed": int(seed),
            "heldout_size": self.heldout_size,
            "wm_max_iter": self.wm_max_iter,
            "train_limit": train_limit,
            "a": _state_digest(self.sd_a),
            "b": _state_digest(self.sd_b),
            "dataset": getattr(self.dataset, "name", "?"),
            "protocol": self.protocol,
            "project_sweeps": self.project_sweeps,
            "project_every": self.project_every,
        }
        self.tilde = {k: self.sd_a[k].detach().clone().requires_grad_(True) for k in self.param_keys}
        self.opt = _make_optimizer(cfg, [self.tilde[k] for k in self.param_keys])
        self.gen = torch.Generator().manual_seed(int(seed))
        self.state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self.state_dir = state_dir
        self.resumed = self.state_path is not None and self.state_path.exists()
        if self.resumed:
            meta = _load_state(self.state_path, self.fingerprint, self.tilde, self.opt, self.gen, self.param_keys, spec)
            self.hist, self.cur, self.best, self.best_loss, self.start_epoch, self.pi_wm = meta
        else:
            self.pi_wm = _project(spec, self.sd_a, self.sd_b, None, _step_seed(seed, -1, 0), self.wm_max_iter, self.dev)
            ident = identity_permutation(spec)
            l_id, l_wm = self.score(ident), self.score(self.pi_wm)
            self.hist = {
                "candidates": [{"name": "identity", "heldout_loss": l_id}, {"name": "wm", "heldout_loss": l_wm}],
                "epochs": [],
                "initial": {
                    "changed_vs_wm": 0.0,
                    "tilde_dist": 0.0,
                    "r03": self.r03(self.pi_wm),
                    "heldout_loss": l_wm,
                    "identity_heldout_loss": l_id,
                },
            }
            if self.protocol == "heldout-best":
                self.best, self.best_loss = (ident, l_id) if l_id <= l_wm else (self.pi_wm, l_wm)
            else:  # git-re-basin: filled by the first minibatch; random-mixing, ste-mm-*: the final projection
                self.best, self.best_loss = self.pi_wm, math.inf
                self.hist["candidates"] = []
            self.hist["minibatch_best"] = []
            self.cur = self.pi_wm
            self.start_epoch = 0
            self.save(0)

        # the per-step projections (see _project)
        self.projector = ste_projector(
            spec, self.sd_b, self.wm_max_iter, self.dev, every=self.project_every, step_sweeps=self.project_sweeps
        )

    def save(self, epoch: int) -> None:
        """Write the resumable state after ``epoch`` finished epochs (when a state folder was given)."""
        if self.state_path is not None:
            _save_state(
                self.state_path,
                self.fingerprint,
                self.tilde,
                self.opt,
                self.gen,
                self.param_keys,
                self.hist,
                self.cur,
                self.best,
                self.best_loss,
                epoch,
                self.pi_wm,
            )

    # ------------------------------------------------------------------ one epoch
    def _step(self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Project ``theta~``, take one optimiser step on the straight-through midpoint loss; the loss."""

        seed = self.seed
        with torch.no_grad():
            self.cur = _project(
                self.spec,
                self.tilde_state(),
                self.sd_b,
                self.cur,
                _step_seed(seed, epoch, step),
                self.wm_max_iter,
                self.dev,
                self.projector,
            )
            pb = apply_permutation(self.spec, self.cur, self.sd_b)
        if self.protocol in STE_MM_PROTOCOLS:  # Ito et al.'s point: weights drawn per step, seeded by the step
            lams = ste_mm_weights(2, self.protocol == "ste-mm-midpoint", _step_seed(seed + 130363, epoch, step))
            point = ste_mm_point(self.sd_a, [pb], [self.tilde], lams)
            self.step_perm = self.cur  # the projection this step trains on (theirs returns the last one)
        else:
            lam = 0.5
            if self.protocol == "random-mixing":  # one draw per step, seeded by the step (resumable)
                g = torch.Generator().manual_seed(_step_seed(seed + 104729, epoch, step))
                lam = float(torch.rand((), generator=g))
            point = ste_midpoint(self.sd_a, pb, self.tilde, lam)
        out = functional_call(self.net, drop_tied(self.net, point), (x,))
        loss = F.cross_entropy(out, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise LmcError(
                f"STE diverged (midpoint loss {lv}) at epoch {epoch + 1}",
                "lower the learning rate (--lr) or use the adam preset",
            )
        if self.protocol == "git-re-basin" and lv < self.best_loss:  # the step's projection, by its minibatch loss
            self.best, self.best_loss = self.cur, lv
        return lv

    def train_epoch(self, epoch: int, n_train: int, steps_per_epoch: int, bar) -> None:
        """One pass over the training images, then the end-of-epoch projection, its score and drift record."""
        cfg, protocol = self.cfg, self.protocol
        self.net.train()
        loss_sum, n_seen = 0.0, 0
        for step, (x, y) in enumerate(
            self.dataset.batches(
                "train", cfg.batch_size, shuffle=True, generator=self.gen, device=self.dev, limit=n_train
            )
        ):
            lv = self._step(epoch, step, x, y)
            loss_sum += lv * int(y.shape[0])
            n_seen += int(y.shape[0])
            if bar is not None:
                bar.update(1, epoch=epoch + 1, mid_loss=lv)
        # end of epoch: project the updated theta~ (to convergence), score it, record drift
        with torch.no_grad():
            self.cur = _project(
                self.spec,
                self.tilde_state(),
                self.sd_b,
                self.cur,
                _step_seed(self.seed, epoch, steps_per_epoch),
                self.wm_max_iter,
                self.dev,
                self.projector,
                full=True,
            )
            dist = math.sqrt(
                sum(float((self.tilde[k].detach() - self.sd_a[k]).double().pow(2).sum()) for k in self.param_keys)
            )
        l_cur = self.score(self.cur)
        if protocol == "heldout-best":
            self.hist["candidates"].append({"name": f"epoch {epoch + 1}", "heldout_loss": l_cur})
            if l_cur < self.best_loss:
                self.best, self.best_loss = self.cur, l_cur
        elif protocol == "random-mixing":
            self.best, self.best_loss = self.cur, l_cur
        elif protocol in STE_MM_PROTOCOLS:  # the last step's projection, as their code returns it
            self.best = self.cur if self.step_perm is None else self.step_perm
            self.best_loss = l_cur if perms_equal(self.best, self.cur) else self.score(self.best)
        self.hist.setdefault("minibatch_best", []).append(self.best_loss)
        a_norm = math.sqrt(sum(float(self.sd_a[k].double().pow(2).sum()) for k in self.param_keys))
        rec = {
            "epoch": epoch + 1,
            "train_midpoint_loss": loss_sum / max(n_seen, 1),
            "heldout_loss": l_cur,
            # the kept permutation's selection loss so far (git-re-basin: a minibatch loss)
            "best_heldout_loss" if protocol != "git-re-basin" else "kept_minibatch_loss": self.best_loss,
            "changed_vs_wm": perm_changed_units(self.cur, self.pi_wm),
            "tilde_dist": dist,
            "tilde_rel_dist": dist / max(a_norm, 1e-12),
            "r03": self.r03(self.cur),
        }
        self.hist["epochs"].append(rec)
        if bar is not None:
            bar.write(
                f"[ste {protocol}] epoch {epoch + 1}/{cfg.epochs}: train mid loss "
                f"{rec['train_midpoint_loss']:.4f}, held-out mid loss {l_cur:.4f} (kept {self.best_loss:.4f}), "
                f"changed vs WM {rec['changed_vs_wm']:.3f}"
            )
        self.save(epoch + 1)

    # ------------------------------------------------------------------ result
    def result(self, preset: str, state_dir: str | Path | None, t0: float):
        """The :class:`MatchResult` of the run (see :func:`ste_matching`); writes the drift files."""

        protocol, hist = self.protocol, self.hist
        drift = drift_history(hist)
        best, best_loss = self.best, self.best_loss
        if (protocol == "random-mixing" or protocol in STE_MM_PROTOCOLS) and not hist["epochs"]:
            # no training: the final projection is plain WM's
            best, best_loss = self.pi_wm, hist["initial"]["heldout_loss"]
        kept_heldout = best_loss if protocol != "git-re-basin" else self.score(best)
        extra = {
            "protocol": protocol,
            "preset": preset,
            "settings": asdict(self.cfg),
            "heldout": self.heldout.source,
            "drift": drift,
            "candidates": hist["candidates"],
            "best_heldout_loss": kept_heldout,
            "kept_minibatch_loss": best_loss if protocol == "git-re-basin" else None,
            "changed_vs_wm": perm_changed_units(best, self.pi_wm),
            "wm_perms": self.pi_wm,
            "resumed": bool(self.resumed),
        }
        if state_dir is not None:
            write_drift(state_dir, drift)
        objective, run_best = [], math.inf
        if protocol == "heldout-best":
            for c in hist["candidates"]:  # running best: non-increasing, ends at the returned permutation's loss
                run_best = min(run_best, c["heldout_loss"])
                objective.append(run_best)
        elif protocol == "git-re-basin":
            objective = [float(v) for v in hist.get("minibatch_best", [])]
        elif protocol in STE_MM_PROTOCOLS:  # the held-out loss of the permutation kept after each epoch
            objective = [float(r["best_heldout_loss"]) for r in hist["epochs"]] or [float(best_loss)]
        else:
            objective = [float(r["heldout_loss"]) for r in hist["epochs"]] or [float(best_loss)]
        return MatchResult(
            perms={g: best[g].clone() for g in self.spec.sizes},
            objective=objective,
            sweeps=len(hist["epochs"]),
            seconds=time.time() - t0,
            method="ste",
            extra=extra,
        )
