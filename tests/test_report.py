"""The report a researcher reads: claims in full, statistics with n and intervals, units, valid HTML in a browser.

One ``tiny`` reproduction (seconds) feeds every test here. The browser test renders report.html in headless
Chromium (the Debian package ``chromium``) and is skipped where Chromium is not installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmckit.report.results import stats, t_interval
from lmckit.report.writer import _table, render_html
from lmckit.reproduce import reproduce

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    res = reproduce("tiny", out=root / "report", cache=root / "cache")
    return root / "report", res.results


# --------------------------------------------------------------------------- an HTML checker (stdlib parser)
class _Checker(HTMLParser):
    """Balanced tags, list items inside lists, table rows as wide as their header, image sources."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.row_cells: list[int] = []
        self.tables: list[list[int]] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        if tag == "li" and (not self.stack or self.stack[-1] not in ("ul", "ol")):
            self.errors.append(f"<li> outside a list (inside {self.stack[-1] if self.stack else 'nothing'})")
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.row_cells.append(0)
        if tag in ("td", "th") and self.row_cells:
            self.row_cells[-1] += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if tag == "tr" and self.tables:
            self.tables[-1].append(self.row_cells.pop())

    def close(self):
        super().close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")
        for i, rows in enumerate(self.tables):
            if rows and len(set(rows)) != 1:
                self.errors.append(f"table {i}: rows of {rows} cells")


def check_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    c.close()
    return c


def test_checker_catches_what_the_old_renderer_got_wrong():
    bad = check_html(
        "<!doctype html><html><body><li>x</li><table><tr><th>a</th></tr><tr><td>1</td><td>2</td></tr>"
        "</table><p><b>open</p></body></html>"
    )
    assert any("outside a list" in e for e in bad.errors)
    assert any("rows of" in e for e in bad.errors)
    assert any("closes" in e for e in bad.errors)


def test_a_pipe_in_a_cell_stays_in_its_cell():
    md = "\n".join(["- a claim", "- another", ""] + _table([{"‖θ̃ − θ_a‖ / ‖θ_a‖": 1, "x|y": "a|b", "n": 3}]))
    page = render_html(md, "t")
    c = check_html(page)
    assert not c.errors, c.errors
    assert c.tables == [[3, 3]] and "<ul>" in page and "a|b" in page and c.doctype


# --------------------------------------------------------------------------- the tiny report
def test_report_html_is_valid_and_its_images_exist(tiny):
    out, _ = tiny
    page = (out / "report.html").read_text()
    c = check_html(page)
    assert not c.errors, c.errors
    assert c.doctype and len(c.images) >= 10 and len(c.tables) >= 8
    for src in c.images:
        assert (out / src).is_file() and (out / src).read_bytes().startswith(b"\x89PNG"), src
    # the same Markdown, rendered: every claim's verdict sentence appears in both
    md = (out / "report.md").read_text()
    assert render_html(md, "lmckit report: tiny") == page


def test_claims_are_quoted_in_full_with_criterion_and_published_value(tiny):
    out, r = tiny
    md = (out / "report.md").read_text()
    from lmckit.report.claims import CLAIMS

    for c in r["claims"]:
        assert c["model"] == "mlp_tiny" and c["statement"] == CLAIMS[c["id"]].statement
        assert f"> {c['statement']}" in md and c["criterion"] in md and c["text"] in md
    by_id = {c["id"]: c for c in r["claims"]}
    assert by_id["3"]["paper"]["value"] == 0.2 and "source" in by_id["3"]["paper"]
    assert "paper" not in by_id["2"] and "no published value" in md


def test_claims_are_judged_per_model(tiny):
    """Two models in one recipe: each gets its own claims, named; the three-model and width claims stay with the
    first."""
    import copy

    from lmckit.report.results import judge_claims

    _, r = tiny
    res = copy.deepcopy(r)
    second = copy.deepcopy(res["experiments"][0])
    second["label"] = "mlp_tiny x2"
    second["methods"]["weight"]["barrier"]["test"]["loss_barrier"]["mean"] = 10.0  # claim 1 fails for it
    res["experiments"].append(second)
    claims = judge_claims(res)
    first = {c["id"]: c for c in claims if c["model"] == "mlp_tiny"}
    other = {c["id"]: c for c in claims if c["model"] == "mlp_tiny x2"}
    assert set(first) == {"1", "2", "3", "4", "5a", "5b", "6", "width"}
    assert set(other) == {"1", "2", "3", "4", "5a", "5b"}
    assert other["1"]["held"] is False and other["1"]["numbers"]["wm_barrier"] == 10.0


