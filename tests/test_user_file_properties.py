"""Property-based tests (hypothesis, bounded) for the loaders of user-written files: permutation JSON
(``lmckit.perm.load_perms`` / ``validate_perms``) and recipes (``lmckit.pipeline.recipe``). Random and mutated
inputs either load into something valid or raise ``LmcError``: never another exception.
(The IDX/CIFAR parsers have their own property tests in test_data_props.py.)
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmckit.errors import LmcError
from lmckit.perm import PermutationSpec, load_perms, save_perms, validate_perms

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# --------------------------------------------------------------------------- JSON values
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=30,
)
group_names = st.sampled_from(["P0", "P1", "P2", "fc0", "layer1.0", "", "P0 "]) | st.text(min_size=1, max_size=5)
sizes_strategy = st.dictionaries(group_names, st.integers(0, 9), min_size=1, max_size=4)


def spec_of(sizes: dict[str, int]) -> PermutationSpec:
    return PermutationSpec(axes={}, sizes=dict(sizes))


def assert_valid(perms: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
    assert set(perms) == set(sizes)
    for g, n in sizes.items():
        p = perms[g]
        assert p.dtype == torch.long and p.shape == (n,)
        assert sorted(p.tolist()) == list(range(n))


@st.composite
def valid_perms(draw, sizes=None):
    sizes = sizes if sizes is not None else draw(sizes_strategy)
    return sizes, {g: draw(st.permutations(list(range(n)))) for g, n in sizes.items()}


def _load_file(tmp: Path, content) -> object:
    path = tmp / "p.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content, allow_nan=True))
    return path


# --------------------------------------------------------------------------- permutation JSON
@SETTINGS
@given(valid_perms())
def test_valid_permutations_round_trip(tmp_path_factory, sp):
    sizes, perms = sp
    path = tmp_path_factory.mktemp("p") / "p.json"
    save_perms(path, {g: torch.tensor(p, dtype=torch.long) for g, p in perms.items()}, note="x")
    for spec in (spec_of(sizes), None):
        out = load_perms(path, spec)
        assert_valid(out, sizes)
        assert {g: p.tolist() for g, p in out.items()} == perms


@SETTINGS
@given(sizes_strategy, json_values)
def test_validate_perms_on_arbitrary_values(sizes, raw):
    try:
        out = validate_perms(spec_of(sizes), raw, "perm")
    except LmcError:
        return
    assert_valid(out, sizes)


@st.composite
def mutated_perms(draw):
    sizes, perms = draw(valid_perms())
    perms = copy.deepcopy(perms)
    g = draw(st.sampled_from(sorted(perms)))
    kind = draw(st.sampled_from(["set", "drop", "append", "rename", "retype", "remove_group", "add_group", "swap"]))
    p = perms[g]
    if kind == "set" and p:
        p[draw(st.integers(0, len(p) - 1))] = draw(json_scalars)
    elif kind == "drop" and p:
        p.pop(draw(st.integers(0, len(p) - 1)))
    elif kind == "append":
        p.append(draw(json_scalars))
    elif kind == "rename":
        perms[draw(group_names)] = perms.pop(g)
    elif kind == "retype":
        perms[g] = draw(json_values)
    elif kind == "remove_group":
        perms.pop(g)
    elif kind == "add_group":
        perms[draw(group_names)] = draw(st.lists(st.integers(0, 9), max_size=9))
    elif kind == "swap" and len(p) > 1:  # still a permutation: must load
        i, j = draw(st.integers(0, len(p) - 1)), draw(st.integers(0, len(p) - 1))
        p[i], p[j] = p[j], p[i]
    return sizes, perms


@SETTINGS
@given(mutated_perms(), st.booleans())
def test_mutated_permutation_files_load_or_raise_lmcerror(tmp_path_factory, sp, with_spec):
    sizes, perms = sp
    path = _load_file(tmp_path_factory.mktemp("p"), {"format": "lmckit.permutation", "version": 1, "perms": perms})
    try:
        out = load_perms(path, spec_of(sizes) if with_spec else None)
    except LmcError:
        return
    # whatever loaded is exactly what the file said, and a valid permutation of the declared sizes
    assert {g: p.tolist() for g, p in out.items()} == perms
    assert_valid(out, sizes if with_spec else {g: len(p) for g, p in perms.items()})


@SETTINGS
@given(
    st.one_of(
        json_values,
        st.binary(max_size=64),
        st.text(max_size=40).map(str.encode),
        st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
        st.integers(1, 3000).map(lambda d: b'{"perms": ' + b'{"a": ' * d + b"1" + b"}" * (d + 1)),
    )
)
def test_arbitrary_files_load_or_raise_lmcerror(tmp_path_factory, content):
    path = _load_file(tmp_path_factory.mktemp("p"), content)
    for spec in (spec_of({"P0": 3}), None):
        try:
            out = load_perms(path, spec)
        except LmcError:
            continue
        assert_valid(out, {"P0": 3} if spec is not None else {g: p.numel() for g, p in out.items()})


def test_deeply_nested_json_is_a_user_error(tmp_path):
    path = _load_file(tmp_path, b"[" * 100000 + b"]" * 100000)
    with pytest.raises(LmcError, match="p.json"):
        load_perms(path)


# --------------------------------------------------------------------------- recipes
TINY = tomllib.loads((Path(__file__).resolve().parents[1] / "src/lmckit/recipes/tiny.toml").read_text())


def _paths(obj, prefix=()):
    """Every (path, value) in a parsed TOML tree, tables and list items included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


