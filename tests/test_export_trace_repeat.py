"""Repeated heads (grouped-query attention) in the ``torch.export`` tracer, on small plain-torch modules.

The Hugging Face Llama checks live in tests/test_hf_specs.py (the hf tier); these need only torch: a
grouped-query attention without rotary embeddings (so Q/K features would be free in multi-head attention),
written with ``repeat_kv``'s ``[:, :, None].expand(...).reshape(...)``, with ``repeat_interleave`` and with
``enable_gqa=True``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmckit.errors import LmcError
from lmckit.match import weight_matching
from lmckit.perm import apply_permutation, check_spec, invert_permutation, random_permutation
from lmckit.perm.export_trace import export_trace_streams
from lmckit.perm.spec import validate_perms

D, H, KV, HD, T = 16, 6, 2, 4, 5


class ToyGQA(nn.Module):
    """One grouped-query attention block (6 query heads, 2 key/value heads of 4 features) and an MLP."""

    def __init__(self, how: str = "repeat"):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(3, D)
        self.q, self.k, self.v = nn.Linear(D, H * HD), nn.Linear(D, KV * HD), nn.Linear(D, KV * HD)
        self.o = nn.Linear(H * HD, D)
        self.fc, self.out = nn.Linear(D, 24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.inp(x)
        q = self.q(h).view(b, T, H, HD).transpose(1, 2)
        k = self.k(h).view(b, T, KV, HD).transpose(1, 2)
        v = self.v(h).view(b, T, KV, HD).transpose(1, 2)
        if self.how == "repeat":
            k = k[:, :, None].expand(b, KV, H // KV, T, HD).reshape(b, H, T, HD)
            v = v[:, :, None].expand(b, KV, H // KV, T, HD).reshape(b, H, T, HD)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.how == "repeat_interleave":
            k, v = k.repeat_interleave(H // KV, dim=1), torch.repeat_interleave(v, H // KV, dim=-3)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, T, H * HD))
        return self.out(torch.relu(self.fc(h)))


def _x(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, T, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["repeat", "repeat_interleave", "enable_gqa"])
def traced(request):
    torch.manual_seed(0)
    m = ToyGQA(request.param).eval()
    return m, export_trace_streams(m, _x())


def test_repeated_heads_spec(traced):
    """Query heads (q rows and biases, o columns) and key/value heads (k and v rows and biases) move as whole
    blocks under one head structure of 2 heads; the residual stream and the MLP move freely; nothing pinned
    is reported (the Q/K and V/O features are pinned by the repeat, silently: that is the symmetry's form)."""
    _, res = traced
    spec, ax = res.spec, res.spec.axes
    gq, gkv = ax["q.weight"][0][0][0], ax["k.weight"][0][0][0]
    resid = ax["inp.weight"][0]
    assert isinstance(resid, str)
    assert ax["q.weight"] == (((gq, H, HD),), resid) and ax["q.bias"] == (((gq, H, HD),),)
    assert ax["o.weight"] == (resid, ((gq, H, HD),))
    for k in ("k", "v"):
        assert ax[f"{k}.weight"] == (((gkv, KV, HD),), resid) and ax[f"{k}.bias"] == (((gkv, KV, HD),),)
    assert spec.sizes[gq] == H and spec.sizes[gkv] == KV
    assert spec.heads == {f"{gq}.heads": (KV, (gq, gkv))}
    assert isinstance(ax["fc.weight"][0], str) and res.warnings == []


def test_repeated_heads_keep_the_function(traced):
    m, res = traced
    m = m.double()
    rep = check_spec(m, _x(1).double(), spec=res.spec, tol=1e-9)
    assert rep.ok, rep.summary()
    m.float()


def test_query_head_leaving_its_group_breaks_the_function(traced):
    """The head structure is needed: a query-head permutation that moves a head to the other key/value group
    (all else fixed) changes the output, and validate_perms refuses it."""
    m, res = traced
    spec = res.spec
    gq = spec.axes["q.weight"][0][0][0]
    perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
    perms[gq] = torch.tensor([3, 1, 2, 0, 4, 5])  # head 0 (group 0) <-> head 3 (group 1)
    x = _x(2)
    with torch.no_grad():
        ref = m(x)
        sd = m.state_dict()
        m.load_state_dict(apply_permutation(spec, perms, sd))
        moved = m(x)
        m.load_state_dict(sd)
    assert (moved - ref).abs().max() > 1e-3
    with pytest.raises(LmcError, match="whole attention heads"):
        validate_perms(spec, perms)


def test_repeated_heads_planted_weight_matching(traced):
    m, res = traced
    spec = res.spec
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    planted = random_permutation(spec, 4)
    gq = spec.axes["q.weight"][0][0][0]
    assert not torch.equal(planted[gq], torch.arange(H))
    wm = weight_matching(spec, sd, apply_permutation(spec, planted, sd), seed=0)
    inv = invert_permutation(planted)
    for grp in spec.sizes:
        assert torch.equal(wm.perms[grp], inv[grp]), grp


def test_repeat_without_a_permuted_source_stays_in_place(monkeypatch):
    """Soundness fallback: if the key/value heads end up without a group (here forced by dropping their name,
    as happens to a stream the tracer cannot name), the repeated query heads must not move freely either: they
    are left in place and said so, and the spec still keeps the function."""
    from lmckit.perm import trace as tr_mod

    base = tr_mod._Tracer._name_groups

    def forget_sources(self, members, refined, used, pinned_root, msgs):
        root_group, sizes = base(self, members, refined, used, pinned_root, msgs)
        for _rep, e, _, _ in getattr(self, "repeats", []):
            g = root_group.pop(self.uf.find(e), None)
            sizes.pop(g, None)
        return root_group, sizes

    monkeypatch.setattr(tr_mod._Tracer, "_name_groups", forget_sources)
    torch.manual_seed(0)
    m = ToyGQA().eval()
    res = export_trace_streams(m, _x())
    ax = res.spec.axes
    assert ax["q.weight"][0] is None and ax["k.weight"][0] is None and ax["o.weight"][1] is None
    assert res.spec.heads == {}
    assert any("repeated heads whose source is not permuted" in w for w in res.warnings)
    assert check_spec(m.double(), _x(1).double(), spec=res.spec, tol=1e-9).ok
