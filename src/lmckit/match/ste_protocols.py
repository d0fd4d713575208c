"""The STE protocols' names, default optimiser presets and one-line descriptions, without torch.

The method registry (:mod:`lmckit.match.registry`), the recipe schema and the CLI list the
protocols from here (``lmckit methods``, ``[match.ste] protocol``, ``--option protocol=...``,
``--ste-protocol``), so a protocol is added in one place; the algorithm is
:mod:`lmckit.match.ste`.
"""

from __future__ import annotations

#: STE protocols (which permutation a run returns, which loss it trains on) and the optimiser
#: preset each uses by default (:data:`lmckit.match.ste.PRESETS`).
#:
#: ``ste-mm-random`` and ``ste-mm-midpoint`` are the STE of Ito, Yamada and Kumagai's own code
#: (github e5-a/STE-MM, ``srcs/search/mult/ste.py``, function ``ste``, with ``mid: False`` /
#: ``mid: True``); their defaults are that repository's ``configs/rebasin/method/ste.yaml``
#: (Adam, learning rate 1e-3, 10 epochs, batch 256), which is the ``adam`` preset.
PROTOCOLS: dict[str, str] = {
    "heldout-best": "adam",
    "git-re-basin": "git-re-basin",
    "random-mixing": "adam",
    "ste-mm-random": "adam",
    "ste-mm-midpoint": "adam",
}

#: The protocols taken from the STE-MM authors' code (the returned permutation is the last
#: training step's projection; see :mod:`lmckit.match.ste`).
STE_MM_PROTOCOLS: tuple[str, ...] = ("ste-mm-random", "ste-mm-midpoint")

#: One line per protocol, for help texts and listings.
DESCRIPTIONS: dict[str, str] = {
    "heldout-best": "loss at the midpoint; keeps the best on a held-out set (identity and WM as candidates)",
    "git-re-basin": "loss at the midpoint; keeps the lowest minibatch midpoint loss (SGD 1e-2, momentum 0.9)",
    "random-mixing": "loss at (1 - l) A + l B with l ~ U(0, 1); returns the end-of-training projection",
    "ste-mm-random": "Ito et al.'s code (mid: False): loss at weights rand(2) / sum; returns the last step's "
    "projection",
    "ste-mm-midpoint": "Ito et al.'s code (mid: True): loss at the midpoint; returns the last step's projection",
}
