"""Symmetry classes beyond permutations (issue 29): the algebra, the exact WM steps against brute force,
and check_spec(symmetry=...) asserting the function on transformers with and without norms."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from lmckit.errors import LmcError
from lmckit.models import create_model
from lmckit.perm import spec_for
from lmckit.perm.check import check_spec
from lmckit.perm.symmetry import (
    CLASSES,
    apply_transform,
    compose_transforms,
    derive_symmetry,
    fold_norms,
    head_step,
    invert_transform,
    perm_matrix,
    random_transform,
    sample,
    step,
    transform_matrix,
)
from lmckit.perm.trace import trace_streams

from .helpers.arch_models import HandAttention, LSTMNet, MatmulAttention, PreLNBlock
from .helpers.symmetry_models import GPTBlock, TanhMLP, perturb

GEN = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


def _tokens(d=6):
    return torch.randn(4, 5, d, generator=GEN(1), dtype=torch.float64)


def _vit(norm):
    return perturb(create_model("vit", width=16, depth=2, heads=4, norm=norm), 0.1).double()


# ------------------------------------------------------------------------------------------------ algebra
@pytest.mark.parametrize("cls", CLASSES)
def test_sample_is_in_its_class(cls):
    m = transform_matrix(sample(cls, 7, GEN()))
    eye = torch.eye(7, dtype=torch.float64)
    if cls in ("permutation", "signed"):
        assert torch.equal(m.abs().sum(0), torch.ones(7)) and torch.equal(m.abs().sum(1), torch.ones(7))
        assert set(m.unique().tolist()) <= {-1.0, 0.0, 1.0}
    if cls != "invertible":
        assert torch.allclose(m.T @ m, eye, atol=1e-12)
    else:
        s = torch.linalg.svdvals(m)
        assert 0.49 < float(s.min()) and float(s.max()) < 2.01 and not torch.allclose(m.T @ m, eye, atol=1e-2)
    q = sample("orthogonal", 7, GEN(), fix_ones=True)
    assert torch.allclose(q.T @ q, eye, atol=1e-12)
    assert torch.allclose(q @ torch.ones(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_apply_invert_compose_on_vit(cls):
    model = _vit("none")
    spec = spec_for(model)
    sym = derive_symmetry(spec, model.state_dict(), cls, model=model)
    sd = model.state_dict()
    t1, t2 = random_transform(spec, sym, 1), random_transform(spec, sym, 2)
    back = apply_transform(spec, sym, invert_transform(t1), apply_transform(spec, sym, t1, sd))
    assert max(float((back[k] - v).abs().max()) for k, v in sd.items()) < 1e-12
    two = apply_transform(spec, sym, t2, apply_transform(spec, sym, t1, sd))
    one = apply_transform(spec, sym, compose_transforms(t1, t2), sd)
    assert max(float((two[k] - one[k]).abs().max()) for k in sd) < 1e-12
    if cls == "permutation":  # the index fast path is kept: integer tensors, exactly apply_permutation's result
        from lmckit.perm import apply_permutation

        assert all(v.dim() == 1 and not v.is_floating_point() for v in t1.values())
        ref = apply_permutation(spec, t1, sd)
        assert all(torch.equal(ref[k], apply_transform(spec, sym, t1, sd)[k]) for k in sd)


# ------------------------------------------------------------------------------------------------ WM steps
def test_signed_step_is_the_brute_force_optimum():
    c = torch.randn(4, 4, generator=GEN(3), dtype=torch.float64)
    m, v = step("signed", c)
    best = max(
        float(sum(s[i] * c[i, p[i]] for i in range(4)))
        for p in itertools.permutations(range(4))
        for s in itertools.product((-1, 1), repeat=4)
    )
    assert v == pytest.approx(best, abs=1e-12) and float((m * c).sum()) == pytest.approx(best, abs=1e-12)


def test_permutation_step_is_the_brute_force_optimum():
    c = torch.randn(5, 5, generator=GEN(4), dtype=torch.float64)
    p, v = step("permutation", c)
    best = max(float(sum(c[i, q[i]] for i in range(5))) for q in itertools.permutations(range(5)))
    assert v == pytest.approx(best, abs=1e-12) and float((perm_matrix(p) * c).sum()) == pytest.approx(best)


@pytest.mark.parametrize("fix_ones", [False, True])
def test_orthogonal_step_beats_every_sampled_element(fix_ones):
    c = torch.randn(6, 6, generator=GEN(5), dtype=torch.float64)
    q, v = step("orthogonal", c, fix_ones=fix_ones)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(q.T @ q, eye, atol=1e-12) and v == pytest.approx(float((q * c).sum()))
    if fix_ones:
        assert torch.allclose(q.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    else:
        assert v == pytest.approx(float(torch.linalg.svdvals(c).sum()))  # the nuclear norm: the known maximum
    gen = GEN(6)
    for _ in range(300):
        r = sample("orthogonal", 6, gen, fix_ones=fix_ones)
        assert float((r * c).sum()) <= v + 1e-12
        # a small rotation of the optimum inside the class never improves it (first-order optimality)
        k = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 1e-3
        k = k - k.T
        if fix_ones:
            k = k - k @ torch.ones(6, 6, dtype=torch.float64) / 6 - torch.ones(6, 6, dtype=torch.float64) @ k / 6
        near = q @ torch.linalg.matrix_exp(k) if not fix_ones else torch.linalg.matrix_exp(k) @ q
        assert float((near * c).sum()) <= v + 1e-12


def test_head_step_is_the_joint_optimum():
    h, d = 3, 2
    costs = [
        ("orthogonal", torch.randn(h * d, h * d, generator=GEN(7), dtype=torch.float64)),
        ("signed", torch.randn(h * d, h * d, generator=GEN(8), dtype=torch.float64)),
    ]
    mats, v = head_step(h, costs)
    best = -1e9
    for hp in itertools.permutations(range(h)):
        tot = 0.0
        for cls, c in costs:
            for i in range(h):
                j = hp[i]
                tot += step(cls, c[i * d : (i + 1) * d, j * d : (j + 1) * d])[1]
        best = max(best, tot)
    assert v == pytest.approx(best, abs=1e-12)
    assert v == pytest.approx(sum(float((transform_matrix(m) * c).sum()) for m, (_, c) in zip(mats, costs)))


def test_invertible_has_no_wm_step():
    with pytest.raises(LmcError, match="unbounded"):
        step("invertible", torch.eye(3))


# ------------------------------------------------------------------------------------------------ folding
@pytest.mark.parametrize("factory", [lambda: _vit("layernorm"), lambda: perturb(GPTBlock()).double()])
def test_fold_norms_is_exact_and_leaves_the_model_alone(factory):
    model = factory()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64) if hasattr(model, "patch") else _tokens()
    before = copy.deepcopy(model.state_dict())
    new, folded, skipped = fold_norms(model, x)
    assert folded and not skipped
    with torch.no_grad():
        assert float((new(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name in folded:
        norm = new.get_submodule(name)
        bias = getattr(norm, "bias", None)
        assert bool((norm.weight == 1).all()) and (bias is None or bool((bias == 0).all()))


# ------------------------------------------------------------------------------------------------ check_spec
CASES = {
    "vit_none": (lambda: _vit("none"), lambda: torch.randn(4, 1, 28, 28, generator=GEN(2), dtype=torch.float64)),
    "vit_layernorm": (lambda: _vit("layernorm"), lambda: torch.randn(4, 1, 28, 28, generator=GEN(2)).double()),
    "gpt_rmsnorm_causal": (lambda: perturb(GPTBlock()).double(), _tokens),
    "preln_mha": (lambda: perturb(PreLNBlock()).double(), _tokens),
    "fused_qkv": (lambda: perturb(HandAttention()).double(), _tokens),
    "matmul_causal": (lambda: perturb(MatmulAttention()).double(), _tokens),
}
#: what each model's stream (first group) and attention heads must get under "orthogonal"
STREAM = {
    "vit_none": "patch",
    "vit_layernorm": "patch",
    "gpt_rmsnorm_causal": "embed",
    "preln_mha": "embed",
    "fused_qkv": "embed",
    "matmul_causal": "embed",
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", ["signed", "orthogonal", "invertible"])
def test_check_spec_symmetry_preserves_the_function(case, cls):
    make, xs = CASES[case]
    rep = check_spec(make(), xs(), symmetry=cls, traced=not case.startswith("vit"))
    assert rep.ok, rep.summary()
    assert max(rep.train_diff, rep.eval_diff) < 1e-5
    stream = rep.groups[STREAM[case]]
    heads = [g for g, d in rep.groups.items() if d["heads"] > 1]
    assert heads and all(rep.groups[g]["class"] in (cls, "orthogonal") for g in heads)
    if cls == "orthogonal":
        assert stream["class"] == "orthogonal"
        assert stream["fix_ones"] == (case in ("vit_layernorm", "preln_mha", "fused_qkv", "matmul_causal"))
    if cls == "signed":  # LayerNorm centres: no signs on its stream; RMSNorm and no norm take them
        assert stream["class"] == (
            "permutation" if stream["fix_ones"] or "LayerNorm" in str(stream["limit"]) else "signed"
        )
    if cls == "invertible":
        assert stream["class"] == ("invertible" if case == "vit_none" else "orthogonal")


def test_the_limits_are_real():
    """Forcing a class past the op that limits it changes the function: the refusals are not over-cautious."""
    model, x = _vit("layernorm"), CASES["vit_layernorm"][1]()
    model, _, _ = fold_norms(model, x)
    spec = spec_for(model)
    sym = derive_symmetry(spec, model.state_dict(), "orthogonal", model=model)
    for g, change in [("patch", {"fix_ones": False}), ("blocks.0.fc1", {"cls": "orthogonal"})]:
        forced = dict(sym)
        forced[g] = dataclasses.replace(sym[g], **change)
        t = random_transform(spec, forced, 0)
        only = {h: (t[h] if h == g else _ident(t[h])) for h in t}
        b = copy.deepcopy(model)
        b.load_state_dict(apply_transform(spec, forced, only, model.state_dict()))
        with torch.no_grad():
            assert float((b(x) - model(x)).abs().max() / model(x).abs().max()) > 1e-3, g


def _ident(t):
    return torch.arange(t.numel()) if t.dim() == 1 else torch.eye(t.shape[0], dtype=torch.float64)


def test_unfolded_layernorm_limits_the_stream_and_names_it():
    model = _vit("layernorm")
    rep = check_spec(model, CASES["vit_layernorm"][1](), symmetry="orthogonal")
    assert rep.ok and rep.folded  # folded by default
    from lmckit.perm.check import check_symmetry

    rep = check_symmetry(model, CASES["vit_layernorm"][1](), "orthogonal", fold=False)
    assert rep.ok and rep.groups["patch"]["class"] == "permutation"
    assert "LayerNorm 'blocks.0.ln1.norm' has a learned gain/bias: fold it" in rep.groups["patch"]["limit"]


@pytest.mark.parametrize(
    "make, x, cls, op",
    [
        (lambda: LSTMNet(), lambda: torch.randn(3, 4, 5), "orthogonal", "LSTM 'rnn'"),
        (lambda: LSTMNet(cell="gru"), lambda: torch.randn(3, 4, 5), "signed", "GRU 'rnn'"),
        (lambda: TanhMLP(), lambda: torch.randn(3, 6), "orthogonal", "tanh"),
    ],
)
def test_a_class_the_model_does_not_admit_is_refused_naming_the_op(make, x, cls, op):
    rep = check_spec(make(), x(), symmetry=cls)
    assert not rep.ok and rep.refusal and op in rep.refusal, rep.summary()
    with pytest.raises(LmcError, match=f"does not admit {cls} maps"):
        check_spec(make(), x(), symmetry=cls, raise_on_fail=True)


def test_tanh_hidden_units_take_signed_permutations():
    rep = check_spec(TanhMLP(), torch.randn(3, 6), symmetry="signed")
    assert rep.ok and rep.groups["fc1"]["class"] == "signed"


def test_lstm_spec_says_permutations_only():
    spec = trace_streams(LSTMNet(), torch.randn(3, 4, 5)).spec
    sym = derive_symmetry(spec, LSTMNet().state_dict(), "orthogonal")
    rnn = [s for g, s in sym.items() if g.startswith("rnn")]
    assert rnn and all(s.cls == "permutation" and "LSTM" in s.limit for s in rnn)


def test_unknown_class_is_refused():
    with pytest.raises(LmcError, match="unknown symmetry class 'rotation'"):
        check_spec(TanhMLP(), torch.randn(3, 6), symmetry="rotation")
