"""Report pieces for the non-MLP recipes (issue 12 part 1: ``vit-fmnist``, ``lstm-fmnist``).

:mod:`lmckit.analysis.layers` reads a fused attention projection ``in_proj_weight`` as three
matrices ``W_Q, W_K, W_V`` (keys ``<module>.in_proj_weight:q|k|v``), ``out_proj`` as ``W_O``,
and the LSTM weights ``weight_ih_l<n>`` / ``weight_hh_l<n>`` as one matrix per gate
(``W_i, W_f, W_g, W_o``; keys ``lstm.weight_ih_l0:i`` ...). This module names those layer
kinds, averages R(gamma) per kind (docs/definitions.md, "Setting": ``R(gamma)`` of one weight matrix),
and describes the trained models' size beside the paper's (MLP 784-512x3-10, 5 epochs), so a
report can say when a model is too small for a claim to be expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from .labels import METHOD_LABEL
from .markdown import _table

__all__ = ["layer_kind", "layer_label", "kind_of_row", "r_by_kind", "model_sizes", "write_architectures"]

#: hidden units per layer of the paper's MLP (docs/definitions.md, "Setting")
PAPER_WIDTH = 512
_QKV = {"q": "W_Q", "k": "W_K", "v": "W_V"}
_RNN = re.compile(r"^(?P<mod>.*)\.weight_(?P<io>ih|hh)_l(?P<layer>\d+)(?:_reverse)?$")


def layer_kind(name: str) -> str:
    """The layer kind of an analysed matrix name, ``""`` for an ordinary linear or conv layer.

    Parameters
    ----------
    name: a key of ``R_per_layer`` / ``spectra`` (``blocks.0.attn.in_proj_weight:q``,
        ``blocks.0.attn.out_proj``, ``lstm.weight_hh_l0:f``, ``fc1``).

    Returns
    -------
    ``"W_Q"``, ``"W_K"``, ``"W_V"`` (rows of a fused attention projection, or the column blocks of
    GPT-2's transposed ``attn.c_attn``), ``"W_O"`` (an attention ``out_proj``, GPT-2's
    ``attn.c_proj``), ``"MLP in"`` / ``"MLP out"`` (GPT-2's ``mlp.c_fc`` / ``mlp.c_proj``),
    ``"W_i (input)"`` ... ``"W_o (hidden)"`` (an LSTM gate of the input
    weights ``weight_ih`` or the hidden weights ``weight_hh``), ``"W_<part>"`` for any other
    segmented weight, else ``""``.
    """
    base, _, part = name.partition(":")
    if part:
        if _is_fused_qkv(base) and part in _QKV:
            return _QKV[part]
        m = _RNN.match(base)
        if m:
            return f"W_{part} ({'input' if m['io'] == 'ih' else 'hidden'})"
        return f"W_{part}"
    if base == "out_proj" or base.endswith(".out_proj") or base.endswith("attn.c_proj"):
        return "W_O"
    if base.endswith("mlp.c_fc"):  # GPT-2's MLP (Hugging Face names)
        return "MLP in"
    if base.endswith("mlp.c_proj"):
        return "MLP out"
    return ""


def _is_fused_qkv(base: str) -> bool:
    """A fused Q, K, V projection: ``nn.MultiheadAttention``'s ``in_proj_weight``, GPT-2's ``attn.c_attn``."""
    return base.endswith("in_proj_weight") or base.endswith("attn.c_attn")


def layer_label(name: str) -> str:
    """A readable label: ``blocks.0.attn W_Q``, ``blocks.0.attn W_O``, ``lstm l0 W_f (hidden)``, ``fc1``.

    The top-level parameters (class token, positional table: module name ``""``) read
    ``(top-level parameters)``.
    """
    kind = layer_kind(name)
    base = name.partition(":")[0]
    if not kind:
        return name or "(top-level parameters)"
    m = _RNN.match(base)
    if m:
        return f"{m['mod']} l{m['layer']} {kind}"
    if _is_fused_qkv(base):
        return f"{base.rsplit('.', 1)[0]} {kind}" if "." in base else kind
    if kind == "W_O":
        return f"{base.rsplit('.', 1)[0]} W_O" if "." in base else "W_O"
    return f"{base} {kind}"


def kind_of_row(name: str) -> str:
    """The group a layer is averaged in by :func:`r_by_kind`: its kind, else its module's last name part.

    ``blocks.1.fc1`` -> ``fc1`` (the MLP's first layer in every block), ``patch`` -> ``patch``,
    ``blocks.0.attn.in_proj_weight:k`` -> ``W_K``.
    """
    kind = layer_kind(name)
    if kind:
        return kind
    return name.rsplit(".", 1)[-1] if name else "(top-level parameters)"


def has_kinds(exp: dict[str, Any]) -> bool:
    """Whether an experiment's analysed layers include attention or recurrent matrices."""
    names = set(exp.get("R_per_layer", {}))
    for t in exp.get("layers", []):
        names.update(r["layer"] for r in t["rows"])
    return any(layer_kind(n) for n in names)


def r_by_kind(exp: dict[str, Any]) -> list[dict[str, Any]]:
    """R(gamma) per layer kind and method: the mean over matrices of that kind and matched pairs.

    Parameters
    ----------
    exp: one entry of ``results["experiments"]`` (its ``layers`` tables: per pair and method, R per
        matrix, already the mean over that pair's WM searches).

    Returns
    -------
    ``[{"kind": kind, "matrices": n, "R": {gamma: {"before": x, method: x, ...}}}, ...]`` in network
    order (a list: results.json sorts mapping keys);
    ``before`` is R with no permutation (the same for every method), each method's value is R
    after its permutation. Only matrices with an R value enter.
    """
    acc: dict[str, dict[str, Any]] = {}
    for t in exp.get("layers", []):
        for row in t["rows"]:
            if "R" not in row:
                continue
            k = acc.setdefault(kind_of_row(row["layer"]), {"names": set(), "R": {}})
            k["names"].add(row["layer"])
            for g, v in row["R"].items():
                slot = k["R"].setdefault(g, {})
                slot.setdefault("before", {})[(tuple(t["pair"]), row["layer"])] = v["before"]
                slot.setdefault(t["method"], []).append(v["after"])
    out: list[dict[str, Any]] = []
    for kind, k in acc.items():
        r = {}
        for g, slot in k["R"].items():
            before = list(slot.pop("before").values())
            r[g] = {"before": sum(before) / len(before), **{m: sum(v) / len(v) for m, v in slot.items()}}
        out.append({"kind": kind, "matrices": len(k["names"]), "R": r})
    return out


def model_sizes(plan: Any, root: str | Path) -> list[dict[str, Any]]:
    """Size of each main experiment's trained model (the first seed's checkpoint).

    Returns one record per experiment: ``label``, ``parameters`` (trainable count), ``groups``
    (permutation group name -> units), ``widest`` (units of the largest group), ``heads``
    (attention module -> heads), ``epochs`` and ``model`` (name).
    """
    from ..checkpoint import build_model
    from ..perm import spec_for
    from ..pipeline.stages import stage_path
    from ..pipeline.tasks import load_trained

    root = Path(root)
    out = []
    for e in plan.experiments:
        t = next(iter(e.trains.values()))
        sd, model_cfg = load_trained(stage_path(root, t), root)
        model = build_model(model_cfg, sd, t.label())
        spec = spec_for(model)
        out.append(
            {
                "label": e.label,
                "model": str(model_cfg.get("name", "")),
                "parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                "groups": {g: int(n) for g, n in spec.sizes.items()},
                "widest": int(max(spec.sizes.values())) if spec.sizes else 0,
                "heads": {name: int(h) for name, (h, _) in spec.heads.items()},
                "epochs": int(t.train_config().epochs),
            }
        )
    return out


def architecture_summary(plan: Any, res: dict[str, Any], root: str | Path) -> list[dict[str, Any]] | None:
    """``results["architectures"]``: per experiment with attention/LSTM layers, its size and R per kind.

    ``None`` when no experiment has such layers (MLP and CNN recipes keep their results unchanged).
    """
    exps = res.get("experiments", [])
    if not any(has_kinds(e) for e in exps):
        return None
    sizes = model_sizes(plan, root)
    return [{**size, "R_by_kind": r_by_kind(e)} for size, e in zip(sizes, exps)]


def _size_sentence(a: dict[str, Any], exp: dict[str, Any]) -> str:
    """Whether the model is in the regime the paper's claims are stated for (width and training)."""
    accs = [m["test_accuracy"] for m in exp.get("models", [])]
    acc = f"; test accuracy {min(accs):.3f}-{max(accs):.3f}" if accs else ""
    text = (
        f"{a['label']}: {a['parameters']:,} parameters, permutation groups of "
        + _span(a["groups"])
        + " units"
        + (f", {len(a['heads'])} attention module(s) of {next(iter(a['heads'].values()))} heads" if a["heads"] else "")
        + f", trained {a['epochs']} epoch(s){acc}."
    )
    if a["widest"] < PAPER_WIDTH:
        text += (
            f" The paper's claims are stated for MLPs with {PAPER_WIDTH} units per layer; LMC after matching is "
            f"known to need width (the barrier falls as width grows; see the width sweep where this recipe has one), "
            f"so at {a['widest']} units a claim that did not hold is not expected to hold, and is no evidence "
            "against the claim at the paper's size."
        )
    return text


def write_architectures(res: dict[str, Any], fig: Callable[[str, str, str, Callable[[Path], Path]], None]) -> list[str]:
    """Markdown lines of the section "Layer kinds and model size" (empty for MLP/CNN results)."""
    arch = res.get("architectures")
    if not arch:
        return []
    md = ["", "## Layer kinds and model size", ""]
    md += [
        "Attention matrices W_Q, W_K, W_V (rows of the fused in_proj), W_O (out_proj) and LSTM gate matrices "
        "W_i, W_f, W_g, W_o of the input (weight_ih) and hidden (weight_hh) weights are analysed as their own "
        "layers (GPT-2: W_Q, W_K, W_V are the column blocks of the transposed fused c_attn, W_O is attn.c_proj, "
        "MLP in / out are mlp.c_fc / mlp.c_proj, wte the tied embedding and output layer, wpe the positions). "
        "R(gamma) per layer kind: mean over the matrices of that kind and the matched pairs "
        "(before: no permutation).",
    ]
    for a, e in zip(arch, res["experiments"]):
        md += ["", f"*{a['label']}*", "", _size_sentence(a, e), ""]
        rows = []
        for k in a["R_by_kind"]:
            cells: dict[str, Any] = {"layer kind": k["kind"], "matrices": k["matrices"]}
            for g, v in k["R"].items():
                cells[f"R({g}) before"] = f"{v['before']:.3f}"
                for m, x in v.items():
                    if m != "before":
                        cells[f"R({g}) {METHOD_LABEL.get(m, m)}"] = f"{x:.3f}"
            rows.append(cells)
        md += _table(rows)
    return md


def _span(groups: dict[str, int]) -> str:
    """``"8-16"`` (smallest-largest group size), ``"64"`` when all groups have one size."""
    if not groups:
        return "0"
    lo, hi = min(groups.values()), max(groups.values())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"
