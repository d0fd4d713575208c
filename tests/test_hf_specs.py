"""Hugging Face ``transformers`` models (the optional ``hf`` tier; skipped without transformers).

Specs come from :mod:`lmckit.perm.export_trace` (torch.export + ATen op rules) on models built from small
configs (no download). For each class: the spec preserves the function (float64, eval and train mode with
dropout 0), its coverage is what the structure allows, and weight and activation matching recover a planted
permutation exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf tier needs `pip install 'lmckit[hf]'` (transformers)")

from lmckit.data.text import TextDataset  # noqa: E402
from lmckit.match import activation_matching, weight_matching  # noqa: E402
from lmckit.perm import (  # noqa: E402
    apply_permutation,
    check_spec,
    invert_permutation,
    random_permutation,
    spec_for,
    uses_export,
)
from lmckit.perm.export_trace import export_trace_streams  # noqa: E402

VOCAB, SEQ = 40, 8


def _gpt2():
    cfg = T.GPT2Config(
        n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return T.GPT2LMHeadModel(cfg)


def _bert():
    cfg = T.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, vocab_size=VOCAB,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return T.BertForSequenceClassification(cfg)


def _bert_base():
    cfg = T.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=VOCAB,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return T.BertModel(cfg)


def _vit():
    cfg = T.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, image_size=8,
        patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return T.ViTForImageClassification(cfg)


def _llama():
    cfg = T.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def _llama_mha():
    cfg = T.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def _tokens(seed=0, n=2):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "gpt2": (_gpt2, _tokens),
    "bert": (_bert, _tokens),
    "bert_base": (_bert_base, _tokens),
    "vit": (_vit, lambda seed=0, n=2: torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))),
    "llama": (_llama, _tokens),
    "llama_mha": (_llama_mha, _tokens),
}
# hidden_coverage (share of matrix output rows that move) each class reaches; pinned: vocabulary / class rows
# (embedding tables count their vocabulary rows), BertModel its residual stream (it is the output), Llama with
# grouped-query attention its attention (see test_llama_gqa_pins_attention)
# of the output layers always; Llama additionally its attention (see test_llama_pins_rope_attention)
MIN_COVERAGE = {"gpt2": 0.7, "bert": 0.8, "bert_base": 0.4, "vit": 0.95, "llama": 0.5, "llama_mha": 0.75}


def _build(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name][0]().eval()


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name in MODELS:
        m = _build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = (m, export_trace_streams(m, MODELS[name][1]()))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_preserves_function(traced, name):
    m, res = traced[name]
    assert uses_export(m)
    rep = check_spec(m, MODELS[name][1](1, 3), spec=res.spec, tol=1e-5)
    print(name, rep.summary())  # coverage: units and entries permuted, heads (shown with -s)
    assert rep.ok, rep.summary()
    assert rep.eval_diff < 1e-5 and rep.train_diff < 1e-5
    assert rep.coverage["hidden_coverage"] >= MIN_COVERAGE[name]


def test_broken_spec_is_caught(traced):
    """The check can fail: moving GPT-2's MLP rows without its c_proj rows changes the function."""
    m, res = traced["gpt2"]
    spec = res.spec
    g = next(g for g in spec.sizes if g.endswith("mlp.c_fc"))
    key = g.replace("c_fc", "c_proj") + ".weight"
    axes = dict(spec.axes)
    axes[key] = (None, axes[key][1])
    bad = type(spec)(axes=axes, sizes=spec.sizes, shapes=spec.shapes, heads=spec.heads)
    assert not check_spec(m, _tokens(), spec=bad).ok


def test_gpt2_structure(traced):
    """Conv1D's transposed weights, the fused c_attn split into Q/K and V/O heads, tied embeddings."""
    _, res = traced["gpt2"]
    ax = res.spec.axes
    resid = ax["transformer.wte.weight"][1]
    assert resid is not None and ax["lm_head.weight"] == (None, resid)  # tied: one group, vocab rows pinned
    assert ax["transformer.h.0.mlp.c_fc.weight"][0] == resid  # Conv1D: (in, out)
    fc = ax["transformer.h.0.mlp.c_fc.weight"][1]
    assert ax["transformer.h.0.mlp.c_proj.weight"] == (fc, resid)
    segs = ax["transformer.h.0.attn.c_attn.weight"][1]
    assert [n for _, n, _ in segs] == [16, 16, 16] and segs[0][0] == segs[1][0] != segs[2][0]
    assert any(set(m) == {segs[0][0], segs[2][0]} and h == 4 for h, m in res.spec.heads.values())


