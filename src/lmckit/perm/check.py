"""The function-preservation check: a random permutation must not change a model.

For a correct spec and any permutation ``pi``, the permuted parameters
``pi(theta)`` (``W_l -> P_l W_l P_{l-1}^T``, norm entries and running statistics
following their channels) compute exactly the same function as ``theta``.
:func:`check_spec` draws a random ``pi`` and measures, on one batch ``x``,

- train mode: ``max |f_theta(x) - f_pi(theta)(x)| / max |f_theta(x)|`` with both
  models in train mode (BatchNorm normalises with batch statistics), and the
  running statistics the forward pass updated, compared after un-permuting
  the permuted model's buffers (``pi^{-1}``);
- eval mode: the same output difference with both models in eval mode.

Dropout modules are kept in eval mode during the train-mode pass (their masks
are drawn per position, so a permuted model would draw different masks per
unit). The check runs in float64 by default so that summation-order noise
(~1e-16 relative) is far below ``tol`` and any real spec error (O(1)) is far
above it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import LmcError
from . import has_rules, spec_for, uses_export
from .spec import PermutationSpec, apply_permutation, identity_permutation, invert_permutation, random_permutation
from .trace import SpecWarning, example_input_for, trace_streams

__all__ = ["CheckReport", "SymmetryReport", "check_spec", "check_symmetry"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class CheckReport:
    """Outcome of :func:`check_spec`.

    ``train_diff`` / ``eval_diff``: max absolute output difference relative to the
    largest absolute output. ``stats_diff``: max absolute difference of the
    updated buffers (BatchNorm running statistics) after un-permuting, relative
    to that buffer's largest value; ``stats_key`` names the worst one.
    ``culprits``: when the check fails, the groups whose permutation alone
    changes the output. ``vacuous``: the spec permutes no units at all (no
    group of two or more units); the check then fails (``ok=False``): an
    unchanged output proves nothing when nothing was moved.
    """

    ok: bool
    tol: float
    seed: int
    train_diff: float
    eval_diff: float
    stats_diff: float
    stats_key: str | None
    coverage: dict[str, Any]
    groups: dict[str, int]
    moved_units: int
    spec_source: str
    warnings: list[str] = field(default_factory=list)
    culprits: list[str] = field(default_factory=list)
    vacuous: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        c = self.coverage
        frac = c["elements_permuted"] / max(c["elements"], 1)
        lines = [
            f"spec ({self.spec_source}): {c['groups']} groups, {c['units']} units; "
            f"{c['entries_permuted']}/{c['entries']} entries and {c['elements_permuted']:,}/{c['elements']:,} "
            f"elements permuted ({frac:.1%})",
            f"unit coverage: {c.get('hidden_coverage', 0.0):.1%} of the output units of the model's matrices move "
            f"(matching warns below 50%)",
            f"random permutation (seed {self.seed}) moved {self.moved_units} of {c['units']} units",
            f"train mode: max relative output diff {self.train_diff:.3g}, running-stats diff {self.stats_diff:.3g}"
            + (f" ({self.stats_key})" if self.stats_key and self.stats_diff > self.tol else ""),
            f"eval mode:  max relative output diff {self.eval_diff:.3g}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        if c.get("heads"):
            lines.append(
                "attention heads: "
                + ", ".join(f"{n} ({v['heads']} heads: {', '.join(v['groups'])})" for n, v in c["heads"].items())
            )
        if self.vacuous:
            lines.append(
                "NO UNITS PERMUTED: the spec leaves every unit in place, so this check proves nothing"
                + (
                    " (pinned: " + "; ".join(self.warnings) + ")"
                    if self.warnings
                    else " (no permutable hidden stream was found)"
                )
            )
        elif self.ok:
            lines.append(f"function preserved (tol {self.tol:g})")
        else:
            lines.append(
                f"FUNCTION CHANGED (tol {self.tol:g})"
                + (f": groups responsible: {', '.join(self.culprits)}" if self.culprits else "")
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> "CheckReport":
        if self.vacuous:
            raise LmcError(
                "the permutation spec permutes no units, so the model cannot be aligned"
                + (": " + "; ".join(self.warnings) if self.warnings else ""),
                "give the model a permutation_spec() method, or change the ops named above",
            )
        if not self.ok:
            raise LmcError(
                f"the permutation spec does not preserve the model's function: relative output diff "
                f"{max(self.train_diff, self.eval_diff):.3g} (train {self.train_diff:.3g}, eval {self.eval_diff:.3g}), "
                f"running statistics {self.stats_diff:.3g}, tolerance {self.tol:g}"
                + (f"; groups responsible: {', '.join(self.culprits)}" if self.culprits else ""),
                "the spec is wrong for this architecture: fix its permutation_rules() / permutation_spec(), or use "
                "lmckit.perm.trace_spec and report the model if tracing is wrong",
            )
        return self


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _rel_diff(a: Any, b: Any) -> float:
    """``max |a - b| / max |a|`` over all output tensors (inf when shapes differ)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    if not ta:
        return 0.0
    diff = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(ta, tb))
    scale = max(float(x.double().abs().max()) if x.numel() else 0.0 for x in ta)
    return diff / max(scale, 1e-30) if diff > 0 else 0.0


