"""Datasets from their standard on-disk formats, held in memory as tensors."""

from .dataset import Dataset, random_crop_flip
from .download import download_dataset
from .registry import DATASETS, cache_root, candidate_dirs, dataset_info, find_dataset, load_dataset

__all__ = [
    "Dataset",
    "DATASETS",
    "cache_root",
    "candidate_dirs",
    "dataset_info",
    "download_dataset",
    "find_dataset",
    "load_dataset",
    "random_crop_flip",
]
