"""Tied tensors (one storage under two names) in the states passed to ``torch.func.functional_call``.

A language model ties its input embedding and its output layer (GPT-2: ``transformer.wte.weight`` and
``lm_head.weight``): ``model.state_dict()`` lists the tensor under both names, and ``functional_call``
refuses a mapping that gives both (``functional_call got multiple values for keys ... which are tied``)
while it ties them itself when one is given. :func:`drop_tied` keeps the first name of each tied set.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

__all__ = ["tied_names", "drop_tied"]


def tied_names(model: nn.Module) -> frozenset[str]:
    """The state-dict names of ``model`` that repeat an earlier name's tensor (same storage and shape).

    Parameters
    ----------
    model:
        Any module; a model without tied tensors gives the empty set.

    Returns
    -------
    frozenset of str
        The later names of each tied set (``{"lm_head.weight"}`` for GPT-2).
    """
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    out = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel() and seen.setdefault((v.data_ptr(), tuple(v.shape)), k) != k:
            out.add(k)
    return frozenset(out)


def drop_tied(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the names of :func:`tied_names` (a plain copy of the mapping when nothing is tied).

    Parameters
    ----------
    model:
        The module ``state`` will be called on.
    state:
        Name -> tensor, as ``model.state_dict()`` names them.

    Returns
    -------
    dict
        What ``torch.func.functional_call(model, ..., args)`` accepts; it ties the dropped names itself.
    """
    tied = tied_names(model)
    return {k: v for k, v in state.items() if k not in tied}
