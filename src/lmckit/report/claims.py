"""The paper's claims as the report quotes them, and the published values printed beside lmckit's.

Statements restate the claims of Ito, Yamada and Kumagai, "Analysis of Linear Mode Connectivity via
Permutation-Based Weight Matching" (arXiv 2402.04051, ICLR 2025) as listed in ``docs/definitions.md``
("Claims"); the criteria by which each is judged live next to the judging code
(:func:`lmckit.report.results.judge_claims`). Published values come from the same document's
"Published values" section; where the paper gives no number for a setting, none is printed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLAIMS", "paper_value"]

#: claim id -> (short title, the claim as stated in docs/definitions.md)
CLAIMS: dict[str, tuple[str, str]] = {
    "1": (
        "WM gives LMC without closing the distance",
        "Weight matching gives linear mode connectivity (a loss barrier near 0 for wide enough models) while "
        "reducing the L2 distance between the models by only about 6-20%: distance reduction is not why LMC holds.",
    ),
    "2": (
        "A Taylor argument does not explain LMC",
        "The second-order Taylor estimate of the midpoint barrier, -(1/8) Delta^T H Delta with "
        "Delta = theta_a - pi(theta_b) and H the loss Hessian at the midpoint, differs clearly from the measured "
        "barrier: the models are not close enough for a local argument to explain LMC.",
    ),
    "3": (
        "WM aligns the dominant singular vectors",
        "Singular values of corresponding layers are nearly equal across seeds, and WM raises the alignment "
        "score R much more at gamma = 0.3 than at gamma = 0: it aligns the dominant singular vectors.",
    ),
    "4": (
        "The dominant directions carry the function",
        "Layer inputs concentrate on the top right-singular vectors, and keeping only the dominant singular "
        "directions of each hidden layer keeps most of the accuracy.",
    ),
    "5a": ("AM behaves like WM", "Activation matching behaves like weight matching on R and on the distance."),
    "5b": (
        "STE reaches LMC with R near 0",
        "The straight-through estimator reaches LMC between two models but leaves R near 0.",
    ),
    "6": (
        "WM merges three models better than STE",
        "With three models matched to one anchor, the barrier between pi_b(theta_b) and pi_c(theta_c) is "
        "smaller with WM, which aligns every model to the same dominant directions, than with STE.",
    ),
    "width": (
        "Wider models are more linearly connected",
        "Claim 1's 'for wide enough models': after WM the barrier falls as the width grows.",
    ),
}

_TABLE1 = "Ito et al., Table 1 (as quoted by secondary sources; docs/definitions.md, 'Published values')"
_R_SRC = "Ito et al., reported for VGG-11 and ResNet-20 on CIFAR-10 (docs/definitions.md, 'Published values')"
#: (dataset, model name prefix) -> WM distance reduction published for that setting
_REDUCTION = {
    ("fashion-mnist", "mlp"): 0.179,
    ("mnist", "mlp"): 0.203,
    ("cifar10", "vgg"): 0.066,
    ("cifar10", "resnet"): 0.070,
}


def paper_value(claim: str, dataset: str, model: str) -> dict[str, Any] | None:
    """The published number (or qualitative finding) for ``claim`` in this setting, with its source; else None.

    Returns ``{"text": ..., "source": ...}`` and, when numeric, ``"value"`` (a fraction) and ``"quantity"``.
    """
    if claim == "1":
        for (ds, prefix), v in _REDUCTION.items():
            if dataset == ds and model.startswith(prefix):
                return {
                    "quantity": "WM L2 distance reduction",
                    "value": v,
                    "text": f"WM distance reduction {100 * v:.1f}% ({model.split()[0]}, {dataset})",
                    "source": _TABLE1,
                }
        return {"text": "WM distance reduction 6.6-20.3% across VGG-11, ResNet-20 and MLPs", "source": _TABLE1}
    if claim == "3":
        return {
            "quantity": "R(0.3) after WM",
            "value": 0.2,
            "text": "R(0.3) about 0.2 after WM, near 0 before (VGG-11, ResNet-20; no MLP value given)",
            "source": _R_SRC,
        }
    if claim == "5b":
        return {
            "text": "STE's R stays near 0 while its two-model barrier is low (qualitative)",
            "source": "Ito et al., Section on other permutation search methods (docs/definitions.md)",
        }
    if claim == "6":
        return {
            "text": "three-model barrier smaller with WM than with STE (a reviewer called the difference small)",
            "source": "Ito et al. and its ICLR 2025 review (docs/definitions.md)",
        }
    return None