def test_statistics_say_n_what_varies_and_a_t_interval(tiny):
    out, r = tiny
    wm = r["experiments"][0]["methods"]["weight"]
    assert wm["R"]["0.3"]["after"]["over"] == "model pairs x WM searches" and wm["R"]["0.3"]["after"]["n"] == 2
    assert wm["barrier"]["test"]["loss_barrier"]["over"] == "model pairs"
    assert "ci95" not in wm["R"]["0.3"]["after"]  # n = 2: no interval
    md = (out / "report.md").read_text()
    assert "(n=2)" in md and "Student t" in md
    # the interval by hand: mean +- t_{0.975, 2} s / sqrt(3)
    s = stats([1.0, 2.0, 4.0], "model pairs")
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)
    assert s["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half]) and s["ci_method"] == "t"
    assert t_interval([1.0, 2.0, 4.0]) == pytest.approx(tuple(s["ci95"]))
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_evaluation_sizes_are_in_results_and_report(tiny):
    out, r = tiny
    ev = r["evaluation"]
    assert ev["split_sizes"] == {"train": 2000, "test": 500}
    assert ev["barrier"] == {"train": 500, "test": 500} and ev["taylor_train_images"] == 200
    assert ev["ste_train_images"] == 2000
    md = (out / "report.md").read_text()
    assert "Taylor estimate and its measured midpoint on 200" in md and "first 500 train, 500 test images" in md


def test_per_layer_table_for_every_matched_pair(tiny):
    out, r = tiny
    e = r["experiments"][0]
    got = {(tuple(t["pair"]), t["method"]) for t in e["layers"]}
    assert got == {((0, 1), m) for m in ("weight", "activation", "ste")}
    wm = next(t for t in e["layers"] if t["method"] == "weight")
    assert wm["searches"] == 2 and [row["layer"] for row in wm["rows"]] == ["fc0", "fc1", "fc2"]
    for row in wm["rows"]:
        assert row["reduction"] == pytest.approx(1 - row["l2_after"] / row["l2_before"])
        assert set(row["R"]) == {"0", "0.3"}
    md = (out / "report.md").read_text()
    assert "*WM, seeds 0-1 (mean of 2 searches):*" in md and "| fc0 |" in md


def test_accuracies_are_fractions_everywhere(tiny):
    _, r = tiny

    def walk(obj, key=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, k if "acc" in k else key)
        elif isinstance(obj, list):
            for v in obj:
                yield from walk(v, key)
        elif isinstance(obj, float) and key:
            yield key, obj

    vals = list(walk(r))
    assert len(vals) > 50
    for k, v in vals:
        assert -1.0 <= v <= 1.0, (k, v)


# --------------------------------------------------------------------------- a real browser
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

_HEAD = (
    "<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push('error: '+"
    "(e.message||(e.target&&(e.target.src||e.target.href))||'?'))},true);var _ce=console.error;console.error="
    "function(){window.__errors.push('console.error: '+Array.prototype.join.call(arguments,' '));"
    "_ce.apply(console,arguments)};</script>"
)
_TAIL = (
    "<script>window.addEventListener('load',function(){var bad=[];for(var i=0;i<document.images.length;i++){"
    "var im=document.images[i];if(!im.complete||im.naturalWidth===0)bad.push(im.getAttribute('src'))}"
    "var widths=[];document.querySelectorAll('table').forEach(function(t){var w=[];t.querySelectorAll('tr')"
    ".forEach(function(r){w.push(r.children.length)});widths.push(w)});var p=document.createElement('pre');"
    "p.id='lmckit-probe';p.textContent=JSON.stringify({images:document.images.length,broken:bad,"
    "errors:window.__errors,widths:widths,orphan_li:document.querySelectorAll('li:not(ul > li):not(ol > li)')"
    ".length});document.body.appendChild(p)});</script>"
)


def browse(html_file: Path, tmp: Path, extra: str = "") -> dict:
    """Load ``html_file`` (a probing copy beside it) in headless Chromium; return what the probe saw."""
    page = html_file.read_text()
    probe = html_file.with_name("_probe_" + html_file.name)
    probe.write_text(page.replace("<head>", "<head>\n" + _HEAD, 1).replace("</body>", extra + _TAIL + "\n</body>", 1))
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.resolve().as_uri(),
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})
    finally:
        probe.unlink()
    import re

    m = re.search(r'<pre id="lmckit-probe">(.*?)</pre>', p.stdout, re.S)
    assert m, f"Chromium did not finish loading the page (rc {p.returncode}):\n{p.stderr[-2000:]}"
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_chromium_without_broken_images_or_errors(tiny, tmp_path):
    out, _ = tiny
    seen = browse(out / "report.html", tmp_path)
    assert seen["images"] >= 10 and seen["broken"] == [] and seen["errors"] == [], seen
    assert seen["orphan_li"] == 0
    for rows in seen["widths"]:
        assert len(set(rows)) == 1, seen["widths"]  # no cell split off its column (the old '|' bug)
    # the probe can fail: a missing image and a console error are both reported
    bad = browse(out / "report.html", tmp_path, extra='<img src="missing.png"><script>console.error("boom")</script>')
    assert bad["broken"] == ["missing.png"] and any("boom" in e for e in bad["errors"])