TINY_PATHS = [p for p, _ in _paths(TINY) if p]
KNOWN_KEYS = sorted(
    {k for p in TINY_PATHS for k in p if isinstance(k, str)}
    | {
        "enabled",
        "widths",
        "gammas",
        "options",
        "overrides",
        "preset",
        "width_mult",
        "norm",
        "width",
        "depth",
        "epochs",
        "lr",
        "batch_size",
        "activation",
    }
)
toml_scalars = (
    st.booleans()
    | st.integers(-5, 30)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(
        ["naive", "weight", "wieght", "ste", "synthetic", "mlp_tiny", "tiny", "all", "batchnorm", "", "../x"]
    )
    | st.text(max_size=6)
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _set(tree, path, value):
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]


@st.composite
def mutated_recipes(draw):
    raw = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(raw) if p]
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        try:
            if kind == "replace":
                _set(raw, path, draw(toml_values))
            elif kind == "delete":
                _delete(raw, path)
            else:
                parent = raw
                for k in path[:-1]:
                    parent = parent[k]
                if isinstance(parent, dict):
                    parent[draw(st.sampled_from(KNOWN_KEYS) | st.text(min_size=1, max_size=6))] = draw(toml_values)
                elif isinstance(parent, list):
                    parent.append(draw(toml_values))
        except (KeyError, IndexError, TypeError):
            pass  # the path vanished under an earlier mutation
    return raw


def _check_recipe_or_lmcerror(raw) -> None:
    from lmckit.pipeline.build import build_plan
    from lmckit.pipeline.recipe import parse_recipe, recipe_to_dict

    try:
        r = parse_recipe(raw, "mutated.toml")
    except LmcError:
        return
    # a recipe that loads is stable: its own dict form parses back to the same recipe
    again = parse_recipe(recipe_to_dict(r), "again")
    assert again == r
    try:
        build_plan(r)
    except LmcError:
        pass


@SETTINGS
@given(mutated_recipes())
def test_mutated_recipes_parse_or_raise_lmcerror(raw):
    _check_recipe_or_lmcerror(raw)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), toml_values, max_size=6))
def test_random_recipe_tables_parse_or_raise_lmcerror(raw):
    _check_recipe_or_lmcerror(raw)


set_keys = st.sampled_from(
    [".".join(map(str, p)) for p in TINY_PATHS]
    + ["models.0.options.depth", "", ".", "a..b", "models.x.name", "train.seeds.0.x", "models.9"]
)
set_values = st.sampled_from(
    [
        "3",
        "-1",
        "0.5",
        "nan",
        "inf",
        "[0,1]",
        "[0]",
        "[]",
        '"x"',
        "true",
        "{a=1}",
        "[[1]]",
        "weight",
        "",
        "=",
        "[0,",
        "1e999",
        "{epochs = 1}",
    ]
) | st.text(max_size=8)


@SETTINGS
@given(st.lists(st.tuples(set_keys, set_values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=10), max_size=4))
def test_random_set_overrides_load_or_raise_lmcerror(sets):
    from lmckit.pipeline.recipe import apply_overrides, load_recipe

    try:
        raw = apply_overrides(TINY, sets)
    except LmcError:
        return
    assert TINY == tomllib.loads((Path(__file__).resolve().parents[1] / "src/lmckit/recipes/tiny.toml").read_text())
    _check_recipe_or_lmcerror(raw)
    try:
        load_recipe("tiny", sets)
    except LmcError:
        pass


@SETTINGS
@given(
    st.text(max_size=80)
    | st.sampled_from(
        [
            "[train]\nseeds = [0, 1]\n",
            "name = 3",
            "[[models]]\nname = 1\n",
            "x = [1, 'a']",
            '[data]\ndataset = "mnist"\n',
        ]
    )
)
def test_random_recipe_text_loads_or_raises_lmcerror(tmp_path_factory, text):
    from lmckit.pipeline.recipe import load_recipe

    p = tmp_path_factory.mktemp("r") / "r.toml"
    p.write_text(text)
    try:
        load_recipe(str(p))
    except LmcError:
        pass


def test_deeply_nested_recipe_is_a_user_error(tmp_path):
    from lmckit.pipeline.recipe import load_recipe

    p = tmp_path / "r.toml"
    p.write_text("a = " + "[" * 100000 + "]" * 100000)
    with pytest.raises(LmcError, match="r.toml"):
        load_recipe(str(p))


@pytest.mark.parametrize("value", ["5", "[1]", '"x"'])
def test_model_kwargs_override_that_is_not_a_table_is_a_user_error(value):
    from lmckit.pipeline.build import build_plan
    from lmckit.pipeline.recipe import load_recipe

    with pytest.raises(LmcError, match="model_kwargs"):
        build_plan(load_recipe("tiny", [f"train.overrides={{model_kwargs={value}}}"]))


@pytest.mark.parametrize("override", ["train.overrides={seed=1}", 'models.0.overrides={dataset="cifar10"}'])
def test_overrides_cannot_contradict_seeds_or_dataset(override):
    from lmckit.pipeline.build import build_plan
    from lmckit.pipeline.recipe import load_recipe

    try:
        plan = build_plan(load_recipe("tiny", [override]))
    except LmcError:
        return
    cfgs = [t.train_config() for t in plan.experiments[0].trains.values()]
    assert [c.seed for c in cfgs] == list(plan.recipe.train.seeds)
    assert {c.dataset for c in cfgs} == {plan.recipe.data.dataset}
