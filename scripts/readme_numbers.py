#!/usr/bin/env python3
"""Write the measured tables of README.md and the documentation from committed results files, never by hand.

Each block of README.md or docs/results.md (:data:`DOCS`) between

    <!-- readme-numbers:begin NAME -->
    <!-- readme-numbers:end NAME -->

is generated from ``docs/results/NAME/results.json`` (a ``results.json`` written by
``lmckit reproduce``) and ``docs/results/NAME/run.json`` (which command produced it, when, and
on what machine). ``NAME:headline`` instead of ``NAME`` writes the short form the README shows
(the methods table and the claims' verdicts). ``tests/test_readme_numbers.py`` fails when a
block differs from what this script writes from the cited files.

Usage::

    python scripts/readme_numbers.py                  # rewrite the README blocks in place
    python scripts/readme_numbers.py --check          # exit 1 (and show the difference) when stale
    python scripts/readme_numbers.py --import reports/quick --name quick \\
        --command "lmckit reproduce --recipe quick" --conditions "2 shared CPU cores, load ~12"
                                                      # copy a report's results.json into docs/results/quick
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: every file holding generated blocks (the README's headline, the documentation's full tables)
DOCS = (README, ROOT / "docs" / "results.md")
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(
    r"(<!-- readme-numbers:begin (?P<name>[\w.-]+)(?::(?P<view>headline))? -->\n)(?P<body>.*?)"
    r"(<!-- readme-numbers:end (?P=name)(?::(?P=view))? -->)",
    re.S,
)
LABEL = {"naive": "naive (no permutation)", "weight": "WM", "activation": "AM", "ste": "STE", "merge_many": "MergeMany"}


def label(method: str) -> str:
    """The README's name of a method: ours above, else the matching registry's label (``Sinkhorn``)."""
    if method in LABEL:
        return LABEL[method]
    try:
        from lmckit.match.registry import get_method

        return get_method(method).label
    except Exception:  # a method this lmckit does not know (an old results file): its key
        return method


def ordered(d: dict[str, Any]) -> list[str]:
    """Method keys in the README's order (naive, WM, AM, STE, MergeMany, others)."""
    order = list(LABEL)
    return sorted(d, key=lambda m: (order.index(m) if m in order else len(order), m))


