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


# ------------------------------------------------------------------ the registry
def test_a_second_rule_for_one_target_is_refused_unless_replaced():
    import torch

    from lmckit.errors import LmcError
    from lmckit.perm.trace import op_rule
    from lmckit.perm.trace_core import FUNCTION_RULES, METHOD_RULES

    old_f, old_m = FUNCTION_RULES[torch.cat], METHOD_RULES["view"]
    with pytest.raises(LmcError, match="already has a rule for .*cat"):
        op_rule(torch.cat)(lambda tr, node: None)
    with pytest.raises(LmcError, match="already has a rule for 'view'"):
        op_rule("view")(lambda tr, node: None)
    with pytest.raises(LmcError, match="at least one target"):
        op_rule()
    assert FUNCTION_RULES[torch.cat] is old_f and METHOD_RULES["view"] is old_m

    def mine(tr, node):
        return old_m(tr, node)

    try:
        assert op_rule("view", replace=True)(mine) is mine and METHOD_RULES["view"] is mine
    finally:
        METHOD_RULES["view"] = old_m


def test_a_registered_user_module_is_one_node_and_its_rule_decides():
    """Without a rule the tracer inlines the module and pins at its unknown op; with one, the rule's answer counts."""
    import torch
    import torch.nn as nn

    from lmckit.perm.trace import op_rule, trace_streams
    from lmckit.perm.trace_core import MODULE_RULES

    class Flip(nn.Module):  # reverses the token axis: units on the feature axis pass through
        def forward(self, x):
            return torch.flip(x, dims=(1,))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.flip, self.fc2 = nn.Linear(4, 8), Flip(), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.flip(torch.relu(self.fc1(x))))

    x = torch.randn(3, 5, 4)
    before = trace_streams(Net(), x)
    assert before.spec.sizes == {} and "flip" in before.warnings[0]
    calls = []

    def flip_rule(tr, node, module):
        calls.append((node.op, str(node.target), type(module).__name__))
        info = dict(tr.tinfo(node.args[0]))
        if 1 in info:
            tr.pin(info.pop(1), "Flip reverses the token axis")
        return info

    try:
        op_rule(Flip)(flip_rule)
        after = trace_streams(Net(), x)
    finally:
        del MODULE_RULES[Flip]
    assert calls == [("call_module", "flip", "Flip")]
    assert after.spec.sizes == {"fc1": 8} and after.spec.axes["fc2.weight"] == (None, "fc1") and not after.warnings
    assert trace_streams(Net(), x).spec.sizes == {}  # the registry is back as it was


def test_rules_import_the_core_and_never_the_other_way():
    """perm/trace_core.py and trace_build.py import no rule module (lazily neither); every rule module imports the
    core; no file of lmckit.perm is over 800 lines (issue 23)."""
    import ast
    from pathlib import Path

    perm = Path(__file__).resolve().parent.parent / "src" / "lmckit" / "perm"

    def imported(path: Path) -> set[str]:
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add("." * node.level + node.module)
            elif isinstance(node, ast.ImportFrom):  # from . import x
                out.update("." * node.level + a.name for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    for core in ("trace_core.py", "trace_build.py"):
        assert not [m for m in imported(perm / core) if "rules" in m or m.endswith(".trace")], core
    rules = sorted((perm / "rules").glob("*.py"))
    assert len(rules) >= 8
    for path in rules:
        if path.name != "__init__.py":
            assert "..trace_core" in imported(path), path.name
            assert not [m for m in imported(path) if m.startswith("..trace") and m != "..trace_core"], path.name
    sizes = {p.relative_to(perm).as_posix(): len(p.read_text().splitlines()) for p in perm.rglob("*.py")}
    assert max(sizes.values()) <= 800, {k: v for k, v in sizes.items() if v > 800}
