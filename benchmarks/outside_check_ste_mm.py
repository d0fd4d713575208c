"""Outside check of issue 30: the STE-MM authors' own ``ste`` on lmckit's ``paper`` models, against lmckit's protocols.

The reference is the public code of Ito, Yamada and Kumagai ("Linear Mode Connectivity between Multiple
Models modulo Permutation Symmetries", ICML 2024), github e5-a/STE-MM: ``srcs/search/mult/ste.py``,
function ``ste`` (``mid=False`` is lmckit's protocol ``ste-mm-random``, ``mid=True`` is
``ste-mm-midpoint``), with their weight matching (``srcs/search/weight_matching_uv.py`` when ``fast_wm``
is true, as in their ``configs/rebasin/rebasin.yaml``; it needs their C++ extension ``lap_uv``, which must
be built and importable from ``<ref>/srcs``), their MLP (``srcs/networks/mlp.py``) and their seeding
(``srcs/utils/seed.py``, ``fix_randomseed``). Their code is imported and called unchanged; this script
only feeds it models and data and measures what it returns.

Run in an environment that has the authors' imports (torch, torchopt, optree, scipy, numpy, tqdm,
torchviz, graphviz; see docs/results.md, "Outside check: the authors' code")::

    PYTHONPATH=src OMP_NUM_THREADS=1 /work/outside/venv/bin/python benchmarks/outside_check_ste_mm.py \\
        --ref /work/outside/STE-MM --pairs 3 --protocol both

What it does, per disjoint pair (seed 2k, seed 2k+1) of the ``paper`` recipe's first model entry (MLP
784-512x3-10, preprocess ``scale01``, keep_epoch ``best-test``), read from the recipe's cache folder:

1. loads both models with :func:`lmckit.checkpoint.load_checkpoint`, maps the parameter names
   (lmckit ``fcI.*`` to the authors' ``layerI.*``) into the authors' ``Net``, and checks the outputs equal
   lmckit's model on a batch of test images;
2. calls ``fix_randomseed(seed)`` (``--seed``, the authors' default 1) and then
   ``ste(model_a, [model_b], train_loader, None, lr, epochs, mid, "cpu", [1, 28, 28], fast_wm)`` with
   the budget of lmckit's ``[studies.ste_protocols]``: ``--epochs 1`` over the first ``--train-limit
   10000`` training images, their batch 256 in a shuffled ``DataLoader`` (their ``DataModule``), Adam
   lr 1e-3, images only scaled to [0, 1] (``ToTensor``'s ``x / 255``);
3. reads the returned permutation (``wms[0].perm``; its groups ``P_k`` are mapped to lmckit's ``P0..``
   through the permutation spec's axes) and checks that applying it with lmckit's
   :func:`lmckit.perm.apply_permutation` gives exactly the authors' returned permuted model;
4. measures it with lmckit's stage code, exactly as the recipe's barrier and analysis stages do
   (:func:`lmckit.lmc.barrier_curve` on the test split's first 2000 images at 11 lambdas, BN batches 10;
   :func:`lmckit.analysis.analyze_pair` for R(0.3)): the test-loss barrier, the uniform merge's test loss
   and accuracy (lambda 0.5), R(0.3), the fraction of units assigned differently from lmckit's
   permutation of the same protocol and pair, and the fraction differing from lmckit's WM permutation;
5. measures lmckit's own permutations of the same protocol and pair (the cached match stages) with the
   same code, and checks that the barrier and R(0.3) equal the ones in ``--results`` (the recipe's
   ``results.json``, ``studies.ste_protocols``): the two sides are evaluated identically.

Context, outside the verdict: the authors' code run again with ``--spread-seed`` (its run-to-run spread
of the permutation and the barrier), lmckit's two protocols against each other, the authors' plain WM
(their solver from the identity) against lmckit's WM stage, and the units each side's STE moved away
from its own starting projection (a WM: the authors' first ``fit`` in ``ste``, recorded by a subclass of
their WM class that calls their ``fit`` unchanged and copies the result; lmckit's ``pi_wm`` from the
stage's ``ste/ste_state.safetensors``).

Verdict rule (fixed before any number was seen)
-----------------------------------------------
For each protocol and each metric m in {test-loss barrier, merged test loss, R(0.3), fraction of units
differing from lmckit's WM}: let mean_A, std_A be the mean and the sample standard deviation (ddof 1)
of m over the pairs for the authors' code, and mean_L, std_L the same for lmckit's protocol on the same
pairs. m agrees when ``|mean_A - mean_L| <= max(std_A, std_L)``. A protocol agrees when every metric
agrees; otherwise the verdict names the metrics that do not. With a single pair there is no spread and
the verdict is "undetermined". The rule is applied as written; nothing is tuned after the run.

Writes ``<out>.txt`` (the table and verdicts, as printed) and ``<out>.json`` (every per-pair number,
timings, load averages, settings). Exit status 0 when it ran (whatever the verdict), 2 with one line on
bad input (missing reference code, cache or results).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"ste-mm-random": False, "ste-mm-midpoint": True}  # lmckit protocol -> the authors' ``mid``
METRICS = (
    ("loss_barrier", "test-loss barrier"),
    ("merged_loss", "merged test loss"),
    ("R03", "R(0.3)"),
    ("changed_vs_wm", "units != lmckit WM"),
)
_FC = re.compile(r"^fc(\d+)\.(weight|bias)$")
_LAYER = re.compile(r"^layer(\d+)\.(weight|bias)$")


class CheckError(Exception):
    """Bad input or a failed consistency check: the script prints one line and exits 2."""


# --------------------------------------------------------------------------- parameter names
def lmckit_to_authors(state: Mapping[str, Any]) -> dict[str, Any]:
    """lmckit MLP state (``fcI.weight``, ``fcI.bias``) -> the authors' ``Net`` state (``layerI.*``).

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        An lmckit ``mlp`` state dict without normalisation layers (``norm="none"``).

    Returns
    -------
    dict
        The same tensors (not copied) under the authors' names.

    Raises
    ------
    CheckError
        A key that is not ``fcI.weight`` or ``fcI.bias`` (e.g. a model with norms).
    """
    out = {}
    for k, v in state.items():
        m = _FC.match(k)
        if m is None:
            raise CheckError(f"parameter {k!r} has no counterpart in the authors' MLP (only fcI.weight/bias map)")
        out[f"layer{m.group(1)}.{m.group(2)}"] = v
    return out


def authors_to_lmckit(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`lmckit_to_authors` (``layerI.*`` -> ``fcI.*``); raises CheckError on other keys."""
    out = {}
    for k, v in state.items():
        m = _LAYER.match(k)
        if m is None:
            raise CheckError(f"parameter {k!r} of the authors' MLP has no lmckit counterpart")
        out[f"fc{m.group(1)}.{m.group(2)}"] = v
    return out