def pm(s: dict[str, Any] | None, fmt: str = "{:.3f}", ci: bool = True) -> str:
    """``mean ± std`` (n, 95% t-interval when n >= 3) or the single value of an aggregate."""
    if not s:
        return "-"
    if s.get("n", 1) <= 1:
        return fmt.format(s["mean"])
    text = f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
    if ci and "ci95" in s:
        text += f" [{fmt.format(s['ci95'][0])}, {fmt.format(s['ci95'][1])}]"
    return text


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def render(name: str, res: dict[str, Any], run: dict[str, Any], view: str | None = None, base: str = ".") -> str:
    """The Markdown of block ``name`` from a results tree and its run record.

    ``view="headline"``: only the methods table of each experiment and the claims' verdicts.
    ``base``: the folder (relative to the repository root) of the file holding the block, so that
    the link to the results file works from there (on GitHub and in the documentation site).
    """
    if "paper" in res:
        return render_paper(name, res, run, base, view)
    src = f"docs/results/{name}/results.json"
    href = Path(os.path.relpath(src, base)).as_posix()
    md = [
        f"*Produced by `{run['command']}` ({run['date']}; {run['conditions']}; lmckit {run.get('commit', '?')}). "
        f"Every number below is read from [`{src}`]({href}).*",
        "",
    ]
    if view == "headline":
        md = [f"*`{run['command']}`, {run['date']}; numbers read from [`{src}`]({href}).*", ""]
    rec = res["recipe"]
    ev = res.get("evaluation", {})
    items = "windows" if "units" in res else "images"  # a language model's evaluation sets count token windows
    for e in res["experiments"]:
        accs = [m["test_accuracy"] for m in e["models"]]
        mean = sum(accs) / len(accs)
        md += [
            f"**{e['label']}** on {rec['data']['dataset']}: {len(e['models'])} models (seeds "
            f"{', '.join(str(m['seed']) for m in e['models'])}), test accuracy {mean:.4f} on average "
            f"({min(accs):.4f}-{max(accs):.4f}); {len(e['pairs'])} disjoint pairs. Barriers on the first "
            f"{_get(ev, 'barrier', 'test') or 'all'} test {items}, {rec['barrier']['lambdas']} values of λ. "
            "Mean ± sample std over the pairs (R and distances after WM: over pairs × "
            f"{rec['match']['searches']} WM searches), [95% t-interval] where n ≥ 3; accuracies as fractions.",
            "",
        ]
        rows = []
        for m in ordered(e["methods"]):
            d = e["methods"][m]
            b = _get(d, "barrier", "test") or {}
            n = _get(b, "loss_barrier", "n") or 0
            rn = _get(d, "R", "0.3", "after", "n") or 0
            rows.append(
                [
                    label(m),
                    pm(b.get("loss_barrier")),
                    pm(b.get("accuracy_barrier")),
                    pm(_get(d, "R", "0", "after")),
                    pm(_get(d, "R", "0.3", "after")),
                    pm(_get(d, "distance", "reduction"), "{:.1%}") if m != "naive" else "-",
                    f"{n} / {rn}" if rn else str(n),
                ]
            )
        md += _table(
            [
                "method",
                "test loss barrier",
                "test accuracy barrier",
                "R(0) after",
                "R(0.3) after",
                "L2 reduction",
                "n (barrier / R)",
            ],
            rows,
        )
        md += _lm_lines(res, e)
        if view == "headline":
            claims = [c for c in res.get("claims", []) if c.get("model", e["label"]) == e["label"]]
            md += [""] + _table(
                ["claim of the paper", "verdict"],
                [[f"{c['id']}: {c.get('title', '')}", "held" if c["held"] else "**did not hold**"] for c in claims],
            )
            md += [""]
            continue
        before = _get(e["methods"], "weight", "R")
        if before:
            md += [
                "",
                f"Without permutation R(0) = {pm(before['0']['before'])} and R(0.3) = {pm(before['0.3']['before'])}.",
            ]
        tay = _get(e["methods"], "weight", "taylor")
        if tay:
            md += [
                "",
                f"Midpoint barrier after WM on {tay.get('num_samples', '?')} training {items}: measured "
                f"{pm(tay['measured_midpoint'])}, second-order Taylor estimate {pm(tay['taylor_midpoint'])} "
                f"(n = {tay['taylor_midpoint']['n']} pairs).",
            ]
        md += _kinds_line(res, e)
        md += [""]
        claims = [c for c in res.get("claims", []) if c.get("model", e["label"]) == e["label"]]
        if claims:
            md += _table(
                ["claim", "verdict", "this run", "published"],
                [
                    [
                        f"{c['id']}: {c.get('title', '')}",
                        "held" if c["held"] else "**did not hold**",
                        c["text"],
                        (c["paper"]["text"] if c.get("paper") else "-"),
                    ]
                    for c in claims
                ],
            )
            md += [""]
    three = res.get("three_models")
    if three and view != "headline":
        md += [
            f"Three models (seeds {', '.join(str(s) for s in rec['train']['seeds'][: rec['three_models']['models']])}"
            f"; models 1 and 2 matched to model 0; one triple, single values; "
            f"{ev.get('three_models_test_images', 'all')} test {items}):",
            "",
        ]
        ns = [x["n"] for x in next(iter(three.values()))["merged"]]
        md += _table(
            ["method", "loss barrier between the two matched models", "its accuracy barrier"]
            + [f"accuracy of the average of {n}" for n in ns],
            [
                [label(m), f"{d['pair_loss_barrier']:.3f}", f"{d['pair_accuracy_barrier']:.3f}"]
                + [f"{x['accuracy']:.4f}" for x in three[m]["merged"]]
                for m in ordered(three)
                for d in [three[m]]
            ],
        )
        md += [""]
    ws = res.get("width_sweep")
    if ws and view != "headline":
        ws = sorted(ws, key=lambda x: x["width_mult"])
        methods = ordered(ws[0]["methods"])
        md += ["Width sweep (one pair per width, test split):", ""]
        md += _table(
            ["width"] + [f"{label(m)} loss barrier" for m in methods] + ["WM R(0.3) after"],
            [
                [f"x{x['width_mult']:g}"]
                + [pm(_get(x, "methods", m, "barrier", "test", "loss_barrier")) for m in methods]
                + [pm(_get(x, "methods", "weight", "R", "0.3", "after"))]
                for x in ws
            ],
        )
        md += [""]
    return "\n".join(md)