def _forward(model: nn.Module, x: torch.Tensor, train: bool) -> Any:
    model.train(train)
    if train:
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.eval()
    with torch.no_grad():
        return model(x)


def _compare(
    model: nn.Module, spec: PermutationSpec, perms: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None
) -> tuple[float, float, float, str | None]:
    a = copy.deepcopy(model)
    if dtype is not None:
        a = a.to(dtype)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(spec, perms, a.state_dict()))
    train_diff = _rel_diff(_forward(a, x, True), _forward(b, x, True))
    sa = a.state_dict()
    sb = apply_permutation(spec, invert_permutation(perms), b.state_dict())
    stats_diff, stats_key = 0.0, None
    for k, va in sa.items():
        vb = sb[k]
        if va.is_floating_point():
            d = float((va.double() - vb.double()).abs().max()) if va.numel() else 0.0
            d = d / max(float(va.double().abs().max()), 1e-30) if d > 0 else 0.0
        else:
            d = 0.0 if torch.equal(va, vb) else float("inf")
        if d > stats_diff:
            stats_diff, stats_key = d, k
    eval_diff = _rel_diff(_forward(a, x, False), _forward(b, x, False))
    return train_diff, eval_diff, stats_diff, stats_key


def _derive_spec(
    model: nn.Module, example_input: torch.Tensor, traced: bool
) -> tuple[PermutationSpec, str, list[str], list[str]]:
    """The spec to check: the model's rules, or (``traced``, or no rules) fx tracing.

    Returns ``(spec, source, warnings, opaque ops)``; the tracer's warnings are also re-emitted as
    :class:`SpecWarning` at the caller of :func:`check_spec`.
    """
    caught: list[str] = []
    opaque: list[str] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", SpecWarning)
        if traced or not has_rules(model):
            if uses_export(model):
                from .export_trace import export_trace_streams

                res = export_trace_streams(model, example_input)
            else:
                res = trace_streams(model, example_input)
            for msg in res.warnings:
                warnings.warn(f"trace_spec({type(model).__name__}): {msg}", SpecWarning, stacklevel=2)
            spec, source, opaque = res.spec, "traced", res.opaque
        else:
            spec, source = spec_for(model, example_input), "rules"
    for w in rec:
        if issubclass(w.category, SpecWarning):
            caught.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for msg in caught:
        warnings.warn(msg, SpecWarning, stacklevel=3)
    return spec, source, caught, opaque


