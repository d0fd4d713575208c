"""Dataset registry and search path.

Search order for a dataset's folder: ``data_dir`` argument (``--data-dir``),
the ``LMCKIT_DATA`` environment variable (a folder holding ``<name>/`` or the
files themselves), system data folders (Debian's ``dataset-fashion-mnist``
installs under ``/usr/share/datasets/fashion-mnist``), then the user cache
(``$XDG_CACHE_HOME/lmckit/datasets/<name>``, default ``~/.cache``). Each of
these is tried as ``<dir>/<name>`` and ``<dir>`` itself, and for datasets that
unpack into a subfolder (CIFAR-10's ``cifar-10-batches-py``) also beneath it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LmcError
from . import cifar  # (its parsers import numpy and torch: `lmckit data list` stays light)
from .cache import cache_root

if TYPE_CHECKING:
    from .dataset import Dataset

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    files: tuple[str, ...]  # file names (without .gz) that must be present
    loader: Callable[[Path], tuple[dict, dict, dict, dict]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    system_dirs: tuple[str, ...] = ()
    install_hint: str = ""
    generated: bool = False  # made in memory (no files): the synthetic test datasets
    subdirs: tuple[str, ...] = ()  # subfolders an archive unpacks into, also searched
    present: Callable[[Path], bool] | None = None  # folder holds a complete copy (default: all ``files``)
    image_size: int = 28  # side of the (square) images: model size checks use it before the data is read
    train_size: int | None = None  # training images (known sizes: a dry run checks val_size against it)

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    def is_present(self, folder: Path) -> bool:
        if not folder.is_dir():
            return False
        return self.present(folder) if self.present else _has_files(folder, self.files)


def _load_idx_folder(folder: Path):
    from .idx import load_idx_pair

    images, labels, source, sums = {}, {}, {}, {}
    for split, (img, lab) in IDX_FILES.items():
        ip, lp = _find_file(folder, img), _find_file(folder, lab)
        x, y, s = load_idx_pair(ip, lp)
        images[split], labels[split], source[split] = x, y, str(ip)
        sums.update(s)
    return images, labels, source, sums


def _find_file(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise LmcError(f"dataset file {stem}[.gz] not found in {folder}")


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


register_dataset(
    DatasetInfo(
        "fashion-mnist",
        10,
        tuple(f for pair in IDX_FILES.values() for f in pair),
        _load_idx_folder,
        (0.2860,),
        (0.3530,),
        ("/usr/share/datasets/fashion-mnist",),
        "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (Debian), "
        "or run `lmckit data download fashion-mnist` when online",
    )
)
register_dataset(
    DatasetInfo(
        "cifar10",
        10,
        cifar.PY_FILES["train"] + cifar.PY_FILES["test"],
        cifar.load_cifar_folder,
        # per-channel mean and std over all pixels of the 50000 training images
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        (),
        "put cifar-10-batches-py/ (from cifar-10-python.tar.gz) or cifar-10-batches-bin/ in a folder "
        "and pass --data-dir, "
        "or run `lmckit data download cifar10` when online",
        subdirs=(cifar.PY_DIR, cifar.BIN_DIR),
        present=lambda f: cifar.cifar_layout(f) is not None,
        image_size=32,
        train_size=50000,
    )
)
register_dataset(
    DatasetInfo(
        "mnist",
        10,
        tuple(f for pair in IDX_FILES.values() for f in pair),
        _load_idx_folder,
        (0.1307,),
        (0.3081,),
        ("/usr/share/datasets/mnist",),
        "put the four IDX files (train-images-idx3-ubyte.gz, ...) in a folder and pass --data-dir, "
        "or run `lmckit data download mnist` when online",
    )
)


def _synthetic(channels: int, size: int, n_train: int, n_test: int):
    def load(_folder: Path):
        from .dataset import synthetic_images

        x, y = synthetic_images(n_train + n_test, channels, size, 10, seed=1234)
        return (
            {"train": x[:n_train], "test": x[n_train:]},
            {"train": y[:n_train], "test": y[n_train:]},
            {"train": "generated", "test": "generated"},
            {},
        )

    return load


register_dataset(
    DatasetInfo(
        "synthetic",
        10,
        (),
        _synthetic(1, 28, 2000, 500),
        (0.5,),
        (0.25,),
        generated=True,
        install_hint="generated in memory",
        train_size=2000,
    )
)
register_dataset(
    DatasetInfo(
        "synthetic-rgb",
        10,
        (),
        _synthetic(3, 32, 1000, 300),
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        generated=True,
        image_size=32,
        train_size=1000,
        install_hint="generated in memory",
    )
)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of dataset ``name`` (:class:`LmcError` for another type or an unknown name)."""
    if not isinstance(name, str):
        raise LmcError(
            f"dataset name must be a string, got {type(name).__name__}", f"known datasets: {', '.join(DATASETS)}"
        )
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        raise LmcError(
            f"unknown dataset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            f"known datasets: {', '.join(DATASETS)}",
        )
    return DATASETS[name]


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    info = dataset_info(name)
    out: list[Path] = []
    roots: list[Path] = []
    for base in ([Path(data_dir)] if data_dir else []) + (
        [Path(os.environ["LMCKIT_DATA"])] if os.environ.get("LMCKIT_DATA") else []
    ):
        roots += [base / name, base]
    roots += [Path(d) for d in info.system_dirs]
    roots.append(cache_root() / name)
    for r in roots:
        for d in [r] + [r / sub for sub in info.subdirs]:
            if d not in out:
                out.append(d)
    return out


