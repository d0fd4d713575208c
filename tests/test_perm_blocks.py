"""Issue 11: attention heads, embeddings, recurrent layers and block permutations (cat, flatten, pad).

Every pattern of :mod:`tests.helpers.arch_models` must trace to a spec that preserves the function (train and eval
mode), permutes the units it used to pin, and lets WM and AM recover planted permutations exactly.
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmckit.errors import LmcError
from lmckit.match import weight_matching
from lmckit.match.activation import activation_matching
from lmckit.match.weight import _solve_heads
from lmckit.perm import (
    CoverageWarning,
    PermutationSpec,
    apply_permutation,
    head_block_perm,
    invert_permutation,
    random_permutation,
    spec_for,
    split_head_perm,
    validate_perms,
)
from lmckit.perm.check import check_spec
from lmckit.perm.trace import SpecWarning, trace_spec
from tests.helpers.arch_models import ARCH_CASES


def _traced(case):
    torch.manual_seed(0)
    m = case.factory()
    x = case.example()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)  # no pattern of the table may pin anything now
        spec = trace_spec(m, x)
    return m, x, spec


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_pattern_spec_preserves_function_and_permutes_what_was_pinned(name):
    case = ARCH_CASES[name]
    m, x, spec = _traced(case)
    for item in case.permuted:
        key, axis = item.rsplit("@", 1)
        assert spec.axes[key][int(axis)] is not None, f"{item} is still pinned"
    assert len(spec.heads) == case.heads
    for seed in (0, 1):
        rep = check_spec(m, x, spec=spec, seed=seed)
        assert rep.ok, rep.summary()
        assert max(rep.train_diff, rep.eval_diff) < 1e-10
        assert rep.moved_units > 0
    # the permuted model really differs in its weights (the check can fail)
    p = random_permutation(spec, 3)
    sd = m.state_dict()
    assert any(not torch.equal(v, sd[k]) for k, v in apply_permutation(spec, p, sd).items() if v.is_floating_point())


@pytest.mark.parametrize("name", [n for n, c in ARCH_CASES.items() if c.heads])
def test_head_structure_is_needed(name):
    """Dropping the head constraint (one unconstrained assignment over all Q/K rows, as C2M3 does) breaks the
    function."""
    m, x, spec = _traced(ARCH_CASES[name])
    free = PermutationSpec(axes=spec.axes, sizes=spec.sizes, shapes=spec.shapes, heads={})
    p = random_permutation(free, 0)
    assert all(split_head_perm(p[g], h) is None for _, (h, ms) in spec.heads.items() for g in ms)
    rep = check_spec(m, x, spec=free, seed=0)
    assert not rep.ok and rep.culprits


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_wm_recovers_planted_permutation(name):
    m, _, spec = _traced(ARCH_CASES[name])
    sd = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if v.is_floating_point() else v
        for k, v in m.state_dict().items()
    }
    planted = random_permutation(spec, 7)
    res = weight_matching(spec, sd, apply_permutation(spec, planted, sd), seed=0)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g
    assert np.all(np.diff(res.objective) >= 0) and res.converged
    validate_perms(spec, res.perms)  # head-structured


class _Batches:
    name = "synthetic"

    def __init__(self, x):
        self.x = x

    def tensors(self, split, limit=None):
        return self.x[:limit], None

    def batches(self, split, batch_size, shuffle=True, generator=None, device=None):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i : i + batch_size], None


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_am_recovers_planted_permutation(name):
    case = ARCH_CASES[name]
    m, x, spec = _traced(case)
    if name == "vgg_pool_flatten":  # random init leaves some ReLU units dead (no activation to match): wake them
        with torch.no_grad():
            m.classifier[0].bias.fill_(2.0)
    gen = torch.Generator().manual_seed(2)
    data = (
        torch.randint(0, 11, (96,) + tuple(x.shape[1:]), generator=gen)
        if not x.is_floating_point()
        else torch.randn((96,) + tuple(x.shape[1:]), generator=gen)
    )
    planted = random_permutation(spec, 11)
    mb = copy.deepcopy(m)
    mb.load_state_dict(apply_permutation(spec, planted, m.state_dict()))
    res = activation_matching(m, mb, _Batches(data), spec=spec, num_batches=None, batch_size=32)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(res.perms[g], inv[g]), g


def test_solve_heads_is_the_exact_optimum():
    """Brute force over every head-structured assignment of 3 heads x 2 dims (two members)."""
    rng = np.random.default_rng(0)
    H, d = 3, 2
    costs = [rng.normal(size=(H * d, H * d)) for _ in range(2)]
    sol = _solve_heads(H, costs)
    got = sum(c[np.arange(H * d), p].sum() for c, p in zip(costs, sol))
    best = -np.inf
    ws = list(itertools.permutations(range(d)))
    for head in itertools.permutations(range(H)):
        for w1 in itertools.product(ws, repeat=H):
            for w2 in itertools.product(ws, repeat=H):
                tot = 0.0
                for c, w in zip(costs, (w1, w2)):
                    p = head_block_perm(torch.tensor(head), torch.tensor(w)).numpy()
                    tot += c[np.arange(H * d), p].sum()
                best = max(best, tot)
    assert got == pytest.approx(best, abs=1e-12)
    for p in sol:
        assert split_head_perm(torch.as_tensor(p), H) is not None


def test_random_permutation_shares_one_head_mapping():
    _, _, spec = _traced(ARCH_CASES["mha_batch_first"])
    ((h, members),) = spec.heads.values()
    for seed in range(5):
        p = random_permutation(spec, seed)
        heads = [split_head_perm(p[g], h)[0] for g in members]
        assert torch.equal(heads[0], heads[1])


def test_validate_perms_rejects_broken_head_structure():
    _, _, spec = _traced(ARCH_CASES["mha_batch_first"])
    p = random_permutation(spec, 0)
    ((h, (qk, vo)),) = spec.heads.values()
    bad = dict(p)
    bad[qk] = torch.roll(p[qk], 1)  # moves a unit across a head boundary
    with pytest.raises(LmcError, match="whole attention heads"):
        validate_perms(spec, bad)
    bad = dict(p)
    hv, wv = split_head_perm(p[vo], h)
    bad[vo] = head_block_perm(torch.roll(hv, 1), wv)  # different head mapping for V/O
    with pytest.raises(LmcError, match="differently"):
        validate_perms(spec, bad)


def test_spec_json_roundtrip_keeps_segments_and_heads():
    _, _, spec = _traced(ARCH_CASES["hand_attention_fused"])
    back = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.axes == spec.axes and back.heads == spec.heads and back.sizes == spec.sizes
    seg = spec.axes["qkv.weight"][0]
    assert isinstance(seg, tuple) and [s[0] for s in seg] == ["qkv.0", "qkv.0", "qkv.1"]


def test_block_axes_index_as_documented():
    """cat/pad/flatten/LSTM gates: the spec's segments, checked against hand-written expectations."""
    _, _, spec = _traced(ARCH_CASES["vgg_pool_flatten"])
    assert spec.axes["classifier.0.weight"] == ("classifier.0", (("features.3", 6, 9),))
    _, _, spec = _traced(ARCH_CASES["cat_skip"])
    assert spec.axes["c.weight"][1] == (("a", 4, 1), ("b", 5, 1))
    assert spec.axes["bn.running_mean"] == ((("a", 4, 1), ("b", 5, 1)),)
    _, _, spec = _traced(ARCH_CASES["resnet_option_a"])
    assert spec.axes["b2.conv2.weight"][0] == (("pad.pad_lo", 2, 1), ("conv", 4, 1), ("pad.pad_hi", 2, 1))
    _, _, spec = _traced(ARCH_CASES["lstm_2layer"])
    assert spec.axes["rnn.weight_hh_l1"] == ((("rnn.l1", 7, 1),) * 4, "rnn.l1")
    assert spec.axes["rnn.weight_ih_l1"] == ((("rnn.l1", 7, 1),) * 4, "rnn.l0")
    _, _, spec = _traced(ARCH_CASES["mha_batch_first"])
    assert spec.axes["attn.in_proj_weight"] == ((("attn.qk", 8, 1), ("attn.qk", 8, 1), ("attn.vo", 8, 1)), "embed")
    assert spec.axes["attn.out_proj.weight"] == ("embed", "attn.vo")


