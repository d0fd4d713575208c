"""fx-traced permutation specs and the function-preservation check."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmckit.errors import LmcError
from lmckit.models import create_model, list_models
from lmckit.models.registry import PROVIDERS
from lmckit.perm import PermutationSpec, apply_permutation, random_permutation, spec_for
from lmckit.perm.check import check_spec
from lmckit.perm.trace import SpecWarning, activation_sites, example_input_for, trace_spec, trace_streams
from tests.helpers.odd_models import ODD_MODELS

#: the image zoo (models a higher layer provides, hf-gpt2, have their own tier: tests/test_hf_gpt2_zoo.py)
IMAGE_ZOO = [n for n in list_models() if n not in PROVIDERS]


def _zoo(name: str, norm: str | None = None) -> nn.Module:
    kw: dict = {} if "tiny" in name else {"width_mult": 0.125}
    if not name.startswith("mlp"):
        kw["image_size"] = 8  # conv nets accept any size; keeps the tests fast
    if norm is not None:
        kw["norm"] = norm
    return create_model(name, **kw)


def _partition(spec: PermutationSpec) -> dict[frozenset, int]:
    """Group -> (key, axis) set, with names forgotten: two specs are equivalent iff these are equal."""
    return {frozenset(members): spec.sizes[g] for g, members in spec.groups.items()}


def _no_spec_warnings(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        return fn(*a, **kw)


# --------------------------------------------------------------------------- zoo: traced == rules
@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_traced_spec_equals_rule_spec(name, norm):
    model = _zoo(name, norm)
    x = example_input_for(model, batch=2)
    traced = _no_spec_warnings(trace_spec, model, x)
    rules = spec_for(model)
    assert set(traced.axes) == set(rules.axes) == set(model.state_dict())
    assert _partition(traced) == _partition(rules)
    assert sorted(traced.sizes.values()) == sorted(rules.sizes.values())
    assert traced.coverage() == rules.coverage()


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_zoo_models_pass_check_with_rules_and_traced_specs(name):
    model = _zoo(name)
    x = example_input_for(model, batch=4)
    for traced in (False, True):
        rep = check_spec(model, x, traced=traced)
        assert rep.ok, rep.summary()
        assert rep.spec_source == ("traced" if traced else "rules")
        assert rep.moved_units > 0
        assert max(rep.train_diff, rep.eval_diff, rep.stats_diff) < 1e-10


def test_group_names_follow_first_producer():
    spec = trace_spec(_zoo("resnet_tiny"), torch.randn(2, 3, 8, 8))
    assert list(spec.sizes) == [
        "conv1",
        "layer1.0.conv1",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer3.0.conv1",
        "layer3.0.conv2",
    ]
    # the stem and the first stage's blocks are one residual stream (block 0 of layer1 has no projection)
    assert spec.axes["layer1.0.conv2.weight"][0] == "conv1"
    assert spec.axes["layer2.0.shortcut.0.weight"] == ("layer2.0.conv2", "conv1", None, None)
    assert spec.axes["bn1.running_var"] == ("conv1",)
    assert spec.axes["bn1.num_batches_tracked"] == ()
    assert spec.axes["head.weight"] == (None, "layer3.0.conv2")
    assert spec.axes["head.bias"] == (None,)


# --------------------------------------------------------------------------- odd models
@pytest.mark.parametrize("name", list(ODD_MODELS))
def test_odd_models_preserve_function(name):
    om = ODD_MODELS[name]
    torch.manual_seed(0)
    model = om.factory()
    x = om.example_input()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rep = check_spec(model, x, seed=3)
    spec_warnings = [w for w in rec if issubclass(w.category, SpecWarning)]
    assert rep.ok, rep.summary()
    assert rep.spec_source == "traced"
    if om.expect == "ok":
        assert not spec_warnings and not rep.warnings
    else:
        assert spec_warnings and rep.warnings
    if om.groups is not None:
        assert len(rep.groups) == om.groups
    if om.units is not None:
        assert sum(rep.groups.values()) == om.units


def test_odd_model_planted_groups():
    spec = _no_spec_warnings(
        trace_spec, ODD_MODELS["residual_mlp"].factory(), ODD_MODELS["residual_mlp"].example_input()
    )
    # residual stream: fc_in out, both blocks' fc2 out and fc1 in, head in
    stream = {("fc_in.weight", 0), ("fc_in.bias", 0), ("head.weight", 1)}
    for b in (0, 1):
        stream |= {(f"blocks.{b}.fc2.weight", 0), (f"blocks.{b}.fc2.bias", 0), (f"blocks.{b}.fc1.weight", 1)}
    assert set(spec.groups["fc_in"]) == stream
    assert set(spec.groups["blocks.1.fc1"]) == {
        ("blocks.1.fc1.weight", 0),
        ("blocks.1.fc1.bias", 0),
        ("blocks.1.fc2.weight", 1),
    }

    spec = _no_spec_warnings(trace_spec, ODD_MODELS["skip_cnn"].factory(), ODD_MODELS["skip_cnn"].example_input())
    assert set(spec.groups["conv2"]) == {
        ("conv2.weight", 0),
        ("bn2.weight", 0),
        ("bn2.bias", 0),
        ("bn2.running_mean", 0),
        ("bn2.running_var", 0),
        ("proj.0.weight", 0),
        ("proj.1.weight", 0),
        ("proj.1.bias", 0),
        ("proj.1.running_mean", 0),
        ("proj.1.running_var", 0),
        ("head.weight", 1),
    }
    assert spec.axes["proj.0.weight"] == ("conv2", "stem", None, None)

    spec = _no_spec_warnings(
        trace_spec, ODD_MODELS["layernorm_mlp"].factory(), ODD_MODELS["layernorm_mlp"].example_input()
    )
    assert spec.axes["ln2.weight"] == ("fc2",) and spec.axes["ln2.bias"] == ("fc2",)


@pytest.mark.parametrize("name, needle", [("groupnorm_net", "GroupNorm"), ("unsupported_op", "cumsum")])
def test_unpermutable_streams_are_reported_by_name(name, needle):
    om = ODD_MODELS[name]
    with pytest.warns(SpecWarning, match=needle) as rec:
        spec = trace_spec(om.factory(), om.example_input())
    msg = " ".join(str(w.message) for w in rec)
    assert "left unpermuted" in msg
    unpermuted = {"groupnorm_net": "conv2", "unsupported_op": "fc1"}[name]
    assert repr(unpermuted) in msg
    assert spec.axes[f"{unpermuted}.weight"][0] is None
    assert unpermuted not in spec.sizes
    with pytest.raises(LmcError, match=needle):
        trace_spec(om.factory(), om.example_input(), strict=True)


# --------------------------------------------------------------------------- more op coverage
class _LayerScaleTokens(nn.Module):
    """Linear over the last axis of (N, L, C) tokens, a per-channel learned scale, softmax, transposes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 12))
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        t = x.view(x.size(0), 8, 8)  # 8 tokens of 8 features
        h = F.gelu(self.fc1(t)) * self.gamma
        h = h + F.softmax(self.fc2(h), dim=-1)
        h = h.transpose(1, 2).contiguous()  # (N, C, L)
        h = h.mean(dim=2)
        return self.head(h)


