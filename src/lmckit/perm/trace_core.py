"""The tracer's core: the union-find of streams and state-dict axes, the fx walk, and the op-rule registry.

The rules themselves (what each op does to the streams of its operands) live in :mod:`lmckit.perm.rules`,
one module per op family, each rule a short function registered with :func:`op_rule` for the torch
functions, tensor method names and module types it handles; :mod:`lmckit.perm.trace` describes them all
and is the entry point. This module never imports a rule module: the registry is filled by importing
:mod:`lmckit.perm.rules` (which :mod:`lmckit.perm.trace` does), so imports go one way, rules to core.

A rule receives the tracer (a :class:`TracerCore`) and the fx node, reads its operands' *stream info*
(:meth:`TracerCore.tinfo`: ``{axis: element}`` for a tensor, an empty dict for an invariant tensor,
tuples for tuple-valued results) and returns the node's own. It may join elements of the union-find
(``tr.uf.union``), tie state-dict axes to a stream (:meth:`TracerCore.join_key`), start a new stream
(:meth:`TracerCore.producer`, :meth:`TracerCore.fresh`), build block streams
(:meth:`TracerCore.refined`) or pin streams it cannot see through (:meth:`TracerCore.pin`,
:meth:`TracerCore.opaque`). See ``docs/adding-an-op-rule.md`` for a worked example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import LmcError
from .spec import PermutationSpec

__all__ = [
    "SpecWarning",
    "TraceResult",
    "TracerCore",
    "op_rule",
    "symbolic_trace",
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "REDUCTION_LABELS",
]


class SpecWarning(UserWarning):
    """Part of a model cannot be permuted; its units are left in place."""


_PINNED = 0  # union-find element standing for "identity permutation"
#: op labels (``spec.ops``) of reductions: a stream they read that does not reach their output was reduced over
#: its units (label suffix ``/units``); the reduction rules register these names
REDUCTION_LABELS = frozenset(
    {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "nansum", "nanmean", "norm", "max", "min"}
)


class _DictInfo(dict):
    """Stream info of a dict-valued result (key -> info of that entry), not of a tensor."""


# --------------------------------------------------------------------------- result
@dataclass
class TraceResult:
    """Everything the tracer learned about a model.

    Attributes
    ----------
    spec:
        The permutation spec (groups in network order).
    warnings:
        One message per stream that could have been permuted but was pinned.
    sites:
        Group -> names of submodules whose output carries that group's units on
        axis 1 (see :func:`activation_sites`).
    producers:
        Group -> every module (or weight key prefix, for functional layers)
        whose output starts that group's units, in graph order.
    """

    spec: PermutationSpec
    warnings: list[str] = field(default_factory=list)
    sites: dict[str, list[str]] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)
    #: every op the tracer could not see through (whether or not units flowed into it)
    opaque: list[str] = field(default_factory=list)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0]  # element 0 is PINNED

    def make(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == _PINNED or (ra != _PINNED and rb < ra):  # keep PINNED (and older elements) as roots
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


def _flat_nodes(arg: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: out.append(n) or n)
    return out


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch") or mod == "" or mod == "builtins":
        return f"torch.{name}" if mod.startswith("torch") else name
    if mod == "_operator":
        return f"operator.{name}"
    return f"{mod}.{name}"


class _RecordingUnionFind(_UnionFind):
    """Union-find that remembers every union (to name streams as they were before pinning)."""

    def __init__(self, log: list[tuple[int, int]]) -> None:
        super().__init__()
        self.log = log

    def union(self, a: int, b: int) -> int:
        self.log.append((a, b))
        return super().union(a, b)


# --------------------------------------------------------------------------- the rule registry
#: a rule for a torch function or a tensor method: ``rule(tracer, node) -> stream info of the node's value``
Rule = Callable[["TracerCore", fx.Node], Any]
#: a rule for a module type: ``rule(tracer, node, module) -> stream info of the module's output``
ModuleRule = Callable[["TracerCore", fx.Node, nn.Module], Any]
#: ``call_function`` targets (``torch.cat``, ``F.relu``, ``operator.add`` ...) -> rule
FUNCTION_RULES: dict[Any, Rule] = {}
#: ``call_method`` names (``"view"``, ``"relu"`` ...) -> rule
METHOD_RULES: dict[str, Rule] = {}
#: module types -> rule; a module takes the rule of the first type of its class's MRO that has one
MODULE_RULES: dict[type, ModuleRule] = {}


def op_rule(*targets: Any, replace: bool = False) -> Callable[[Callable], Callable]:
    """Register the decorated function as the tracer's rule for ``targets``.

    Parameters
    ----------
    *targets:
        Each one a torch function or other ``call_function`` target (``torch.cumsum``, ``F.gelu``,
        ``operator.add``), a tensor method name (a ``str``: ``"cumsum"``) or an ``nn.Module`` subclass
        (its instances and those of its subclasses that have no rule of their own).
    replace:
        Allow replacing an existing rule for a target (by default a second rule for one target is an error,
        so two families cannot claim one op unnoticed).

    Returns
    -------
    Callable
        The decorator; it returns the function unchanged. Function and method rules are called as
        ``rule(tracer, node)``, module rules as ``rule(tracer, node, module)``; each returns the stream
        info of the node's value (see the module docstring).

    Raises
    ------
    LmcError
        No target given, or a target that already has a rule (without ``replace=True``).
    """
    if not targets:
        raise LmcError("op_rule needs at least one target", "name the torch function, method name or module type")

    def deco(fn: Callable) -> Callable:
        for t in targets:
            if isinstance(t, str):
                table: dict = METHOD_RULES
            elif isinstance(t, type) and issubclass(t, nn.Module):
                table = MODULE_RULES
            else:
                table = FUNCTION_RULES
            if t in table and not replace and table[t] is not fn:
                raise LmcError(
                    f"the tracer already has a rule for {t!r} ({table[t].__module__}.{table[t].__qualname__})",
                    "pass replace=True to op_rule to override it",
                )
            table[t] = fn
        return fn

    return deco


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, also keeping as one ``call_module`` node every module whose own type has a rule.

    torch.fx inlines the ``forward`` of modules outside ``torch.nn``; a user module registered with
    :func:`op_rule` must stay whole for its rule to see it. Only the exact type counts (a subclass of
    ``nn.Linear`` with its own ``forward`` is still traced through), so graphs of models without registered
    user modules are exactly ``torch.fx.symbolic_trace``'s.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_RULES or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with modules whose type has a registered rule kept whole.

    Parameters
    ----------
    model:
        The module to trace.

    Returns
    -------
    torch.fx.GraphModule
        The graph, named after the model's class as ``torch.fx.symbolic_trace`` names it.

    Raises
    ------
    Exception
        Whatever torch.fx raises for a model it cannot trace (data-dependent control flow ...).
    """
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


