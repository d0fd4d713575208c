"""The recipe schema: the frozen dataclasses a recipe TOML is validated into, with each field's checks and help.

Every key of a recipe is a field made by ``_f`` (default, bounds, allowed
values, help text), read by the validation (:mod:`lmckit.pipeline.recipe_check`),
the commented TOML writer (:mod:`lmckit.pipeline.recipe_toml`) and
``docs/recipes.md``'s tests: the schema has one source. :func:`recipe_to_dict`
is the JSON view written into every report's ``results.json``. Reading and
overriding files is :mod:`lmckit.pipeline.recipe`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..match.registry import list_methods, methods_supporting
from ..match.ste_protocols import PROTOCOLS as STE_PROTOCOLS

__all__ = [
    "Recipe",
    "DataSection",
    "ModelEntry",
    "TrainSection",
    "MatchSection",
    "SteSection",
    "BarrierSection",
    "AnalysisSection",
    "ThreeModelSection",
    "WidthSweepSection",
    "DirectionsStudy",
    "DoseStudy",
    "WeightDecayStudy",
    "ManyModelsStudy",
    "SteProtocolsStudy",
    "PaperSection",
    "StudiesSection",
    "recipe_to_dict",
]

#: The "no permutation" baseline of match.methods (not a matching method: no match stage runs).
NAIVE = "naive"
#: The default match.methods; any method of the matching registry may be named (:func:`method_choices`).
METHODS = (NAIVE, "weight", "activation", "ste")
#: The classes ``match.symmetry`` may list (:mod:`lmckit.perm.symmetry`; ``invertible`` has no exact matching
#: step and is refused), and the methods that align under a class beyond permutations (on folded models).
SYMMETRY_CLASSES = ("permutation", "signed", "orthogonal")
SYMMETRY_METHODS = ("weight", "activation")
#: The method ``match.searches`` repeats with seeds 0..searches-1 (every other method runs one search)
#: and whose first search carries the data-dependent analyses: weight matching, the method the claims are about.
SEARCHED_METHOD = "weight"


def method_choices() -> tuple[str, ...]:
    """``naive`` and every method of the matching registry (``lmckit methods``)."""
    return (NAIVE, *list_methods())


def ste_protocol_choices() -> tuple[str, ...]:
    """The STE protocols (:data:`lmckit.match.ste_protocols.PROTOCOLS`)."""
    return tuple(STE_PROTOCOLS)


def joint_method_choices() -> tuple[str, ...]:
    """``pairwise`` and the registry's many-model methods except MergeMany (``merge_many`` in ``methods``)."""
    from ..match.registry import list_many_methods

    return ("pairwise", *(m for m in list_many_methods() if m != "mergemany"))


def anchor_method_choices() -> tuple[str, ...]:
    """The registry methods that support anchor matching (the three-model experiment)."""
    return tuple(methods_supporting("anchor"))