def test_bert_structure(traced):
    _, res = traced["bert"]
    ax = res.spec.axes
    resid = ax["bert.embeddings.word_embeddings.weight"][1]
    for k in ("position_embeddings", "token_type_embeddings"):
        assert ax[f"bert.embeddings.{k}.weight"] == (None, resid)
    q = ax["bert.encoder.layer.0.attention.self.query.weight"][0]
    assert ax["bert.encoder.layer.0.attention.self.key.weight"][0] == q  # Q and K share features
    assert ax["bert.pooler.dense.weight"][1] == resid and ax["classifier.weight"][0] is None


def test_llama_rope_heads_move_whole(traced):
    """RoPE rotates each head's feature pairs by position: Q/K heads move as whole blocks (no within-head
    permutation), V/O heads with free within-head permutations, one head mapping for both."""
    _, res = traced["llama_mha"]
    ax, heads = res.spec.axes, res.spec.heads
    q = ax["model.layers.0.self_attn.q_proj.weight"][0]
    assert isinstance(q, tuple) and len(q) == 1 and q[0][1:] == (4, 4)  # 4 heads of 4 features, as blocks
    assert ax["model.layers.0.self_attn.k_proj.weight"][0] == q
    v = ax["model.layers.0.self_attn.v_proj.weight"][0]
    assert isinstance(v, str) and ax["model.layers.0.self_attn.o_proj.weight"][1] == v
    assert any(h == 4 and set(m) == {v, q[0][0]} for h, m in heads.values())
    assert not any("attention" in w for w in res.warnings)


def test_llama_gqa_pins_attention(traced):
    """With grouped-query attention the heads are not permuted yet (the key/value-group plus within-group
    query-head symmetry is not expressed): attention is pinned and said so; the MLP (SwiGLU: gate and up
    rows together) and the residual stream (RMSNorm weights) are permuted."""
    _, res = traced["llama"]
    ax = res.spec.axes
    gate = ax["model.layers.0.mlp.gate_proj.weight"][0]
    assert gate is not None and ax["model.layers.0.mlp.up_proj.weight"][0] == gate
    resid = ax["model.embed_tokens.weight"][1]
    assert ax["model.layers.0.input_layernorm.weight"] == (resid,)
    assert ax["model.layers.0.self_attn.q_proj.weight"][0] is None
    assert any("attention heads" in w for w in res.warnings)


def _planted(name, traced, seed=3):
    m, res = traced[name]
    spec = res.spec
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():  # generic weights (no ties between units), tied tensors kept tied
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
    if "lm_head.weight" in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    planted = random_permutation(spec, seed)
    return spec, sd, planted, apply_permutation(spec, planted, sd)


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_recovers_planted(traced, name):
    spec, sd, planted, sd_b = _planted(name, traced)
    res = weight_matching(spec, sd, sd_b, seed=0)
    inv = invert_permutation(planted)
    for grp in spec.sizes:
        assert torch.equal(res.perms[grp], inv[grp]), grp
    back = apply_permutation(spec, res.perms, sd_b)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "llama_mha"])
def test_activation_matching_recovers_planted(traced, name):
    spec, sd, planted, sd_b = _planted(name, traced)
    m_a, m_b = _build(name), _build(name)
    m_a.load_state_dict(sd)
    m_b.load_state_dict(sd_b)
    data = TextDataset("random-tokens", {"train": torch.randint(0, VOCAB, (64, SEQ + 1))}, vocab_size=VOCAB)
    res = activation_matching(m_a, m_b, data, spec=spec, num_batches=2, batch_size=32)
    inv = invert_permutation(planted)
    for grp in spec.sizes:
        assert torch.equal(res.perms[grp], inv[grp]), grp


def test_spec_for_dispatches_to_export(traced):
    m, res = traced["gpt2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = spec_for(m, _tokens())
    assert spec.axes == res.spec.axes and spec.sizes == res.spec.sizes