def render_paper(name: str, res: dict[str, Any], run: dict[str, Any], base: str = ".", view: str | None = None) -> str:
    """The compact block of a recipe with a ``paper`` section (issue 30): WM's distance reduction beside the
    paper's, and each claim's verdict per setting with its margin's mean, 95% interval and where it lies."""
    src = f"docs/results/{name}/results.json"
    href = Path(os.path.relpath(src, base)).as_posix()
    p = res["paper"]
    if view == "headline":
        return _paper_headline(src, href, res, run)
    md = [
        f"*Produced by `{run['command']}` ({run['date']}; {run['conditions']}; lmckit {run.get('commit', '?')}). "
        f"Every number below is read from [`{src}`]({href}); criteria: `docs/definitions.md`, 'The paper recipe'.*",
        "",
    ]
    for e in res["experiments"]:
        accs = [m["test_accuracy"] for m in e["models"]]
        md.append(
            f"- **{e['label']}**: {len(accs)} models, test accuracy {sum(accs) / len(accs):.4f} on average "
            f"({min(accs):.4f}-{max(accs):.4f}), {len(e['pairs'])} disjoint pairs."
        )
    for note in p.get("notes", []):
        md.append(f"- Sizing (CPU budget, not tuned to any number): {note}.")
    md += [""]
    md += _table(
        ["model", "WM L2 distance reduction", "paper (Table 1)"],
        [[r["model"], pm(r["reduction"], "{:.1%}"), f"{r['paper']:.1%}"] for r in p["reduction"]],
    )
    md += [""]
    rows = []
    for c in p["claims"]:
        for k, cond in enumerate(c["conditions"]):
            rows.append(
                [
                    c["claim"] if k == 0 else "",
                    c["setting"] if k == 0 else "",
                    ("held" if c["held"] else "**did not hold**") if k == 0 else "",
                    f"{cond['quantity']} {cond['side']}",
                    pm(cond["margin"], "{:.4f}"),
                    cond["decided"],
                ]
            )
    md += _table(["claim", "setting", "verdict", "margin per pair", "mean ± std [95% CI]", "interval"], rows)
    return "\n".join(md + [""])


