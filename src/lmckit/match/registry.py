"""A registry of two-model matching methods (after mergekit's merge-method registry).

Every method is one :class:`MatchMethod`: a name, a one-line description,
the paper it comes from, whether it needs data, which multi-model schemes it
supports, an options dataclass (defaults and validation) and ONE call
signature::

    method = get_method("sinkhorn")
    opts = method.options(steps=300, tau=0.5)          # LmcError on a bad value
    res = method.match(spec, sd_a, sd_b, model=model, dataset=dataset,
                       options=opts, seed=0, device="cpu", progress=False)
    res.perms                                          # aligns B to A, as for every method

The CLI (``lmckit match --method``, ``lmckit methods``) reads this registry,
so a new method is one module that calls :func:`register_method` (see
``docs/adding-a-method.md``). The existing functions
(:func:`~lmckit.match.weight.weight_matching`,
:func:`~lmckit.match.activation.activation_matching`,
:func:`~lmckit.match.ste.ste_matching`) keep their own signatures; their
entries are thin adapters over them (:mod:`lmckit.match.builtin_methods`).
A method's options derive from :class:`~lmckit.match.method_options.MethodOptions`
(importable from here as well). A registering module that cannot import its
algorithm module (because that module imports it back, as
:mod:`lmckit.match.sinkhorn` imports its options) names the function instead:
:class:`LazyFunction` is resolved when the method first runs.

Objective direction (``MatchResult.objective``), per method:

- ``weight``: ``sum_k <A_k, pi(B)_k>_F``, one value per sweep; higher is better (non-decreasing).
- ``activation``: summed similarity of matched units; higher is better.
- ``ste``: best held-out midpoint loss so far; lower is better (non-increasing).
- ``sinkhorn``: ``sum_k <A_k, pi(B)_k>_F`` at the identity and at the final hard permutation;
  higher is better (the relaxed loss history is in ``extra["loss_history"]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import LmcError
from .method_options import (  # noqa: F401  (re-exported: registering modules import them from here)
    MethodOptions,
    _at_most,
    _convert,
    _one_of,
    _positive,
    _type_name,
)

if TYPE_CHECKING:  # (annotations only: listing methods and their options, e.g. for --help, needs no torch)
    import torch

    from ..perm.spec import PermutationSpec
    from .result import MatchResult, MultiMatchResult

#: Modules that register the built-in methods when imported (registration only: no torch), in registration order.
BUILTIN_METHOD_MODULES = ("lmckit.match.builtin_methods", "lmckit.match.sinkhorn_options", "lmckit.match.many_options")
#: Multi-model schemes a method can support.
MULTI_SCHEMES = ("anchor", "mergemany")
SCHEME_LABEL = {"anchor": "anchor matching", "mergemany": "MergeMany"}


# --------------------------------------------------------------------------- method
#: ``func(spec, sd_a, sd_b, *, model, dataset, options, seed, device, progress) -> MatchResult``
MatchFunction = Callable[..., "MatchResult"]


@dataclass(frozen=True)
class LazyFunction:
    """A function named by its module and attribute, imported when first called (an entry of a name table).

    A registering module passes one as a method's function (or ``check_spec``) when the algorithm's module
    imports the registering module: importing it there would make an import circle, and importing it inside
    a function only hides one. Calling it imports ``module`` and calls ``attr`` with the same arguments; its
    signature is the target's (so :attr:`MatchMethod.tracks_alignment` sees the target's keywords).

    Parameters
    ----------
    module:
        Dotted module name, e.g. ``"lmckit.match.sinkhorn"``.
    attr:
        The function's name in that module.

    Raises
    ------
    ImportError, AttributeError
        When called or inspected, if the module or the attribute does not exist (a programming error).
    """

    module: str
    attr: str

    def resolve(self) -> Callable[..., Any]:
        """The named function (its module is imported on the first call)."""
        return getattr(importlib.import_module(self.module), self.attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.resolve())


@dataclass(frozen=True)
class MatchMethod:
    """One registered matching method.

    Attributes
    ----------
    name:
        Registry key (``lmckit match --method NAME``).
    description:
        One line.
    reference:
        The paper (authors, title, venue, year).
    needs_data:
        Whether the method reads training data with its default options
        (see :meth:`requires_data` for option-dependent needs).
    multi:
        Multi-model schemes supported: ``"anchor"`` (match each model to the
        first), ``"mergemany"`` (Ainsworth et al.'s MergeMany).
    options_type:
        Its :class:`MethodOptions` subclass.
    objective:
        What ``MatchResult.objective`` holds and which direction is better.
    func:
        The adapter with the common call signature.
    needs_model:
        Whether a module of the architecture is needed (a forward pass).
    data_when:
        Optional ``options -> bool`` overriding ``needs_data`` per options.
    label:
        Short display name for legends and tables (``WM``, ``AM``, ``STE``); defaults to ``name``.
    record:
        Optional ``(result, options) -> dict``: what a perm file records about a run of the method
        (default: ``{"options": options.to_dict()}``); see :meth:`run_record`.
    iterations:
        Optional ``(result, options) -> str``: what the method iterated, in its own terms, for a
        one-line summary (default: its steps and whether it converged); see :meth:`iterations_line`.
    check_spec:
        Optional ``spec -> None`` raising :class:`LmcError` for a permutation spec the method cannot
        align (e.g. Sinkhorn and attention heads); ``lmckit reproduce`` calls it when it plans a recipe,
        before any model trains. See :meth:`check`.
    cost:
        Optional ``options -> float``: a rough run time (about seconds for the quick recipe's MLP pair
        on 2 CPU cores) that the pipeline's scheduler uses to start long stages first; default 1.
        Never hashed, never changes a result.
    symmetries:
        Symmetry classes the method aligns with (:mod:`lmckit.perm.symmetry`; ``lmckit match --symmetry``):
        every method supports ``"permutation"``; weight and activation matching also ``"signed"`` and
        ``"orthogonal"`` (:mod:`lmckit.match.symmetric`).
    """

    name: str
    description: str
    reference: str
    needs_data: bool
    multi: tuple[str, ...]
    options_type: type[MethodOptions]
    objective: str
    func: MatchFunction = field(repr=False)
    needs_model: bool = False
    data_when: Callable[[MethodOptions], bool] | None = field(default=None, repr=False)
    label: str = ""
    record: Callable[[MatchResult, MethodOptions], dict[str, Any]] | None = field(default=None, repr=False)
    iterations: Callable[[MatchResult, MethodOptions], str] | None = field(default=None, repr=False)
    check_spec: Callable[[PermutationSpec], None] | None = field(default=None, repr=False)
    cost: Callable[[MethodOptions], float] | None = field(default=None, repr=False)
    symmetries: tuple[str, ...] = ("permutation",)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def run_record(self, result: MatchResult, options: MethodOptions) -> dict[str, Any]:
        """Method-specific metadata of a run, for its perm file (JSON-ready)."""
        return self.record(result, options) if self.record else {"options": options.to_dict()}

    def iterations_line(self, result: MatchResult, options: MethodOptions) -> str:
        """One line saying what the run iterated (``sweeps: 4 (converged)``)."""
        if self.iterations:
            return self.iterations(result, options)
        return f"steps:       {result.sweeps}" + ("" if result.converged else " (not converged)")

    def options(self, values: Mapping[str, Any] | None = None, **kw: Any) -> MethodOptions:
        """Validated options from a mapping and/or keywords (unknown names raise :class:`LmcError`)."""
        return self.options_type.from_mapping({**dict(values or {}), **kw}, self.name)

    def check(self, spec: PermutationSpec) -> None:
        """Raise :class:`LmcError` when this method cannot align models of ``spec`` (no-op without a hook)."""
        if self.check_spec is not None:
            self.check_spec(spec)

    def requires_data(self, options: MethodOptions | None = None) -> bool:
        """Whether a run with ``options`` needs a dataset."""
        if self.data_when is None or options is None:
            return self.needs_data
        return bool(self.data_when(options))

    def supports(self, scheme: str) -> bool:
        return scheme in self.multi

    def match(
        self,
        spec: PermutationSpec,
        sd_a: Mapping[str, torch.Tensor],
        sd_b: Mapping[str, torch.Tensor],
        *,
        model: torch.nn.Module | None = None,
        dataset=None,
        options: MethodOptions | Mapping[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = False,
        alignment: Callable[[Mapping[str, torch.Tensor]], float] | None = None,
    ) -> MatchResult:
        """Permutations of B's units aligning B to A (``apply_permutation(spec, res.perms, sd_b)``).

        Parameters
        ----------
        spec:
            The architecture's permutation spec.
        sd_a, sd_b:
            State dicts of the reference model A and of B (never modified).
        model:
            A module of the architecture (template for forward passes;
            required when ``needs_model``).
        dataset:
            :class:`lmckit.data.Dataset` (required when :meth:`requires_data`).
        options:
            An instance of ``options_type``, a mapping (validated), or None (defaults).
        seed, device, progress:
            Randomness, where to compute, whether to show progress.
        alignment:
            ``perms -> R(0.3)`` (:func:`lmckit.analysis.alignment_tracker`), for methods that record
            it while they iterate (STE's drift); passed to the method's function only when that
            function takes an ``alignment`` argument, ignored otherwise.

        Raises
        ------
        LmcError
            Bad options, missing data or model, state dicts that do not fit ``spec``.
        """
        if options is None or isinstance(options, Mapping):
            options = self.options(options)
        elif not isinstance(options, self.options_type):
            raise LmcError(f"method {self.name!r} takes {self.options_type.__name__}, got {type(options).__name__}")
        if self.requires_data(options) and dataset is None:
            raise LmcError(f"{self.name} matching needs data", "pass a dataset (CLI: --dataset NAME)")
        if self.needs_model and model is None:
            raise LmcError(f"{self.name} matching needs a model of the architecture (for forward passes)")
        hooks = {"alignment": alignment} if self.tracks_alignment else {}
        return self.func(
            spec,
            sd_a,
            sd_b,
            model=model,
            dataset=dataset,
            options=options,
            seed=int(seed),
            device=device,
            progress=progress,
            **hooks,
        )

    @property
    def tracks_alignment(self) -> bool:
        """Whether the method's function takes an ``alignment`` function (see :meth:`match`)."""
        return "alignment" in inspect.signature(self.func).parameters

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "description": self.description,
            "reference": self.reference,
            "needs_data": self.needs_data,
            "multi": list(self.multi),
            "objective": self.objective,
            "options": self.options_type.describe(),
            "symmetries": list(self.symmetries),
        }


_REGISTRY: dict[str, MatchMethod] = {}
_LOADED = False


def register_method(
    name: str,
    *,
    description: str,
    reference: str,
    needs_data: bool,
    options: type[MethodOptions],
    objective: str,
    multi: tuple[str, ...] = ("anchor",),
    needs_model: bool = False,
    data_when: Callable[[MethodOptions], bool] | None = None,
    label: str = "",
    record: Callable[[MatchResult, MethodOptions], dict[str, Any]] | None = None,
    iterations: Callable[[MatchResult, MethodOptions], str] | None = None,
    check_spec: Callable[[PermutationSpec], None] | None = None,
    cost: Callable[[MethodOptions], float] | None = None,
    symmetries: tuple[str, ...] = ("permutation",),
) -> Callable[[MatchFunction], MatchFunction]:
    """Decorator registering ``func(spec, sd_a, sd_b, *, model, dataset, options, seed, device, progress)``.

    Raises ``ValueError`` (a programming error, at import) for a duplicate
    name, an unknown multi scheme or options that are not a
    :class:`MethodOptions` dataclass.
    """
    bad = [s for s in multi if s not in MULTI_SCHEMES]
    if bad:
        raise ValueError(f"unknown multi-model scheme(s) {bad}; known: {MULTI_SCHEMES}")
    if not (isinstance(options, type) and issubclass(options, MethodOptions) and dataclasses.is_dataclass(options)):
        raise ValueError(f"options of method {name!r} must be a MethodOptions dataclass")

    def deco(func: MatchFunction) -> MatchFunction:
        _load_builtins()  # the built-in methods come first in registration order, whoever registers first
        if name in _REGISTRY and _REGISTRY[name].func != func:  # (!=: a LazyFunction naming the same target)
            raise ValueError(f"matching method {name!r} is already registered")
        _REGISTRY[name] = MatchMethod(
            name=name,
            description=description,
            reference=reference,
            needs_data=needs_data,
            multi=tuple(multi),
            options_type=options,
            objective=objective,
            func=func,
            needs_model=needs_model,
            data_when=data_when,
            label=label,
            record=record,
            iterations=iterations,
            check_spec=check_spec,
            cost=cost,
            symmetries=tuple(symmetries),
        )
        return func

    return deco


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_METHOD_MODULES:
            importlib.import_module(mod)


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get_method(name: str) -> MatchMethod:
    """The method called ``name``; :class:`LmcError` listing the known ones otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _MANY:
            raise LmcError(
                f"{name!r} is a many-model method (it brings {_MANY[name].models_label()} models into one order), "
                "not a two-model matching method",
                f"two-model methods: {', '.join(_REGISTRY)}",
            ) from None
        raise LmcError(f"unknown matching method {name!r}", f"known methods: {', '.join(_REGISTRY)}") from None


def methods_supporting(scheme: str) -> list[str]:
    """Names of the methods supporting the multi-model ``scheme`` (``anchor`` or ``mergemany``)."""
    if scheme not in MULTI_SCHEMES:
        raise LmcError(f"unknown multi-model scheme {scheme!r}", f"choose one of {', '.join(MULTI_SCHEMES)}")
    return [n for n in list_methods() if _REGISTRY[n].supports(scheme)]


def check_scheme(method: str, scheme: str) -> MatchMethod:
    """The method ``method`` after checking it supports the multi-model ``scheme``.

    The one place that says, e.g., "MergeMany is defined for weight matching only"
    (from the registry's ``multi`` field). Raises :class:`LmcError` for an unknown
    method or scheme, or a method without the scheme.
    """
    m = get_method(method)
    ok = methods_supporting(scheme)
    if method not in ok:
        raise LmcError(
            f"{SCHEME_LABEL[scheme]} (--multi {scheme}) is not defined for {method} matching "
            f"(it is defined for: {', '.join(ok) or 'no method'})",
            f"use --method {ok[0]}, or --multi anchor" if ok else "use --multi anchor",
        )
    return m


#: The name of the method MergeMany runs (the first method supporting the ``mergemany`` scheme).
def mergemany_method() -> str:
    """The method MergeMany's inner matchings use (weight matching, per the registry)."""
    names = methods_supporting("mergemany")
    if not names:
        raise LmcError("no registered matching method supports MergeMany")
    return names[0]


# --------------------------------------------------------------------------- many-model methods
#: ``func(spec, states, *, model, dataset, options, seed, device, progress) -> MultiMatchResult``
ManyFunction = Callable[..., "MultiMatchResult"]


@dataclass(frozen=True)
class ManyMethod:
    """One registered many-model method: brings ``N >= min_models`` models into one unit order.

    The many-model counterpart of :class:`MatchMethod` (MergeMany, STE-MM, C2M3): one call
    signature for every method, so the many-models study and the CLI run any of them::

        m = get_many_method("c2m3")
        res = m.match(spec, states, model=model, dataset=dataset, options={"max_iter": 50}, seed=0)
        res.perms[i]        # puts model i in the common order (model 0's: identity for model 0)

    Attributes
    ----------
    name, description, reference, objective, label, options_type, needs_data, needs_model, cost:
        As for :class:`MatchMethod` (``objective`` describes ``MultiMatchResult.objective``).
    min_models:
        The fewest models the method is defined for (``lmckit methods`` shows ``N >= min_models``).
    func:
        ``func(spec, states, *, model, dataset, options, seed, device, progress) -> MultiMatchResult``.
    check_spec:
        Optional ``spec -> None`` raising :class:`LmcError` for a spec the method cannot align.
    """

    name: str
    description: str
    reference: str
    min_models: int
    needs_data: bool
    options_type: type[MethodOptions]
    objective: str
    func: ManyFunction = field(repr=False)
    needs_model: bool = False
    label: str = ""
    check_spec: Callable[[PermutationSpec], None] | None = field(default=None, repr=False)
    cost: Callable[[MethodOptions], float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def models_label(self) -> str:
        """``"N >= 3"``."""
        return f"N >= {self.min_models}"

    def options(self, values: Mapping[str, Any] | None = None, **kw: Any) -> MethodOptions:
        """Validated options from a mapping and/or keywords (unknown names raise :class:`LmcError`)."""
        return self.options_type.from_mapping({**dict(values or {}), **kw}, self.name)

    def check(self, spec: PermutationSpec) -> None:
        """Raise :class:`LmcError` when this method cannot align models of ``spec`` (no-op without a hook)."""
        if self.check_spec is not None:
            self.check_spec(spec)

    def match(
        self,
        spec: PermutationSpec,
        states: typing.Sequence[Mapping[str, torch.Tensor]],
        *,
        model: torch.nn.Module | None = None,
        dataset=None,
        options: MethodOptions | Mapping[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> MultiMatchResult:
        """Permutations putting every model of ``states`` in one order (``res.perms[i]`` for model ``i``).

        Raises
        ------
        LmcError
            Fewer than ``min_models`` states, bad options, a missing dataset or model, a spec the
            method does not model, states that do not fit ``spec``.
        """
        if len(states) < self.min_models:
            raise LmcError(
                f"{self.name} needs at least {self.min_models} models, got {len(states)}",
                "use weight matching for two models" if self.min_models > 2 else "pass more models",
            )
        if options is None or isinstance(options, Mapping):
            options = self.options(options)
        elif not isinstance(options, self.options_type):
            raise LmcError(f"method {self.name!r} takes {self.options_type.__name__}, got {type(options).__name__}")
        if self.needs_data and dataset is None:
            raise LmcError(f"{self.name} needs data", "pass a dataset (CLI: --dataset NAME)")
        if self.needs_model and model is None:
            raise LmcError(f"{self.name} needs a model of the architecture (for forward passes)")
        self.check(spec)
        return self.func(
            spec,
            states,
            model=model,
            dataset=dataset,
            options=options,
            seed=int(seed),
            device=device,
            progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "kind": "many-model",
            "description": self.description,
            "reference": self.reference,
            "min_models": self.min_models,
            "needs_data": self.needs_data,
            "objective": self.objective,
            "options": self.options_type.describe(),
        }


_MANY: dict[str, ManyMethod] = {}


def register_many_method(
    name: str,
    *,
    description: str,
    reference: str,
    min_models: int,
    needs_data: bool,
    options: type[MethodOptions],
    objective: str,
    needs_model: bool = False,
    label: str = "",
    check_spec: Callable[[PermutationSpec], None] | None = None,
    cost: Callable[[MethodOptions], float] | None = None,
) -> Callable[[ManyFunction], ManyFunction]:
    """Decorator registering a many-model method ``func(spec, states, *, model, dataset, options, seed, device,
    progress) -> MultiMatchResult``.

    Raises ``ValueError`` (a programming error, at import) for a duplicate name (in either registry),
    ``min_models < 2`` or options that are not a :class:`MethodOptions` dataclass.
    """
    if int(min_models) < 2:
        raise ValueError(f"min_models of {name!r} must be at least 2, got {min_models}")
    if not (isinstance(options, type) and issubclass(options, MethodOptions) and dataclasses.is_dataclass(options)):
        raise ValueError(f"options of method {name!r} must be a MethodOptions dataclass")

    def deco(func: ManyFunction) -> ManyFunction:
        if (name in _MANY and _MANY[name].func is not func) or name in _REGISTRY:
            raise ValueError(f"matching method {name!r} is already registered")
        _MANY[name] = ManyMethod(
            name=name,
            description=description,
            reference=reference,
            min_models=int(min_models),
            needs_data=needs_data,
            options_type=options,
            objective=objective,
            func=func,
            needs_model=needs_model,
            label=label,
            check_spec=check_spec,
            cost=cost,
        )
        return func

    return deco


def list_many_methods() -> list[str]:
    """Names of the registered many-model methods, in registration order."""
    _load_builtins()
    return list(_MANY)


def get_many_method(name: str) -> ManyMethod:
    """The many-model method called ``name``; :class:`LmcError` listing the known ones otherwise."""
    _load_builtins()
    try:
        return _MANY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_MANY), n=1)
        raise LmcError(
            f"unknown many-model method {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            f"known many-model methods: {', '.join(_MANY)}",
        ) from None
