"""Merging three or more models: align, average uniformly, measure (docs/definitions.md claim 6).

Given N models of one architecture with states ``theta_0 .. theta_{N-1}``:

1. *Align* them into one common unit order, by

   - ``anchor`` matching: ``pi_i = M(theta_0, theta_i)`` for every ``i > 0``
     with the two-model method ``M`` (weight matching, activation matching
     or STE), ``pi_0`` the identity; or
   - ``mergemany`` (weight matching only): match each model to the mean of
     the others until nothing changes (:func:`lmckit.match.merge_many`).

2. *Merge* by the uniform average ``theta_merged = (1/N) sum_i pi_i(theta_i)``
   (floating-point entries; integer buffers from model 0), followed by a
   BatchNorm reset on training data for models with BatchNorm (the
   averaged running statistics are meaningless, as on a linear path).

3. *Measure*: each model's loss/accuracy; the merged model's; the loss and
   accuracy barrier (as in :func:`lmckit.lmc.barrier_curve`) between every
   pair of aligned *non-anchor* models ``pi_i(theta_i)``, ``pi_j(theta_j)``
   (for MergeMany, every pair: there is no anchor), plus anchor-to-model
   barriers; and the *merged-accuracy curve*: loss and accuracy of the
   uniform average of the first ``n`` aligned models for ``n = 2 .. N``
   (:func:`merged_accuracy_curve`), for the alignment and for the naive
   (unaligned) average.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .analysis import alignment_tracker
from .checks import check_device, check_module, check_state
from .errors import LmcError
from .evaluate import evaluate
from .lmc import (
    Repairer,
    barrier_curve,
    check_compatible,
    has_batchnorm,
    mix_states,
    reset_bn_stats,
    resolve_bn_mode,
    training_batches,
)
from .match import anchor_matching, merge_many
from .match.registry import MethodOptions, check_scheme, get_method
from .perm import Perms, PermutationSpec, apply_permutation, spec_for

State = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------- input checks
def _options(method: str, options: MethodOptions | Mapping[str, Any] | None) -> MethodOptions:
    """``options`` as the registry method's validated options (defaults for None)."""
    m = get_method(method)
    if isinstance(options, m.options_type):
        return options
    if isinstance(options, MethodOptions):
        raise LmcError(f"method {method!r} takes {m.options_type.__name__}, got {type(options).__name__}")
    return m.options(options)


def check_merge_inputs(
    model: nn.Module,
    states: Sequence[State],
    dataset,
    method: str = "weight",
    multi: str = "anchor",
    split: str = "test",
    bn_reset: str | bool = "auto",
    options: MethodOptions | Mapping[str, Any] | None = None,
) -> PermutationSpec:
    """Validate everything :func:`merge_models` needs, before any work or any file is written.

    Checks the method (a name of :mod:`lmckit.match.registry`) and that it
    supports the multi-model scheme, its options, that there are at least two
    states of one architecture matching the model's permutation spec, that the
    dataset has the evaluation ``split`` (and a ``train`` split where the
    method or a BatchNorm reset needs training data). Raises
    :class:`~lmckit.errors.LmcError`; returns the spec.
    """
    m = check_scheme(method, multi)
    opts = _options(method, options)
    check_module(model)
    if isinstance(states, (str, bytes, dict)) or not isinstance(states, Sequence):
        raise LmcError(f"states must be a list of state dicts, got {type(states).__name__}")
    if len(states) < 2:
        raise LmcError(f"merging needs at least two models, got {len(states)}")
    if bn_reset not in ("auto", "on", "off", "repair", True, False):
        raise LmcError(f"bn_reset must be auto, on, off or repair, got {bn_reset!r}")
    check_compatible(list(states), [f"model {i}" for i in range(len(states))])
    spec = spec_for(model)
    for i, sd in enumerate(states):
        spec.check_state(sd, f"model {i}")
    if dataset is None:
        raise LmcError("merging needs a dataset to evaluate on")
    dataset.size(split)
    needs_train = m.requires_data(opts) or (
        bn_reset in ("on", "repair", True) or (bn_reset == "auto" and has_batchnorm(model))
    )
    if needs_train:
        dataset.size("train")
    return spec