def load_authors_net(lmckit_state: Mapping[str, Any], net_class, width: int = 512):
    """The authors' ``Net(w=width/512)`` holding an lmckit MLP state (strict ``load_state_dict``)."""
    net = net_class(w=width / 512)
    net.load_state_dict({k: v.clone() for k, v in lmckit_to_authors(lmckit_state).items()}, strict=True)
    return net


def check_same_outputs(lmckit_model, authors_net, x, atol: float = 1e-6) -> float:
    """Run both models on ``x`` (``(N, 1, 28, 28)``, float) and raise CheckError unless they agree.

    Returns
    -------
    float
        The largest absolute difference of the logits (0.0 when the mapping is right).
    """
    import torch

    lmckit_model.eval()
    authors_net.eval()
    with torch.no_grad():
        a, b = lmckit_model(x), authors_net(x)
    diff = float((a - b).abs().max())
    if a.shape != b.shape or not diff <= atol:
        raise CheckError(f"the authors' Net and lmckit's model disagree on a batch (max |diff| {diff:.3g})")
    return diff


def authors_perm_groups(ps) -> dict[str, str]:
    """The authors' permutation names (``P_k``) -> lmckit's MLP groups (``PI``), from their spec's axes.

    A group ``P_k`` is lmckit's ``PI`` when it permutes axis 0 of ``layerI.weight``.
    """
    out = {}
    for p, axes in ps.perm_to_axes.items():
        rows = [wk for wk, axis in axes if axis == 0 and _LAYER.match(wk) and wk.endswith(".weight")]
        if len(rows) != 1:
            raise CheckError(f"the authors' permutation {p} does not permute exactly one layer's rows: {axes}")
        out[p] = f"P{_LAYER.match(rows[0]).group(1)}"
    return out


