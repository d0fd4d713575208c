"""docs/recipes.md documents every recipe key; `reproduce --show` prints a recipe as commented TOML that reads back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lmckit.cli import main
from lmckit.pipeline.recipe import load_recipe, parse_recipe, recipe_names
from lmckit.pipeline.recipe_toml import recipe_toml, schema_rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def test_every_schema_key_is_documented_with_its_default():
    text = DOC.read_text()
    rows = schema_rows()
    assert len(rows) > 40
    for r in rows:
        assert f"| `{r['key']}` | `{r['default']}` |" in text, f"docs/recipes.md lacks {r['key']} = {r['default']}"


@pytest.mark.parametrize("name", recipe_names())
def test_show_round_trips(name):
    r = load_recipe(name)
    text = recipe_toml(r, "header line")
    assert text.startswith("# header line\n")
    assert parse_recipe(tomllib.loads(text)) == r
    # every key carries a comment line above it
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if " = " in ln and not ln.startswith("#"):
            assert lines[i - 1].startswith("# "), ln


def test_cli_show_and_list(capsys, tmp_path):
    assert main(["reproduce", "--show", "tiny", "--set", "train.seeds=[3,4,5]"]) == 0
    out = capsys.readouterr().out
    assert "seeds = [3, 4, 5]" in out and "# one model per seed" in out
    f = tmp_path / "r.toml"
    f.write_text(out)
    assert load_recipe(str(f)) == load_recipe("tiny", ["train.seeds=[3,4,5]"])
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert "quick" in out and "recipes" in out and "--show" in out
    assert main(["reproduce", "--show", "no-such-recipe"]) == 2