# --------------------------------------------------------------------------- alignment
def align_models(
    model: nn.Module,
    states: Sequence[State],
    method: str = "weight",
    multi: str = "anchor",
    dataset=None,
    spec: PermutationSpec | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    options: MethodOptions | Mapping[str, Any] | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    passes: int = 100,
):
    """Bring all ``states`` into the unit order of ``states[0]``.

    Parameters
    ----------
    model:
        A module of the architecture (a template; not modified).
    states:
        N >= 2 state dicts (not modified).
    method:
        A two-model method of the registry (``lmckit methods``), used against the anchor.
    multi:
        ``anchor`` (match each model to model 0) or ``mergemany`` (the methods whose registry
        entry supports it: weight matching).
    dataset:
        Needed by the methods that read data (activation matching, STE, ...).
    options:
        The method's options (:class:`~lmckit.match.registry.MethodOptions` or a mapping; None: defaults).
        For MergeMany, the weight-matching options of every inner matching (``max_iter``: its sweeps).
    state_dir:
        For a method with a resumable state (STE): model ``i``'s state goes to
        ``state_dir/model_i`` (default: the ``state_dir`` option, if set).
    passes:
        MergeMany's maximum passes over the models.

    Returns
    -------
    MultiMatchResult
        ``perms[i]`` puts model ``i`` in model 0's order (identity for model 0).

    Raises
    ------
    LmcError
        Unknown method or scheme, a method without the scheme, bad options, missing data.
    """
    m = check_scheme(method, multi)
    opts = _options(method, options)
    check_module(model)
    if isinstance(states, (str, bytes, dict)) or not isinstance(states, Sequence):
        raise LmcError(f"states must be a list of state dicts, got {type(states).__name__}")
    if len(states) < 2:
        raise LmcError(f"merging needs at least two models, got {len(states)}")
    spec = spec if spec is not None else spec_for(model)
    if multi == "mergemany":
        wm_iter = getattr(opts, "max_iter", 100)  # the inner weight matchings' sweeps
        return merge_many(spec, states, seed=seed, max_iter=passes, wm_max_iter=wm_iter, device=device)
    if m.requires_data(opts) and dataset is None:
        raise LmcError(f"{method} matching needs a dataset")
    base = state_dir if state_dir is not None else getattr(opts, "state_dir", None)
    resumable = "state_dir" in {f.name for f in dataclasses.fields(opts)}

    def matcher(i, sd_ref, sd_i):
        o = opts
        if resumable and base is not None:
            o = dataclasses.replace(opts, state_dir=str(Path(base) / f"model_{i}"))
        return m.match(
            spec,
            sd_ref,
            sd_i,
            model=model,
            dataset=dataset,
            options=o,
            seed=seed,
            device=device,
            progress=progress,
            alignment=alignment_tracker(spec, sd_ref, sd_i),
        )

    return anchor_matching(spec, states, anchor=0, method=method, matcher=matcher)


def align_models_sym(
    model: nn.Module,
    states: Sequence[State],
    symmetry: str,
    method: str = "weight",
    multi: str = "anchor",
    spec: PermutationSpec | None = None,
    seed: int = 0,
    options: MethodOptions | Mapping[str, Any] | None = None,
    progress: bool = True,
    passes: int = 100,
):
    """Fold every model's norms and align them to model 0 under ``symmetry`` (weight matching only).

    :func:`lmckit.match.symmetric_many.match_many_sym` (anchor or MergeMany over transforms). Returns
    ``(SymMultiResult, aligned states)``: the aligned folded states in each entry's original dtype.
    ``options``: weight matching's (``max_iter``: sweeps of each matching; ``lmckit merge --symmetry``
    uses 1000 unless ``--max-iter`` says otherwise: orthogonal descent needs hundreds of sweeps).

    Raises
    ------
    LmcError
        A method other than weight matching (activation matching under a class: ``lmckit match
        --symmetry``, two models), or what ``match_many_sym`` refuses.
    """
    from .match.symmetric_many import match_many_sym
    from .perm.symmetry import fold_states

    if method != "weight":
        raise LmcError(
            f"merging under --symmetry {symmetry} uses weight matching (anchor or MergeMany), not {method}",
            "use --method weight (activation matching under a class: lmckit match A B --symmetry ...)",
        )
    opts = _options(method, options)
    spec = spec if spec is not None else spec_for(model)
    template, folded, _ = fold_states(model, states)
    max_iter = getattr(opts, "max_iter", 100)
    res = match_many_sym(spec, folded, symmetry, template, multi, seed, max_iter, passes, progress=progress)
    aligned = [{k: v.to(states[0][k].dtype) for k, v in sd.items()} for sd in res.aligned]
    return res, aligned


