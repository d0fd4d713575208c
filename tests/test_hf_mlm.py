"""Masked-LM loss for BERT (issue 26): the masking, the loss by hand, and ``barrier --hf`` on BertForMaskedLM.

The masking and the hand-computed loss need only torch; the rest is the ``hf`` tier (skipped without
transformers). Folders are written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from lmckit.data.text import TextDataset
from lmckit.errors import LmcError
from lmckit.evaluate import IGNORE_INDEX, MaskedLMDataset, evaluate, mask_tokens


def test_mask_tokens_is_seeded_and_masks_15_percent():
    tokens = torch.randint(0, 50, (6, 20), generator=torch.Generator().manual_seed(1))
    x, y = mask_tokens(tokens, 99, seed=3)
    chosen = y != IGNORE_INDEX
    assert chosen.sum(1).tolist() == [3] * 6  # round(0.15 * 20) per window
    assert torch.equal(x[chosen], torch.full((18,), 99))
    assert torch.equal(y[chosen], tokens[chosen]) and torch.equal(x[~chosen], tokens[~chosen])
    x2, y2 = mask_tokens(tokens, 99, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = mask_tokens(tokens, 99, seed=4)
    assert not torch.equal(y, y3)
    assert (mask_tokens(tokens[:, :3], 99)[1] != IGNORE_INDEX).sum(1).tolist() == [1] * 6  # at least one
    for bad in (dict(rate=0.0), dict(rate=1.5)):
        with pytest.raises(LmcError):
            mask_tokens(tokens, 99, **bad)
    with pytest.raises(LmcError):
        mask_tokens(tokens[0], 99)


class _TableLM(nn.Module):
    """Logits ``(B, V, T)`` that depend only on the input id at each position: ``table[x]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, x):
        return self.table[x].transpose(1, 2)


def test_masked_loss_equals_hand_computation():
    # vocabulary 4, mask id 3; two windows of 4 input tokens (+1: the windows' next-token column, unused)
    w = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    data = TextDataset("tiny", {"test": w}, vocab_size=4)
    # rate 0.5: two masked positions per window
    masked = MaskedLMDataset(data, 3, rate=0.5, seed=0)
    x, y = masked.tensors("test")
    table = torch.tensor(
        [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 2.0, 0.5, -1.0]]
    )  # the model sees only [MASK] (id 3) at masked positions: logits (1, 2, 0.5, -1) there
    model = _TableLM(table)
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(0.5) + math.exp(-1))
    logit = {0: 1.0, 1: 2.0, 2: 0.5}
    targets = [int(t) for t in y[y != IGNORE_INDEX]]
    assert len(targets) == 4 and (x[y != IGNORE_INDEX] == 3).all()
    hand = sum(lse - logit[t] for t in targets) / 4  # mean over masked tokens only
    hand_acc = sum(t == 1 for t in targets) / 4  # argmax of the [MASK] row is id 1
    for bs in (1, 2):  # the batch size changes nothing
        loss, acc = evaluate(model, masked, "test", batch_size=bs)
        assert loss == pytest.approx(hand, abs=1e-6)
        assert acc == pytest.approx(hand_acc)
    with pytest.raises(LmcError, match="outside the vocabulary"):
        MaskedLMDataset(data, 4)


try:
    import transformers as T
except ImportError:  # the hf tier: the tests below skip without the optional extra
    T = None
hf_tier = pytest.mark.skipif(T is None, reason="the hf tier needs `pip install 'lmckit[hf]'` (transformers)")


def _bert_mlm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = T.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=256,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.BertForMaskedLM(cfg).eval()


@hf_tier
def test_masked_lm_is_detected_by_class():
    from lmckit.hf import adapt, masked_lm_mask_id

    assert adapt(_bert_mlm()).lmckit_mask_token_id == 255  # byte vocabulary: byte 255 never occurs in UTF-8
    assert masked_lm_mask_id(_bert_mlm(mask_token_id=7)) == 7
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert adapt(T.BertModel(cfg)).lmckit_mask_token_id is None
        gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8))
    assert masked_lm_mask_id(gpt2) is None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Folder A and folder B = a planted permutation of A (the same function)."""
    from lmckit.hf import adapt
    from lmckit.perm import apply_permutation, random_permutation, spec_for

    tmp = tmp_path_factory.mktemp("mlm")
    a = adapt(_bert_mlm(0, initializer_range=0.5))  # large weights: a function far from uniform
    spec = spec_for(a)
    b = _bert_mlm(1, initializer_range=0.5)
    b.load_state_dict(apply_permutation(spec, random_permutation(spec, 4), a.state_dict()))
    a.save_pretrained(str(tmp / "a"))
    b.save_pretrained(str(tmp / "b"))
    return tmp, str(tmp / "a"), str(tmp / "b")


@hf_tier
def test_cli_barrier_in_masked_lm_units_and_planted_permutation_is_flat(pair, capsys):
    from lmckit.cli import main

    tmp, fa, fb = pair
    base = ["--dataset", "text-synthetic", "--points", "3", "--limit", "8", "--json"]
    assert main(["barrier", "--hf", fa, fb, *base]) == 0, capsys.readouterr().err
    naive = json.loads(capsys.readouterr().out)
    assert naive["loss_unit"] == "nats/masked token"
    assert naive["loss_kind"] == "masked-LM loss (nats per masked token)"
    assert naive["masking"] == {"rate": 0.15, "rule": "[MASK]", "mask_token_id": 255, "seed": 0}
    la, lb = naive["endpoint_loss"]
    assert abs(la - lb) < 1e-4  # B is a permutation of A: the same function
    assert abs(la - math.log(256)) < 3.0  # untrained: near ln(256) nats per masked token, not per window
    assert naive["perplexity"][0] == pytest.approx(math.exp(la))
    assert naive["perplexity_barrier_factor"] == pytest.approx(math.exp(naive["loss_barrier"]))

    perm = tmp / "perm.json"
    assert main(["match", "--hf", fa, fb, "--out", str(perm), "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["barrier", "--hf", fa, fb, "--perm", str(perm), *base]) == 0, capsys.readouterr().err
    aligned = json.loads(capsys.readouterr().out)
    assert aligned["loss_unit"] == "nats/masked token"
    assert abs(aligned["loss_barrier"]) < 1e-5  # aligned B is A: a flat path
    assert max(aligned["loss"]) - min(aligned["loss"]) < 1e-5
    assert naive["loss_barrier"] > aligned["loss_barrier"] + 1e-3  # the naive path does cross a barrier

    assert main(["barrier", "--hf", fa, fb, "--dataset", "text-synthetic", "--points", "3", "--limit", "8"]) == 0
    assert "masked-LM loss (nats per masked token)" in capsys.readouterr().out
