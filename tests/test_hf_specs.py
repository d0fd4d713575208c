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
from lmckit.errors import LmcError  # noqa: E402
from lmckit.match import activation_matching, weight_matching  # noqa: E402
from lmckit.perm import (  # noqa: E402
    apply_permutation,
    check_spec,
    identity_permutation,
    invert_permutation,
    random_permutation,
    spec_for,
    uses_export,
)
from lmckit.perm.export_trace import export_graph, export_trace_streams  # noqa: E402
from lmckit.perm.spec import head_block_perm, validate_perms  # noqa: E402

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


def _bert_mlm():
    """The masked-LM head ``cls.predictions`` (dense, GELU, LayerNorm, decoder tied to the word embeddings)."""
    cfg = T.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, vocab_size=VOCAB,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return T.BertForMaskedLM(cfg)


def _vit():
    cfg = T.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, image_size=8,
        patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return T.ViTForImageClassification(cfg)


def _llama(**kw):
    """Grouped-query attention: 4 query heads in 2 key/value groups (head dim 4)."""
    cfg = T.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False, bos_token_id=0, eos_token_id=0, **kw,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def _llama_gqa3():
    """Grouped-query attention with 3 query heads per key/value head: 6 query heads, 2 key/value heads."""
    cfg = T.LlamaConfig(
        hidden_size=24, intermediate_size=24, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
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
    "bert_mlm": (_bert_mlm, _tokens),
    "vit": (_vit, lambda seed=0, n=2: torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))),
    "llama": (_llama, _tokens),
    "llama_mha": (_llama_mha, _tokens),
    "llama_gqa3": (_llama_gqa3, _tokens),
}
# hidden_coverage (share of matrix output rows that move) each class reaches; pinned: vocabulary / class rows
# (embedding tables count their vocabulary rows), BertModel its residual stream (it is the output); Llama's
# attention moves by whole heads (RoPE pins Q/K features; with grouped-query attention the V/O features too)
MIN_COVERAGE = {
    "gpt2": 0.7, "bert": 0.8, "bert_base": 0.4, "bert_mlm": 0.7, "vit": 0.95, "llama": 0.7, "llama_mha": 0.75,
    "llama_gqa3": 0.7,
}  # fmt: skip


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


def test_bert_mlm_structure(traced):
    """The MLM head works in the residual stream; its decoder is the word embedding (tied), vocabulary pinned."""
    m, res = traced["bert_mlm"]
    ax = res.spec.axes
    resid = ax["bert.embeddings.word_embeddings.weight"][1]
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight  # tied in the model
    assert ax["cls.predictions.decoder.weight"] == (None, resid)  # tied: one group, vocab rows pinned
    assert ax["cls.predictions.transform.dense.weight"] == (resid, resid)
    assert ax["cls.predictions.transform.LayerNorm.weight"] == (resid,)
    assert ax["cls.predictions.bias"] == (None,)


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


def _gqa_groups(spec, layer):
    """(query-head group, key/value-head group) of a Llama layer with grouped-query attention."""
    p = f"model.layers.{layer}.self_attn."
    return spec.axes[p + "q_proj.weight"][0][0][0], spec.axes[p + "k_proj.weight"][0][0][0]


@pytest.mark.parametrize("name, n_heads, n_kv", [("llama", 4, 2), ("llama_gqa3", 6, 2)])
def test_llama_gqa_heads(traced, name, n_heads, n_kv):
    """Grouped-query attention: the key/value heads move as whole blocks (k_proj and v_proj rows, one group of
    n_kv units), the query heads as whole blocks (q_proj rows and o_proj columns, one group of n_heads units),
    under one head structure of n_kv heads: a key/value-group permutation shared by both groups and a free
    query-head permutation inside each group. RoPE pins the Q/K features, the repeat pins the V/O features
    (see lmckit.perm.export_trace._ExportTracer.repeat_heads). MLP (SwiGLU: gate and up rows together) and
    residual stream (RMSNorm weights) as in multi-head Llama; nothing is reported pinned."""
    _, res = traced[name]
    spec = res.spec
    ax, d = spec.axes, 4
    gate = ax["model.layers.0.mlp.gate_proj.weight"][0]
    assert gate is not None and ax["model.layers.0.mlp.up_proj.weight"][0] == gate
    resid = ax["model.embed_tokens.weight"][1]
    assert ax["model.layers.0.input_layernorm.weight"] == (resid,)
    for layer in (0, 1):
        p = f"model.layers.{layer}.self_attn."
        gq, gkv = _gqa_groups(spec, layer)
        assert ax[p + "q_proj.weight"] == (((gq, n_heads, d),), resid)
        assert ax[p + "o_proj.weight"] == (resid, ((gq, n_heads, d),))
        assert ax[p + "k_proj.weight"] == (((gkv, n_kv, d),), resid)
        assert ax[p + "v_proj.weight"] == (((gkv, n_kv, d),), resid)
        assert spec.sizes[gq] == n_heads and spec.sizes[gkv] == n_kv and gq != gkv
        assert spec.heads[f"{gq}.heads"] == (n_kv, (gq, gkv))
    assert len(spec.heads) == 2
    assert res.warnings == []
    cov = spec.coverage()  # every attention row moves: q/k/v rows and o_proj's (residual) rows
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert ax[f"model.layers.0.self_attn.{k}.weight"][0] is not None
    assert cov["heads"][f"{_gqa_groups(spec, 0)[0]}.heads"] == {"heads": n_kv, "groups": list(_gqa_groups(spec, 0))}


