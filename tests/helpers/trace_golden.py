"""Golden specs of the fx (and torch.export) tracer: every model it is tested on, its full result as JSON.

Why: the tracer was split from one class into a core and op-rule modules (issue 23); the split must not change
one spec. :func:`cases` lists every zoo model (tiny and default sizes, each norm, and the reduced sizes the
tests trace) and every model the tests trace (``tests/helpers`` catalogues, the test files' own models, the
Hugging Face models of ``test_hf_specs`` when ``transformers`` is installed); :func:`snapshot` serialises a
:class:`~lmckit.perm.trace.TraceResult` deterministically (spec axes, sizes, shapes, heads, ops, warnings,
activation sites, producers, opaque ops; every mapping as a list of pairs, so order counts too).

Regenerate (only when a spec change is intended, and say why in the commit)::

    PYTHONPATH=src python -m tests.helpers.trace_golden   # writes tests/data/trace_golden.json

``tests/test_trace_rules.py`` compares each case against that file.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "trace_golden.json"

#: (build the model, build its example input, tracer: "fx", "fx-strict" (strict=True) or "export")
Case = tuple[Callable[[], nn.Module], Callable[[], Any], str]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the tests' inline models (copied: local classes)
class _Strided(nn.Module):  # test_perm_trace.test_strided_channel_slicing_is_pinned
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        return self.head(F.relu(self.fc2(h))[:, ::2])


class _PinnedEncoder(nn.Module):  # test_perm_blocks.test_vacuous_spec_fails_the_check
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class _HalfPinned(nn.Module):  # test_perm_blocks.test_wm_warns_on_low_coverage
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 40)
        self.head = nn.Linear(40, 2)

    def forward(self, x):
        return self.head(torch.cumsum(self.fc2(torch.relu(self.fc1(x))), 1))


def _summed_attention() -> nn.Module:  # test_perm_blocks.test_fused_qkv_heads_used_otherwise_are_pinned
    from tests.helpers.arch_models import TimmAttention

    class Summed(TimmAttention):
        def forward(self, x):
            B, N, C = x.shape[0], x.shape[1], self.embed.out_features
            h = self.embed(x)
            qkv = self.qkv(self.norm(h)).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            s = qkv.sum(0)
            o = F.scaled_dot_product_attention(s, s, s).transpose(1, 2).reshape(B, N, C)
            return self.head((h + self.proj(o)).mean(1))

    return Summed()


class _UserNet(nn.Module):  # test_user_architectures MODULE.Net
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(196, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], 4, 196))
        y = self.ln(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        return self.head(t.mean(1))


class _UserOpaque(nn.Module):  # test_user_architectures MODULE.Opaque
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x):
        return self.enc(x).sum(1)


def _folded_gpt_block() -> nn.Module:  # test_match_symmetric.test_wm_on_a_traced_gpt_block_with_rmsnorm
    from lmckit.perm.symmetry import fold_norms
    from tests.helpers.symmetry_models import GPTBlock, perturb

    torch.manual_seed(0)
    return fold_norms(perturb(GPTBlock()), torch.randn(4, 5, 6, generator=_gen(2)))[0]


# ------------------------------------------------------------------ the catalogue
def _zoo_cases() -> dict[str, Case]:
    from lmckit.models import create_model, list_models, model_entry
    from lmckit.models.registry import PROVIDERS
    from lmckit.perm.trace import example_input_for

    out: dict[str, Case] = {}

    def add(name: str, **kw: Any) -> None:
        label = "zoo:" + name + "".join(f",{k}={v}" for k, v in sorted(kw.items()))

        def build(name=name, kw=kw):
            torch.manual_seed(0)
            return create_model(name, **kw)

        out[label] = (build, lambda build=build: example_input_for(build(), batch=2), "fx")

    for name in (n for n in list_models() if n not in PROVIDERS):  # hf-gpt2: the hf cases below trace GPT-2
        params = inspect.signature(model_entry(name).factory).parameters
        norms = ("none", "batchnorm", "layernorm") if "norm" in params else (None,)
        add(name)  # default size (the tiny models' default is their size)
        for norm in norms:
            kw: dict[str, Any] = {} if "tiny" in name else {"width_mult": 0.125}
            if not name.startswith("mlp"):
                kw["image_size"] = 8  # test_perm_trace's reduced sizes
            if norm is not None:
                kw["norm"] = norm
            add(name, **kw)
    return out


def _helper_cases() -> dict[str, Case]:
    from tests.helpers.arch_models import ARCH_CASES
    from tests.helpers.odd_models import ODD_MODELS
    from tests.helpers.symmetry_models import GPTBlock, TanhMLP
    from tests.test_perm_trace import _LayerScaleTokens, _SharedDepthwise, _Sliced, _TiedAndDict

    out: dict[str, Case] = {}
    for n, om in ODD_MODELS.items():
        out[f"odd:{n}"] = (om.factory, om.example_input, "fx")
    for n, ac in ARCH_CASES.items():
        out[f"arch:{n}"] = (ac.factory, ac.example, "fx")
    tokens = lambda: torch.randn(4, 5, 6, generator=_gen(1), dtype=torch.float64)  # noqa: E731
    out["sym:gpt_block"] = (lambda: GPTBlock().double(), tokens, "fx")
    for n in ("groupnorm_net", "unsupported_op"):  # strict mode: the refusal's message
        out[f"odd:{n}:strict"] = (ODD_MODELS[n].factory, ODD_MODELS[n].example_input, "fx-strict")
    out["sym:gpt_block_folded"] = (_folded_gpt_block, lambda: torch.randn(4, 5, 6, generator=_gen(2)), "fx")
    out["sym:tanh_mlp"] = (TanhMLP, lambda: torch.randn(3, 6, generator=_gen()), "fx")
    out["sym:tanh_mlp_12"] = (lambda: TanhMLP(hidden=12), lambda: torch.randn(3, 6, generator=_gen()), "fx")
    images = lambda: torch.randn(4, 1, 8, 8, generator=_gen())  # noqa: E731
    out["test:layerscale_tokens"] = (_LayerScaleTokens, images, "fx")
    out["test:shared_depthwise"] = (_SharedDepthwise, images, "fx")
    out["test:sliced"] = (_Sliced, images, "fx")
    out["test:strided"] = (_Strided, images, "fx")
    out["test:tied_dict"] = (lambda: _TiedAndDict(False), lambda: torch.randn(4, 3, 6, generator=_gen()), "fx")
    out["test:tied_first"] = (lambda: _TiedAndDict(True), lambda: torch.randn(4, 3, 5, generator=_gen()), "fx")
    out["test:tied_first:strict"] = (
        lambda: _TiedAndDict(True),
        lambda: torch.randn(4, 3, 5, generator=_gen()),
        "fx-strict",
    )
    out["test:pinned_encoder"] = (_PinnedEncoder, lambda: torch.randn(3, 5, 4, generator=_gen()), "fx")
    out["test:half_pinned"] = (_HalfPinned, lambda: torch.randn(2, 4, generator=_gen()), "fx")
    out["test:summed_attention"] = (_summed_attention, ARCH_CASES["timm_attention_unbind"].example, "fx")
    out["test:user_net"] = (_UserNet, lambda: torch.zeros(2, 1, 28, 28), "fx")
    out["test:user_opaque"] = (_UserOpaque, lambda: torch.zeros(2, 3, 8), "fx")
    return out


def _hf_cases() -> dict[str, Case]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {}
    import tests.test_hf_specs as hf

    out: dict[str, Case] = {}
    for n, (factory, example) in hf.MODELS.items():

        def build(factory=factory):
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return factory().eval()

        out[f"hf:{n}"] = (build, example, "export")
    return out


def cases(hf: bool = True) -> dict[str, Case]:
    """Every golden case: name -> (build the model, build its example input, tracer ``"fx"`` or ``"export"``)."""
    out = {**_zoo_cases(), **_helper_cases()}
    if hf:
        out.update(_hf_cases())
    return out


# ------------------------------------------------------------------ serialisation
def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return [[_plain(k), _plain(v)] for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def snapshot(res: Any) -> dict[str, Any]:
    """JSON-ready form of a ``TraceResult`` (mappings as ordered lists of pairs)."""
    s = res.spec
    return {
        "axes": _plain(s.axes),
        "sizes": _plain(s.sizes),
        "shapes": _plain(s.shapes),
        "heads": _plain(s.heads),
        "ops": _plain(s.ops),
        "warnings": list(res.warnings),
        "sites": _plain(res.sites),
        "producers": _plain(res.producers),
        "opaque": list(res.opaque),
    }


def run_case(case: Case) -> dict[str, Any]:
    """Trace one case and return its snapshot (or ``{"error": message}`` when tracing raises)."""
    from lmckit.errors import LmcError

    build, example, tracer = case
    model, x = build(), example()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if tracer == "export":
                from lmckit.perm.export_trace import export_trace_streams

                return snapshot(export_trace_streams(model, x))
            from lmckit.perm.trace import trace_streams

            return snapshot(trace_streams(model, x, strict=tracer == "fx-strict"))
        except LmcError as e:
            return {"error": str(e)}


def main(argv: list[str] | None = None) -> int:
    import time

    data, slow = {}, []
    for name, c in cases().items():
        t0 = time.process_time()
        data[name] = run_case(c)
        slow.append((time.process_time() - t0, name))
    for t, name in sorted(slow)[-8:]:
        print(f"{t:6.2f}s cpu  {name}", file=sys.stderr)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    print(f"{len(data)} cases -> {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
