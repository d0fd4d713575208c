"""Symmetry classes beyond permutations: signed permutations, orthogonal and invertible maps.

A permutation spec says which axes of which state-dict entries a group's units
occupy. A network's function is often invariant under more than permutations
of those units (Theus et al., "Generalized Linear Mode Connectivity for
Transformers", arXiv 2506.22712, NeurIPS 2025; docs/definitions.md derives
every case below). This module adds, per group,

- the *class* of maps applied to its units, one of :data:`CLASSES` in
  increasing size: ``"permutation"`` (``P``), ``"signed"`` (``D P``, ``D``
  diagonal of +-1), ``"orthogonal"`` (``Q^T Q = I``; under a LayerNorm only
  those with ``Q 1 = 1``) and ``"invertible"`` (any ``M`` with ``det M != 0``);
- the largest class the group admits, derived from the ops its units pass
  through (``spec.ops``, filled by the zoo rules and the fx tracer), and the op
  that limits it (a LayerNorm, a GELU, an LSTM ...), so a refusal names it;
- one interface per class: :func:`sample`, :func:`apply_transform` (a matrix
  applied along every axis the group moves), :func:`invert_transform`,
  :func:`compose_transforms` and the exact weight-matching step :func:`step`
  (``argmax_M tr(M^T C)`` over the class: LAP, sign choice, orthogonal
  Procrustes, restricted Procrustes on the ones-complement).

Convention
----------
A transform is a dict ``group -> tensor``: a LongTensor index ``p`` for a
group whose class is ``"permutation"`` (the fast path of
:mod:`lmckit.perm.spec`, unchanged) and an ``n x n`` float64 matrix ``M``
otherwise. ``M`` acts like the permutation matrix ``P[i, p[i]] = 1``: an axis
that *writes* the units (a weight's rows, a bias, a class token) becomes
``M W`` (new unit ``i`` is ``sum_j M[i, j]`` old unit ``j``); an axis that
*reads* them (a Linear weight's columns) becomes ``W M^{-1}``, which is
``W M^T`` for the orthogonal and signed classes (so for them the two kinds of
axes need not be told apart). Norm gains and biases on a transformed stream are
not transformed: the orthogonal classes require them folded away
(:func:`fold_norms`: gain 1, bias 0, invariant under the class), the signed
class moves them by the permutation part ``|M|`` (a gain commutes with signs).
Under a head structure (``spec.heads``) a group's matrix is block-structured:
``M[block i, block h(i)] = A_i`` with one head permutation ``h`` shared by the
structure's groups and one ``d x d`` map ``A_i`` of the class per head.

Code
----
The classes and their derivation are :mod:`lmckit.perm.symmetry_classes`, the transforms (sample, apply,
invert, compose, files) :mod:`lmckit.perm.symmetry_transforms`, the exact matching steps
:mod:`lmckit.perm.symmetry_solve` and norm folding :mod:`lmckit.perm.symmetry_fold`; every public name is
importable from here.
"""

from __future__ import annotations

from .symmetry_classes import CLASSES, GroupSymmetry, Transform, derive_symmetry, is_linear_label, refusal
from .symmetry_fold import fold_norms, fold_states
from .symmetry_solve import head_step, procrustes, step
from .symmetry_transforms import (
    TRANSFORM_FORMAT,
    apply_transform,
    compose_transforms,
    head_matrix,
    identity_transform,
    invert_transform,
    is_permutation_transform,
    load_transform,
    log_condition,
    ones_complement,
    perm_matrix,
    random_transform,
    sample,
    save_transform,
    transform_matrix,
)

__all__ = [
    "CLASSES",
    "GroupSymmetry",
    "derive_symmetry",
    "sample",
    "random_transform",
    "identity_transform",
    "apply_transform",
    "invert_transform",
    "compose_transforms",
    "transform_matrix",
    "step",
    "head_step",
    "fold_norms",
    "fold_states",
    "is_permutation_transform",
    "is_linear_label",
    "refusal",
    "Transform",
    "perm_matrix",
    "head_matrix",
    "ones_complement",
    "procrustes",
    "log_condition",
    "TRANSFORM_FORMAT",
    "save_transform",
    "load_transform",
]