def field_choices(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    """A field's allowed values (``choices`` may be a function, read when the recipe is checked)."""
    c = meta.get("choices")
    return tuple(c()) if callable(c) else c


MAX_SEED = 2**63 - 1
#: most [[models]] entries, and most stages a recipe may plan (checked before the plan is built or listed)
MAX_MODELS = 32
MAX_STAGES = 20_000

#: a recipe name is one safe path component: it names the default report folder ``reports/<name>``
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")

#: training settings the recipe sets elsewhere: an override may not contradict them (key -> where to set it)
RESERVED_OVERRIDES = {"seed": "train.seeds (one model per seed)", "dataset": "data.dataset", "model": "models.N.name"}
#: create_model options the recipe sets elsewhere (in model_kwargs overrides and models.N.options)
RESERVED_MODEL_KWARGS = {
    "width_mult": "models.N.width_mult (or width_sweep.widths)",
    "norm": "models.N.norm",
    "in_channels": "data.dataset (it follows the dataset)",
    "image_size": "data.dataset (it follows the dataset)",
    "num_classes": "data.dataset (it follows the dataset)",
}


def _f(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    mapping: bool = False,
    help: str = "",
    check: str = "",
    max_len: int | None = None,
    above_min: bool = False,
    omit_default: bool = False,
) -> Any:
    """A recipe field with its checks and help. ``omit_default``: left out of :func:`recipe_to_dict` (and so
    of every report's ``results.json``) while at its default, for keys added after reports were pinned."""
    meta = {
        "min": min,
        "max": max,
        "choices": choices if callable(choices) else (tuple(choices) if choices else None),
        "mapping": mapping,
        "help": help,
        "check": check,
        "max_len": max_len,
        "above_min": above_min,
        "omit_default": omit_default,
    }
    if isinstance(default, (list, dict, tuple)) or (
        dataclasses.is_dataclass(default) and not isinstance(default, type)
    ):
        d = default
        return field(default_factory=lambda: d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataSection:
    dataset: str = _f("fashion-mnist", help="dataset name (lmckit data list)")


@dataclass(frozen=True)
class ModelEntry:
    name: str = _f("mlp", help="registered model (lmckit models)")
    label: str = _f("", help="name shown in the report (default: the model name and width)")
    width_mult: float = _f(1.0, min=1e-6, max=1024.0)
    norm: str = _f("none", choices=("none", "batchnorm", "layernorm"))
    options: tuple = _f(
        (),
        mapping=True,
        check="model_kwargs",
        help="extra create_model keyword arguments, e.g. {depth = 3, width = 512}",
    )
    preset: str = _f("", help="lmckit.train preset for this model (default: train.preset)")
    overrides: tuple = _f(
        (), mapping=True, check="overrides", help="training overrides for this model, on top of train.overrides"
    )
    seeds: tuple[int, ...] = _f(
        (),
        min=0,
        max=MAX_SEED,
        max_len=64,
        omit_default=True,
        help="this entry's seeds, paired as match.pairs says (empty: train.seeds; not for the first entry, "
        "whose seeds the three-model experiment, width sweep and studies use)",
    )

    def display(self) -> str:
        """``label``, else e.g. ``mlp depth=3 width=512`` / ``vgg11 batchnorm x4``, built from the settings."""
        if self.label:
            return self.label
        parts = [self.name] + [f"{k}={v}" for k, v in self.options]
        if self.norm != "none":
            parts.append(self.norm)
        if self.width_mult != 1.0:
            parts.append(f"x{self.width_mult:g}")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainSection:
    preset: str = _f("mlp-fmnist", help="lmckit.train preset name")
    seeds: tuple[int, ...] = _f((0, 1, 2, 3), min=0, max=MAX_SEED, max_len=64, help="one model per seed (at most 64)")
    overrides: tuple = _f((), mapping=True, check="overrides", help="TrainConfig fields to override, e.g. {epochs = 5}")


@dataclass(frozen=True)
class SteSection:
    epochs: int = _f(1, min=1, max=100_000)
    lr: float = _f(1e-3, min=1e-12, max=1e3)
    batch_size: int = _f(256, min=1, max=1_000_000)
    max_iter: int = _f(30, min=1, max=100_000, help="weight-matching sweeps per projection")
    train_limit: int = _f(0, min=0, max=100_000_000, help="train STE on the first N training images only (0: all)")
    project_sweeps: int = _f(
        0,
        min=0,
        max=100_000,
        help="approximation: at most N sweeps of each step's warm-started projection, continued at the next "
        "step (0: off, every projection to convergence; the end-of-epoch projection always converges)",
    )
    project_every: int = _f(
        1, min=1, max=100_000, help="approximation: project at every k-th step only (1: off, every step)"
    )
    protocol: str = _f(
        "heldout-best",
        choices=tuple(STE_PROTOCOLS),
        help="which permutation STE keeps: best on a held-out set (identity and WM as candidates), "
        "git-re-basin's lowest minibatch midpoint loss (SGD momentum 0.9), random mixing's final "
        "one (loss at lambda ~ U(0,1)), or Ito et al.'s code's last-step projection (ste-mm-random: "
        "loss at weights rand(2)/sum; ste-mm-midpoint: at the midpoint); lr and batch_size above apply "
        "to every protocol (the ste_protocols study uses each protocol's literature values)",
    )


@dataclass(frozen=True)
class MatchSection:
    methods: tuple[str, ...] = _f(METHODS, choices=method_choices, max_len=32)
    pairs: str = _f(
        "disjoint",
        choices=("disjoint", "all"),
        help="model pairs from train.seeds: (s0,s1), (s2,s3), ... or every pair",
    )
    searches: int = _f(
        3, min=1, max=100, help="weight-matching seeds per pair (mean/std of R over searches; at most 100)"
    )
    max_iter: int = _f(100, min=1, max=100_000, help="weight-matching sweeps")
    am_samples: int = _f(5000, min=1, max=10_000_000, help="training images for activation statistics")
    symmetry: tuple[str, ...] = _f(
        ("permutation",),
        choices=SYMMETRY_CLASSES,
        max_len=len(SYMMETRY_CLASSES),
        check="symmetry",
        omit_default=True,
        help="symmetry classes compared side by side (docs/symmetry.md); 'permutation' (always listed) is the "
        "recipe's own rows, each other class adds per model pair and method (weight, activation) a transform of "
        "folded B (norm gains/biases folded into the next Linear), its barriers between folded A and "
        "transformed folded B, L2 and R, plus permutation matching on folded weights where folding changes "
        "the model; left out of results.json while ['permutation']",
    )
    symmetry_max_iter: int = _f(
        1000,
        min=1,
        max=100_000,
        omit_default=True,
        help="weight-matching sweeps under a class beyond permutations (orthogonal descent needs hundreds; "
        "the CLI's default too)",
    )
    ste: SteSection = _f(SteSection())
    options: tuple = _f(
        (),
        mapping=True,
        check="method_options",
        help="registry options of every method other than weight, activation and ste (those are set by the keys "
        "above), e.g. {sinkhorn = {steps = 100}}; `lmckit methods` lists each method's options",
    )


@dataclass(frozen=True)
class BarrierSection:
    lambdas: int = _f(25, min=2, max=1001, help="evenly spaced interpolation points including both ends (at most 1001)")
    splits: tuple[str, ...] = _f(("train", "test"), choices=("train", "test", "val"), max_len=3)
    limit: int = _f(10000, min=0, max=100_000_000, help="images per split and evaluation point (0: all)")
    bn_batches: int = _f(10, min=1, max=10_000, help="training batches for the BatchNorm reset at each point")


@dataclass(frozen=True)
class AnalysisSection:
    enabled: bool = _f(True)
    gammas: tuple[float, ...] = _f((0.0, 0.3), min=0.0, max=1.0, max_len=32)
    spectra: bool = _f(True, help="singular-value spectra and per-index alignment")
    alignment: bool = _f(True, help="alignment score R(gamma) per method")
    taylor: bool = _f(True, help="second-order Taylor estimate of the midpoint barrier")
    taylor_samples: int = _f(2000, min=1, max=10_000_000)
    projections: bool = _f(True, help="input projections onto right-singular vectors")
    projection_samples: int = _f(2000, min=1, max=10_000_000)
    rank: bool = _f(True, help="accuracy against kept rank")
    rank_gammas: tuple[float, ...] = _f((0.0, 0.05, 0.1, 0.2, 0.3, 0.5), min=0.0, max=1.0, max_len=32)
    rank_fractions: tuple[float, ...] = _f(
        (0.05, 0.1, 0.25, 0.5, 1.0),
        min=0.0,
        max=1.0,
        max_len=32,
        above_min=True,
        help="fractions of the rank kept, in (0, 1]",
    )
    eval_limit: int = _f(0, min=0, max=100_000_000, help="test images for rank-k accuracy (0: all)")


@dataclass(frozen=True)
class ThreeModelSection:
    enabled: bool = _f(True)
    models: int = _f(3, min=3, max=64, help="models matched to the anchor (the first seed)")
    methods: tuple[str, ...] = _f(("weight", "ste"), choices=anchor_method_choices, max_len=32)
    landscape: bool = _f(True)
    grid: int = _f(9, min=3, max=201, help="points per side of the loss-landscape grid (at most 201)")
    merge_many: bool = _f(True, help="also run MergeMany")


@dataclass(frozen=True)
class WidthSweepSection:
    enabled: bool = _f(False)
    widths: tuple[float, ...] = _f((0.25, 0.5, 1.0, 2.0), min=1e-6, max=1024.0, max_len=32)
    methods: tuple[str, ...] = _f((NAIVE, "weight"), choices=method_choices, max_len=32)
    pairs: int = _f(1, min=1, max=32, help="model pairs per width")


@dataclass(frozen=True)
class DirectionsStudy:
    enabled: bool = _f(False)
    gammas: tuple[float, ...] = _f(
        (0.3, 0.1),
        min=0.0,
        max=1.0,
        max_len=16,
        help="WM-top keeps sigma_i >= gamma sigma_max of every weight matrix, WM-tail the rest",
    )
    pairs: int = _f(1, min=1, max=32, help="model pairs (the first of match.pairs)")


@dataclass(frozen=True)
class DoseStudy:
    enabled: bool = _f(False)
    fractions: tuple[float, ...] = _f(
        (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
        min=0.0,
        max=1.0,
        max_len=32,
        help="fraction of the units of every group re-assigned at random after WM",
    )
    draws: int = _f(3, min=1, max=64, help="random draws per fraction")
    pairs: int = _f(1, min=1, max=32)


@dataclass(frozen=True)
class WeightDecayStudy:
    enabled: bool = _f(False)
    values: tuple[float, ...] = _f((0.0, 1e-4, 1e-3, 1e-2), min=0.0, max=10.0, max_len=16)
    optimizer: str = _f("adamw", choices=("adamw", "adam", "sgd"), help="training optimizer of the study's models")
    pairs: int = _f(1, min=1, max=32)
    gamma: float = _f(0.3, min=0.0, max=1.0, help="spectrum concentration: fraction of sigma_i >= gamma sigma_max")


@dataclass(frozen=True)
class ManyModelsStudy:
    enabled: bool = _f(False)
    counts: tuple[int, ...] = _f(
        (2, 3, 4, 5), min=2, max=64, max_len=16, help="numbers of models N (the first N seeds; seed 0 the anchor)"
    )
    methods: tuple[str, ...] = _f(
        ("weight", "activation", "ste", "merge_many"), choices=("weight", "activation", "ste", "merge_many"), max_len=4
    )
    joint: tuple[str, ...] = _f(
        (),
        choices=lambda: joint_method_choices(),
        max_len=8,
        omit_default=True,
        help="many-model methods also run (STE-MM, C2M3: options from match.options.<method>) on the first N "
        "models for every N, and 'pairwise' (WM of every pair: its cycle error)",
    )
    ste_protocols: tuple[str, ...] = _f(
        (),
        choices=lambda: ste_protocol_choices(),
        max_len=8,
        omit_default=True,
        help="STE protocols also run here, each matching models 1..N-1 to the anchor with the ste_protocols "
        "study's settings for it (epochs, train_limit; every one must be listed there)",
    )


@dataclass(frozen=True)
class SteProtocolsStudy:
    enabled: bool = _f(False)
    protocols: tuple[str, ...] = _f(
        ("heldout-best", "git-re-basin", "random-mixing"),
        choices=tuple(STE_PROTOCOLS),
        max_len=len(STE_PROTOCOLS),
    )
    epochs: tuple[int, ...] = _f(
        (3, 20, 3),
        min=1,
        max=100_000,
        max_len=len(STE_PROTOCOLS),
        help="STE epochs per protocol (same order as protocols)",
    )
    train_limit: int = _f(0, min=0, max=100_000_000, help="STE trains on the first N training images (0: all)")
    pairs: int = _f(
        3, min=1, max=32, help="disjoint model pairs (plus the three-model matches of the first three seeds)"
    )


@dataclass(frozen=True)
class PaperSection:
    enabled: bool = _f(
        False,
        omit_default=True,
        help="the report's 'paper' section: claims 1-6 per model entry and per STE protocol side by side, with "
        "mean, std and 95% intervals over pairs and the paper's values (docs/definitions.md, 'The paper recipe')",
    )


@dataclass(frozen=True)
class StudiesSection:
    directions: DirectionsStudy = _f(DirectionsStudy())
    alignment_dose: DoseStudy = _f(DoseStudy())
    weight_decay: WeightDecayStudy = _f(WeightDecayStudy())
    many_models: ManyModelsStudy = _f(ManyModelsStudy())
    ste_protocols: SteProtocolsStudy = _f(SteProtocolsStudy())


@dataclass(frozen=True)
class Recipe:
    name: str = _f("custom", check="name", help="letters, digits, '-', '_', '.'; the report goes to reports/<name>")
    description: str = _f("")
    data: DataSection = _f(DataSection())
    models: tuple[ModelEntry, ...] = _f((ModelEntry(),))
    train: TrainSection = _f(TrainSection())
    match: MatchSection = _f(MatchSection())
    barrier: BarrierSection = _f(BarrierSection())
    analysis: AnalysisSection = _f(AnalysisSection())
    three_models: ThreeModelSection = _f(ThreeModelSection())
    width_sweep: WidthSweepSection = _f(WidthSweepSection())
    studies: StudiesSection = _f(StudiesSection())
    paper: PaperSection = _f(PaperSection(), omit_default=True)

    def pairs(self, seeds: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Model pairs of ``seeds`` (default: ``train.seeds``) as ``match.pairs`` says."""
        s = tuple(self.train.seeds if seeds is None else seeds)
        if self.match.pairs == "all":
            return [(s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))]
        return [(s[i], s[i + 1]) for i in range(0, len(s) - 1, 2)]


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def recipe_to_dict(r: Any) -> Any:
    """A JSON-able view of a recipe (mappings back as dicts)."""
    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        out = {}
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            if f.metadata.get("omit_default") and v == _default_of(f):
                continue
            if f.metadata.get("check") == "method_options":  # a table of tables: {method: {option: value}}
                out[f.name] = {k: {o: recipe_to_dict(y) for o, y in x} for k, x in v}
            elif f.metadata.get("mapping"):
                out[f.name] = dict((k, recipe_to_dict(x)) for k, x in v)
            else:
                out[f.name] = recipe_to_dict(v)
        return out
    if isinstance(r, tuple):
        return [recipe_to_dict(x) for x in r]
    return r