def check_spec(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    spec: PermutationSpec | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    dtype: torch.dtype | None = torch.float64,
    raise_on_fail: bool = False,
    traced: bool = False,
    symmetry: str | None = None,
) -> CheckReport | SymmetryReport:
    """Check that a random permutation of ``model`` by ``spec`` leaves its function unchanged.

    Parameters
    ----------
    model:
        The model (not modified: the check works on deep copies).
    example_input:
        A batch (batch size >= 2 for BatchNorm in train mode); derived from the
        config for zoo models when omitted.
    spec:
        The spec to check; by default :func:`lmckit.perm.spec_for` (the model's
        own rules, else tracing), or :func:`~lmckit.perm.trace.trace_spec` when
        ``traced`` is true.
    seed, tol:
        Seed of the random permutation; tolerance on every relative difference.
    dtype:
        Precision of the check (float64 by default; ``None`` keeps the model's).
    raise_on_fail:
        Raise :class:`LmcError` instead of returning ``ok=False``.
    symmetry:
        ``None`` / ``"permutation"``: the permutation check above. ``"signed"``,
        ``"orthogonal"`` or ``"invertible"``: :func:`check_symmetry` (a random
        element of each group's class, derived from the model's ops; returns a
        :class:`SymmetryReport`).

    Returns
    -------
    CheckReport
        ``ok`` iff the spec permutes some units and train- and eval-mode
        outputs and the updated running statistics agree within ``tol``;
        with the spec's coverage.
    """
    if symmetry not in (None, "permutation"):
        return check_symmetry(model, example_input, symmetry, spec, seed, tol, dtype, raise_on_fail, traced)
    if example_input is None:
        example_input = example_input_for(model)
    source, caught, opaque = "given", [], []
    if spec is None:
        spec, source, caught, opaque = _derive_spec(model, example_input, traced)
    spec.check_state(model.state_dict(), f"{type(model).__name__} state dict")
    x = example_input
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    perms = random_permutation(spec, seed)
    ident = identity_permutation(spec)
    moved = int(sum(int((perms[g] != ident[g]).sum()) for g in spec.sizes))
    train_diff, eval_diff, stats_diff, stats_key = _compare(model, spec, perms, x, dtype)
    vacuous = not any(n >= 2 for n in spec.sizes.values())
    if vacuous:  # name every op the tracer could not see through, even those no hidden unit reached
        caught += [f"pinned by {op}" for op in opaque if not any(op in w for w in caught)]
    ok = max(train_diff, eval_diff, stats_diff) <= tol and not vacuous
    culprits: list[str] = []
    if not ok and not vacuous and len(spec.sizes) <= 64:
        for g in spec.sizes:  # which groups break the function on their own
            only = {h: (perms[h] if h == g else ident[h]) for h in spec.sizes}
            d = _compare(model, spec, only, x, dtype)
            if max(d[0], d[1], d[2]) > tol:
                culprits.append(g)
    report = CheckReport(
        ok=ok,
        tol=tol,
        seed=seed,
        train_diff=train_diff,
        eval_diff=eval_diff,
        stats_diff=stats_diff,
        stats_key=stats_key,
        coverage=spec.coverage(),
        groups=dict(spec.sizes),
        moved_units=moved,
        spec_source=source,
        warnings=caught,
        culprits=culprits,
        vacuous=vacuous,
    )
    if raise_on_fail:
        report.raise_if_failed()
    return report


