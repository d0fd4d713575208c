"""Evaluation of a model on a dataset split (mean cross-entropy and accuracy), and the BatchNorm
statistics reset that evaluation of a merged or interpolated network needs (Jordan et al. 2023,
"RESET"; see :mod:`lmckit.lmc.bn`). Both sit below matching, which scores candidates with them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .checks import check_device
from .data import Dataset
from .data.dataset import index_batches
from .errors import LmcError


@contextlib.contextmanager
def module_mode(*models: nn.Module, train: bool = False) -> Iterator[None]:
    """Put ``models`` in eval mode (``train=True``: train mode) for the ``with`` block, then restore
    every submodule's own mode.

    The one save-and-restore of train/eval modes (evaluation, BN reset, REPAIR statistics, activation
    statistics, projections, the Taylor estimate): modes come back even when the block raises, and
    per submodule, so a model whose BatchNorm layers alone were in train mode is left that way.
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train)
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    split: str = "test",
    *,
    batch_size: int = 2000,
    device: torch.device | str | None = None,
    limit: int | None = None,
    where: str | None = None,
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` (in eval mode) on ``split``.

    Per target: per image for classifiers; per token for language models (logits ``(B, V, T)``, targets
    ``(B, T)``), the loss then in nats per token (perplexity ``exp(loss)``) and the accuracy of the
    next-token prediction; per masked token for a masked language model evaluated on a
    :class:`MaskedLMDataset` (targets :data:`IGNORE_INDEX` at unmasked positions are skipped), the loss
    then the masked-LM loss in nats per masked token and the accuracy that of the masked-token prediction.

    A non-finite mean loss (NaN or inf: weights so large that the logits overflow float32, or a
    diverged model) raises :class:`NonFiniteLoss` naming ``where`` (which model, which lambda or grid
    point) and the split: every barrier, landscape, merge, rank and study evaluation goes through here,
    so a NaN never reaches a table, a JSON record or a report as if it were a number.

    The model's train/eval mode is restored afterwards. Batches are gathered
    from the split held on the device (:meth:`Dataset.on_device`); the sums
    stay on the device (float64 loss, int64 count) and are read once at the
    end, so there is no per-batch host synchronisation.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with module_mode(model):
        for x, y in dataset.batches(split, batch_size, device=device, limit=limit):
            out = model(x)
            # float32 batch sum, accumulated in float64 (the same rounding as the earlier Python-float sum);
            # targets equal to IGNORE_INDEX (a masked LM's unmasked positions) add nothing and are not counted
            loss_sum += F.cross_entropy(out, y, reduction="sum", ignore_index=IGNORE_INDEX).double()
            correct += (out.argmax(1) == y).sum()  # an argmax is never IGNORE_INDEX
            # one target per image, per token ((B, T) targets of a language model), or per masked token
            count += (y != IGNORE_INDEX).sum()
    n = int(count)
    loss = float(loss_sum) / max(n, 1)
    require_finite_loss(loss, where or "the model", split)
    return loss, int(correct) / max(n, 1)


#: target value of a position that is not scored (``F.cross_entropy``'s default ``ignore_index``)
IGNORE_INDEX = -100
#: share of each window's tokens a masked-LM evaluation masks (BERT's 15%, Devlin et al. 2019)
MLM_MASK_RATE = 0.15


def mask_tokens(
    tokens: torch.Tensor, mask_token_id: int, *, rate: float = MLM_MASK_RATE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``rate`` of each window's tokens, chosen by a seeded generator: ``(inputs, targets)``.

    Parameters
    ----------
    tokens:
        Token ids ``(N, T)`` (int64), one window per row.
    mask_token_id:
        The id every chosen position is replaced by (``[MASK]``); in ``[0, vocab)`` of the model.
    rate:
        Share of positions masked per window: exactly ``k = max(1, round(rate * T))`` positions per row.
    seed:
        Seed of the CPU generator that draws the positions; the same ``(tokens, seed)`` give the same mask on
        any device and for any batching.

    Returns
    -------
    tuple of torch.Tensor
        ``inputs`` ``(N, T)``: ``tokens`` with the chosen positions set to ``mask_token_id``; ``targets``
        ``(N, T)``: the original ids at the chosen positions, :data:`IGNORE_INDEX` elsewhere.

    Raises
    ------
    LmcError
        ``tokens`` not 2-D, ``rate`` outside ``(0, 1]`` or ``mask_token_id`` negative.

    Notes
    -----
    Every chosen position becomes ``[MASK]`` (not BERT's 80/10/10 training rule of Devlin et al. 2019, which
    also leaves 10% unchanged and replaces 10% by random tokens): the evaluation measures how well the model
    fills in masked tokens, with one fixed mask shared by every point of an interpolation path.
    """
    if tokens.dim() != 2:
        raise LmcError(f"masking needs token windows (N, T), got shape {tuple(tokens.shape)}")
    if not 0.0 < rate <= 1.0:
        raise LmcError(f"the mask rate must be in (0, 1], got {rate}")
    if mask_token_id < 0:
        raise LmcError(f"the mask token id must be a vocabulary id (>= 0), got {mask_token_id}")
    n, t = tokens.shape
    k = max(1, round(rate * t))
    gen = torch.Generator().manual_seed(int(seed))
    pos = torch.rand(n, t, generator=gen).argsort(dim=1)[:, :k].to(tokens.device)
    chosen = torch.zeros(n, t, dtype=torch.bool, device=tokens.device).scatter_(1, pos, True)
    inputs = tokens.masked_fill(chosen, int(mask_token_id))
    targets = tokens.masked_fill(~chosen, IGNORE_INDEX)
    return inputs, targets


class MaskedLMDataset:
    """A token dataset seen by a masked language model: inputs with 15% of each window masked, masked targets.

    Wraps a :class:`lmckit.data.text.TextDataset` (every other attribute is the wrapped one's): a window's
    inputs ``(T,)`` are its first ``T`` tokens with the positions of :func:`mask_tokens` set to
    ``mask_token_id``, and its targets the original tokens there, :data:`IGNORE_INDEX` elsewhere, so
    :func:`evaluate` returns the masked-LM loss in nats per masked token. The mask of a split is drawn once
    (seed ``seed``, independent of the other splits, the batch size and the device) and shared by every
    evaluation.
    """

    def __init__(self, dataset, mask_token_id: int, *, rate: float = MLM_MASK_RATE, seed: int = 0) -> None:
        if not hasattr(dataset, "context"):
            raise LmcError(
                f"a masked-LM loss needs a text dataset of token windows; {getattr(dataset, 'name', dataset)} "
                "is not one",
                "pass a text dataset (e.g. --dataset kjv-mini)",
            )
        if not 0 <= int(mask_token_id) < int(dataset.vocab_size):
            raise LmcError(
                f"mask token id {mask_token_id} is outside the vocabulary of dataset {dataset.name} "
                f"(0..{int(dataset.vocab_size) - 1})",
                "set mask_token_id in the model's config.json to an id of the vocabulary",
            )
        self.base = dataset
        self.mask_token_id = int(mask_token_id)
        self.rate = float(rate)
        self.seed = int(seed)
        self._masked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def masking(self) -> dict:
        """What was masked, for the JSON record: rate, rule, mask token id, seed."""
        return {"rate": self.rate, "rule": "[MASK]", "mask_token_id": self.mask_token_id, "seed": self.seed}

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._masked:
            tokens = self.base.tensors(split)[0]
            self._masked[split] = mask_tokens(tokens, self.mask_token_id, rate=self.rate, seed=self.seed)
        return self._masked[split]

    def tensors(
        self, split: str, device: torch.device | str = "cpu", limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs and targets ``(N, T)`` of the split (or its first ``limit`` windows) on ``device``."""
        x, y = self._split(split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return x.to(device), y.to(device)

    def on_device(self, split: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs and targets of the whole split on ``device``."""
        return self.tensors(split, device)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        limit: int | None = None,
        drop_last: bool = False,
        augment: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield masked ``(inputs, targets)`` batches ``(B, T)`` by index, as :meth:`TextDataset.batches` does."""
        if batch_size <= 0:
            raise LmcError(f"batch size must be positive, got {batch_size}")
        x_all, y_all = self.tensors(split, device)
        n = x_all.shape[0] if limit is None else min(limit, x_all.shape[0])
        for idx in index_batches(n, batch_size, shuffle, generator, x_all.device, drop_last):
            yield x_all[idx], y_all[idx]


class NonFiniteLoss(LmcError):
    """A loss that is NaN or infinite: the CLI exits 2 naming the model (and lambda); no NaN is printed."""


def require_finite_loss(loss: float, where: str, split: str = "") -> float:
    """Return ``loss``; raise :class:`NonFiniteLoss` naming ``where`` and ``split`` when it is NaN or inf."""
    if loss - loss != 0.0:
        on = f" on the {split} split" if split else ""
        raise NonFiniteLoss(
            f"{where}: the mean loss{on} is {loss} (not a finite number)",
            "the weights are so large that the logits overflow float32 (or the model diverged); "
            "check the checkpoint (lmckit check-spec) or use another one",
        )
    return loss


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (1d/2d/3d, SyncBatchNorm) that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics (what a BN reset recomputes).

    The one test for "is this a BatchNorm model" (BN reset, REPAIR, rank sweeps, merging).
    """
    return bool(batchnorm_layers(model))


def training_batches(
    dataset,
    num_batches: int = 10,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str = "cpu",
    split: str = "train",
) -> list[torch.Tensor]:
    """A fixed, seeded list of ``num_batches`` normalised input batches from ``split``.

    The same seed gives the same images, so every point of a curve (and both
    endpoints for REPAIR) sees the same data. Labels are not needed.
    """
    device = check_device(device)
    if num_batches < 1 or batch_size < 1:
        raise LmcError(
            f"BN reset / REPAIR needs num_batches >= 1 and batch_size >= 1 (got {num_batches}, {batch_size})"
        )
    gen = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    for x, _ in dataset.batches(split, batch_size, shuffle=True, generator=gen, device=device):
        out.append(x)
        if len(out) >= num_batches:
            break
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter of ``model`` (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module,
    dataset=None,
    *,
    num_batches: int = 10,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
    batches: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics of ``model`` in place.

    Parameters
    ----------
    model:
        The network (its BN buffers are overwritten; nothing else changes).
    dataset:
        A :class:`lmckit.data.Dataset`; ``num_batches`` seeded training batches
        of ``batch_size`` are drawn from it (see :func:`training_batches`).
        Not needed when ``batches`` is given.
    batches:
        Pre-drawn input batches (reuse them across the points of a curve).

    Notes
    -----
    Only the BN layers are put in train mode; every other module stays in
    eval mode (no dropout noise). Momentum and train/eval modes are restored
    afterwards. A model without BatchNorm is returned unchanged.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return model
    if batches is None:
        if dataset is None:
            raise LmcError("reset_bn_stats needs a dataset or pre-drawn batches")
        batches = training_batches(dataset, num_batches, batch_size, seed, device or model_device(model))
    momenta = [bn.momentum for bn in bns]
    try:
        with module_mode(model):
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for x in batches:
                model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
    return model
