"""The tutorial notebook (docs/tutorial.ipynb) runs from top to bottom on tiny models and says what it should.

Executed by nbclient in a fresh Python kernel with ``LMCKIT_TUTORIAL_TINY=1`` (the ``tiny`` preset on
synthetic data: about 20 s). Needs the ``docs`` extra (nbclient, nbformat, ipykernel); skipped with that
reason where it is missing. ``.ci/run`` installs the extra and runs this file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the docs extra is not installed: pip install -e '.[docs]'")
nbclient = pytest.importorskip("nbclient", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("ipykernel", reason="the docs extra is not installed: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"


def _run(nb, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCKIT_TUTORIAL_TINY", "1")
    monkeypatch.setenv("LMCKIT_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder (tempfile.mkdtemp)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def _text(nb) -> str:
    return "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "stream"
    )


def test_the_tutorial_runs_and_shows_the_paper_s_effect(tmp_path, monkeypatch):
    nb = _run(nbformat.read(NOTEBOOK, as_version=4), tmp_path, monkeypatch)
    text = _text(nb)
    naive, wm = (float(x) for x in re.findall(r"(?:naive|WM)\s*: loss barrier (-?[0-9.]+)", text))
    assert wm < naive, text  # weight matching lowers the barrier
    assert re.search(r"reduction \d+\.\d%", text), text
    before, after = (float(x) for x in re.search(r"R\(0\.3\): ([0-9.]+) before -> ([0-9.]+) after WM", text).groups())
    assert after > before, text  # and aligns the leading singular vectors
    assert re.search(r"merged model: test loss [0-9.]+, accuracy [0-9.]+", text), text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the curves, the R bars and the merged-accuracy plot"
    assert list(tmp_path.glob("lmckit-tutorial-*/runs")), "the notebook trains into its temporary folder"


def test_a_failing_cell_fails_the_run(tmp_path, monkeypatch):
    """The runner can fail: a notebook whose cell raises does not pass."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from lmckit.lmc import no_such_name")]
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        _run(nb, tmp_path, monkeypatch)


def test_the_committed_notebook_has_its_outputs():
    """The site renders the stored outputs (mkdocs-jupyter, execute: false): they must be there."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code), "run the notebook and save its outputs (see its first cell)"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
