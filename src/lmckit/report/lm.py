"""Report pieces for language-model recipes (issue 26, ``gpt2-text``): nats per token and perplexity.

On a token dataset (:data:`lmckit.data.text.TEXT_DATASETS`) every loss of a report is the mean next-token
cross-entropy in nats per token and every accuracy the next-token accuracy (docs/definitions.md,
"Barriers", language models). :func:`add_lm_units` records that in ``results.json`` (``units``) and adds
perplexities beside the losses; :func:`write_lm` writes the report section "Language model: nats per token
and perplexity". Perplexity is ``exp(loss)``; the *perplexity barrier factor* ``exp(loss barrier)`` is how
many times the worst point's perplexity exceeds the geometric interpolation of the endpoints'.
"""

from __future__ import annotations

import math
from typing import Any

from .labels import METHOD_LABEL
from .markdown import _pm, _table
from .stats import stats

__all__ = ["is_language_model", "add_lm_units", "write_lm", "LM_UNITS"]

#: ``results["units"]`` of a language-model recipe
LM_UNITS = {
    "loss": "nats per token (mean next-token cross-entropy over every target token)",
    "perplexity": "exp(loss)",
    "perplexity_barrier_factor": "exp(loss barrier)",
    "accuracy": "next-token accuracy (fraction of target tokens predicted by the argmax)",
    "evaluation_items": "windows of tokens (evaluation sizes count windows, not tokens)",
}


def is_language_model(res: dict[str, Any]) -> bool:
    """Whether the results' recipe ran on a token dataset (its losses are per token)."""
    from ..data.text import TEXT_DATASETS

    ds = res.get("recipe", {}).get("data", {}).get("dataset")
    return isinstance(ds, str) and ds in TEXT_DATASETS


def _exp_stats(s: dict[str, Any] | None) -> dict[str, Any] | None:
    """exp of every value of an aggregate (``stats`` of the exponentiated values), or None."""
    if not s or not s.get("values"):
        return None
    return stats([math.exp(min(v, 700.0)) for v in s["values"]], s.get("over"))


def _method_ppl(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sp, b in d.get("barrier", {}).items():
        row: dict[str, Any] = {}
        f = _exp_stats(b.get("loss_barrier"))
        if f is not None:
            row["barrier_factor"] = f
        mid = _exp_stats(b.get("midpoint_loss"))
        if mid is not None:
            row["midpoint"] = mid
        curve = d.get("curves", {}).get(sp, {}).get("loss_mean")
        if curve:
            row["endpoints"] = [math.exp(curve[0]), math.exp(curve[-1])]
        if row:
            out[sp] = row
    return out


def add_lm_units(res: dict[str, Any]) -> None:
    """For a language-model recipe: ``res["units"]`` and perplexities beside the losses (in place).

    Adds ``perplexity`` to every method of every experiment and width-sweep entry
    (per split: ``barrier_factor`` and ``midpoint`` aggregates over the pairs, ``endpoints`` from the mean
    curve), ``test_perplexity`` / ``train_perplexity`` to every trained model, and
    ``pair_perplexity_barrier_factor`` to every three-model method. Nothing changes for other recipes.
    """
    if not is_language_model(res):
        return
    res["units"] = dict(LM_UNITS)
    for e in list(res.get("experiments", [])) + list(res.get("width_sweep", [])):
        for d in e.get("methods", {}).values():
            d["perplexity"] = _method_ppl(d)
        for m in e.get("models", []):
            for sp in ("train", "test"):
                if f"{sp}_loss" in m:
                    m[f"{sp}_perplexity"] = math.exp(m[f"{sp}_loss"])
    for d in (res.get("three_models") or {}).values():
        if isinstance(d, dict) and "pair_loss_barrier" in d:
            d["pair_perplexity_barrier_factor"] = math.exp(d["pair_loss_barrier"])


def write_lm(res: dict[str, Any]) -> list[str]:
    """Markdown lines of the section "Language model: nats per token and perplexity" (empty otherwise)."""
    if not is_language_model(res):
        return []

    md = [
        "",
        "## Language model: nats per token and perplexity",
        "",
        "Losses in this report are next-token cross-entropy in **nats per token** (mean over every target "
        "token of the evaluated windows); accuracies are next-token accuracies. Perplexity = exp(loss); the "
        "perplexity barrier factor exp(loss barrier) is how many times the worst point's perplexity exceeds "
        "the geometric interpolation of the endpoints' perplexities (1 = no barrier).",
    ]
    for e in res.get("experiments", []):
        models = e.get("models", [])
        if models:
            md += ["", f"*{e['label']}*: trained models' test perplexity "]
            md[-1] += ", ".join(f"{math.exp(m['test_loss']):.2f} (seed {m['seed']})" for m in models) + "."
        rows = []
        for meth, d in e.get("methods", {}).items():
            for sp, b in d.get("barrier", {}).items():
                p = d.get("perplexity", {}).get(sp, {})
                ends = p.get("endpoints")
                rows.append(
                    {
                        "method": METHOD_LABEL.get(meth, meth),
                        "split": sp,
                        "loss barrier (nats/token)": _pm(b.get("loss_barrier"), "{:.4f}"),
                        "perplexity barrier factor": _pm(p.get("barrier_factor"), "{:.3f}"),
                        "perplexity A, B": f"{ends[0]:.2f}, {ends[1]:.2f}" if ends else "-",
                        "midpoint perplexity": _pm(p.get("midpoint"), "{:.2f}"),
                    }
                )
        md += [""] + _table(rows) if rows else []
    ws = res.get("width_sweep") or []
    rows = []
    for w in ws:
        for meth, d in w.get("methods", {}).items():
            b = d.get("barrier", {}).get("test")
            if not b:
                continue
            p = d.get("perplexity", {}).get("test", {})
            rows.append(
                {
                    "width": f"x{w.get('width_mult', 1):g}",
                    "method": METHOD_LABEL.get(meth, meth),
                    "test loss barrier (nats/token)": _pm(b.get("loss_barrier"), "{:.4f}"),
                    "perplexity barrier factor": _pm(p.get("barrier_factor"), "{:.3f}"),
                    "midpoint perplexity": _pm(p.get("midpoint"), "{:.2f}"),
                }
            )
    if rows:
        md += ["", "Width sweep (test split):", ""] + _table(rows)
    three = res.get("three_models") or {}
    rows = [
        {
            "method": METHOD_LABEL.get(k, k),
            f"{d.get('split', 'test')} loss barrier between the two matched models (nats/token)": (
                f"{d['pair_loss_barrier']:.4f}"
            ),
            "perplexity barrier factor": f"{math.exp(d['pair_loss_barrier']):.3f}",
        }
        for k, d in three.items()
        if isinstance(d, dict) and "pair_loss_barrier" in d
    ]
    if rows:
        md += ["", "Three models (1 and 2 matched to the anchor 0):", ""] + _table(rows)
    return md