class _SharedDepthwise(nn.Module):
    """A depthwise conv, a weight-shared (called twice) 1x1 conv, stack and max over a new axis."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.dw(F.relu(self.conv(x)))))
        a = self.mix(h)
        b = self.mix(F.relu(a))
        h = torch.stack([a, b], dim=0).amax(dim=0)
        h = F.pad(h, (1, 1, 1, 1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class _Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))[:, :4]
        return self.head(h)


def test_extra_ops_layerscale_tokens_softmax_transpose():
    m = _LayerScaleTokens()
    x = torch.randn(4, 1, 8, 8)
    spec = _no_spec_warnings(trace_spec, m, x)
    assert spec.axes["gamma"] == ("fc1",)
    assert spec.axes["fc2.weight"] == ("fc1", "fc1")  # residual with softmax: fc2 output joins the stream
    assert spec.sizes == {"fc1": 12}
    assert check_spec(m, x).ok


def test_extra_ops_depthwise_shared_stack_pad():
    m = _SharedDepthwise()
    x = torch.randn(4, 1, 8, 8)
    spec = _no_spec_warnings(trace_spec, m, x)
    # depthwise conv and BN move with conv's channels; mix is applied to its own output, so in == out
    assert spec.axes["dw.weight"] == ("conv", None, None, None)
    assert spec.axes["bn.running_mean"] == ("conv",)
    assert spec.axes["mix.weight"][:2] == ("conv", "conv")
    assert spec.sizes == {"conv": 6}
    assert check_spec(m, x).ok


def test_channel_slicing_permutes_the_read_block_and_fixes_the_rest():
    m = _Sliced()
    x = torch.randn(4, 1, 8, 8)
    spec = _no_spec_warnings(trace_spec, m, x)
    # fc2's first 4 units (read by head) form a block of their own; units 4, 5 are never read and stay fixed
    assert spec.sizes == {"fc1": 8, "fc2.0": 4}
    assert spec.axes["fc2.weight"] == ((("fc2.0", 4, 1), (None, 2, 1)), "fc1")
    assert spec.axes["head.weight"] == (None, "fc2.0")
    assert check_spec(m, x).ok


def test_strided_channel_slicing_is_pinned():
    class Strided(_Sliced):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            h = F.relu(self.fc1(x.flatten(1)))
            return self.head(F.relu(self.fc2(h))[:, ::2])

    m = Strided()
    x = torch.randn(4, 1, 8, 8)
    with pytest.warns(SpecWarning, match="strided"):
        spec = trace_spec(m, x)
    assert "fc2.0" not in spec.sizes
    assert check_spec(m, x).ok


def test_untraceable_model_raises_lmc_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(LmcError, match="cannot trace DataDependent"):
        trace_spec(DataDependent(), torch.randn(2, 4))
    with pytest.raises(LmcError, match="does not run through"):
        trace_spec(ODD_MODELS["gelu_mlp"].factory(), torch.randn(2, 3, 5, 5))
    with pytest.raises(LmcError, match="example_input"):
        trace_spec(ODD_MODELS["gelu_mlp"].factory())


def test_tracing_and_checking_leave_the_model_untouched():
    m = _zoo("resnet_tiny")
    m.train()
    before = copy.deepcopy(m.state_dict())
    trace_spec(m, torch.randn(4, 3, 8, 8))
    check_spec(m, torch.randn(4, 3, 8, 8), traced=True)
    assert m.training and all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


# --------------------------------------------------------------------------- the check itself must fail on bad specs
def test_check_catches_a_wrong_spec_and_names_the_group():
    m = _zoo("resnet_tiny")
    spec = spec_for(m)
    axes = dict(spec.axes)
    axes["layer1.0.bn1.running_mean"] = (None,)  # forget one BN buffer: only train-mode stats reveal it
    bad = PermutationSpec(axes=axes, sizes=spec.sizes, shapes=spec.shapes)
    rep = check_spec(m, torch.randn(4, 3, 8, 8), spec=bad)
    assert not rep.ok
    assert rep.stats_diff > 1e-3 and rep.stats_key == "layer1.0.bn1.running_mean"
    assert rep.culprits == ["B0.0"]
    assert "FUNCTION CHANGED" in rep.summary()
    with pytest.raises(LmcError, match="does not preserve"):
        check_spec(m, torch.randn(4, 3, 8, 8), spec=bad, raise_on_fail=True)

    axes = dict(spec.axes)
    axes["head.weight"] = (None, None)  # the head no longer follows the last stream: outputs change
    bad = PermutationSpec(axes=axes, sizes=spec.sizes, shapes=spec.shapes)
    rep = check_spec(m, torch.randn(4, 3, 8, 8), spec=bad)
    assert not rep.ok and rep.eval_diff > 1e-3 and rep.train_diff > 1e-3
    assert rep.culprits == ["S2"]


# --------------------------------------------------------------------------- activation sites
def _hooked(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach())) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return out


@pytest.mark.parametrize("case", ["mlp_tiny", "resnet_tiny", *[n for n, m in ODD_MODELS.items() if m.expect == "ok"]])
def test_activation_sites_carry_their_group_equivariantly(case):
    """Each site's output, in the permuted model, is the original output permuted on axis 1 by its group."""
    torch.manual_seed(0)
    if case in ODD_MODELS:
        model, x = ODD_MODELS[case].factory(), ODD_MODELS[case].example_input()
        sites = activation_sites(model, x)
        spec = trace_spec(model, x)
    else:
        model = _zoo(case)
        x = example_input_for(model, batch=4)
        sites = activation_sites(model)
        spec = spec_for(model)
        assert sites == activation_sites_traced_names(model, x, spec)
    assert set(sites) == set(spec.sizes)
    assert all(sites.values())
    perms = random_permutation(spec, 1)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(spec, perms, model.state_dict()))
    names = [n for ns in sites.values() for n in ns]
    a, b = _hooked(model, names, x), _hooked(permuted, names, x)
    for g, ns in sites.items():
        for n in ns:
            assert a[n].shape[1] == spec.sizes[g]
            torch.testing.assert_close(b[n], a[n].index_select(1, perms[g]), rtol=1e-5, atol=1e-5)


