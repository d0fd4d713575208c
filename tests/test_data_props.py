"""Property tests: random and mutated bytes either parse to well-formed data or raise LmcError, nothing else."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmckit.data.checksums import KNOWN_CHECKSUMS, check_file
from lmckit.data.cifar import parse_cifar_batch, parse_cifar_bin
from lmckit.data.idx import load_idx_pair, parse_idx
from lmckit.errors import LmcError
from tests.helpers.data_files import idx_bytes, planted_images, py2_cifar_pickle, py3_cifar_pickle

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_X, _Y = planted_images(6, 8, 1)
IDX_IMAGES, IDX_LABELS = idx_bytes(_X[:, 0]), idx_bytes(_Y)
_CX, _CY = planted_images(3, 32, 3)
CIFAR_PICKLES = [
    py2_cifar_pickle(_CX.reshape(3, -1), _CY),
    py3_cifar_pickle(_CX.reshape(3, -1), _CY, 3),
    py3_cifar_pickle(_CX.reshape(3, -1), _CY, 4),
]


@st.composite
def mutated(draw, base: bytes):
    """``base`` with a few byte flips, a truncation, an insertion or a splice."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


def _idx_ok(arr: np.ndarray) -> None:
    assert isinstance(arr, np.ndarray) and 1 <= arr.ndim <= 4


@SETTINGS
@given(st.binary(max_size=64))
def test_parse_idx_random_bytes(data):
    try:
        _idx_ok(parse_idx(data))
    except LmcError:
        pass


@SETTINGS
@given(st.one_of(mutated(IDX_IMAGES), mutated(IDX_LABELS)))
def test_parse_idx_mutated(data):
    try:
        _idx_ok(parse_idx(data))
    except LmcError:
        pass


@SETTINGS
@given(mutated(IDX_IMAGES), mutated(IDX_LABELS), st.booleans(), st.booleans())
def test_load_idx_pair_mutated_files(images, labels, gz_images, mutate_gz):
    with tempfile.TemporaryDirectory() as d:
        ip, lp = Path(d) / "img", Path(d) / "lab"
        if gz_images:
            z = gzip.compress(IDX_IMAGES)
            ip.write_bytes(images[: len(z)] if mutate_gz else z)  # a mutated/truncated gzip stream, or a good one
        else:
            ip.write_bytes(images)
        lp.write_bytes(labels)
        try:
            x, y, sums = load_idx_pair(ip, lp)
        except LmcError as e:
            assert str(ip) in e.message or str(lp) in e.message
            return
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 1
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert set(sums) == {"img", "lab"}


def _cifar_ok(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert y.numel() == 0 or (int(y.min()) >= 0 and int(y.max()) < 10)


@SETTINGS
@given(st.binary(max_size=256))
def test_cifar_batch_random_bytes(data):
    for blob in (data, b"\x80\x02" + data):
        try:
            _cifar_ok(*parse_cifar_batch(blob, "batch"))
        except LmcError as e:
            assert "batch" in e.message


@SETTINGS
@given(st.sampled_from(range(len(CIFAR_PICKLES))).flatmap(lambda i: mutated(CIFAR_PICKLES[i])))
def test_cifar_batch_mutated(data):
    try:
        _cifar_ok(*parse_cifar_batch(data, "batch"))
    except LmcError as e:
        assert "batch" in e.message


@SETTINGS
@given(st.integers(0, 3), st.binary(min_size=0, max_size=3073 * 2 + 5))
def test_cifar_bin_random(records, tail):
    rng = np.random.default_rng(records)
    rec = rng.integers(0, 256, size=(records, 3073), dtype=np.uint8)
    rec[:, 0] %= 10
    for blob in (tail, rec.tobytes(), rec.tobytes() + tail[:7]):
        try:
            _cifar_ok(*parse_cifar_bin(blob, "bin"))
        except LmcError as e:
            assert "bin" in e.message
    if records:
        x, y = parse_cifar_bin(rec.tobytes())
        assert torch.equal(y, torch.from_numpy(rec[:, 0].astype(np.int64)))
        assert torch.equal(x.reshape(records, -1), torch.from_numpy(rec[:, 1:]))


@SETTINGS
@given(st.binary(max_size=128))
def test_check_file_never_raises(data):
    with tempfile.TemporaryDirectory() as d:
        for blob in (data, b"\x1f\x8b" + data, gzip.compress(data)):
            p = Path(d) / "train-images-idx3-ubyte.gz"
            p.write_bytes(blob)
            for known in (
                KNOWN_CHECKSUMS["fashion-mnist"]["train-images-idx3-ubyte"],
                KNOWN_CHECKSUMS["mnist"]["train-images-idx3-ubyte"],
                None,
            ):
                row = check_file(p, known)
                assert row["status"] in {"unknown", "mismatch", "unreadable"}