# --------------------------------------------------------------------------- the tracer
class TracerCore:
    """Walks a shape-propagated fx graph, dispatching each node to its registered rule; holds the union-find.

    Parameters
    ----------
    gm:
        The traced graph, shape-propagated (every tensor node has ``meta["tensor_meta"]``).
    state:
        The model's state dict (its keys and axes are elements of the union-find).
    strict:
        Raise instead of warning when units are pinned (read by the spec building step).

    Notes
    -----
    Elements of the union-find are ints: ``0`` stands for "pinned" (the identity permutation), every
    state-dict axis ``(key, axis)`` has one (:meth:`key`), and every stream a rule creates has one.
    """

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], strict: bool):
        self.gm = gm
        self.state = state
        self.strict = strict
        self._unions: list[tuple[int, int]] = []
        self.uf: _UnionFind = _RecordingUnionFind(self._unions)
        self.key_elem: dict[tuple[str, int], int] = {}
        self.producer_name: dict[int, str] = {}  # producer element -> module name
        self.producer_order: list[int] = []
        self.pin_reasons: list[tuple[int, str, bool]] = []
        self.info: dict[fx.Node, Any] = {}
        self.module_calls: dict[str, int] = {}
        self.site_nodes: list[tuple[fx.Node, str]] = []  # (call_module node, kind)
        self.opaque_ops: list[str] = []
        self.op_records: list[tuple[str, tuple[int, ...], tuple[int, ...], bool]] = []  # for spec.ops
        self.elem_ops: list[tuple[int, str]] = []  # (element, op label) of units created inside a module
        self.refines: list[tuple[int, list[tuple[int | None, int, int]], str]] = []  # (elem, pieces, where)
        self.slices: list[tuple[int, int, int, int, str]] = []  # (elem, start, stop, piece elem, where)
        self.heads: list[tuple[str, int, list[int]]] = []  # (name, n_heads, member elems)
        self.extra_sizes: dict[int, int] = {}  # element -> size, for elements without state-dict axes
        # head-split streams: (flat stream, H, d, head-axis elem, within-head-axis elem); the head axis carries
        # a plain permutation of the H heads, the within-head axis one permutation per head (never alone)
        self.joints: list[tuple[int, int, int, int, int]] = []
        self.w_partner: dict[int, int] = {}  # within-head elem -> its head elem
        # fused q/k/v viewed as (3, H, d) (timm style): stack elem -> (head placeholder, within placeholder,
        # [(head elem, within elem) per q/k/v]); unbind/indexing the stack axis picks one projection's heads
        self.stacks: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}
        self.stack_src: dict[int, int] = {}  # stack elem -> the fused stream it was cut from
        self._alias_keys()

    # ---------------------------------------------------------------- elements
    def _alias_keys(self) -> None:
        """Tied tensors (two keys, one storage) must move together."""
        seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
        for k, v in self.state.items():
            if v.dim() == 0 or v.numel() == 0:
                continue
            sig = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            if sig in seen:
                for ax in range(v.dim()):
                    self.uf.union(self.key(seen[sig], ax), self.key(k, ax))
            else:
                seen[sig] = k

    def key(self, key: str, axis: int) -> int:
        """The element of state-dict axis ``(key, axis)`` (made on first use)."""
        e = self.key_elem.get((key, axis))
        if e is None:
            e = self.key_elem[(key, axis)] = self.uf.make()
        return e

    def join_key(self, stream: int | None, key: str, axis: int) -> None:
        """Tie axis ``axis`` of state entry ``key`` to ``stream`` (nothing when either does not exist)."""
        if stream is not None and key in self.state and axis < self.state[key].dim():
            self.uf.union(stream, self.key(key, axis))

    def producer(self, name: str, keys: list[tuple[str, int]]) -> int:
        """A new stream started by layer ``name`` (groups are named after producers), tied to ``keys``' axes."""
        p = self.uf.make()
        self.producer_name[p] = name
        self.producer_order.append(p)
        for k, ax in keys:
            self.join_key(p, k, ax)
        return p

    def fresh(self, size: int, name: str | None = None) -> int:
        """A new stream of ``size`` units (a producer named ``name`` when given)."""
        e = self.uf.make()
        self.extra_sizes[e] = int(size)
        if name is not None:
            self.producer_name[e] = name
            self.producer_order.append(e)
        return e

    def refined(self, pieces: list[tuple[int | None, int, int]], where: str) -> int:
        """A new stream whose permutation is the block composition of ``pieces``."""
        e = self.uf.make()
        self.extra_sizes[e] = int(sum(n * inner for _, n, inner in pieces))
        self.refines.append((e, list(pieces), where))
        return e

    def pin(self, stream: int, reason: str, warn: bool = True) -> None:
        """Fix ``stream``'s units (identity permutation); ``reason`` ends up in the warning when ``warn``."""
        self.pin_reasons.append((stream, reason, warn))
        self.uf.union(_PINNED, stream)

    def pin_all(self, arg: Any, reason: str, warn: bool = True) -> None:
        """Pin every stream of every node in ``arg`` (nodes, or nested tuples/dicts of them)."""
        for n in _flat_nodes(arg):
            self._pin_info(self.info.get(n), reason, warn)

    def _pin_info(self, inf: Any, reason: str, warn: bool) -> None:
        if isinstance(inf, _DictInfo):
            for i in inf.values():
                self._pin_info(i, reason, warn)
        elif isinstance(inf, dict):
            for e in inf.values():
                self.pin(e, reason, warn)
        elif isinstance(inf, (tuple, list)):
            for i in inf:
                self._pin_info(i, reason, warn)

    # ---------------------------------------------------------------- node facts
    def shape(self, arg: Any) -> tuple[int, ...] | None:
        """Shape of a tensor node (``()`` for a Python number, ``None`` when unknown or not a tensor)."""
        if isinstance(arg, fx.Node):
            tm = arg.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                return tuple(int(s) for s in tm.shape)
            return None
        if isinstance(arg, (int, float, bool)):
            return ()
        return None

    def tinfo(self, arg: Any) -> dict[int, int]:
        """Stream info ``{axis: element}`` of a tensor node (``{}``: invariant, or not a tensor node)."""
        if isinstance(arg, fx.Node):
            inf = self.info.get(arg)
            return inf if isinstance(inf, dict) and not isinstance(inf, _DictInfo) else {}
        return {}

    def invariant_like(self, node: fx.Node) -> Any:
        """The info of an invariant value shaped like ``node``'s (``{}`` per tensor, tuples and dicts kept)."""
        tm = node.meta.get("tensor_meta")
        return self._inv(tm)

    def _inv(self, tm: Any) -> Any:
        if isinstance(tm, TensorMetadata):
            return {}
        if isinstance(tm, (tuple, list)):
            return tuple(self._inv(t) for t in tm)
        if isinstance(tm, dict):
            return _DictInfo({k: self._inv(v) for k, v in tm.items()})
        return None

    # ---------------------------------------------------------------- rules
    def opaque(self, node: fx.Node, why: str | None = None) -> Any:
        """An op the tracer cannot see through: pin every stream flowing in, return an invariant result."""
        reason = why or f"{_op_name(node)} at node {node.name!r} is not understood by the tracer"
        self.opaque_ops.append(reason)
        self.pin_all((node.args, node.kwargs), reason)
        return self.invariant_like(node)

    def check_heads(self, node: fx.Node) -> None:
        """A within-head axis must travel with its head axis (one permutation per head is no axis permutation)."""
        inf = self.info.get(node)
        if not isinstance(inf, dict) or isinstance(inf, _DictInfo):
            return
        heads = {self.uf.find(e) for e in inf.values()}
        for _d, e in inf.items():
            h = self.w_partner.get(e)
            if h is not None and self.uf.find(h) not in heads:
                self.pin(e, f"{_op_name(node)} at node {node.name!r} separates a head's features from their head")

    # ---------------------------------------------------------------- dispatch
    def _dim_arg(self, node: fx.Node, pos: int, default: Any = None, kw: str = "dim") -> Any:
        if kw in node.kwargs:
            return node.kwargs[kw]
        return node.args[pos] if len(node.args) > pos else default

    def _keyed(self, arg: Any) -> str | None:
        """State-dict key behind a ``get_attr`` node (for functional layers)."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and str(arg.target) in self.state:
            return str(arg.target)
        return None

    def call_module(self, node: fx.Node) -> Any:
        """The rule of the module's type (the first class of its MRO with a rule), else opaque."""
        name = str(node.target)
        m = self.gm.get_submodule(name)
        self.module_calls[name] = self.module_calls.get(name, 0) + 1
        for cls in type(m).__mro__:
            rule = MODULE_RULES.get(cls)
            if rule is not None:
                return rule(self, node, m)
        return self.opaque(node, f"module {name!r} ({type(m).__name__}) is not understood by the tracer")

    def call_function(self, node: fx.Node) -> Any:
        """The rule registered for the function, else opaque."""
        rule = FUNCTION_RULES.get(node.target)
        return rule(self, node) if rule is not None else self.opaque(node)

    def call_method(self, node: fx.Node) -> Any:
        """The rule registered for the method name, else opaque."""
        rule = METHOD_RULES.get(str(node.target))
        return rule(self, node) if rule is not None else self.opaque(node)

    # ---------------------------------------------------------------- walk
    def run(self) -> None:
        """Walk the graph once in order, giving every node its stream info (``self.info``)."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.info[node] = self.invariant_like(node)
            elif node.op == "get_attr":
                key = str(node.target)
                s = self.shape(node)
                if key in self.state and s is not None:
                    self.info[node] = {i: self.key(key, i) for i in range(len(s)) if s[i] > 1}
                else:
                    self.info[node] = self.invariant_like(node)
            elif node.op == "call_module":
                self.info[node] = self.call_module(node)
                self._record_op(node)
            elif node.op == "call_function":
                self.info[node] = self.call_function(node)
                self._record_op(node)
            elif node.op == "call_method":
                self.info[node] = self.call_method(node)
                self._record_op(node)
            elif node.op == "output":
                self.pin_all(node.args, "model output", warn=False)
            if self.info.get(node) is None and node.op not in ("output",) and node.meta.get("tensor_meta") is not None:
                # a tensor-valued result no rule described: never let it pass as invariant silently
                self.info[node] = self.opaque(node)
            if self.w_partner:
                self.check_heads(node)

    def _record_op(self, node: fx.Node) -> None:
        """Remember which streams ``node`` reads, as ``spec.ops`` data (see :mod:`lmckit.perm.spec`).

        The label is ``"Kind:module"`` for modules, the function or method name otherwise
        (``mul_scalar`` / ``truediv_scalar`` when the other operand is a Python number); a
        reduction whose input stream does not survive into its output reduced over the units
        and gets the suffix ``/units``. Only :mod:`lmckit.perm.symmetry` reads these labels.
        """
        ins = {e for a in _flat_nodes((node.args, node.kwargs)) for e in self.tinfo(a).values()}
        if not ins:
            return
        if node.op == "call_module":
            label = f"{type(self.gm.get_submodule(str(node.target))).__name__}:{node.target}"
        else:
            label = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            label = str(label).strip("_")
            if label in ("mul", "truediv", "imul", "itruediv") and len(_flat_nodes(node.args)) == 1:
                label = label.lstrip("i") + "_scalar"
        outs: set[int] = set()
        stack = [self.info.get(node)]
        while stack:
            x = stack.pop()
            if isinstance(x, _DictInfo):
                stack.extend(x.values())
            elif isinstance(x, dict):
                outs.update(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
        self.op_records.append((label, tuple(ins), tuple(outs), label in REDUCTION_LABELS))