# --------------------------------------------------------------------------- inputs from the cache
def _pairs(params) -> dict[str, Any]:
    return {k: (_pairs(v) if isinstance(v, list) and v and isinstance(v[0], list) else v) for k, v in params}


def paper_models(cache: Path) -> dict[int, Path]:
    """Seed -> run folder of the ``paper`` recipe's first entry (mlp, scale01, best-test) in ``cache``."""
    out: dict[int, Path] = {}
    for d in sorted((cache / "model").iterdir()):
        if "." in d.name or not (d / "model.safetensors").exists():
            continue
        cfg = _pairs(json.loads((d / "config.json").read_text())["params"]["config"])
        kw = cfg.get("model_kwargs", {})
        if (
            cfg.get("model") == "mlp"
            and cfg.get("preprocess") == "scale01"
            and cfg.get("keep_epoch") == "best-test"
            and cfg.get("dataset") == "fashion-mnist"
            and kw.get("width") == 512
            and kw.get("depth") == 3
            and kw.get("norm", "none") == "none"
        ):
            out[int(cfg["seed"])] = d
    return out


def lmckit_matches(cache: Path, hashes: Mapping[int, str]) -> dict[tuple[int, int, str], Path]:
    """(seed a, seed b, method) -> match stage folder, method one of the STE-MM protocols or ``weight``."""
    seeds = {h: s for s, h in hashes.items()}
    out = {}
    for d in sorted((cache / "match").iterdir()):
        if "." in d.name or not (d / "perms.json").exists():
            continue
        p = json.loads((d / "config.json").read_text())["params"]
        a, b = seeds.get(p["a"]["hash"]), seeds.get(p["b"]["hash"])
        if a is None or b is None:
            continue
        opts = dict(p["options"])
        if p["method"] == "weight":
            out[(a, b, "weight")] = d
        elif p["method"] == "ste" and opts.get("protocol") in PROTOCOLS:
            if (opts.get("epochs"), opts.get("train_limit"), opts.get("batch_size")) == (1, 10000, 256):
                out[(a, b, opts["protocol"])] = d
    return out


# --------------------------------------------------------------------------- measuring (lmckit's code)
def measure(model, spec, sd_a, sd_b, perms, dataset, wm_perms, ref_perms=None) -> dict[str, float]:
    """Barrier, merge and R(0.3) of ``perms(sd_b)`` against ``sd_a`` exactly as the recipe's stages do.

    ``barrier_curve`` with the recipe's ``[barrier]`` (test split, first 2000 images, 11 lambdas, BN
    batches 10) as :class:`lmckit.pipeline.tasks.BarrierStage`; ``analyze_pair`` as
    :class:`lmckit.pipeline.tasks.AnalysisStage` (gammas 0 and 0.3, nothing data-dependent).
    """
    from lmckit.analysis import analyze_pair
    from lmckit.lmc import barrier_curve
    from lmckit.perm import apply_permutation, perm_changed_units

    bar = barrier_curve(
        model,
        sd_a,
        apply_permutation(spec, perms, sd_b),
        dataset,
        splits=("test",),
        points=11,
        limit=2000,
        device="cpu",
        bn_batches=10,
        progress=False,
    ).to_dict()
    an = analyze_pair(
        model,
        spec,
        sd_a,
        sd_b,
        perms,
        dataset=dataset,
        gammas=(0.0, 0.3),
        rank_fractions=(),
        projections=False,
        rank_sweeps=False,
        device="cpu",
    )
    R = an.svd.summary()["R"]
    out = {
        "loss_barrier": float(bar["loss_barrier"]["test"]),
        "merged_loss": float(bar["midpoint_loss"]["test"]),
        "merged_accuracy": float(bar["midpoint_accuracy"]["test"]),
        "R03": float(R["0.3"]["after"]),
        "R0": float(R["0"]["after"]),
        "reduction": float(an.distances["reduction"]),
        "changed_vs_wm": perm_changed_units(perms, wm_perms),
    }
    if ref_perms is not None:
        out["changed_vs_lmckit"] = perm_changed_units(perms, ref_perms)
    return out