def _has_files(folder: Path, files: tuple[str, ...]) -> bool:
    return folder.is_dir() and all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in files)


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The first folder on the search path holding all of the dataset's files."""
    info = dataset_info(name)
    if info.generated:
        return Path("<generated>")
    tried = candidate_dirs(name, data_dir)
    for folder in tried:
        if info.is_present(folder):
            return folder
    partial = [
        (t, missing)
        for t in tried
        if t.is_dir()
        for missing in [[f for f in info.files if not any((t / f"{f}{ext}").is_file() for ext in ("", ".gz", ".bin"))]]
        if len(missing) < len(info.files)
    ]
    detail = "".join(f"; {t} has only some of its files (missing {', '.join(m)})" for t, m in partial)
    if data_dir and not Path(data_dir).is_dir():
        detail += f"; --data-dir {data_dir} is not a folder"
    raise LmcError(
        f"dataset {name} not found; looked in: {', '.join(str(t) for t in tried)}{detail}", info.install_hint
    )


_CACHE: dict[tuple, Dataset] = {}
#: every dataset :func:`load_dataset` returned in this process: name -> its files' checksums (file name ->
#: sha256 of the content). A pipeline stage clears it before it runs and records what it read, so a cached
#: stage is reused only on the same data (:func:`lmckit.pipeline.stages.cache_problem`).
LOADED: dict[str, dict[str, str]] = {}
#: what :meth:`Dataset.normalize` does to the pixels (:func:`load_dataset`'s ``preprocess``):
#: ``standardize`` (scale to [0, 1], then per-channel mean/std of the training set) or ``scale01`` (x / 255 only)
PREPROCESSING = ("standardize", "scale01")


