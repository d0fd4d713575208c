"""Report figures drawn from the aggregated results tree (JSON numbers, not live objects).

The per-pair plots of :mod:`lmckit.analysis.plots` take live analysis
objects of one pair; the report needs mean and standard deviation over
pairs and searches read back from stage folders, so it draws its own
figures here. Each function writes one PNG (Agg backend) and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..plotting import pyplot as _plt
from ..plotting import save_figure, subplot_grid

METHOD_LABEL = {"naive": "naive", "weight": "WM", "activation": "AM", "ste": "STE", "merge_many": "MergeMany"}
METHOD_COLOR = {"naive": "0.5", "weight": "C3", "activation": "C0", "ste": "C2", "merge_many": "C4"}


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=90, tight_layout=True, metadata={"Software": None})


def _grid(n: int, size: float = 3.0):
    return subplot_grid(n, size)


def interpolation(exp: Mapping[str, Any], path: Path) -> Path:
    """Loss and accuracy against lambda per split, one line per method (mean, shaded +-1 std over pairs)."""
    methods = {m: d for m, d in exp["methods"].items() if "curves" in d}
    splits = [s for s in next(iter(methods.values()))["curves"] if s != "lambdas"]
    fig, axes = _grid(2 * len(splits))
    for j, (q, name) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        for i, sp in enumerate(splits):
            ax = axes[j * len(splits) + i]
            for m, d in methods.items():
                lam = d["curves"]["lambdas"]
                mu, sd = d["curves"][sp][f"{q}_mean"], d["curves"][sp][f"{q}_std"]
                ax.plot(lam, mu, label=METHOD_LABEL.get(m, m), color=METHOD_COLOR.get(m), lw=1.3)
                ax.fill_between(lam, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                                color=METHOD_COLOR.get(m), alpha=0.2, lw=0)
            ax.set_xlabel("lambda")
            ax.set_ylabel(f"{sp} {name}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{exp['label']}: linear interpolation (mean +- std over {len(exp['pairs'])} pair(s))", fontsize=9)
    return _save(fig, path)


def spectra(exp: Mapping[str, Any], path: Path) -> Path:
    sp = exp["spectra"]
    fig, axes = _grid(len(sp))
    a, b = exp["pairs"][0]
    for ax, (name, d) in zip(axes, sp.items()):
        ax.plot(d["sigma_a"], lw=1.2, label=f"seed {a}")
        ax.plot(d["sigma_b"], lw=1.2, ls="--", label=f"seed {b}")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i")
    axes[0].legend(fontsize=7)
    fig.suptitle("Singular values of corresponding layers, two seeds", fontsize=9)
    return _save(fig, path)


def r_bars(exp: Mapping[str, Any], path: Path) -> Path:
    """R(gamma) before matching and after each method, mean +- std over pairs and searches."""
    plt = _plt()
    methods = [m for m, d in exp["methods"].items() if "R" in d and m != "naive"]  # naive = "no permutation"
    gammas = list(exp["methods"][methods[0]]["R"])
    series = [("no permutation", exp["methods"][methods[0]]["R"], "before", "0.6")]
    series += [(METHOD_LABEL.get(m, m), exp["methods"][m]["R"], "after", METHOD_COLOR.get(m)) for m in methods]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(gammas) * len(series) / 2, 3.2))
    w = 0.8 / len(series)
    for j, (name, R, when, color) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(gammas))]
        ax.bar(xs, [R[g][when]["mean"] for g in gammas], yerr=[R[g][when]["std"] for g in gammas], width=w,
               label=name, color=color, capsize=2)
    ax.set_xticks(range(len(gammas)), [f"gamma={g}" for g in gammas])
    ax.set_ylabel("R(gamma)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title("Alignment of singular vectors (mean +- std)", fontsize=9)
    return _save(fig, path)


def per_index(exp: Mapping[str, Any], path: Path) -> Path:
    sp = exp["spectra"]
    fig, axes = _grid(len(sp))
    for ax, (name, d) in zip(axes, sp.items()):
        ax.plot(d["per_index_before"], color="0.6", lw=0.8, label="before")
        ax.plot(d["per_index_after"], color="C3", lw=0.8, label="after WM")
        ax.axhline(0, color="k", lw=0.4)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (by sigma)")
        ax.set_ylabel("(u_i.Pu'_i)(v_i.Qv'_i)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Per-index alignment against singular-value rank", fontsize=9)
    return _save(fig, path)


def projections(exp: Mapping[str, Any], path: Path) -> Path:
    pr = exp["projections"]
    fig, axes = _grid(len(pr))
    for ax, (name, d) in zip(axes, pr.items()):
        ax.plot(d["mean_abs"], lw=1.0, label="right-singular v_i")
        ax.plot(d["random_mean_abs"], lw=0.8, color="0.6", label="random direction")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("singular index i (by sigma)")
        ax.set_ylabel("mean |v_i . z|")
    axes[0].legend(fontsize=7)
    fig.suptitle("Layer inputs projected on right-singular vectors", fontsize=9)
    return _save(fig, path)


def rank(exp: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, (who, recs) in enumerate(exp["rank_sweep"].items()):
        full = next((r for r in recs if r["kind"] == "full"), None)
        for kind, marker in (("fraction", "o"), ("gamma", "s")):
            pts = sorted((r["kept_fraction"], r["accuracy"]) for r in recs if r["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=3, color=f"C{i}",
                        ls="-" if kind == "fraction" else "none", label=f"{who} ({'top fraction' if kind == 'fraction' else 'sigma >= gamma sigma_max'})")
        if full is not None:
            ax.axhline(full["accuracy"], color=f"C{i}", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("kept directions / full rank (hidden layers)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=6)
    ax.set_title("Accuracy of rank-k truncated models (dotted: untruncated)", fontsize=9)
    return _save(fig, path)


def three_models(three: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for m, d in three.items():
        c = d["pair_curve"]
        a1.plot(c["lambdas"], c["loss"], label=METHOD_LABEL.get(m, m), color=METHOD_COLOR.get(m))
        a2.plot([r["n"] for r in d["merged"]], [r["accuracy"] for r in d["merged"]], marker="o", ms=3,
                label=METHOD_LABEL.get(m, m), color=METHOD_COLOR.get(m))
    a1.set_xlabel("lambda")
    a1.set_ylabel(f"{next(iter(three.values()))['split']} loss")
    a1.set_title("Path between two models matched to one anchor", fontsize=9)
    a2.set_xlabel("number of averaged models")
    a2.set_ylabel("test accuracy of the average")
    a2.set_title("Merged model accuracy", fontsize=9)
    a1.legend(fontsize=7)
    return _save(fig, path)


def landscape(three: Mapping[str, Any], path: Path) -> Path:
    items = [(m, d["landscape"]) for m, d in three.items() if "landscape" in d]
    fig, axes = _grid(len(items), size=3.4)
    import numpy as np

    for ax, (m, ld) in zip(axes, items):
        z = np.log10(np.maximum(np.asarray(ld["loss"], dtype=float), 1e-6))
        cs = ax.contourf(ld["xs"], ld["ys"], z, levels=12, cmap="viridis")
        fig.colorbar(cs, ax=ax, shrink=0.8, label="log10 loss")
        for name, (x, y) in ld["models"].items():
            ax.plot([x], [y], "w^", ms=5)
            ax.annotate(name, (x, y), color="w", fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{METHOD_LABEL.get(m, m)}: loss on the plane of 3 models", fontsize=8)
    return _save(fig, path)


def width_sweep(ws: list[Mapping[str, Any]], path: Path, split: str = "test", gamma: str | None = None) -> Path:
    plt = _plt()
    ws = sorted(ws, key=lambda x: x["width_mult"])
    widths = [x["width_mult"] for x in ws]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for m in ws[0]["methods"]:
        b = [x["methods"][m].get("barrier", {}).get(split, {}).get("loss_barrier") for x in ws]
        if all(v is not None for v in b):
            a1.errorbar(widths, [v["mean"] for v in b], yerr=[v["std"] for v in b], marker="o", ms=3, capsize=2,
                        label=METHOD_LABEL.get(m, m), color=METHOD_COLOR.get(m))
        R = [x["methods"][m].get("R") for x in ws]
        if all(R):
            g = gamma or list(R[0])[-1]
            a2.errorbar(widths, [r[g]["after"]["mean"] for r in R], yerr=[r[g]["after"]["std"] for r in R], marker="o",
                        ms=3, capsize=2, label=f"{METHOD_LABEL.get(m, m)} R({g})", color=METHOD_COLOR.get(m))
            a2.plot(widths, [r[g]["before"]["mean"] for r in R], ls=":", color="0.5", label=f"no permutation R({g})")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width multiplier")
        ax.legend(fontsize=7)
    a1.set_ylabel(f"{split} loss barrier")
    a2.set_ylabel("R(gamma)")
    fig.suptitle("Width sweep", fontsize=9)
    return _save(fig, path)


def ste_drift(drift: Mapping[str, Any], path: Path) -> Path:
    """STE drift against epoch, one line per STE run, in four panels.

    Panels: fraction of units assigned differently from plain WM (with the
    WM-vs-WM seed-to-seed baseline as a dashed line, shaded +-1 std),
    ``||theta~ - theta_a|| / ||theta_a||``, R(0.3) of the current permutation,
    and the held-out midpoint loss ``L((theta_a + pi(theta_b)) / 2)``.
    """
    from matplotlib.ticker import MaxNLocator

    runs = drift["runs"]
    fig, axes = _grid(4)
    panels = [("changed_vs_wm", "units reassigned vs WM"), ("tilde_rel_dist", "||theta~ - theta_a|| / ||theta_a||"),
              ("r03", "R(0.3) of current permutation"), ("heldout_loss", "held-out midpoint loss")]
    for ax, (k, title) in zip(axes, panels):
        for i, r in enumerate(runs):
            ax.plot(r["epoch"], r[k], marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=r["label"])
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("STE epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    base = drift.get("wm_vs_wm")
    if base and base.get("n"):
        ep = sorted({e for r in runs for e in r["epoch"]})
        lo, hi = ep[0], ep[-1]
        axes[0].axhline(base["mean"], color="k", ls="--", lw=1, label=f"WM vs WM, other seed (n={base['n']})")
        axes[0].axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="k", alpha=0.1, lw=0)
        axes[0].set_xlim(lo - 0.1, hi + 0.1)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=6)
    return _save(fig, path)