def _paper_headline(src: str, href: str, res: dict[str, Any], run: dict[str, Any]) -> str:
    """The README's view of a ``paper`` block: WM's distance reduction beside Table 1, then per claim in how
    many of the judged settings (training choice x STE protocol x N) it held, naming those where it did not."""
    p = res["paper"]
    red = ", ".join(f"{pm(r['reduction'], '{:.1%}')} ({r['model'].removeprefix('mlp ')})" for r in p["reduction"])
    md = [
        f"*`{run['command']}`, {run['date']}; numbers read from [`{src}`]({href}).*",
        "",
        f"WM's L2 distance reduction: {red}; the paper's Table 1: {p['reduction'][0]['paper']:.1%}.",
        "",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for c in p["claims"]:
        by.setdefault(c["claim"], []).append(c)
    rows = []
    for claim, cs in by.items():
        failed = [c["setting"].removeprefix("mlp ") for c in cs if not c["held"]]
        rows.append([claim, f"{len(cs) - len(failed)} / {len(cs)}", "; ".join(failed) if failed else "-"])
    md += _table(["claim", "held in (settings judged)", "settings where it did not hold"], rows)
    return "\n".join(md + [""])


def _lm_lines(res: dict[str, Any], e: dict[str, Any]) -> list[str]:
    """Language-model recipes (results with ``units``): the test barriers in nats per token and as perplexities."""
    if "units" not in res:
        return []
    rows = []
    for m in ordered(e["methods"]):
        d = e["methods"][m]
        p = _get(d, "perplexity", "test") or {}
        ends = p.get("endpoints")
        rows.append(
            [
                label(m),
                pm(_get(d, "barrier", "test", "loss_barrier"), "{:.4f}"),
                pm(p.get("barrier_factor"), "{:.3f}"),
                f"{ends[0]:.2f}, {ends[1]:.2f}" if ends else "-",
                pm(p.get("midpoint"), "{:.2f}"),
            ]
        )
    ppl = [m["test_perplexity"] for m in e["models"] if "test_perplexity" in m]
    return [
        "",
        "Language model: losses are next-token cross-entropy in nats per token, accuracies next-token "
        "accuracies, evaluation sizes count windows of tokens (not images); perplexity = exp(loss), "
        "perplexity barrier factor = exp(loss barrier)"
        + (f"; the trained models' test perplexity is {min(ppl):.2f}-{max(ppl):.2f}" if ppl else "")
        + ".",
        "",
    ] + _table(
        [
            "method",
            "test loss barrier (nats/token)",
            "perplexity barrier factor",
            "test perplexity of the path's ends",
            "midpoint perplexity",
        ],
        rows,
    )


def _kinds_line(res: dict[str, Any], e: dict[str, Any]) -> list[str]:
    """Model size and R(0.3) by layer kind (W_Q ... W_O, LSTM gates) where results have ``architectures``."""
    arch = next((a for a in res.get("architectures", []) if a["label"] == e["label"]), None)
    if not arch:
        return []
    kinds = [k for k in arch["R_by_kind"] if "weight" in k["R"].get("0.3", {})]
    return [
        "",
        f"{arch['parameters']:,} parameters, widest permutation group {arch['widest']} units, "
        f"{arch['epochs']} training epoch(s). R(0.3) before → after WM by layer kind (mean over matrices and pairs): "
        + ", ".join(f"{k['kind']} {k['R']['0.3']['before']:.3f} → {k['R']['0.3']['weight']:.3f}" for k in kinds)
        + ".",
    ]


def load(name: str, root: Path = RESULTS) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = root / name
    return (json.loads((folder / "results.json").read_text()), json.loads((folder / "run.json").read_text()))


def rewrite(text: str, root: Path = RESULTS, base: str = ".") -> str:
    """``text`` with every marked block regenerated from ``root/NAME`` (links relative to folder ``base``)."""

    def sub(m: re.Match) -> str:
        res, run = load(m.group("name"), root)
        return m.group(1) + render(m.group("name"), res, run, m.group("view"), base) + "\n" + m.group(5)

    return BLOCK.sub(sub, text)


def base_of(path: Path) -> str:
    """The folder of ``path`` relative to the repository root (``.`` for README.md, ``docs`` for a page)."""
    try:
        return Path(path).resolve().parent.relative_to(ROOT).as_posix()
    except ValueError:
        return "."


def import_run(report: Path, name: str, command: str, conditions: str) -> Path:
    """Copy ``report/results.json`` into ``docs/results/NAME/`` beside a ``run.json`` provenance record."""
    folder = RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report / "results.json", folder / "results.json")
    if (report / "timings.json").exists():
        shutil.copyfile(report / "timings.json", folder / "timings.json")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    mtime = datetime.fromtimestamp((report / "results.json").stat().st_mtime, timezone.utc)
    run = {"command": command, "date": mtime.strftime("%Y-%m-%d %H:%M UTC"), "conditions": conditions, "commit": commit}
    (folder / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a file is not what the results give")
    ap.add_argument(
        "--readme", action="append", default=None, help="a file holding blocks (repeatable; default: README + docs)"
    )
    ap.add_argument("--import", dest="report", default=None, help="a report folder whose results.json to commit")
    ap.add_argument("--name", default="quick")
    ap.add_argument("--command", default="lmckit reproduce --recipe quick")
    ap.add_argument("--conditions", default="")
    args = ap.parse_args(argv)
    if args.report:
        print(f"wrote {import_run(Path(args.report), args.name, args.command, args.conditions)}")
    stale = 0
    for path in map(Path, args.readme or DOCS):
        old = path.read_text()
        new = rewrite(old, base=base_of(path))
        if args.check:
            if new != old:
                sys.stdout.writelines(
                    difflib.unified_diff(old.splitlines(True), new.splitlines(True), path.name, "from docs/results")
                )
                print(f"{path} is stale: run python scripts/readme_numbers.py", file=sys.stderr)
                stale = 1
        elif new != old:
            path.write_text(new)
            print(f"updated {path}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
