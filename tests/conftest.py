"""Shared fixtures: tiny data and models, so the default tier runs in minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("LMCKIT_NO_PROGRESS", "1")
torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI has 2 cores


@pytest.fixture(scope="session")
def synthetic():
    from lmckit.data import load_dataset

    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def synthetic_rgb():
    from lmckit.data import load_dataset

    return load_dataset("synthetic-rgb")


def pytest_collection_modifyitems(config, items):
    # Slow scientific checks need the real dataset; skip them cleanly where it is absent.
    try:
        from lmckit.data import find_dataset

        find_dataset("fashion-mnist")
        have = True
    except Exception:
        have = False
    if not have:
        skip = pytest.mark.skip(reason="Fashion-MNIST not installed")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
