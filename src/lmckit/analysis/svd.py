"""Singular-value view of weight matching: spectra, alignment score R(gamma), per-index alignment.

Definitions (docs/definitions.md, "SVD view" and "Alignment score R(gamma)")
-----------------------------------------------------------------
Each layer ``W = sum_i sigma_i u_i v_i^T`` (singular values in decreasing
order). A permutation maps ``W_b`` to ``P W_b Q^T``, whose singular vectors
are ``P u^b_i`` and ``Q v^b_i``. With the *cross-alignment matrix*

    C_ij = (u^a_i . P u^b_j) (v^a_i . Q v^b_j) = (M_u * M_v)_ij,
    M_u = U_a^T P U_b,   M_v = V_a^T Q V_b,

and ``I_a = {i : sigma^a_i >= gamma sigma^a_max}`` (likewise ``I_b``, each
model on its own), a leading block since the spectrum is sorted,

    R_l(gamma) = sum_{i in I_a, j in I_b} C_ij,
    R(gamma)   = sum_l R_l(gamma) / sum_l min(|I_a|, |I_b|).

Per layer we also report ``R_l / min(|I_a|, |I_b|)`` (the same normalisation
applied to one layer). The *per-index alignment* is the diagonal ``C_ii``.

Choices documented here:

- Conv kernels are read as ``out x (in*k*k)``; ``Q`` acts on the column axis
  as ``Q ⊗ I_{k*k}``, applied by permuting the rows of ``V_b`` viewed as
  ``(in, k*k, r)`` (see :mod:`lmckit.analysis.layers`).
- Attention and recurrent layers: ``W_Q, W_K, W_V`` (the row blocks of a
  fused ``in_proj``/``qkv`` weight), ``W_O`` (``out_proj``) and the LSTM/GRU
  gate matrices (row blocks of ``weight_ih_l``/``weight_hh_l``) are layers,
  each ``P W Q^T`` with ``P`` the permutation of its rows (Q/K group, V/O
  group, hidden units; head-structured permutations included) and ``Q`` of
  its columns (the residual stream, the previous layer, the hidden units for
  ``weight_hh``). Block axes (concatenation, padding, flatten) use the
  composite permutation of the whole axis. The definition of ``R`` is
  otherwise unchanged.
- Each model's SVD is computed once (float64, on the CPU); "before" uses the
  identity, "after" permutes the rows of ``U_b`` and ``V_b``. This is exactly
  the SVD of ``P W_b Q^T`` and avoids the sign/ordering ambiguity of
  re-decomposing the permuted matrix.
- Sign ambiguity: flipping ``u_i`` and ``v_i`` together (the only freedom of an
  SVD with distinct singular values) flips row ``i`` of both ``M_u`` and
  ``M_v``, so ``C`` is unchanged. More generally ``R_l`` equals
  ``<U_a V_a^T, P U_b V_b^T Q^T>_F`` restricted to the kept indices, which is
  invariant to any rotation inside a degenerate singular subspace that the
  threshold does not split. Identical (permuted) weights with distinct
  singular values, after un-permuting, give ``C = I`` so ``R_l = |I_a|`` and
  ``R = 1``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..checks import as_perms, check_int, check_real
from ..errors import LmcError
from ..perm import PermutationSpec
from ..perm.spec import check_spec
from .layers import Layer, as_matrix, layer_weight, layers_of, perms_for, permute_kron_rows, permute_rows

DEFAULT_GAMMAS = (0.0, 0.3)


def gamma_key(gamma: float) -> str:
    """Canonical text form of a threshold, used as a JSON key: ``0.3 -> "0.3"``, ``0.0 -> "0"``."""
    return f"{float(gamma):g}"


def layer_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, sigma, V)`` of ``w`` read as a matrix, float64 on the CPU, ``W = U diag(sigma) V^T``.

    ``U`` is ``(out, r)``, ``V`` is ``(in*k*k, r)`` (singular vectors as
    columns), ``r = min(out, in*k*k)``, ``sigma`` decreasing.
    """
    if not isinstance(w, torch.Tensor) or w.dim() < 1 or not w.is_floating_point():
        raise LmcError(f"w must be a floating-point weight tensor, got {type(w).__name__}")
    if not bool(torch.isfinite(w).all()):
        raise LmcError("w has NaN/inf entries: no SVD of a non-finite matrix")
    m = as_matrix(w.detach().to("cpu", torch.float64))
    with single_thread():
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh.mT