def activation_sites_traced_names(model: nn.Module, x: torch.Tensor, spec: PermutationSpec) -> dict[str, list[str]]:
    """The traced sites of a zoo model, renamed to the rule spec's group names (for comparison)."""
    res = trace_streams(model, x)
    rename = {}
    rules = _partition(spec)
    by_members = {frozenset(m): g for g, m in spec.groups.items()}
    for g, members in res.spec.groups.items():
        assert frozenset(members) in rules
        rename[g] = by_members[frozenset(members)]
    return {rename[g]: v for g, v in res.sites.items()}


def test_activation_sites_functional_relu_falls_back_to_producers():
    om = ODD_MODELS["functional_net"]
    assert activation_sites(om.factory(), om.example_input()) == {
        "conv1": ["conv1"],
        "conv2": ["conv2"],
        "fc1": ["fc1"],
    }
    om = ODD_MODELS["skip_cnn"]  # one ReLU module called three times cannot be hooked: norms instead
    assert activation_sites(om.factory(), om.example_input()) == {
        "stem": ["stem_bn"],
        "conv1": ["bn1"],
        "conv2": ["bn2", "proj.1"],
    }


class _TiedAndDict(nn.Module):
    """Weight tying across two layers, a dict-valued submodule output, ``.mT`` transposes, a 2-D input."""

    def __init__(self, tie_first: bool):
        super().__init__()
        self.fc0 = nn.Linear(6, 5)
        self.fc_a = nn.Linear(5, 5)
        self.fc_b = nn.Linear(5, 5)
        self.fc_b.weight = self.fc_a.weight if not tie_first else self.fc_b.weight
        if tie_first:  # tie fc_b to the layer that reads the (unpermuted) input
            self.fc0 = nn.Linear(5, 5)
            self.fc_b.weight = self.fc0.weight
        self.head = nn.Linear(5, 2)

    def inner(self, x):
        h = torch.relu(self.fc_a(torch.relu(self.fc0(x))))
        return {"h": torch.relu(self.fc_b(h)).mT.mT}

    def forward(self, x):
        return self.head(self.inner(x)["h"])


def test_tied_weights_move_together_or_not_at_all():
    m = _TiedAndDict(tie_first=False)
    x = torch.randn(4, 3, 6)
    spec = _no_spec_warnings(trace_spec, m, x)
    # fc_a and fc_b share W: y = W relu(W h) forces one permutation on both axes of W and on fc0's output
    assert spec.axes["fc_a.weight"] == spec.axes["fc_b.weight"] == ("fc0", "fc0")
    assert spec.sizes == {"fc0": 5}
    assert check_spec(m, x).ok

    m = _TiedAndDict(tie_first=True)
    x = torch.randn(4, 3, 5)
    with pytest.warns(
        SpecWarning, match="units of 'fc_a' left unpermuted: 'fc0' reads an unpermuted input with weights tied"
    ):
        spec = trace_spec(m, x)
    # W's columns read the input (fixed), so fc_a's units, which W's columns also read in fc_b, cannot move;
    # W's rows (fc0 and fc_b outputs) still can, together.
    assert spec.axes["fc0.weight"] == spec.axes["fc_b.weight"] == ("fc0", None)
    assert spec.axes["fc_a.weight"] == (None, "fc0") and spec.sizes == {"fc0": 5}
    assert check_spec(m, x).ok
