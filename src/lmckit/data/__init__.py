"""Datasets from their standard on-disk formats, held in memory as tensors."""

from .registry import DATASETS, PREPROCESSING, cache_root, candidate_dirs, dataset_info, find_dataset, load_dataset

__all__ = [
    "Dataset",
    "DATASETS",
    "PREPROCESSING",
    "cache_root",
    "candidate_dirs",
    "dataset_info",
    "download_dataset",
    "find_dataset",
    "load_dataset",
    "random_crop_flip",
]


def __getattr__(name: str):  # lazy: the registry and search path need no torch (`lmckit data list`)
    if name in ("Dataset", "random_crop_flip"):
        from . import dataset

        return getattr(dataset, name)
    if name == "download_dataset":
        from .download import download_dataset

        return download_dataset
    raise AttributeError(name)
