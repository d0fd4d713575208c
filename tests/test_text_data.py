"""Token datasets (lmckit.data.text): windows, splits, the KJV corpus's checksum and its clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmckit.data import load_dataset
from lmckit.data.text import (
    KJV_SHA256,
    TextDataset,
    byte_tokens,
    kjv_bytes,
    load_text_dataset,
    split_stream,
    windows,
)
from lmckit.errors import LmcError


def test_byte_tokens_and_windows_by_hand():
    t = byte_tokens("abcdefg")
    assert t.tolist() == [97, 98, 99, 100, 101, 102, 103]
    w = windows(t, 3)  # (7 - 1) // 3 = 2 windows of 4 tokens, sharing one token
    assert w.tolist() == [[97, 98, 99, 100], [100, 101, 102, 103]]
    assert byte_tokens("é").tolist() == [0xC3, 0xA9]  # UTF-8 bytes
    with pytest.raises(LmcError, match="shorter than one window"):
        windows(t, 10)


def test_split_holds_out_every_tenth_block():
    t = torch.arange(100)
    s = split_stream(t, block=5, every=10)
    assert s["test"].tolist() == list(range(45, 50)) + list(range(95, 100))
    assert s["train"].numel() == 90 and not set(s["train"].tolist()) & set(s["test"].tolist())


def test_text_dataset_batches_are_shifted_targets():
    ds = TextDataset("t", {"train": torch.arange(12).view(3, 4)})
    x, y = next(ds.batches("train", 2))
    assert x.tolist() == [[0, 1, 2], [4, 5, 6]] and y.tolist() == [[1, 2, 3], [5, 6, 7]]
    with pytest.raises(LmcError, match="no 'test' split"):
        ds.tensors("test")


def test_synthetic_text_is_deterministic():
    a, b = load_dataset("text-synthetic"), load_text_dataset("text-synthetic")
    assert torch.equal(a.windows["train"], b.windows["train"]) and a.context == 32
    assert int(a.windows["train"].min()) >= 65 and int(a.windows["train"].max()) < 65 + 32


def test_kjv_bad_file_is_refused(tmp_path):
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "kjv.txt").write_bytes(b"In the beginning")
    with pytest.raises(LmcError, match="sha256 .* not the expected"):
        kjv_bytes(tmp_path)
    with pytest.raises(LmcError, match="is not a folder"):
        kjv_bytes(tmp_path / "missing")


def test_kjv_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LMCKIT_DATA", raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    import lmckit.data.text as text

    original = text._kjv_from_package  # as on a machine without the package: no program, no data file
    monkeypatch.setattr(text, "_kjv_from_package", lambda: original(None, str(tmp_path / "nolib")))
    with pytest.raises(LmcError, match="apt-get install -y bible-kjv"):
        kjv_bytes()


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
def test_kjv_from_the_debian_package(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LMCKIT_DATA", raising=False)
    data, where = kjv_bytes()
    assert hashlib.sha256(data).hexdigest() == KJV_SHA256 and where.endswith("kjv.txt")
    assert data.startswith(b"\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.")
    ds = load_text_dataset("kjv")
    assert ds.context == 128 and ds.size("train") > 9 * ds.size("test") * 0.9
    assert ds.checksums["kjv.txt"] == KJV_SHA256