def _validate(info: DatasetInfo, folder: Path, images: dict, labels: dict, source: dict) -> None:
    """Every split non-empty, one image size and channel count, labels in ``[0, num_classes)``."""
    shapes = set()
    for split, x in images.items():
        where = source.get(split, str(folder))
        if x.shape[0] == 0:
            raise LmcError(
                f"the {split} split of {info.name} in {where} is empty", "the file is truncated or wrong; get it again"
            )
        shapes.add(tuple(x.shape[1:]))
        if x.dim() != 4 or x.shape[2] != x.shape[3] or x.shape[2] < 1 or x.shape[1] < 1:
            raise LmcError(
                f"the {split} split of {info.name} in {where} holds images of shape {tuple(x.shape[1:])}; "
                "lmckit needs square images of at least 1 x 1 pixel",
                "check the dataset files",
            )
        y = labels[split]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= info.num_classes:
            raise LmcError(
                f"labels of the {split} split of {info.name} ({where}) span {lo}..{hi}; "
                f"{info.name} has classes 0..{info.num_classes - 1}",
                "the label file is corrupt or belongs to another dataset",
            )
    if len(shapes) > 1:
        raise LmcError(
            f"the splits of {info.name} in {folder} have different image shapes {sorted(shapes)}",
            "the files come from different datasets; check the folder",
        )


def _folder_signature(folder: Path) -> tuple:
    """Names, sizes and mtimes of the files in ``folder``: a changed file invalidates the in-process cache."""
    if not folder.is_dir():
        return ()
    return tuple(
        sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir() if p.is_file() for st in [p.stat()])
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 0,
    val_seed: int = 0,
    preprocess: str = "standardize",
) -> Dataset:
    """Load a dataset into memory (cached per process).

    ``val_size > 0`` holds out that many training images (a seeded random
    subset) as a ``val`` split; the rest stay in ``train``.

    ``preprocess`` (one of :data:`PREPROCESSING`) says what
    :meth:`Dataset.normalize` does to the uint8 pixels: ``standardize``
    (lmckit's default) scales to [0, 1] and standardises per channel with the
    training set's mean and std; ``scale01`` only scales to [0, 1]
    (``x / 255``), as ``torchvision.transforms.ToTensor`` does in the STE-MM
    authors' code (e5-a/STE-MM ``srcs/datasets/FMNIST.py``, ``DataModule.setup``).
    Raises :class:`LmcError` for another value.
    """
    import torch

    from ..checks import check_int
    from .dataset import Dataset
    from .text import TEXT_DATASETS

    val_size, val_seed = check_int(val_size, "val_size", 0), check_int(val_seed, "val_seed")
    if isinstance(name, str) and name in TEXT_DATASETS:  # token windows of a text corpus (lmckit.data.text)
        from .text import load_text_dataset

        return load_text_dataset(name, data_dir, val_size=val_size, val_seed=val_seed)
    dataset_info(name)  # a name that is not a string or not registered: LmcError naming it
    if preprocess not in PREPROCESSING:
        raise LmcError(f"unknown preprocessing {preprocess!r}", f"choose one of {', '.join(PREPROCESSING)}")
    folder = find_dataset(name, data_dir)
    # a generated dataset has no folder: its placeholder path must not depend on the working directory
    where = str(folder) if dataset_info(name).generated else str(folder.absolute())
    key = (name, where, _folder_signature(folder), val_size, val_seed, preprocess)
    if key in _CACHE:
        LOADED[name] = dict(_CACHE[key].checksums)
        return _CACHE[key]
    info = dataset_info(name)
    images, labels, source, sums = info.loader(folder)
    _validate(info, folder, images, labels, source)
    if val_size < 0 or val_size >= images["train"].shape[0]:
        raise LmcError(
            f"validation size {val_size} must be between 0 and the training set size {images['train'].shape[0]}"
        )
    if val_size:
        perm = torch.randperm(images["train"].shape[0], generator=torch.Generator().manual_seed(val_seed))
        vi, ti = perm[:val_size].sort().values, perm[val_size:].sort().values
        images["val"], labels["val"] = images["train"][vi], labels["train"][vi]
        images["train"], labels["train"] = images["train"][ti], labels["train"][ti]
    mean, std = info.mean, info.std
    if preprocess == "scale01":  # normalize() then computes (x / 255 - 0) / 1 = x / 255 exactly
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    ds = Dataset(name, images, labels, info.num_classes, mean, std, source, sums)
    _CACHE[key] = ds
    LOADED[name] = dict(ds.checksums)
    return ds
