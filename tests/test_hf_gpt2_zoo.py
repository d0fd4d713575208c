"""The ``hf-gpt2`` zoo model (issue 26; the hf tier, skipped without transformers).

A ``transformers.GPT2LMHeadModel`` built by name: its spec (from the torch.export tracer) preserves the
function, its fused ``c_attn`` reads as W_Q / W_K / W_V for the SVD analyses, tied tensors are saved and
passed to ``functional_call`` correctly, and the pipeline trains it on a token dataset with per-token
accuracy.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the hf tier needs `pip install 'lmckit[hf]'` (transformers)")

from lmckit.errors import LmcError  # noqa: E402
from lmckit.models import create_model  # noqa: E402
from lmckit.perm import (  # noqa: E402
    apply_permutation,
    check_spec,
    invert_permutation,
    random_permutation,
    spec_for,
)


def _gpt2(**kw):
    torch.manual_seed(0)
    opts = dict(image_size=16, num_classes=40, width=16, depth=2, heads=4)
    opts.update(kw)
    return create_model("hf-gpt2", **opts)


def test_forward_gives_vocab_on_axis_1_and_a_per_token_loss():
    m = _gpt2()
    assert type(m).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, 40, (3, 16))
    out = m(x)
    assert out.shape == (3, 40, 16)
    assert math.isfinite(float(F.cross_entropy(out, x).detach()))
    assert m.lmckit_config["name"] == "hf-gpt2"


def test_spec_from_the_export_tracer_preserves_the_function():
    m = _gpt2()
    spec = spec_for(m)
    assert spec is spec_for(_gpt2())  # traced once per architecture
    rep = check_spec(m, torch.randint(0, 40, (3, 16)), spec=spec, tol=1e-5)
    assert rep.ok, rep.summary()
    assert len(spec.heads) == 2  # one head-aware attention per block
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"} <= set(spec.sizes)


def test_width_mult_and_options():
    m = _gpt2(width_mult=2.0)
    assert m.config.n_embd == 32 and m.config.n_inner == 128 and m.config.n_positions == 16
    assert _gpt2(width=18).config.n_embd == 16  # rounded to a multiple of the heads
    with pytest.raises(LmcError, match="LayerNorms"):
        _gpt2(norm="none")
    with pytest.raises(LmcError, match="token ids"):
        _gpt2(in_channels=3)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(LmcError) as e:
        _gpt2()
    assert "lmckit[hf]" in str(e.value.hint)


def test_fused_c_attn_reads_as_q_k_v_matrices():
    from lmckit.analysis.layers import layer_weight, layers_of, perms_for
    from lmckit.analysis.svd import svd_alignment
    from lmckit.report.architectures import layer_kind

    m = _gpt2()
    spec, sd = spec_for(m), m.state_dict()
    layers = {la.name: la for la in layers_of(spec, sd)}
    for lab, kind in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):
        la = layers[f"transformer.h.0.attn.c_attn:{lab}"]
        assert la.shape == (16, 16) and layer_kind(la.name) == kind
        off = {"q": 0, "k": 16, "v": 32}[lab]
        assert torch.equal(layer_weight(la, sd), sd["transformer.h.0.attn.c_attn.weight"][:, off : off + 16])
    assert layer_kind("transformer.h.0.attn.c_proj") == "W_O"
    assert layer_kind("transformer.h.0.mlp.c_fc") == "MLP in" and layer_kind("transformer.h.1.mlp.c_proj") == "MLP out"
    # a planted permutation: R(gamma) after undoing it is 1 for every matrix, W_Q / W_K / W_V included
    perms = random_permutation(spec, seed=3)
    sd_b = apply_permutation(spec, perms, sd)
    inv = invert_permutation(perms)
    assert all(torch.equal(v, sd[k]) for k, v in apply_permutation(spec, inv, sd_b).items())
    p, q = perms_for(layers["transformer.h.0.attn.c_attn:k"], inv)
    assert q is not None and p is not None
    r = svd_alignment(spec, sd, sd_b, inv, gammas=(0.0,))
    assert {la.layer.name for la in r.layers} >= {f"transformer.h.1.attn.c_attn:{x}" for x in "qkv"}
    for la in r.layers:
        (v,) = la.R.values()
        assert v["after"] == pytest.approx(1.0, abs=1e-4), la.layer.name
        assert v["before"] < 0.9, la.layer.name  # the planted permutation did move it


def test_tied_tensors_save_and_functional_call(tmp_path):
    from lmckit.store import load_state, save_state
    from lmckit.tied import drop_tied, tied_names

    m = _gpt2()
    sd = m.state_dict()
    assert tied_names(m) == {"lm_head.weight"}
    save_state(tmp_path / "m.safetensors", sd)  # safetensors refuses shared storage: written as copies
    back, _ = load_state(tmp_path / "m.safetensors")
    assert torch.equal(back["lm_head.weight"], back["transformer.wte.weight"])
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        out = torch.func.functional_call(m, drop_tied(m, back), (x,))
    assert torch.allclose(out, m(x))


def test_input_projections_read_conv1d_inputs_on_the_left_singular_vectors():
    from lmckit.analysis.projection import input_projections
    from lmckit.data import load_dataset

    m = _gpt2(image_size=32, num_classes=256)
    out = input_projections(m, spec_for(m), m.state_dict(), load_dataset("text-synthetic"), num_batches=1, batch_size=4)
    # Conv1D c_fc is (in 16, out 64): its 16-dim inputs meet the 16 left singular vectors (u), not v (64-dim)
    assert len(out["transformer.h.0.mlp.c_fc"]["mean_abs"]) == 16
    assert len(out["transformer.h.0.mlp.c_proj"]["mean_abs"]) == 16  # (in 64, out 16): rank 16
    assert "transformer.h.0.attn.c_attn:q" not in out  # column blocks of a fused weight are skipped
    # a full orthonormal basis of the inputs: sum_i (u_i . z)^2 = |z|^2 >= (mean |z|)^2 on average
    fc = out["transformer.h.0.mlp.c_fc"]
    assert sum(fc["mean_sq"]) >= fc["mean_norm"] ** 2 * (1 - 1e-4)


def test_spec_is_right_after_a_meta_device_skeleton(monkeypatch):
    """build_model checks a checkpoint on a meta-device skeleton first: that must not trace (and cache) a wrong
    spec, in which the blocks' groups are merged because every meta parameter has the same null address."""
    from lmckit.checkpoint import build_model
    from lmckit.hf import zoo as mod

    monkeypatch.setattr(mod, "_SPECS", {})
    m = _gpt2()
    model = build_model(m.lmckit_config, m.state_dict(), "test")
    sizes = spec_for(model).sizes
    assert {"transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_attn.0", "transformer.h.1.attn.c_attn.1"} <= set(sizes)
    assert len(spec_for(model).heads) == 2