def _gqa_planted(spec, seed=5):
    """A planted permutation of a GQA Llama: random MLP and residual permutations, and in every layer the two
    key/value groups swapped and the query heads of the first (new) group permuted, the second's kept."""
    perms = random_permutation(spec, seed)
    for layer in (0, 1):
        gq, gkv = _gqa_groups(spec, layer)
        r = spec.sizes[gq] // 2
        perms[gkv] = torch.tensor([1, 0])
        within = torch.stack([torch.arange(r).flip(0), torch.arange(r)])
        perms[gq] = head_block_perm(torch.tensor([1, 0]), within)
    return perms


@pytest.mark.parametrize("name", ["llama", "llama_gqa3"])
def test_llama_gqa_symmetry_is_exact_and_tight(traced, name):
    """The planted group + within-group permutation keeps the function (float64); moving one query head to the
    other key/value group (a permutation the head structure forbids) changes it, and is refused."""
    m, res = traced[name]
    spec = res.spec
    x = _tokens(1, 3)
    model = _build(name).double()
    sd = model.state_dict()
    with torch.no_grad():
        ref = model(x).logits
        model.load_state_dict(apply_permutation(spec, _gqa_planted(spec), sd))
        rel = ((model(x).logits - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-5
        bad = identity_permutation(spec)
        gq, _ = _gqa_groups(spec, 0)
        n = spec.sizes[gq]
        bad[gq] = torch.tensor([n - 1] + list(range(1, n - 1)) + [0])  # swaps a head of group 0 with one of group 1
        model.load_state_dict(apply_permutation(spec, bad, sd))
        rel_bad = ((model(x).logits - ref).abs().max() / ref.abs().max()).item()
    assert rel_bad > 1e-3
    with pytest.raises(LmcError, match="whole attention heads"):
        validate_perms(spec, bad)


@pytest.mark.parametrize("name", ["llama", "llama_gqa3"])
def test_llama_gqa_planted_recovered(traced, name):
    """Weight and activation matching undo a planted key/value-group swap with a within-group query-head
    permutation (plus random MLP and residual permutations) exactly."""
    m, res = traced[name]
    spec = res.spec
    sd = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(m.state_dict().items())
    }
    planted = _gqa_planted(spec)
    sd_b = apply_permutation(spec, planted, sd)
    inv = invert_permutation(planted)
    wm = weight_matching(spec, sd, sd_b, seed=0)
    m_a, m_b = _build(name), _build(name)
    m_a.load_state_dict(sd)
    m_b.load_state_dict(sd_b)
    data = TextDataset("random-tokens", {"train": torch.randint(0, VOCAB, (64, SEQ + 1))}, vocab_size=VOCAB)
    am = activation_matching(m_a, m_b, data, spec=spec, num_batches=2, batch_size=32)
    for grp in spec.sizes:
        assert torch.equal(wm.perms[grp], inv[grp]), grp
        assert torch.equal(am.perms[grp], inv[grp]), grp
    gq, gkv = _gqa_groups(spec, 0)
    assert not torch.equal(inv[gq], torch.arange(spec.sizes[gq]))  # the attention part was really planted


@pytest.mark.parametrize("how", ["eager", "sdpa_enable_gqa"])
def test_llama_gqa_other_attention_paths(traced, monkeypatch, how):
    """The same spec when attention is eager (matmul, softmax, matmul on repeat_kv'd heads) or sdpa with
    enable_gqa=True (no repeat_kv: the key/value heads are repeated inside the op)."""
    _, res = traced["llama"]
    kw = {}
    if how == "eager":
        kw["attn_implementation"] = "eager"
    else:
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # transformers' switch to sdpa(enable_gqa=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _llama(**kw).eval()
        gm = export_graph(m, _tokens())
        sdpa = [n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
        assert bool(sdpa) == (how != "eager") and all(n.kwargs.get("enable_gqa") for n in sdpa)
        other = export_trace_streams(m, _tokens())
    assert other.spec.axes == res.spec.axes and other.spec.heads == res.spec.heads and other.warnings == []
    rep = check_spec(m, _tokens(1, 3), spec=other.spec, tol=1e-5)
    assert rep.ok, rep.summary()


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


@pytest.mark.parametrize("name", ["gpt2", "bert", "bert_mlm", "llama", "llama_mha", "llama_gqa3"])
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


def test_llama_gqa_cli_check_spec_and_match(traced, tmp_path, capsys):
    """A user's GQA Llama folders: check-spec prints the grouped-query head structures (permuted, not pinned)
    and the preserved function; match recovers a planted group swap with within-group query-head moves."""
    import json

    from lmckit.cli import main
    from lmckit.perm import load_perms

    _, res = traced["llama"]
    spec = res.spec
    a = _build("llama")
    planted = _gqa_planted(spec)
    b = _build("llama")
    b.load_state_dict(apply_permutation(spec, planted, a.state_dict()))
    fa, fb = str(tmp_path / "a"), str(tmp_path / "b")
    a.save_pretrained(fa)
    b.save_pretrained(fb)
    assert main(["check-spec", "--hf", fa]) == 0
    out = capsys.readouterr().out
    assert "function preserved" in out
    gq, gkv = _gqa_groups(spec, 0)
    assert f"{gq}.heads (2 heads: {gq}, {gkv})" in out
    perm_file = tmp_path / "perm.json"
    assert main(["match", "--hf", fa, fb, "--out", str(perm_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["l2_after"] < 1e-5 * max(summary["l2_before"], 1.0)
    perms, inv = load_perms(perm_file), invert_permutation(planted)
    for grp in spec.sizes:
        assert torch.equal(perms[grp], inv[grp]), grp