def test_vacuous_spec_fails_the_check():
    class Pinned(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)).mean(1))

    m = Pinned()
    with pytest.warns(SpecWarning, match="TransformerEncoderLayer"):
        rep = check_spec(m, torch.randn(3, 5, 4))
    assert not rep.ok and rep.vacuous
    assert "NO UNITS PERMUTED" in rep.summary() and "TransformerEncoderLayer" in rep.summary()
    with pytest.raises(LmcError, match="permutes no units"):
        rep.raise_if_failed()


def test_wm_warns_on_low_coverage():
    class HalfPinned(nn.Module):  # fc1's units permutable; fc2's pinned by an op the tracer refuses
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 3)
            self.fc2 = nn.Linear(3, 40)
            self.head = nn.Linear(40, 2)

        def forward(self, x):
            return self.head(torch.cumsum(self.fc2(torch.relu(self.fc1(x))), 1))

    m = HalfPinned()
    with pytest.warns(SpecWarning):
        spec = trace_spec(m, torch.randn(2, 4))
    assert spec.coverage()["hidden_coverage"] < 0.5
    sd = m.state_dict()
    with pytest.warns(CoverageWarning, match="threshold 50%"):
        weight_matching(spec, sd, sd)
    _, _, good = _traced(ARCH_CASES["mha_batch_first"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        sd = ARCH_CASES["mha_batch_first"].factory().state_dict()
        weight_matching(good, sd, sd)


@pytest.mark.parametrize(
    "name",
    [
        "mha_batch_first",
        "hand_attention_fused",
        "lstm_2layer",
        "gru_2layer",
        "resnet_option_a",
        "vgg_pool_flatten",
        "cat_skip",
        "vit_tiny",
        "lstm_tiny",
    ],
)
def test_r_gamma_on_attention_gate_and_block_matrices(name):
    """R(gamma) = 1 for a model and its planted permutation once un-permuted, on W_Q/W_K/W_V/W_O, gate and block
    layers."""
    from lmckit.analysis import layers_of, svd_alignment, truncate_state
    from lmckit.models import create_model

    if name in ARCH_CASES:
        _, _, spec = _traced(ARCH_CASES[name])
        sd = ARCH_CASES[name].factory().state_dict()
    else:
        m = create_model(name)
        spec, sd = spec_for(m), m.state_dict()
    sd = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) if v.is_floating_point() else v
        for k, v in sd.items()
    }
    planted = random_permutation(spec, 4)
    res = svd_alignment(spec, sd, apply_permutation(spec, planted, sd), invert_permutation(planted))
    for g in ("0", "0.3"):
        assert res.R[g]["after"] == pytest.approx(1.0, abs=1e-6)
        assert res.R[g]["before"] < 0.9
    names = [la.layer.name for la in res.layers]
    if "attn" in name or name == "vit_tiny":
        assert any(n.endswith(":q") for n in names) and any(n.endswith(":v") for n in names)
        assert any(n.endswith("out_proj") for n in names)
    if "lstm" in name or "gru" in name:
        assert any(n.endswith(":g" if "lstm" in name else ":n") or n.endswith(":i") for n in names)
    # full-rank truncation gives the weights back, split layers included
    out, _ = truncate_state(spec, sd, gamma=0.0)
    for layer in layers_of(spec, sd):
        assert torch.allclose(out[layer.key], sd[layer.key], atol=1e-5)


def test_fused_qkv_heads_used_otherwise_are_pinned():
    """Summing the (3, H, d) projections mixes Q, K and V: no head permutation survives; pinned with a warning."""
    from tests.helpers.arch_models import TimmAttention

    class Summed(TimmAttention):
        def forward(self, x):
            B, N, C = x.shape[0], x.shape[1], self.embed.out_features
            h = self.embed(x)
            qkv = self.qkv(self.norm(h)).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            s = qkv.sum(0)
            o = F.scaled_dot_product_attention(s, s, s).transpose(1, 2).reshape(B, N, C)
            return self.head((h + self.proj(o)).mean(1))

    m = Summed()
    x = ARCH_CASES["timm_attention_unbind"].example()
    with pytest.warns(SpecWarning):
        spec = trace_spec(m, x)
    assert not spec.heads and spec.axes["qkv.weight"][0] is None
    assert check_spec(m, x, spec=spec).ok
