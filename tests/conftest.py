"""Shared fixtures: tiny data and models, so the default tier runs in minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.reliability import Zygote, subprocess_env

os.environ.setdefault("LMCKIT_NO_PROGRESS", "1")
torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI has 2 cores


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread (two threads spin-wait badly on a loaded 2-core machine), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No LMCKIT_DATA or download mirror, and an empty user cache: only the dataset folders a test makes are found."""
    monkeypatch.delenv("LMCKIT_DATA", raising=False)
    monkeypatch.delenv("LMCKIT_DATA_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def zygote():
    """A pre-imported lmckit process that forks each CLI run (fast, real processes; tests/helpers/reliability.py)."""
    z = Zygote(subprocess_env())
    yield z
    z.close()


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