@contextlib.contextmanager
def single_thread():
    """Run LAPACK's SVD on one thread: at layer sizes threads gain little, and on shared
    cores the multithreaded driver can slow down by 10-50x (measured: 0.2 s -> 11 s for
    512x784 with 2 threads on 2 busy cores)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


SVDs = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def state_svds(spec: PermutationSpec, sd: Mapping[str, torch.Tensor]) -> SVDs:
    """``{weight key: (U, sigma, V)}`` for every layer of ``sd`` (see :func:`layer_svd`); compute once, reuse."""
    check_spec(spec)
    spec.check_state(sd, "sd")
    return {layer.name: layer_svd(layer_weight(layer, sd)) for layer in layers_of(spec, sd)}


def kept_count(sigma: torch.Tensor, gamma: float) -> int:
    """``|{i : sigma_i >= gamma * sigma_max}|`` (the leading block of a sorted spectrum)."""
    if sigma.numel() == 0:
        return 0
    return int((sigma >= gamma * sigma.max()).sum())


def cross_alignment(
    u_a: torch.Tensor,
    v_a: torch.Tensor,
    u_b: torch.Tensor,
    v_b: torch.Tensor,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    kernel: int = 1,
) -> torch.Tensor:
    """``C = (U_a^T P U_b) * (V_a^T (Q ⊗ I_kernel) V_b)`` (elementwise product), shape ``(r_a, r_b)``."""
    m_u = u_a.mT @ permute_rows(u_b, p)
    m_v = v_a.mT @ permute_kron_rows(v_b, q, kernel)
    return m_u * m_v


def matrix_alignment(w_a: torch.Tensor, w_b: torch.Tensor, gamma: float = 0.0) -> tuple[float, int, int]:
    """``(R_l(gamma), |I_a|, |I_b|)`` for two matrices (or kernels) as given, with no permutation."""
    gamma = check_real(gamma, "gamma", 0.0, 1.0)
    if isinstance(w_a, torch.Tensor) and isinstance(w_b, torch.Tensor) and w_a.shape != w_b.shape:
        raise LmcError(f"w_a and w_b have shapes {tuple(w_a.shape)} and {tuple(w_b.shape)}; they must be equal")
    u_a, s_a, v_a = layer_svd(w_a)
    u_b, s_b, v_b = layer_svd(w_b)
    c = cross_alignment(u_a, v_a, u_b, v_b)
    ka, kb = kept_count(s_a, gamma), kept_count(s_b, gamma)
    return float(c[:ka, :kb].sum()), ka, kb


def inner_product_identity(w_a: torch.Tensor, w_b_permuted: torch.Tensor) -> tuple[float, float]:
    """Both sides of Theorem 4.1 for ``W_a`` and an (already permuted) ``P W_b Q^T``.

        <W_a, P W_b Q^T>_F = sum_{i,j} sigma^a_i sigma^b_j (u^a_i . P u^b_j)(v^a_i . Q v^b_j)

    Conv kernels are read as ``out x (in*k*k)``. Returns ``(lhs, rhs)`` in float64.
    """
    a = as_matrix(w_a.detach().to("cpu", torch.float64))
    b = as_matrix(w_b_permuted.detach().to("cpu", torch.float64))
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(w_a.shape)} vs {tuple(w_b_permuted.shape)}")
    lhs = float((a * b).sum())
    u_a, s_a, v_a = layer_svd(a)
    u_b, s_b, v_b = layer_svd(b)
    rhs = float((s_a[:, None] * s_b[None, :] * cross_alignment(u_a, v_a, u_b, v_b)).sum())
    return lhs, rhs


@dataclass
class LayerAlignment:
    """SVD analysis of one layer (see the module docstring for the definitions).

    ``kept[g] = (|I_a|, |I_b|)``; ``R_sum[g][when]`` is ``R_l`` and
    ``R[g][when]`` is ``R_l / min(|I_a|, |I_b|)``, ``when`` in before/after.
    ``per_index[when]`` is the diagonal ``C_ii`` (length r);
    ``cross[when]`` is the leading ``k x k`` block of ``C``.
    """

    layer: Layer
    sigma_a: torch.Tensor
    sigma_b: torch.Tensor
    kept: dict[str, tuple[int, int]]
    R_sum: dict[str, dict[str, float]]
    R: dict[str, dict[str, float]]
    per_index: dict[str, torch.Tensor]
    cross: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.layer.name,
            "key": self.layer.key,
            "shape": list(self.layer.shape),
            "output_layer": self.layer.is_output,
            "rank": self.layer.rank,
            "kept": {g: {"a": ka, "b": kb} for g, (ka, kb) in self.kept.items()},
            "R": self.R,
            "R_sum": self.R_sum,
        }


@dataclass
class SVDAlignment:
    """Result of :func:`svd_alignment`: totals ``R[g]["before"/"after"]`` and per-layer records."""

    gammas: tuple[float, ...]
    R: dict[str, dict[str, float]]
    layers: list[LayerAlignment]

    def summary(self, arrays: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``arrays=True`` adds spectra and per-index alignments per layer."""
        per = []
        for la in self.layers:
            d = la.summary()
            if arrays:
                d["sigma_a"] = _rounded(la.sigma_a)
                d["sigma_b"] = _rounded(la.sigma_b)
                d["per_index"] = {w: _rounded(v) for w, v in la.per_index.items()}
            per.append(d)
        return {"gammas": [gamma_key(g) for g in self.gammas], "R": self.R, "per_layer": per}


def _rounded(x: torch.Tensor, digits: int = 6) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in x.tolist()]