def stats(values) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; NaN for one value) of ``values``."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "values": v}


def agree(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
    """The rule: ``|mean_a - mean_b| <= max(std_a, std_b)``; None when either side has one pair."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return abs(a["mean"] - b["mean"]) <= max(a["std"], b["std"])


# --------------------------------------------------------------------------- the authors' run
def import_reference(ref: Path):
    """Import the authors' ``ste``, ``Net``, ``fix_randomseed`` and ``generate_permutation_spec`` from ``ref``."""
    srcs = ref / "srcs"
    if not (srcs / "search" / "mult" / "ste.py").exists():
        raise CheckError(f"{ref} does not hold the STE-MM code (no srcs/search/mult/ste.py)")
    sys.path.insert(0, str(srcs))
    try:
        ste_mod = importlib.import_module("search.mult.ste")
        mlp = importlib.import_module("networks.mlp")
        seed = importlib.import_module("utils.seed")
        wm = importlib.import_module("search.weight_matching")
        wm_uv = importlib.import_module("search.weight_matching_uv")
    except ImportError as e:
        hint = " (build lap_uv into <ref>/srcs: see docs/results.md)" if "lap_uv" in str(e) else ""
        raise CheckError(f"cannot import the authors' code from {srcs}: {e}{hint}") from None
    return {
        "ste_module": ste_mod,
        "ste": ste_mod.ste,
        "Net": mlp.Net,
        "fix_randomseed": seed.fix_randomseed,
        "generate_permutation_spec": wm.generate_permutation_spec,
        "weight_matching": wm.weight_matching,
        "weight_matching_uv": wm_uv.weight_matching_uv,
    }


def lmckit_start(match_dir: Path):
    """lmckit's STE starting projection ``pi_wm`` (``perm.wm.*`` in the stage's ``ste/ste_state.safetensors``)."""
    from safetensors.torch import load_file

    f = match_dir / "ste" / "ste_state.safetensors"
    if not f.exists():
        return None
    st = load_file(str(f))
    out = {k[len("perm.wm.") :]: v.long() for k, v in st.items() if k.startswith("perm.wm.")}
    return out or None


def run_authors(ref, args, seed, sd_a, sd_b, proto, x_train, y_train):
    """One call of the authors' ``ste`` on the pair; returns (lmckit-named perms, seconds, load, steps)."""
    from torch.utils.data import DataLoader, TensorDataset

    Net = ref["Net"]
    net_a, net_b = load_authors_net(sd_a, Net), load_authors_net(sd_b, Net)
    ref["fix_randomseed"](seed)  # then their DataModule's loader: shuffled from the global generator
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    # Observation only: their WM class, as ste() looks it up in its module, is swapped for a subclass that
    # calls their fit unchanged and keeps a copy of the first projection (theta~ = theta_a: their STE's
    # starting WM), so the units STE moves away from its own start can be counted as lmckit's
    # changed_vs_wm is. Restored after the call.
    attr = "weight_matching_uv" if args.fast_wm else "weight_matching"
    first: dict[str, Any] = {}

    class Recording(ref[attr]):
        def fit(self, *a, **k):
            super().fit(*a, **k)
            first.setdefault("perm", {p: v.detach().cpu().clone() for p, v in self.perm.items()})

    mod = ref["ste_module"]
    setattr(mod, attr, Recording)
    try:
        t0, load0 = time.time(), os.getloadavg()[0]
        permed, wms = ref["ste"](
            net_a, [net_b], loader, None, args.lr, args.epochs, PROTOCOLS[proto], "cpu", [1, 28, 28], args.fast_wm
        )
        secs = time.time() - t0
    finally:
        setattr(mod, attr, ref[attr])
    names = authors_perm_groups(ref["generate_permutation_spec"](Net(), [1, 1, 28, 28]))
    perms = {names[p]: v.detach().cpu().long() for p, v in wms[0].perm.items()}
    ref["_last_permed"] = permed[1]
    ref["_first_projection"] = {names[p]: v.long() for p, v in first["perm"].items()}
    return perms, secs, load0, len(loader) * args.epochs


def check_perm_applies(ref, sd_b, proto, perms, spec, pair) -> None:
    """Raise CheckError unless lmckit's ``apply_permutation`` of ``perms`` is the authors' returned model."""
    import torch

    from lmckit.perm import apply_permutation

    mine = apply_permutation(spec, perms, sd_b)
    theirs = authors_to_lmckit(ref["_last_permed"].state_dict())
    if set(mine) != set(theirs) or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise CheckError(f"pair {pair} {proto}: the authors' permuted model is not their permutation applied")


def run(args) -> dict[str, Any]:
    import torch

    from lmckit.checkpoint import build_model, load_checkpoint
    from lmckit.data import load_dataset
    from lmckit.perm import load_perms, perm_changed_units, spec_for

    ref = import_reference(Path(args.ref))
    Net, fix_randomseed = ref["Net"], ref["fix_randomseed"]
    ps = ref["generate_permutation_spec"](Net(), [1, 1, 28, 28])
    names = authors_perm_groups(ps)
    cache = Path(args.cache)
    if not (cache / "model").is_dir() or not (cache / "match").is_dir():
        raise CheckError(f"{cache} is not a paper-recipe cache folder (no model/ and match/)")
    results_path = Path(args.results)
    if not results_path.exists():
        raise CheckError(f"no lmckit results at {results_path}")
    lm_study = json.loads(results_path.read_text())["studies"]["ste_protocols"]
    runs = paper_models(cache)
    hashes = {s: d.name for s, d in runs.items()}
    matches = lmckit_matches(cache, hashes)
    pairs = [(2 * k, 2 * k + 1) for k in range(args.pairs)]
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    for a, b in pairs:
        for m in ["weight", *protocols]:
            if (a, b, m) not in matches:
                raise CheckError(f"no lmckit {m} match stage for pair ({a}, {b}) in {cache}/match")

    ds = load_dataset("fashion-mnist", preprocess="scale01")
    x_train = ds.images["train"][: args.train_limit].to(torch.float32) / 255.0  # ToTensor: x / 255
    y_train = ds.labels["train"][: args.train_limit]
    x_check, _ = ds.tensors("test", limit=256)
    if float((x_check - ds.images["test"][:256].to(torch.float32) / 255.0).abs().max()) != 0.0:
        raise CheckError("lmckit's scale01 test images are not x / 255")

    out: dict[str, Any] = {
        "settings": {
            "ref": str(args.ref),
            "cache": str(cache),
            "results": str(results_path),
            "pairs": pairs,
            "protocols": protocols,
            "epochs": args.epochs,
            "train_limit": args.train_limit,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "spread_seed": args.spread_seed,
            "fast_wm": args.fast_wm,
            "barrier": {"split": "test", "limit": 2000, "lambdas": 11, "bn_batches": 10},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "models": {str(s): hashes[s] for a, b in pairs for s in (a, b)},
        },
        "load_start": list(os.getloadavg()),
        "pairs": {p: [] for p in protocols},
        "lmckit": {p: [] for p in protocols},
        "wm_context": [],
    }
    t_all = time.time()
    for a, b in pairs:
        sd_a, info = load_checkpoint(runs[a])
        sd_b, _ = load_checkpoint(runs[b])
        model = build_model(info["model"], sd_a)
        spec = spec_for(model)
        wm_perms = load_perms(matches[(a, b, "weight")] / "perms.json", spec)
        diff = check_same_outputs(model, load_authors_net(sd_a, Net), x_check)
        # context: the authors' own WM (their solver, from the identity) against lmckit's WM stage
        fix_randomseed(args.seed)
        own = (ref["weight_matching_uv"] if args.fast_wm else ref["weight_matching"])(ps)
        own.fit(load_authors_net(sd_a, Net).state_dict(), load_authors_net(sd_b, Net).state_dict())
        own_wm = {names[p]: v.detach().cpu().long() for p, v in own.perm.items()}
        pair_context = {"pair": [a, b], "authors_wm_vs_lmckit_wm": perm_changed_units(own_wm, wm_perms)}
        pair_context.update(
            {f"authors_wm_{k}": v for k, v in measure(model, spec, sd_a, sd_b, own_wm, ds, wm_perms).items()}
        )
        out["wm_context"].append(pair_context)
        for proto in protocols:
            lm_perms = load_perms(matches[(a, b, proto)] / "perms.json", spec)
            lm = measure(model, spec, sd_a, sd_b, lm_perms, ds, wm_perms)
            ref_row = next(r for r in lm_study[proto]["pairs"] if list(r["pair"]) == [a, b])
            for k in ("loss_barrier", "R03"):
                if abs(lm[k] - ref_row[k]) > 1e-5:
                    raise CheckError(
                        f"re-measuring lmckit's {proto} pair ({a}, {b}) gives {k} {lm[k]:.6f}, "
                        f"results.json has {ref_row[k]:.6f}: the evaluation is not the recipe's"
                    )
            lm["changed_vs_wm_results_json"] = ref_row.get("changed_vs_wm")
            lm_start = lmckit_start(matches[(a, b, proto)])  # lmckit STE's first projection (its pi_wm)
            if lm_start is not None:
                lm["changed_vs_own_start"] = perm_changed_units(lm_perms, lm_start)
                lm["own_start_vs_lmckit_wm"] = perm_changed_units(lm_start, wm_perms)

            perms, secs, load0, steps = run_authors(ref, args, args.seed, sd_a, sd_b, proto, x_train, y_train)
            check_perm_applies(ref, sd_b, proto, perms, spec, (a, b))
            start = ref["_first_projection"]
            row = measure(model, spec, sd_a, sd_b, perms, ds, wm_perms, ref_perms=lm_perms)
            row.update(pair=[a, b], seconds=secs, load1=load0, steps=steps, output_diff=diff)
            row["changed_vs_own_start"] = perm_changed_units(perms, start)  # as lmckit's changed_vs_wm
            row["own_start_vs_lmckit_wm"] = perm_changed_units(start, wm_perms)
            # context, outside the verdict: the run-to-run spread of the authors' own code (another seed),
            # and how far lmckit's two protocols are from each other on this pair
            perms2, secs2, _, _ = run_authors(ref, args, args.spread_seed, sd_a, sd_b, proto, x_train, y_train)
            row["changed_vs_authors_other_seed"] = perm_changed_units(perms, perms2)
            row["other_seed"] = measure(model, spec, sd_a, sd_b, perms2, ds, wm_perms, ref_perms=lm_perms)
            row["other_seed"]["seconds"] = secs2
            other = [q for q in PROTOCOLS if q != proto][0]
            if (a, b, other) in matches:
                lm["changed_vs_lmckit_other_protocol"] = perm_changed_units(
                    lm_perms, load_perms(matches[(a, b, other)] / "perms.json", spec)
                )
            out["lmckit"][proto].append({"pair": [a, b], "match_stage": matches[(a, b, proto)].name, **lm})
            row["perms"] = {k: v.tolist() for k, v in perms.items()}
            out["pairs"][proto].append(row)
            print(
                f"pair ({a}, {b}) {proto}: authors barrier {row['loss_barrier']:.4f} R(0.3) {row['R03']:.3f} "
                f"| lmckit barrier {lm['loss_barrier']:.4f} R(0.3) {lm['R03']:.3f} "
                f"| {row['changed_vs_lmckit']:.1%} units differ | {secs:.1f} s (load {load0:.1f})",
                flush=True,
            )
    out["seconds"] = time.time() - t_all
    out["load_end"] = list(os.getloadavg())
    summarize(out)
    return out


def summarize(out: dict[str, Any]) -> None:
    """Add ``summary`` (stats per side and metric, per-metric agreement, verdict) to ``out``."""
    summary = {}
    for proto, rows in out["pairs"].items():
        lm_rows = out["lmckit"][proto]
        s: dict[str, Any] = {"metrics": {}}
        for key, _ in METRICS:
            sa, sl = stats(r[key] for r in rows), stats(r[key] for r in lm_rows)
            s["metrics"][key] = {"authors": sa, "lmckit": sl, "agree": agree(sa, sl)}
        s["changed_vs_lmckit"] = stats(r["changed_vs_lmckit"] for r in rows)
        s["merged_accuracy"] = {
            "authors": stats(r["merged_accuracy"] for r in rows),
            "lmckit": stats(r["merged_accuracy"] for r in lm_rows),
        }
        s["seconds"] = stats(r["seconds"] for r in rows)
        s["changed_authors_seed_to_seed"] = stats(r["changed_vs_authors_other_seed"] for r in rows)
        if all("changed_vs_own_start" in r for r in lm_rows):
            s["changed_vs_own_start"] = {
                "authors": stats(r["changed_vs_own_start"] for r in rows),
                "lmckit": stats(r["changed_vs_own_start"] for r in lm_rows),
            }
            s["own_start_vs_lmckit_wm"] = {
                "authors": stats(r["own_start_vs_lmckit_wm"] for r in rows),
                "lmckit": stats(r["own_start_vs_lmckit_wm"] for r in lm_rows),
            }
        s["authors_other_seed_barrier"] = stats(r["other_seed"]["loss_barrier"] for r in rows)
        s["authors_other_seed_R03"] = stats(r["other_seed"]["R03"] for r in rows)
        if all("changed_vs_lmckit_other_protocol" in r for r in lm_rows):
            s["changed_lmckit_protocol_to_protocol"] = stats(r["changed_vs_lmckit_other_protocol"] for r in lm_rows)
        flags = {k: v["agree"] for k, v in s["metrics"].items()}
        if any(v is None for v in flags.values()):
            s["verdict"] = "undetermined (one pair: no spread)"
        elif all(flags.values()):
            s["verdict"] = "agree"
        else:
            s["verdict"] = "disagree on " + ", ".join(dict(METRICS)[k] for k, v in flags.items() if not v)
        summary[proto] = s
    out["summary"] = summary
    if out["wm_context"]:
        out["wm_summary"] = {
            k: stats(r[k] for r in out["wm_context"])
            for k in ("authors_wm_vs_lmckit_wm", "authors_wm_loss_barrier", "authors_wm_R03")
        }


def render(out: dict[str, Any]) -> str:
    """The table and verdicts as text."""
    st = out["settings"]
    lines = [
        "Outside check (issue 30): the STE-MM authors' ste() (e5-a/STE-MM srcs/search/mult/ste.py) against lmckit's",
        f"protocols of the same name, on the paper recipe's pairs {st['pairs']}; {st['epochs']} epoch on the first "
        f"{st['train_limit']} training images, batch {st['batch_size']}, Adam lr {st['lr']}, seed {st['seed']}, "
        f"fast_wm {st['fast_wm']}.",
        "Both sides measured by lmckit's barrier/analysis code: test split, first 2000 images, 11 lambdas.",
        "Rule: a metric agrees when |mean_authors - mean_lmckit| <= max(std_authors, std_lmckit) (sample std over "
        "pairs); a protocol agrees when all four metrics do.",
        "",
    ]
    head = (
        f"{'protocol':<16} {'metric':<20} {'authors mean +- std':>22} {'lmckit mean +- std':>22} {'|diff|':>8}  agree"
    )
    lines += [head, "-" * len(head)]
    for proto, s in out["summary"].items():
        for key, label in METRICS:
            m = s["metrics"][key]
            a, lm = m["authors"], m["lmckit"]
            flag = "-" if m["agree"] is None else ("yes" if m["agree"] else "NO")
            lines.append(
                f"{proto:<16} {label:<20} {a['mean']:>12.4f} +- {a['std']:<7.4f} "
                f"{lm['mean']:>12.4f} +- {lm['std']:<7.4f} {abs(a['mean'] - lm['mean']):>8.4f}  {flag}"
            )
        ma = s["merged_accuracy"]
        lines.append(
            f"{proto:<16} {'(merged accuracy)':<20} {ma['authors']['mean']:>12.4f} +- {ma['authors']['std']:<7.4f}"
            f" {ma['lmckit']['mean']:>12.4f} +- {ma['lmckit']['std']:<7.4f}"
        )
        c, c2 = s["changed_vs_lmckit"], s["changed_authors_seed_to_seed"]
        lines.append(
            f"{proto:<16} units assigned differently from lmckit's permutation: {c['mean']:.1%} (+- {c['std']:.1%})"
        )
        lines.append(
            f"{proto:<16}   context: the authors' code, seed {st['seed']} vs seed {st['spread_seed']}: "
            f"{c2['mean']:.1%} of units differ; barrier at seed {st['spread_seed']} "
            f"{s['authors_other_seed_barrier']['mean']:.4f}, "
            f"R(0.3) {s['authors_other_seed_R03']['mean']:.3f}"
        )
        if "changed_vs_own_start" in s:
            o, w = s["changed_vs_own_start"], s["own_start_vs_lmckit_wm"]
            lines.append(
                f"{proto:<16}   context: units the returned permutation moved from the STE's own start (its first "
                f"projection, a WM): authors {o['authors']['mean']:.1%} +- {o['authors']['std']:.1%}, lmckit "
                f"{o['lmckit']['mean']:.1%} +- {o['lmckit']['std']:.1%}"
            )
            lines.append(
                f"{proto:<16}   context: that start against lmckit's WM stage: authors {w['authors']['mean']:.1%}, "
                f"lmckit {w['lmckit']['mean']:.1%}"
            )
        if "changed_lmckit_protocol_to_protocol" in s:
            lines.append(
                f"{proto:<16}   context: lmckit's ste-mm-random vs ste-mm-midpoint: "
                f"{s['changed_lmckit_protocol_to_protocol']['mean']:.1%} of units differ"
            )
        lines.append(f"{proto:<16} verdict: {s['verdict']}")
        lines.append("")
    lines.append("Per pair (authors | lmckit): barrier, merged loss, R(0.3), units != WM; units != lmckit; seconds")
    for proto, rows in out["pairs"].items():
        for r, lm in zip(rows, out["lmckit"][proto]):
            lines.append(
                f"  {proto:<16} {tuple(r['pair'])}: {r['loss_barrier']:.4f} {r['merged_loss']:.4f} {r['R03']:.3f} "
                f"{r['changed_vs_wm']:.3f} | {lm['loss_barrier']:.4f} {lm['merged_loss']:.4f} {lm['R03']:.3f} "
                f"{lm['changed_vs_wm']:.3f}; {r['changed_vs_lmckit']:.3f}; {r['seconds']:.1f} s"
            )
    if "wm_summary" in out:
        w = out["wm_summary"]
        lines.append(
            f"Context: the authors' own WM (their solver from the identity) vs lmckit's WM stage: "
            f"{w['authors_wm_vs_lmckit_wm']['mean']:.1%} of units differ; the authors' WM barrier "
            f"{w['authors_wm_loss_barrier']['mean']:.4f}, R(0.3) {w['authors_wm_R03']['mean']:.3f}"
        )
    lines.append("")
    lines.append(
        f"Wall time {out['seconds']:.0f} s (authors' ste calls plus both sides' evaluation), torch "
        f"{st['torch']}, {st['threads']} thread(s); load average at start {out['load_start'][0]:.1f}, at end "
        f"{out['load_end'][0]:.1f} (2 cores shared)."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="/work/outside/STE-MM", help="the STE-MM repository (srcs/ with lap_uv built)")
    ap.add_argument("--cache", default="/work/cache-paper", help="the paper recipe's cache folder")
    ap.add_argument("--results", default=str(ROOT / "docs/results/paper/results.json"), help="lmckit's results")
    ap.add_argument("--pairs", type=int, default=3, help="disjoint pairs (0,1), (2,3), ... (1 to 5)")
    ap.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1, help="fix_randomseed's seed (their rebasin.yaml: 1)")
    ap.add_argument("--spread-seed", type=int, default=2, help="a second seed: the authors' run-to-run spread")
    ap.add_argument("--no-fast-wm", dest="fast_wm", action="store_false", help="their scipy WM instead of lap_uv")
    ap.add_argument("--out", default=str(ROOT / "docs/results/outside-check-ste-mm"), help="writes OUT.txt, OUT.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the authors' progress bars (tqdm reads it when imported)
    if not 1 <= args.pairs <= 5:
        print("outside_check_ste_mm: --pairs must be 1 to 5 (the recipe has 5 disjoint pairs)", file=sys.stderr)
        return 2
    try:
        out = run(args)
    except CheckError as e:
        print(f"outside_check_ste_mm: {e}", file=sys.stderr)
        return 2
    text = render(out)
    print(text, end="")
    Path(args.out + ".txt").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
