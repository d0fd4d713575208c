"""The paper's analyses of a matched pair of models.

- :func:`distances`: L2 distance before/after permutation and its reduction.
- :func:`svd_alignment`: spectra, alignment score ``R(gamma)``, per-index and cross alignment.
- :func:`inner_product_identity`: both sides of Theorem 4.1.
- :func:`input_projections`: mean ``|v_i . z|`` of layer inputs against singular-value rank.
- :func:`truncate_state`, :func:`rank_sweep`: rank-k truncation and accuracy against kept rank.
- :func:`taylor_midpoint`: second-order Taylor estimate of the midpoint barrier beside the measured one.
- :func:`analyze_pair`: all of it for one pair (``lmckit analyze``); :mod:`.plots` draws the figures.
"""

from .distance import distances
from .layers import Layer, layers_of, midpoint_state
from .pair import PairAnalysis, analyze_pair
from .projection import input_projections, projection_summary
from .rank import rank_sweep, truncate_state
from .svd import (
    DEFAULT_GAMMAS,
    LayerAlignment,
    SVDAlignment,
    alignment_tracker,
    cross_alignment,
    gamma_key,
    inner_product_identity,
    layer_svd,
    matrix_alignment,
    state_svds,
    svd_alignment,
)
from .taylor import taylor_midpoint

__all__ = [
    "distances",
    "Layer",
    "layers_of",
    "midpoint_state",
    "PairAnalysis",
    "analyze_pair",
    "input_projections",
    "projection_summary",
    "rank_sweep",
    "truncate_state",
    "DEFAULT_GAMMAS",
    "LayerAlignment",
    "SVDAlignment",
    "cross_alignment",
    "gamma_key",
    "inner_product_identity",
    "layer_svd",
    "matrix_alignment",
    "state_svds",
    "svd_alignment",
    "alignment_tracker",
    "taylor_midpoint",
]