# --------------------------------------------------------------------------------------------- symmetry classes
@dataclass
class SymmetryReport:
    """Outcome of :func:`check_symmetry`.

    ``groups``: per group the class applied, the classes admitted, the op
    limiting it (``limit``) and its head count. ``folded`` / ``fold_skipped``:
    norms whose gain and bias were folded into the next Linear first (and
    those that could not be, with why); ``fold_diff``: the relative output
    change folding itself caused (train and eval, max). ``refusal``: why no
    group admits the class (then ``ok`` is false). ``train_diff`` /
    ``eval_diff`` / ``stats_diff``: as in :class:`CheckReport`, for the random
    transform; ``culprits``: groups (head structures as a whole) whose map alone
    changes the output.
    """

    ok: bool
    symmetry: str
    tol: float
    seed: int
    train_diff: float
    eval_diff: float
    stats_diff: float
    fold_diff: float
    folded: list[str]
    fold_skipped: list[str]
    groups: dict[str, dict[str, Any]]
    spec_source: str
    refusal: str | None = None
    culprits: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; a difference never measured (the class was refused: NaN) is ``None``, so
        ``--json`` stays strict JSON."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out

    def summary(self) -> str:
        lines = [f"symmetry class {self.symmetry} (spec: {self.spec_source})"]
        if self.folded:
            lines.append(
                f"folded the gain/bias of {len(self.folded)} norms into the next Linear "
                f"({', '.join(self.folded[:4])}{' ...' if len(self.folded) > 4 else ''}): relative output change "
                f"{self.fold_diff:.3g}"
            )
        lines += [f"not folded: {w}" for w in self.fold_skipped]
        for g, d in self.groups.items():
            extra = f" ({d['heads']} heads)" if d["heads"] > 1 else ""
            extra += ", fixing the all-ones direction" if d["fix_ones"] else ""
            lines.append(f"  {g}: {d['class']}{extra}" + (f"; limited by {d['limit']}" if d["limit"] else ""))
        if self.refusal:
            lines.append(f"REFUSED: {self.refusal}")
            return "\n".join(lines)
        lines += [
            f"train mode: max relative output diff {self.train_diff:.3g}, running-stats diff {self.stats_diff:.3g}",
            f"eval mode:  max relative output diff {self.eval_diff:.3g}",
        ]
        if self.ok:
            lines.append(f"function preserved (tol {self.tol:g})")
        else:
            lines.append(
                f"FUNCTION CHANGED (tol {self.tol:g})"
                + (f": groups responsible: {', '.join(self.culprits)}" if self.culprits else "")
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> "SymmetryReport":
        if self.refusal:
            raise LmcError(f"the model does not admit {self.symmetry} maps: {self.refusal}")
        if not self.ok:
            raise LmcError(
                f"a random {self.symmetry} transform changes the model's function: relative output diff "
                f"{max(self.train_diff, self.eval_diff):.3g}, running statistics {self.stats_diff:.3g}, "
                f"tolerance {self.tol:g}"
                + (f"; groups responsible: {', '.join(self.culprits)}" if self.culprits else ""),
                "the spec's ops (spec.ops) do not describe the model: report the model",
            )
        return self


def _compare_transform(a: nn.Module, spec, sym, t, x) -> tuple[float, float, float]:
    from .symmetry import apply_transform, invert_transform

    b = copy.deepcopy(a)
    b.load_state_dict(apply_transform(spec, sym, t, a.state_dict()))
    a2 = copy.deepcopy(a)
    train_diff = _rel_diff(_forward(a2, x, True), _forward(b, x, True))
    sa, sb = a2.state_dict(), apply_transform(spec, sym, invert_transform(t), b.state_dict())
    stats = 0.0
    for k, va in sa.items():
        vb = sb[k]
        if va.is_floating_point() and va.numel():
            d = float((va.double() - vb.double()).abs().max())
            stats = max(stats, d / max(float(va.double().abs().max()), 1e-30) if d > 0 else 0.0)
        elif not torch.equal(va, vb):
            stats = float("inf")
    eval_diff = _rel_diff(_forward(a, x, False), _forward(b, x, False))
    return train_diff, eval_diff, stats


def check_symmetry(
    model: nn.Module,
    example_input: torch.Tensor | None,
    symmetry: str,
    spec: PermutationSpec | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    dtype: torch.dtype | None = torch.float64,
    raise_on_fail: bool = False,
    traced: bool = False,
    fold: bool = True,
) -> SymmetryReport:
    """Check that a random element of ``symmetry`` (per group, as derived) leaves ``model``'s function unchanged.

    The groups' classes come from :func:`lmckit.perm.symmetry.derive_symmetry`
    on the spec's ops; with ``fold`` (default) LayerNorm/RMSNorm gains and
    biases are first folded into the Linear layers they feed
    (:func:`~lmckit.perm.symmetry.fold_norms`, its own output change reported
    as ``fold_diff``), since the orthogonal classes need them folded. The check
    then draws a random transform (a shared head permutation per head
    structure), and compares outputs in train and eval mode (float64 by
    default; dropout kept in eval) and the updated buffers after undoing the
    transform. A class no group admits is refused (``refusal``, naming the
    ops that limit it; ``ok`` false).
    """
    from .symmetry import derive_symmetry, fold_norms, identity_transform, random_transform, refusal

    if example_input is None:
        example_input = example_input_for(model)
    x = example_input
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    base = copy.deepcopy(model)
    if dtype is not None:
        base = base.to(dtype)
    source = "given"
    if spec is None:
        spec, source, _, _ = _derive_spec(base, x, traced)
    spec.check_state(base.state_dict(), f"{type(model).__name__} state dict")
    folded, skipped, fold_diff = [], [], 0.0
    if fold:
        new, folded, skipped = fold_norms(base, x)
        if folded:
            fold_diff = max(
                _rel_diff(_forward(copy.deepcopy(base), x, tr), _forward(copy.deepcopy(new), x, tr))
                for tr in (True, False)
            )
            base = new
    sym = derive_symmetry(spec, base.state_dict(), symmetry, model=base)
    why = refusal(sym, symmetry)
    groups = {g: s.to_dict() for g, s in sym.items()}
    if why is not None:
        rep = SymmetryReport(
            False,
            symmetry,
            tol,
            seed,
            float("nan"),
            float("nan"),
            float("nan"),
            fold_diff,
            folded,
            skipped,
            groups,
            source,
            refusal=why,
        )
        if raise_on_fail:
            rep.raise_if_failed()
        return rep
    t = random_transform(spec, sym, seed)
    train_diff, eval_diff, stats = _compare_transform(base, spec, sym, t, x)
    ok = max(train_diff, eval_diff, stats, fold_diff) <= tol
    culprits: list[str] = []
    if not ok:
        ident = identity_transform(spec, sym)
        units: list[list[str]] = [list(m) for _, m in spec.heads.values()]
        units += [[g] for g in spec.sizes if not any(g in u for u in units)]
        for u in units:
            only = {h: (t[h] if h in u else ident[h]) for h in spec.sizes}
            if max(_compare_transform(base, spec, sym, only, x)) > tol:
                culprits.append("+".join(u))
    rep = SymmetryReport(
        ok,
        symmetry,
        tol,
        seed,
        train_diff,
        eval_diff,
        stats,
        fold_diff,
        folded,
        skipped,
        groups,
        source,
        culprits=culprits,
    )
    if raise_on_fail:
        rep.raise_if_failed()
    return rep
