"""Straight-through estimator (STE) permutation search.

The method (Ainsworth, Hayase and Srinivasa, "Git Re-Basin", 2023, Sec. 3.3;
restated in PAPER.md "Definitions") learns a dense copy ``theta~`` of model A
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
  - ``"git-re-basin"`` (the reference code of Ainsworth et al.; PAPER.md
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
  midpoint losses (JSON and a plot in ``state_dir``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LmcError
from ..perm import (
    Perms,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    perm_changed_units,
    spec_for,
    validate_perms,
)

STATE_FILE = "ste_state.safetensors"
DRIFT_JSON = "drift.json"
DRIFT_PLOT = "drift.png"
STATE_VERSION = 1


@dataclass(frozen=True)
class StePreset:
    """Optimiser settings of an STE run.

    Attributes
    ----------
    optimizer: ``"adam"`` or ``"sgd"``.
    lr: learning rate (constant; no schedule).
    batch_size: training batch size.
    epochs: default number of passes over the training split.
    momentum: SGD momentum (ignored by Adam).
    """

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0


#: Named presets. ``adam`` is the recipe of Ito et al. (Adam 1e-3, batch 256,
#: about 10 epochs); ``git-re-basin`` follows Ainsworth et al.'s STE runs (SGD
#: 1e-2 with momentum 0.9, batch 1000, long runs: 50 epochs here).
PRESETS: dict[str, StePreset] = {
    "adam": StePreset("adam", 1e-3, 256, 10),
    "git-re-basin": StePreset("sgd", 1e-2, 1000, 50, 0.9),
}

#: STE protocols (which permutation a run returns) and the optimiser preset each uses by default.
PROTOCOLS: dict[str, str] = {"heldout-best": "adam", "git-re-basin": "git-re-basin", "random-mixing": "adam"}


def check_protocol(protocol: str) -> str:
    """``protocol`` if it names an STE protocol (:data:`PROTOCOLS`), else :class:`LmcError`."""
    if protocol not in PROTOCOLS:
        import difflib

        close = difflib.get_close_matches(str(protocol), list(PROTOCOLS), n=1)
        raise LmcError(
            f"unknown STE protocol {protocol!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            f"choose one of {', '.join(PROTOCOLS)}",
        )
    return protocol


def resolve_preset(
    preset: str = "adam", epochs: int | None = None, lr: float | None = None, batch_size: int | None = None
) -> StePreset:
    """The preset ``preset`` with the given overrides; raises :class:`LmcError` on bad values."""
    if preset not in PRESETS:
        raise LmcError(f"unknown STE preset {preset!r}", f"choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    e = p.epochs if epochs is None else int(epochs)
    l_ = p.lr if lr is None else float(lr)
    b = p.batch_size if batch_size is None else int(batch_size)
    if e < 0:
        raise LmcError(f"STE epochs must be >= 0, got {e}")
    if not (l_ > 0 and math.isfinite(l_)):
        raise LmcError(f"STE learning rate must be a positive number, got {l_}")
    if b <= 0:
        raise LmcError(f"STE batch size must be positive, got {b}")
    return StePreset(p.optimizer, l_, b, e, p.momentum)


# --------------------------------------------------------------------------- helpers
def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def midpoint_state(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(sd_a + sd_b) / 2`` for floating entries; integer entries (``num_batches_tracked``) from ``sd_a``."""
    return {k: (0.5 * (v + sd_b[k].to(v.device)) if v.is_floating_point() else v.clone()) for k, v in sd_a.items()}


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


