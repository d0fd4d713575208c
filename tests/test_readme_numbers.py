"""The measured numbers of README.md and docs/results.md are exactly what scripts/readme_numbers.py
writes from the files they cite."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
rn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rn)

README = (ROOT / "README.md").read_text()
TEXTS = {p: p.read_text() for p in rn.DOCS}
NAMES = [m.group("name") for m in rn.BLOCK.finditer(README)]


def test_the_readme_and_the_results_page_have_generated_blocks_citing_committed_files():
    assert NAMES, "README.md has no <!-- readme-numbers:begin NAME --> block"
    for path, text in TEXTS.items():
        blocks = list(rn.BLOCK.finditer(text))
        assert blocks, f"{path} has no generated block"
        for m in blocks:
            name = m.group("name")
            folder = ROOT / "docs" / "results" / name
            res, run = rn.load(name)
            assert {"command", "date", "conditions"} <= set(run), f"{folder}/run.json must say how the run was made"
            assert res["experiments"] and res["claims"]
            assert f"docs/results/{name}/results.json" in m.group("body") and run["command"] in m.group("body")


def test_readme_numbers_match_their_files():
    for path, text in TEXTS.items():
        assert rn.rewrite(text, base=rn.base_of(path)) == text, f"{path} is stale: run python scripts/readme_numbers.py"


def test_links_to_results_work_from_each_file():
    for path, text in TEXTS.items():
        for m in rn.BLOCK.finditer(text):
            for href in re.findall(r"\]\(([^)]+results\.json)\)", m.group("body")):
                assert (path.parent / href).is_file(), f"{path}: link {href} points nowhere"


def test_a_changed_number_is_caught(tmp_path):
    """The check can fail: one aggregate changed in a copy of the results gives a different block."""
    name = NAMES[0]
    res, run = rn.load(name)
    (tmp_path / name).mkdir()
    bad = copy.deepcopy(res)
    b = bad["experiments"][0]["methods"]["weight"]["barrier"]["test"]["loss_barrier"]
    b["mean"] += 0.5
    (tmp_path / name / "results.json").write_text(json.dumps(bad))
    (tmp_path / name / "run.json").write_text(json.dumps(run))
    for other in NAMES[1:]:  # the other blocks read their unchanged files
        shutil.copytree(ROOT / "docs" / "results" / other, tmp_path / other)
    assert rn.rewrite(README, tmp_path) != README


def test_numbers_by_hand():
    s = {"mean": 0.1234, "std": 0.01, "n": 3, "values": [0.11, 0.12, 0.14], "ci95": [0.1, 0.15]}
    assert rn.pm(s) == "0.123 ± 0.010 [0.100, 0.150]"
    assert rn.pm({"mean": 0.5, "std": 0.0, "n": 1}) == "0.500"
    assert rn.pm(None) == "-"
    assert re.search(r"\| --- \|", "\n".join(rn._table(["a"], [["1"]])))


def test_check_mode_fails_on_a_stale_readme(tmp_path):
    stale = tmp_path / "README.md"
    text = README
    m = next(rn.BLOCK.finditer(text))
    stale.write_text(text[: m.start("body")] + "typed by hand\n" + text[m.end("body") :])
    assert rn.main(["--check", "--readme", str(stale)]) == 1
    assert rn.main(["--check"]) == 0  # README and docs/results.md as committed


def test_paper_headline_counts_each_claims_settings():
    """The README's paper view: per claim, held / judged over its settings, and the failed ones named."""
    res = {
        "experiments": [],
        "paper": {
            "reduction": [{"model": "mlp a", "paper": 0.179, "reduction": {"mean": 0.184, "std": 0.0, "n": 1}}],
            "claims": [
                {"claim": "1", "setting": "mlp a", "held": True},
                {"claim": "5b", "setting": "mlp a, STE x", "held": False},
                {"claim": "5b", "setting": "mlp a, STE y", "held": True},
            ],
        },
    }
    run = {"command": "lmckit reproduce --recipe paper", "date": "d", "conditions": "c"}
    md = rn.render("paper", res, run, "headline")
    assert "18.4% (a); the paper's Table 1: 17.9%" in md
    assert "| 1 | 1 / 1 | - |" in md
    assert "| 5b | 1 / 2 | a, STE x |" in md