@pytest.mark.parametrize(
    "rise0,rise3,held",
    [
        (0.070, 0.226, True),  # quick's MLP: 3.2x
        (0.134, 0.140, False),  # the ViT of vit-fmnist: 1.04x is "more", not "much more"
        (0.100, 0.200, True),  # exactly twice
        (0.100, 0.199, False),
        (-0.010, 0.050, True),  # no rise at gamma = 0
        (0.000, 0.000, False),  # no rise at all
    ],
)
def test_claim_3_needs_a_rise_at_high_gamma_at_least_twice_that_at_gamma_0(rise0, rise3, held):
    """Hand-made evidence: R before/after at gamma 0 and 0.3, leading singular values 1% apart."""
    from lmckit.report.claims import CLAIMS, Evidence

    def r(before, after):
        return {"before": {"mean": before}, "after": {"mean": after}}

    exp = {
        "methods": {"weight": {"R": {"0": r(0.01, 0.01 + rise0), "0.3": r(0.02, 0.02 + rise3)}}},
        "spectra": {"fc1": {"sigma_a": [10.0] * 20, "sigma_b": [10.1] * 20}},
    }
    claim = CLAIMS["3"]
    rec = claim.record(Evidence({"recipe": {}}, exp, True))
    assert rec["held"] is held
    assert rec["numbers"]["R_rise_high_gamma"] == pytest.approx(rise3)
    assert "at least twice" in rec["criterion"]


# --------------------------------------------------------------------------- text a user controls (issue 28)
def test_user_text_reaches_the_report_as_text_only(tiny, tmp_path):
    """A multi-line recipe description with a heading, a table and terminal escapes, a name with an OSC
    title escape and a note with a heading: report.md and report.html carry their words, no markup, no ESC/BEL."""
    import copy

    from lmckit.report.writer import plain, write_report

    write_report(tiny[1], tmp_path / "base")
    base = (tmp_path / "base" / "report.md").read_text()
    res = copy.deepcopy(tiny[1])
    res["recipe"]["description"] = "line one\n# Injected heading\n| a | b |\n|---|---|\n| 1 | 2 |\n\x1b[31mred\x07 end"
    res["recipe"]["name"] = "evil\x1b]0;pwned\x07name"
    res["notes"] = ["a note\n## Injected note heading\x1b[2J"]
    write_report(res, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "report.html").read_text()
    for text in (md, page):
        assert not any(c in text for c in "\x1b\x07\x00"), "a control character reached the report"
    assert "Injected heading" in md and "Injected note heading" in md  # the words stay, as text
    assert not any(line.startswith(("# Injected", "## Injected", "| a |")) for line in md.splitlines())
    assert md.count("\n#") == base.count("\n#") and md.count("\n|") == base.count("\n|")  # no heading, no row added
    assert page.count("<table") == render_html(base, "x").count("<table") and "<h1>Injected" not in page
    assert "evil]0;pwnedname" in md and "<title>lmckit report: evil]0;pwnedname</title>" in page
    assert plain("# x") == "\\# x" and plain("1. x") == "1\\. x" and plain("a\n\n|b|") == "a |b|"
