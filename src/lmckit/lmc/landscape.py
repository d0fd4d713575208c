"""Loss landscape on the plane through three models.

Flatten the floating-point entries of the three (aligned) state dicts into
vectors a, b, c. Gram-Schmidt gives an orthonormal basis of the plane

    e1 = (b - a) / |b - a|,   e2 = (c - a - <c - a, e1> e1) / |...|

and plane coordinates ``(x, y) -> a + x e1 + y e2``; the models sit at
``A = (0, 0)``, ``B = (|b - a|, 0)``, ``C = (<c - a, e1>, <c - a, e2>)``.
Every plane point is the affine combination ``w_a a + w_b b + w_c c`` with
barycentric weights (``w_a + w_b + w_c = 1``; all >= 0 inside the triangle,
some negative beyond it), which is how it is built (:func:`mix_states`), so
float buffers (BN statistics) are mixed alike and then optionally reset.
The grid spans the models' bounding box widened by ``margin`` times its
extent on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..checks import check_device, check_int, check_module
from ..errors import LmcError
from ..evaluate import evaluate
from ..limits import MAX_GRID
from ..progress import NullProgress, Progress
from .barrier import check_model_fits, resolve_bn_mode
from .bn import Repairer, reset_bn_stats, training_batches
from .interpolate import check_compatible, copy_state, float_keys, mix_states, state_vector


@dataclass
class PlaneBasis:
    """Orthonormal basis of the plane through three flattened models."""

    e1: torch.Tensor
    e2: torch.Tensor
    coords: list[tuple[float, float]]  # plane coordinates of the three models
    norm_ab: float

    def weights(self, x: float, y: float) -> tuple[float, float, float]:
        """Barycentric weights ``(w_a, w_b, w_c)`` of the plane point ``(x, y)``.

        Solves ``x e1 + y e2 = alpha (b - a) + beta (c - a)``:
        ``beta = y / c_y``, ``alpha = (x - beta c_x) / |b - a|``.
        """
        cx, cy = self.coords[2]
        beta = y / cy
        alpha = (x - beta * cx) / self.norm_ab
        return 1.0 - alpha - beta, alpha, beta


def plane_basis(
    sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], sd_c: Mapping[str, torch.Tensor]
) -> PlaneBasis:
    """Gram-Schmidt basis of span{b - a, c - a} in flattened float-entry space (float64)."""
    keys = float_keys(sd_a)
    a, b, c = (state_vector(s, keys) for s in (sd_a, sd_b, sd_c))
    u, v = b - a, c - a
    nab = float(u.norm())
    if nab == 0.0:
        raise LmcError(
            "models A and B are identical; the plane through the three models is undefined",
            "pass three different models",
        )
    e1 = u / nab
    cx = float(v @ e1)
    w = v - cx * e1
    cy = float(w.norm())
    if cy <= 1e-5 * max(nab, float(v.norm())):  # float32 round-off leaves ~1e-7
        raise LmcError("the three models are (nearly) collinear; they span no plane", "pass three different models")
    e2 = w / cy
    return PlaneBasis(e1, e2, [(0.0, 0.0), (nab, 0.0), (cx, cy)], nab)


@dataclass
class LandscapeResult:
    """Loss and accuracy on a grid over the plane of three models.

    ``loss[i][j]`` and ``accuracy[i][j]`` are at ``(xs[j], ys[i])``;
    ``weights[i][j]`` the barycentric weights of that point.
    """

    xs: list[float]
    ys: list[float]
    loss: list[list[float]]
    accuracy: list[list[float]]
    weights: list[list[tuple[float, float, float]]]
    models: dict[str, tuple[float, float]]
    split: str
    bn_reset: bool | str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "xs": self.xs,
            "ys": self.ys,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "weights": [[list(w) for w in row] for row in self.weights],
            "models": {k: list(v) for k, v in self.models.items()},
            "split": self.split,
            "bn_reset": self.bn_reset,
            **self.info,
        }


def _axis(lo: float, hi: float, margin: float, n: int) -> list[float]:
    span = hi - lo
    lo, hi = lo - margin * span, hi + margin * span
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def plane_landscape(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    sd_c: Mapping[str, torch.Tensor],
    dataset,
    grid: int = 11,
    margin: float = 0.2,
    split: str = "test",
    bn_reset: str | bool = "auto",
    *,
    labels: Sequence[str] = ("A", "B", "C"),
    batch_size: int = 2000,
    limit: int | None = None,
    device: torch.device | str | None = None,
    bn_batches: int = 10,
    bn_batch_size: int = 500,
    seed: int = 0,
    progress: bool | str = True,
) -> LandscapeResult:
    """Evaluate loss and accuracy on a ``grid x grid`` lattice of the plane through three models.

    Parameters
    ----------
    model:
        Workspace module of the architecture (restored afterwards).
    sd_a, sd_b, sd_c:
        The three state dicts, aligned to one another (e.g. B and C matched to A).
    grid:
        Points per axis (>= 2).
    margin:
        How far beyond the models' bounding box the grid reaches, as a
        fraction of the box's extent on each axis.
    split, bn_reset, batch_size, limit, device, bn_batches, bn_batch_size, seed:
        As in :func:`lmckit.lmc.barrier_curve`. BN reset is applied at every
        grid point; REPAIR at every point that is not exactly one of the three
        models, with target statistics the barycentric mixture of the three
        models' statistics.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, float)) or int(grid) != grid or grid < 2:
        raise LmcError(f"grid must be an integer >= 2 (got {grid!r})")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (margin >= 0 and math.isfinite(margin)):
        raise LmcError(f"margin must be a finite number >= 0 (got {margin!r})")
    grid = check_int(int(grid), "grid", 2, MAX_GRID)
    check_module(model)
    device = next(model.parameters()).device if device is None else check_device(device)
    if limit is not None:
        limit = check_int(limit, "limit", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    dataset.size(split)
    check_compatible([sd_a, sd_b, sd_c], [f"model {label}" for label in labels])
    check_model_fits(model, dataset, split, device)
    mode = resolve_bn_mode(model, bn_reset)
    states = [{k: v.detach().to(device, copy=True) for k, v in s.items()} for s in (sd_a, sd_b, sd_c)]
    basis = plane_basis(*states)
    mx = [c[0] for c in basis.coords]
    my = [c[1] for c in basis.coords]
    xs = _axis(min(mx), max(mx), margin, grid)
    ys = _axis(min(my), max(my), margin, grid)

    saved = copy_state(model.state_dict())
    home = next(model.parameters()).device
    model.to(device)
    loss = [[0.0] * grid for _ in ys]
    acc = [[0.0] * grid for _ in ys]
    wts: list[list[tuple[float, float, float]]] = [[(0.0, 0.0, 0.0)] * grid for _ in ys]
    try:
        batches = training_batches(dataset, bn_batches, bn_batch_size, seed, device) if mode is not False else None
        repairer = Repairer(model, states, batches) if mode == "repair" else None
        desc = progress if isinstance(progress, str) else "landscape"
        with Progress(grid * grid, desc) if progress else NullProgress() as bar:
            for i, y in enumerate(ys):
                for j, x in enumerate(xs):
                    w = basis.weights(x, y)
                    wts[i][j] = w
                    state = mix_states(states, w)
                    is_model = any(wi == 1.0 for wi in w) and sum(wi == 0.0 for wi in w) == 2
                    if repairer is not None and not is_model:
                        state = repairer(state, w)
                    model.load_state_dict(state)
                    if mode is True:
                        reset_bn_stats(model, batches=batches)
                    loss[i][j], acc[i][j] = evaluate(
                        model,
                        dataset,
                        split,
                        batch_size=batch_size,
                        device=device,
                        limit=limit,
                        where=f"the landscape point (x={x:g}, y={y:g}) = "
                        + " + ".join(f"{wi:g} x model {lab}" for wi, lab in zip(w, labels)),
                    )
                    bar.update(1, loss=loss[i][j])
    finally:
        model.load_state_dict(saved)
        model.to(home)
    models = {lab: basis.coords[k] for k, lab in enumerate(labels)}
    return LandscapeResult(xs, ys, loss, acc, wts, models, split, mode)
