"""The tracer's specs are pinned by a golden file (issue 23: splitting the tracer into rules changes no spec).

``tests/data/trace_golden.json`` was written by ``python -m tests.helpers.trace_golden`` from the tracer as it
was before the split (one class); every zoo model and every model the tests trace must give the same result:
spec axes, sizes, shapes, heads, ops, warnings, activation sites, producers and opaque ops, in the same order.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.trace_golden import GOLDEN, cases, run_case

EXPECTED: dict = json.loads(GOLDEN.read_text())
CASES = cases()


def test_golden_covers_every_case():
    """The catalogue and the file agree (a new model in a catalogue needs a regenerated golden file)."""

    def fx(names):
        return {n for n in names if not n.startswith("hf:")}

    assert fx(CASES) == fx(EXPECTED) and set(CASES) <= set(EXPECTED)
    assert any(n.startswith("zoo:") for n in CASES) and len(EXPECTED) >= 100


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_matches_the_golden_file(name):
    if name not in CASES:
        pytest.skip("needs transformers (the hf tier)")
    got = json.loads(json.dumps(run_case(CASES[name])))
    want = EXPECTED[name]
    for field in want:
        assert got.get(field) == want[field], f"{name}: {field} differs from the golden file"
    assert got == want