def svd_alignment(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor] | None = None,
    gammas: Iterable[float] = DEFAULT_GAMMAS,
    cross_k: int = 64,
    svds_a: SVDs | None = None,
    svds_b: SVDs | None = None,
    sd_b_after: Mapping[str, torch.Tensor] | None = None,
) -> SVDAlignment:
    """Spectra and alignment ``R(gamma)`` of every layer, before (identity) and after ``perms``.

    Parameters
    ----------
    spec: permutation spec of the architecture; layers are its ``*.weight`` entries with ndim >= 2.
    sd_a, sd_b: the two models' state dicts (``theta_b`` un-permuted; not modified).
    perms: permutation ``pi`` applied to ``theta_b`` for "after" (``None``: identity).
    gammas: thresholds ``gamma`` in [0, 1]; index ``i`` is kept when ``sigma_i >= gamma sigma_max``.
    cross_k: size of the leading block of ``C`` kept for plotting.
    svds_a, svds_b: precomputed :func:`state_svds` of the two models (optional).
    sd_b_after: ``theta_b`` already aligned (a transform of a larger symmetry class), used for "after"
        instead of ``perms`` (not both): its own SVDs give the "after" alignment, so an orthogonal map ``Q``
        enters as ``U_A^T Q U_B`` (docs/definitions.md, "R(gamma) under a transform"). The kept counts are
        B's (a map of the class keeps every singular value).

    Returns
    -------
    :class:`SVDAlignment` with totals ``R[gamma_key(g)] = {"before": R, "after": R}``.
    """
    check_spec(spec)
    spec.check_state(sd_a, "model A")
    spec.check_state(sd_b, "model B")
    if perms is not None:
        perms = as_perms(perms, "perms", spec.sizes)
    if sd_b_after is not None:
        if perms is not None:
            raise LmcError("svd_alignment: pass perms or sd_b_after, not both")
        spec.check_state(sd_b_after, "aligned model B")
    gammas = tuple(check_real(g, "gammas", 0.0, 1.0) for g in gammas)
    cross_k = check_int(cross_k, "cross_k", 1)
    keys = [gamma_key(g) for g in gammas]
    tot_sum = {k: {"before": 0.0, "after": 0.0} for k in keys}
    tot_min = {k: 0 for k in keys}
    out: list[LayerAlignment] = []
    for layer in layers_of(spec, sd_a):
        u_a, s_a, v_a = svds_a[layer.name] if svds_a is not None else layer_svd(layer_weight(layer, sd_a))
        u_b, s_b, v_b = svds_b[layer.name] if svds_b is not None else layer_svd(layer_weight(layer, sd_b))
        if sd_b_after is not None:
            u_t, _, v_t = layer_svd(layer_weight(layer, sd_b_after))
            after = cross_alignment(u_a, v_a, u_t, v_t)
        else:
            p, q = perms_for(layer, perms)
            after = cross_alignment(u_a, v_a, u_b, v_b, p, q, layer.kernel)
        c = {"before": cross_alignment(u_a, v_a, u_b, v_b), "after": after}
        kept, r_sum, r_norm = {}, {}, {}
        for g, k in zip(gammas, keys):
            ka, kb = kept_count(s_a, g), kept_count(s_b, g)
            kept[k] = (ka, kb)
            r_sum[k] = {w: float(c[w][:ka, :kb].sum()) for w in c}
            m = min(ka, kb)
            r_norm[k] = {w: (v / m if m else 0.0) for w, v in r_sum[k].items()}
            tot_min[k] += m
            for w in c:
                tot_sum[k][w] += r_sum[k][w]
        out.append(
            LayerAlignment(
                layer,
                s_a.float(),
                s_b.float(),
                kept,
                r_sum,
                r_norm,
                per_index={w: torch.diagonal(v).float() for w, v in c.items()},
                cross={w: v[:cross_k, :cross_k].float() for w, v in c.items()},
            )
        )
    totals = {k: {w: (tot_sum[k][w] / tot_min[k] if tot_min[k] else 0.0) for w in ("before", "after")} for k in keys}
    return SVDAlignment(gammas, totals, out)


def alignment_tracker(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    gamma: float = 0.3,
) -> Callable[[Mapping[str, torch.Tensor]], float]:
    """A function ``perms -> R(gamma)`` of model B permuted by ``perms`` against model A.

    The total alignment score ``R(gamma)`` of :func:`svd_alignment` (``"after"``; definition in
    docs/definitions.md), computed on CPU copies of the state dicts (taken at the first call).
    Matching methods that track it while they iterate (STE's drift record) take this function, since
    the analysis layer sits above matching: ``get_method("ste").match(..., alignment=alignment_tracker(
    spec, sd_a, sd_b))``. Returns a float in [-1, 1]; raises as :func:`svd_alignment` does.
    """
    key, cpu = gamma_key(gamma), {}

    def r(perms: Mapping[str, torch.Tensor]) -> float:
        if not cpu:
            cpu["a"] = {k: v.detach().cpu() for k, v in sd_a.items()}
            cpu["b"] = {k: v.detach().cpu() for k, v in sd_b.items()}
        return float(svd_alignment(spec, cpu["a"], cpu["b"], perms, gammas=(gamma,)).R[key]["after"])

    return r