def aligned_states(
    spec: PermutationSpec, states: Sequence[State], perms: Sequence[Mapping[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """``[pi_i(theta_i)]`` as new state dicts."""
    if len(perms) != len(states):
        raise LmcError(f"{len(perms)} permutations for {len(states)} models")
    return [apply_permutation(spec, p, sd) for p, sd in zip(perms, states)]


# --------------------------------------------------------------------------- averaging and evaluation
def average_states(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Uniform average ``(1/N) sum_i theta_i`` of floating entries; integer entries from ``states[0]``."""

    n = len(states)
    if n == 0:
        raise LmcError("no state dicts to average")
    return mix_states(states, [1.0 / n] * n, require_affine=False)


def _workspace(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device)


def merged_state(
    model: nn.Module,
    states: Sequence[State],
    dataset=None,
    bn_reset: str | bool = "auto",
    device: torch.device | str | None = None,
    seed: int = 0,
    bn_batches: int = 10,
    bn_batch_size: int = 500,
) -> dict[str, torch.Tensor]:
    """The uniform average of ``states``, with BatchNorm statistics recomputed on training data.

    ``bn_reset``: ``auto`` (reset when the model has BatchNorm), ``on``, ``off``, or ``repair``: REPAIR
    (Jordan et al. 2023) with the ``n`` models as endpoints and weights ``1/n`` each, i.e. every hidden unit
    of the average rescaled to the mean of the models' activation means and standard deviations
    (:class:`lmckit.lmc.Repairer`; an :class:`LmcError` names what is missing when the model has no place
    to fold the correction). Both use the fixed seeded batches of :func:`lmckit.lmc.training_batches`.
    """

    dev = torch.device(device) if device is not None else torch.device("cpu")
    avg = average_states(states)
    mode = resolve_bn_mode(model, bn_reset)
    if mode == "repair":
        if dataset is None:
            raise LmcError("REPAIR of the merged model needs the training data")
        net = _workspace(model, dev)
        ends = [{k: v.detach().to(dev, copy=True) for k, v in sd.items()} for sd in states]
        rep = Repairer(net, ends, training_batches(dataset, bn_batches, bn_batch_size, seed, dev))
        fixed = rep({k: v.to(dev) for k, v in avg.items()}, [1.0 / len(states)] * len(states))
        return {k: v.detach().to("cpu").clone() for k, v in fixed.items()}
    if mode is not True:
        return avg
    if dataset is None:
        raise LmcError("resetting BatchNorm statistics of the merged model needs the training data")
    net = _workspace(model, dev)
    net.load_state_dict({k: v.to(dev) for k, v in avg.items()})
    reset_bn_stats(net, batches=training_batches(dataset, bn_batches, bn_batch_size, seed, dev))
    return {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}


def evaluate_state(
    model: nn.Module,
    state: State,
    dataset,
    split: str = "test",
    device: torch.device | str | None = None,
    limit: int | None = None,
    batch_size: int = 2000,
    where: str = "the merged model",
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` with weights ``state`` (eval mode, state used as given).

    Raises :class:`~lmckit.evaluate.NonFiniteLoss` naming ``where`` when the loss is NaN or inf.
    """

    dev = check_device(device) if device is not None else torch.device("cpu")
    check_module(model)
    check_state(state, where)
    net = _workspace(model, dev)
    net.load_state_dict({k: v.to(dev) for k, v in state.items()})
    return evaluate(net, dataset, split, batch_size=batch_size, device=dev, limit=limit, where=where)


def merged_accuracy_curve(
    model: nn.Module,
    states: Sequence[State],
    dataset,
    split: str = "test",
    bn_reset: str | bool = "auto",
    device: torch.device | str | None = None,
    seed: int = 0,
    limit: int | None = None,
    start: int = 2,
    bn_batches: int = 10,
) -> list[dict[str, float]]:
    """Loss and accuracy of the uniform average of the first ``n`` states, ``n = start .. N``.

    .. math:: \\theta^{(n)} = \\frac1n \\sum_{i<n} \\theta_i

    Pass aligned states (``pi_i(theta_i)``) for a method's curve and the raw
    states for the naive one. Each average of two or more states gets a BN
    reset on ``bn_batches`` training batches as in :func:`merged_state`
    (``n = 1`` is the first model as it is).

    Returns
    -------
    list of ``{"n": n, "loss": ..., "accuracy": ...}``.
    """
    if len(states) < start:
        raise LmcError(f"the merged-accuracy curve needs at least {start} models, got {len(states)}")
    out = []
    for n in range(start, len(states) + 1):
        st = merged_state(model, states[:n], dataset, bn_reset, device, seed, bn_batches) if n > 1 else states[0]
        where = f"the merge of the first {n} models" if n > 1 else "model 0"
        loss, acc = evaluate_state(model, st, dataset, split, device, limit, where=where)
        out.append({"n": n, "loss": loss, "accuracy": acc})
    return out


def pairwise_barriers(
    model: nn.Module,
    states: Sequence[State],
    dataset,
    pairs: Sequence[tuple[int, int]],
    split: str = "test",
    points: int = 25,
    bn_reset: str | bool = "auto",
    device: torch.device | str | None = None,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Loss and accuracy barrier on ``split`` along the linear path between ``states[i]`` and ``states[j]``.

    Returns ``[{"models": [i, j], "loss_barrier", "accuracy_barrier", "midpoint_loss", "midpoint_accuracy"}]``.
    """

    dev = torch.device(device) if device is not None else torch.device("cpu")
    net = _workspace(model, dev)
    out = []
    for i, j in pairs:
        res = barrier_curve(
            net,
            states[i],
            states[j],
            dataset,
            splits=(split,),
            points=points,
            bn_reset=bn_reset,
            device=dev,
            seed=seed,
            limit=limit,
            progress=f"barrier {i}-{j}" if progress else False,
            names=(f"model {i}", f"model {j}"),
        )
        c = res[split]
        out.append(
            {
                "models": [int(i), int(j)],
                "loss_barrier": c.loss_barrier,
                "accuracy_barrier": c.accuracy_barrier,
                "midpoint_loss": c.midpoint_loss,
                "midpoint_accuracy": c.midpoint_accuracy,
            }
        )
    return out


# --------------------------------------------------------------------------- the whole merge
@dataclass
class MergeResult:
    """Outcome of :func:`merge_models` (see the module docstring)."""

    method: str
    multi: str
    perms: list[Perms]
    merged: dict[str, torch.Tensor]
    split: str
    model_metrics: list[dict[str, float]]
    merged_loss: float
    merged_accuracy: float
    pairwise_barriers: list[dict[str, Any]]
    anchor_barriers: list[dict[str, Any]]
    curve: dict[str, list[dict[str, float]]]
    seconds: float
    match: Any = field(repr=False, default=None)
    symmetry: str = "permutation"

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.symmetry != "permutation":  # default output unchanged
            extra = {"symmetry": self.symmetry, "parameterisation": "folded"}
        return {
            **extra,
            "method": self.method,
            "multi": self.multi,
            "split": self.split,
            "num_models": len(self.perms),
            "model_accuracies": [m["accuracy"] for m in self.model_metrics],
            "model_losses": [m["loss"] for m in self.model_metrics],
            "merged_accuracy": self.merged_accuracy,
            "merged_loss": self.merged_loss,
            "pairwise_barriers": self.pairwise_barriers,
            "anchor_barriers": self.anchor_barriers,
            "merged_accuracy_curve": self.curve,
            "seconds": self.seconds,
            "match": None if self.match is None else self.match.to_dict(),
        }


def merge_models(
    model: nn.Module,
    states: Sequence[State],
    dataset,
    method: str = "weight",
    multi: str = "anchor",
    split: str = "test",
    points: int = 25,
    bn_reset: str | bool = "auto",
    seed: int = 0,
    device: torch.device | str | None = None,
    curve: bool = True,
    limit: int | None = None,
    options: MethodOptions | Mapping[str, Any] | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    passes: int = 100,
    symmetry: str = "permutation",
) -> MergeResult:
    """Align ``states`` (:func:`align_models`), average them, and measure everything (module docstring).

    ``split``/``limit`` choose the evaluation data; ``points`` the lambda grid of
    the barriers; ``curve`` adds the merged-accuracy curves for this method
    and for the naive average. ``symmetry``: ``"signed"`` or ``"orthogonal"`` align with
    :func:`align_models_sym` instead (weight matching, anchor or MergeMany, on folded models); then
    ``perms`` holds each model's transform, and the barriers, the merged model and its curve are on the
    folded parameterisation (the naive curve stays on the raw weights).
    """
    t0 = time.time()
    spec = check_merge_inputs(model, states, dataset, method, multi, split, bn_reset, options)
    if symmetry != "permutation":
        res, aligned = align_models_sym(model, states, symmetry, method, multi, spec, seed, options, progress, passes)
        maps = res.transforms
    else:
        res = align_models(
            model, states, method, multi, dataset, spec, seed, device, options, state_dir, progress, passes
        )
        aligned = aligned_states(spec, states, res.perms)
        maps = res.perms
    metrics = []
    for i, sd in enumerate(states):
        loss, acc = evaluate_state(model, sd, dataset, split, device, limit, where=f"model {i}")
        metrics.append({"loss": loss, "accuracy": acc})
    merged = merged_state(model, aligned, dataset, bn_reset, device, seed)
    m_loss, m_acc = evaluate_state(model, merged, dataset, split, device, limit)
    n = len(states)
    if multi == "anchor":
        pairs = [(i, j) for i in range(1, n) for j in range(i + 1, n)]
        anchor_pairs = [(0, i) for i in range(1, n)]
    else:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        anchor_pairs = []
    kw = dict(split=split, points=points, bn_reset=bn_reset, device=device, seed=seed, limit=limit, progress=progress)
    pb = pairwise_barriers(model, aligned, dataset, pairs, **kw)
    ab = pairwise_barriers(model, aligned, dataset, anchor_pairs, **kw)
    curves: dict[str, list[dict[str, float]]] = {}
    if curve:
        label = method if multi == "anchor" else "mergemany"
        curves[label] = merged_accuracy_curve(model, aligned, dataset, split, bn_reset, device, seed, limit)
        curves["naive"] = merged_accuracy_curve(model, list(states), dataset, split, bn_reset, device, seed, limit)
    return MergeResult(
        method,
        multi,
        [dict(p) for p in maps],
        merged,
        split,
        metrics,
        m_loss,
        m_acc,
        pb,
        ab,
        curves,
        time.time() - t0,
        res,
        symmetry,
    )


# --------------------------------------------------------------------------- plot
def draw_merged_accuracy(
    ax: Any,
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    model_accuracies: Sequence[float] | None = None,
    split: str = "test",
    labels: bool = True,
) -> None:
    """The merged-accuracy panel: accuracy of the uniform average against the number of merged models.

    Drawn onto ``ax`` for ``lmckit merge --plot`` (:func:`plot_merged_accuracy`) and the report's
    three-model figure alike. ``curves`` maps a label (``weight``, ``ste``, ``naive``, ...) to the output of
    :func:`merged_accuracy_curve`; ``styles`` optional line keywords per label; ``model_accuracies`` draws
    the mean accuracy of the individual models as a reference line; ``labels=False`` leaves the lines
    unlabelled (when another panel of the figure carries the legend).
    """
    from .plotting import integer_ticks

    for label, rows in curves.items():
        kw = dict((styles or {}).get(label, {}))
        if labels:
            kw["label"] = label
        ax.plot([r["n"] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3, **kw)
    if model_accuracies:
        mean = sum(model_accuracies) / len(model_accuracies)
        ax.axhline(mean, color="gray", ls="--", label="mean single model" if labels else None)
    ax.set_xlabel("number of averaged models n")
    ax.set_ylabel(f"{split} accuracy of the average (fraction)")
    ax.set_title("Merged model accuracy", fontsize=9)
    integer_ticks(ax)


def plot_merged_accuracy(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str | None = None,
    model_accuracies: Sequence[float] | None = None,
    split: str = "test",
) -> Path:
    """Accuracy of the uniform average against the number of merged models, one line per curve
    (:func:`draw_merged_accuracy`), legend below the panel."""
    from .plotting import pyplot, save_with_legend

    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    draw_merged_accuracy(ax, curves, model_accuracies=model_accuracies, split=split)
    if title:
        ax.set_title(title, fontsize=9)
    return save_with_legend(fig, Path(path), [ax], dpi=100)
