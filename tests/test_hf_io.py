"""Hugging Face folders in and out (``lmckit.hf``, ``--hf``): local safetensors only, round trips, CLI.

Skipped without transformers (the optional ``hf`` extra). Folders are written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf tier needs `pip install 'lmckit[hf]'` (transformers)")

from lmckit.cli import main  # noqa: E402
from lmckit.errors import LmcError  # noqa: E402
from lmckit.hf import adapt, load_hf, save_hf  # noqa: E402
from lmckit.perm import apply_permutation, invert_permutation, load_perms, random_permutation, spec_for  # noqa: E402


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=256, n_positions=32, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.GPT2LMHeadModel(cfg).eval()


def _save(model, folder, **kw):
    model.save_pretrained(str(folder), **kw)
    return str(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Folder A, folder B = a planted permutation of A (same function), the spec and the planted perms."""
    tmp = tmp_path_factory.mktemp("hf")
    a = adapt(_gpt2(0))
    spec = spec_for(a)
    planted = random_permutation(spec, 4)
    b = _gpt2(1)
    b.load_state_dict(apply_permutation(spec, planted, a.state_dict()))
    return tmp, spec, planted, _save(a, tmp / "a"), _save(b, tmp / "b")


def test_load_round_trip_and_function(pair):
    tmp, spec, planted, fa, fb = pair
    ma, sa = load_hf(fa)
    ref = _gpt2(0)
    assert all(torch.equal(sa[k], v) for k, v in ref.state_dict().items())
    assert sa["lm_head.weight"].data_ptr() == sa["transformer.wte.weight"].data_ptr()  # still tied
    x = torch.randint(0, 256, (2, 12))
    out = ma(x)
    assert out.shape == (2, 256, 12)  # (B, V, T): cross_entropy over axis 1
    assert torch.allclose(out, ref(x).logits.transpose(1, 2))
    mb, _ = load_hf(fb)
    assert torch.allclose(mb(x), out, atol=1e-5)  # B is a permutation of A


def test_sharded_folder_is_read(pair, tmp_path):
    _, _, _, fa, _ = pair
    m, _ = load_hf(fa)
    folder = _save(_gpt2(0), tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sd = load_hf(folder)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    (
        tmp_path
        / "sharded"
        / json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"][
            "transformer.h.0.attn.c_attn.weight"
        ]
    ).unlink()
    with pytest.raises(LmcError, match="shard .* missing"):
        load_hf(folder)


def test_save_round_trip_loads_with_from_pretrained(pair, tmp_path):
    _, spec, _, fa, _ = pair
    m, sd = load_hf(fa)
    half = {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}
    out = save_hf(m, half, tmp_path / "out")
    back = T.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True)
    assert all(torch.equal(back.state_dict()[k], half[k]) for k in half)
    with pytest.raises(LmcError, match="already exists"):
        save_hf(m, half, out)


def test_refusals(tmp_path, pair):
    with pytest.raises(LmcError, match="Hub id.*local folders only"):
        load_hf("openai-community/gpt2")
    with pytest.raises(LmcError, match="does not exist"):
        load_hf(str(tmp_path / "nothing" / "here"))
    _, _, _, fa, _ = pair
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((tmp_path.parent / "x").exists() and "" or open(f"{fa}/config.json").read())
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(LmcError, match="pickle.*convert it to safetensors"):
        load_hf(str(pk))
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    with pytest.raises(LmcError, match="no config.json"):
        load_hf(str(nocfg))
    custom = tmp_path / "custom"
    custom.mkdir()
    cfg = json.loads(open(f"{fa}/config.json").read())
    (custom / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(LmcError, match="custom model code"):
        load_hf(str(custom))


def test_cli_match_check_spec_and_errors(pair, tmp_path, capsys):
    _, spec, planted, fa, fb = pair
    out = tmp_path / "perm.json"
    assert main(["match", "--hf", fa, fb, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["l2_after"] < 1e-5 * max(summary["l2_before"], 1.0)
    perms = load_perms(out)
    inv = invert_permutation(planted)
    for g in spec.sizes:
        assert torch.equal(perms[g], inv[g]), g
    assert main(["check-spec", "--hf", fa]) == 0
    assert "function preserved" in capsys.readouterr().out
    assert main(["match", "--hf", fa, "openai-community/gpt2", "--out", str(tmp_path / "p2.json")]) == 2
    err = capsys.readouterr().err
    assert "local folders only" in err and "Traceback" not in err


def test_cli_merge_writes_a_loadable_folder(pair, tmp_path, capsys):
    _, _, _, fa, fb = pair
    out = tmp_path / "merged"
    rc = main(
        ["merge", "--hf", fa, fb, "--out", str(out), "--dataset", "text-synthetic", "--no-curve", "--limit", "8",
         "--json"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    back = T.GPT2LMHeadModel.from_pretrained(summary["merged_hf_folder"], local_files_only=True)
    ma, _ = load_hf(fa)
    x = torch.randint(0, 256, (2, 12))
    # B is an exact permutation of A: the aligned average is A itself (same function)
    assert torch.allclose(back(x).logits, ma(x).transpose(1, 2), atol=1e-4)


def test_cli_barrier_in_nats_per_token(pair, capsys):
    _, _, _, fa, fb = pair
    rc = main(["barrier", "--hf", fa, fb, "--dataset", "text-synthetic", "--points", "3", "--limit", "8", "--json"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    import math

    assert res["loss_unit"] == "nats/token"
    la, lb = res["endpoint_loss"]
    assert abs(la - lb) < 1e-4  # B is a permutation of A: the same function
    assert abs(la - math.log(256)) < 0.5  # an untrained byte model: about ln(256) nats per token, not per window
    assert res["perplexity"][0] == pytest.approx(math.exp(la))
    assert res["perplexity_barrier_factor"] == pytest.approx(math.exp(res["loss_barrier"]))


def test_cli_analyze_and_landscape_run_on_hf_folders(pair, tmp_path, capsys):
    """Tied embeddings pass through analyze's functional_call; landscape evaluates per token."""
    _, _, _, fa, fb = pair
    assert main(["analyze", "--hf", fa, fb, "--dataset", "text-synthetic", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["l2_before"] > 0 and any(p["name"] == "lm_head" for p in res["per_layer"])
    plot = tmp_path / "plane.png"
    fc = _save(_gpt2(2), tmp_path / "c")
    args = ["landscape", "--hf", fa, fb, fc, "--dataset", "text-synthetic", "--limit", "4", "--grid", "3"]
    assert main(args + ["--plot", str(plot), "--json"]) == 0
    land = json.loads(capsys.readouterr().out)
    assert plot.is_file() and all(abs(v - 5.545) < 0.5 for row in land["loss"] for v in row)  # ~ln(256) per token