def _state_digest(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
) -> Perms:
    """``WM(theta~, theta_b)`` warm-started at ``init``.

    With a :class:`lmckit.match.projection.WarmProjector` for ``(spec, sd_b)``
    (``projector``, from :func:`lmckit.match.projection.ste_projector`) the same
    descent runs with state kept between steps (see that module for the exact
    and the approximate modes and their environment switches).
    """
    from .weight import weight_matching  # noqa: WPS433

    if projector is not None and init is not None:
        return projector(tilde_sd, init, seed)
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
        from torch.func import functional_call

        model.eval()
        tot = 0.0
        for s in range(0, int(self.y.shape[0]), self.batch_size):
            out = functional_call(model, dict(state), (self.x[s : s + self.batch_size],))
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
        Folder for the resumable state and the drift JSON/plot.
    progress:
        Show a progress bar with the current midpoint loss.
    heldout_size:
        Images in the held-out set that scores candidate permutations.
    wm_max_iter:
        Sweep limit of each warm-started projection.
    track_alignment:
        Compute R(0.3) of the current permutation every epoch.
    train_limit:
        Train on the first ``train_limit`` training images only (quick runs, tests).
    protocol:
        Which permutation is returned (module docstring): ``"heldout-best"``,
        ``"git-re-basin"`` or ``"random-mixing"``.

    Returns
    -------
    MatchResult
        ``method="ste"``; ``perms`` the returned permutation (B -> A).
        ``objective``: ``heldout-best``: the best held-out midpoint loss so far
        after each scored candidate (identity, plain WM, then one per epoch;
        non-increasing, its last value is the returned permutation's);
        ``git-re-basin``: the lowest minibatch midpoint loss seen by the end of
        each epoch; ``random-mixing``: the held-out midpoint loss of the
        end-of-epoch projection (the last is the returned permutation's).
        ``extra`` holds the protocol, the raw candidate losses, the drift
        history, the preset, the held-out set description and
        ``changed_vs_wm`` of the returned permutation.

    Raises
    ------
    LmcError
        Unknown protocol or preset, bad settings, a diverging run, or a state
        folder of another run.
    """
    from ..device import resolve_device
    from ..progress import Progress
    from .result import MatchResult  # noqa: WPS433

    t0 = time.time()
    dev = resolve_device(device if device is not None else "cpu")
    spec = spec if spec is not None else spec_for(model)
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    check_protocol(protocol)
    preset = PROTOCOLS[protocol] if preset is None else preset
    cfg = resolve_preset(preset, epochs, lr, batch_size)

    sd_a = {k: v.detach().to(dev) for k, v in sd_a.items()}
    sd_b = {k: v.detach().to(dev) for k, v in sd_b.items()}
    net = copy.deepcopy(model).to(dev)
    param_keys = [k for k, p in net.named_parameters() if p.is_floating_point()]
    missing = [k for k in param_keys if k not in sd_a]
    if missing:
        raise LmcError(
            f"the model's parameters {missing[:3]} are not in the state dicts",
            "pass state dicts of this model's architecture",
        )
    has_bn = _has_batchnorm(net)
    heldout = _HeldOut(dataset, seed, heldout_size, dev)

    bn_batches = None
    if has_bn:
        from ..lmc import reset_bn_stats, training_batches  # noqa: WPS433

        bn_batches = training_batches(dataset, seed=int(seed), device=dev)

    def score(perms: Perms) -> float:
        """Held-out loss of the midpoint (theta_a + pi(theta_b)) / 2 (after a BN reset)."""
        mid = midpoint_state(sd_a, apply_permutation(spec, perms, sd_b))
        if has_bn:
            net.load_state_dict(mid)
            reset_bn_stats(net, batches=bn_batches)
            mid = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return heldout.loss(net, mid)

    a_cpu = {k: v.cpu() for k, v in sd_a.items()}
    b_cpu = {k: v.cpu() for k, v in sd_b.items()}

    def r03(perms: Perms) -> float | None:
        if not track_alignment:
            return None
        from ..analysis.svd import gamma_key, svd_alignment  # noqa: WPS433

        return float(svd_alignment(spec, a_cpu, b_cpu, perms, gammas=(0.3,)).R[gamma_key(0.3)]["after"])

    # ---------------------------------------------------------------- state (fresh or resumed)
    fingerprint = {
        "version": STATE_VERSION,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "momentum": cfg.momentum,
        "seed": int(seed),
        "heldout_size": int(heldout_size),
        "wm_max_iter": int(wm_max_iter),
        "train_limit": train_limit,
        "a": _state_digest(sd_a),
        "b": _state_digest(sd_b),
        "dataset": getattr(dataset, "name", "?"),
        "protocol": protocol,
    }
    tilde = {k: sd_a[k].detach().clone().requires_grad_(True) for k in param_keys}
    opt = _make_optimizer(cfg, [tilde[k] for k in param_keys])
    gen = torch.Generator().manual_seed(int(seed))
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    resumed = state_path is not None and state_path.exists()
    if resumed:
        meta = _load_state(state_path, fingerprint, tilde, opt, gen, param_keys, spec)
        hist, cur, best, best_loss, start_epoch, pi_wm = meta
    else:
        pi_wm = _project(spec, sd_a, sd_b, None, _step_seed(seed, -1, 0), wm_max_iter, dev)
        ident = identity_permutation(spec)
        l_id, l_wm = score(ident), score(pi_wm)
        hist = {
            "candidates": [{"name": "identity", "heldout_loss": l_id}, {"name": "wm", "heldout_loss": l_wm}],
            "epochs": [],
            "initial": {
                "changed_vs_wm": 0.0,
                "tilde_dist": 0.0,
                "r03": r03(pi_wm),
                "heldout_loss": l_wm,
                "identity_heldout_loss": l_id,
            },
        }
        if protocol == "heldout-best":
            best, best_loss = (ident, l_id) if l_id <= l_wm else (pi_wm, l_wm)
        else:  # git-re-basin: filled by the first minibatch; random-mixing: the final projection
            best, best_loss = pi_wm, math.inf
            hist["candidates"] = []
        hist["minibatch_best"] = []
        cur = pi_wm
        start_epoch = 0
        if state_path is not None:
            _save_state(state_path, fingerprint, tilde, opt, gen, param_keys, hist, cur, best, best_loss, 0, pi_wm)

    # ---------------------------------------------------------------- training
    from torch.func import functional_call

    from .projection import ste_projector  # noqa: WPS433

    projector = ste_projector(spec, sd_b, wm_max_iter, dev)  # the per-step projections (see _project)
    if start_epoch > cfg.epochs:
        raise LmcError(
            f"the STE state in {state_dir} already holds {start_epoch} epochs, more than the {cfg.epochs} asked for",
            "ask for at least that many epochs, or use another state folder",
        )
    n_train = dataset.size("train") if train_limit is None else min(int(train_limit), dataset.size("train"))
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    a_norm = math.sqrt(sum(float(sd_a[k].double().pow(2).sum()) for k in param_keys))
    todo = max(0, cfg.epochs - start_epoch) * steps_per_epoch
    with Progress(todo if progress else 0, "ste") as bar:
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            loss_sum, n_seen = 0.0, 0
            for step, (x, y) in enumerate(
                dataset.batches("train", cfg.batch_size, shuffle=True, generator=gen, device=dev, limit=n_train)
            ):
                with torch.no_grad():
                    tilde_sd = dict(sd_a)
                    tilde_sd.update({k: tilde[k].detach() for k in param_keys})
                    cur = _project(
                        spec, tilde_sd, sd_b, cur, _step_seed(seed, epoch, step), wm_max_iter, dev, projector
                    )
                    pb = apply_permutation(spec, cur, sd_b)
                lam = 0.5
                if protocol == "random-mixing":  # one draw per step, seeded by the step (resumable)
                    lam = float(
                        torch.rand((), generator=torch.Generator().manual_seed(_step_seed(seed + 104729, epoch, step)))
                    )
                out = functional_call(net, ste_midpoint(sd_a, pb, tilde, lam), (x,))
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise LmcError(
                        f"STE diverged (midpoint loss {lv}) at epoch {epoch + 1}",
                        "lower the learning rate (--lr) or use the adam preset",
                    )
                if protocol == "git-re-basin" and lv < best_loss:  # the step's projection, by its minibatch loss
                    best, best_loss = cur, lv
                loss_sum += lv * int(y.shape[0])
                n_seen += int(y.shape[0])
                if progress:
                    bar.update(1, epoch=epoch + 1, mid_loss=lv)
            # end of epoch: project the updated theta~, score it, record drift
            with torch.no_grad():
                tilde_sd = dict(sd_a)
                tilde_sd.update({k: tilde[k].detach() for k in param_keys})
                cur = _project(
                    spec, tilde_sd, sd_b, cur, _step_seed(seed, epoch, steps_per_epoch), wm_max_iter, dev, projector
                )
                dist = math.sqrt(sum(float((tilde[k].detach() - sd_a[k]).double().pow(2).sum()) for k in param_keys))
            l_cur = score(cur)
            if protocol == "heldout-best":
                hist["candidates"].append({"name": f"epoch {epoch + 1}", "heldout_loss": l_cur})
                if l_cur < best_loss:
                    best, best_loss = cur, l_cur
            elif protocol == "random-mixing":
                best, best_loss = cur, l_cur
            hist.setdefault("minibatch_best", []).append(best_loss)
            rec = {
                "epoch": epoch + 1,
                "train_midpoint_loss": loss_sum / max(n_seen, 1),
                "heldout_loss": l_cur,
                # the kept permutation's selection loss so far (git-re-basin: a minibatch loss)
                "best_heldout_loss" if protocol != "git-re-basin" else "kept_minibatch_loss": best_loss,
                "changed_vs_wm": perm_changed_units(cur, pi_wm),
                "tilde_dist": dist,
                "tilde_rel_dist": dist / max(a_norm, 1e-12),
                "r03": r03(cur),
            }
            hist["epochs"].append(rec)
            if progress:
                bar.write(
                    f"[ste {protocol}] epoch {epoch + 1}/{cfg.epochs}: train mid loss "
                    f"{rec['train_midpoint_loss']:.4f}, held-out mid loss {l_cur:.4f} (kept {best_loss:.4f}), "
                    f"changed vs WM {rec['changed_vs_wm']:.3f}"
                )
            if state_path is not None:
                _save_state(
                    state_path, fingerprint, tilde, opt, gen, param_keys, hist, cur, best, best_loss, epoch + 1, pi_wm
                )

    drift = drift_history(hist)
    if protocol == "random-mixing" and not hist["epochs"]:  # no training: the final projection is plain WM's
        best, best_loss = pi_wm, hist["initial"]["heldout_loss"]
    kept_heldout = best_loss if protocol != "git-re-basin" else score(best)
    extra = {
        "protocol": protocol,
        "preset": preset,
        "settings": asdict(cfg),
        "heldout": heldout.source,
        "drift": drift,
        "candidates": hist["candidates"],
        "best_heldout_loss": kept_heldout,
        "kept_minibatch_loss": best_loss if protocol == "git-re-basin" else None,
        "changed_vs_wm": perm_changed_units(best, pi_wm),
        "wm_perms": pi_wm,
        "resumed": bool(resumed),
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
    else:
        objective = [float(r["heldout_loss"]) for r in hist["epochs"]] or [float(best_loss)]
    return MatchResult(
        perms={g: best[g].clone() for g in spec.sizes},
        objective=objective,
        sweeps=len(hist["epochs"]),
        seconds=time.time() - t0,
        method="ste",
        extra=extra,
    )


def _make_optimizer(cfg: StePreset, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


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
    from ..store import save_state

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
    from ..store import load_state

    tensors, meta = load_state(path)
    if meta.get("format") != "lmckit.ste_state":
        raise LmcError(f"{path} is not an lmckit STE state file", "use another state folder")
    # states written before train_limit / protocol existed
    old = {"train_limit": None, "protocol": "heldout-best", **(meta.get("fingerprint") or {})}
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
    """Write ``drift.json`` and ``drift.png`` (fraction changed vs WM, distance, R(0.3), losses)."""
    from ..store import atomic_write_json

    folder = Path(folder)
    atomic_write_json(folder / DRIFT_JSON, dict(drift))
    plot_drift(drift, folder / DRIFT_PLOT)


def plot_drift(drift: Mapping[str, Any], path: str | Path) -> Path:
    from ..plotting import pyplot, save_figure

    ep = drift["epoch"]
    fig, axes = pyplot().subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("changed_vs_wm", "units reassigned vs WM"),
        ("tilde_dist", "||theta~ - theta_a||"),
        ("r03", "R(0.3) of current pi"),
    ]
    for ax, (k, title) in zip(axes, panels):
        xs = [e for e, v in zip(ep, drift[k]) if v is not None]
        ys = [v for v in drift[k] if v is not None]
        ax.plot(xs, ys, marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
    ax = axes[3]
    for k, lab in (("train_midpoint_loss", "train (running)"), ("heldout_loss", "held-out")):
        xs = [e for e, v in zip(ep, drift[k]) if v is not None]
        ys = [v for v in drift[k] if v is not None]
        ax.plot(xs, ys, marker="o", label=lab)
    ax.axhline(drift["identity_heldout_loss"], color="gray", ls="--", label="identity (held-out)")
    ax.set_title("midpoint loss")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100, tight_layout=True)
