"""lmckit.data: IDX and CIFAR-10 loading, search path, validation split, augmentation, bad input."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from lmckit.data import find_dataset, load_dataset, random_crop_flip
from lmckit.data.cifar import parse_cifar_batch, parse_cifar_bin, restricted_unpickle
from lmckit.data.idx import parse_idx
from lmckit.errors import LmcError
from tests.helpers.data_files import (
    CIFAR_TRAIN,
    IDX_NAMES,
    idx_bytes,
    planted_images,
    py2_cifar_pickle,
    py3_cifar_pickle,
    write_cifar_dataset,
    write_idx_dataset,
)

pytestmark = pytest.mark.usefixtures("isolated_data")  # tests/conftest.py


# --------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_loads_planted_values(tmp_path, gz):
    want = write_idx_dataset(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.splits() == ["train", "test"]
    for split, (x, y) in want.items():
        assert ds.images[split].dtype == torch.uint8 and ds.images[split].shape == (len(y), 1, 8, 8)
        assert torch.equal(ds.images[split], torch.from_numpy(x))
        assert torch.equal(ds.labels[split], torch.from_numpy(y))
    # image 3 of train: pixel (r, c) = 3 + 8 r + c
    assert int(ds.images["train"][3, 0, 2, 5]) == 3 + 16 + 5
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 8
    assert set(ds.checksums) == {n + (".gz" if gz else "") for pair in IDX_NAMES.values() for n in pair}


def test_idx_found_via_env_and_folder_itself(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "flat", gz=True)  # files directly in the folder, not in <dir>/mnist
    monkeypatch.setenv("LMCKIT_DATA", str(tmp_path / "flat"))
    assert find_dataset("mnist") == tmp_path / "flat"
    assert load_dataset("mnist").size("test") == 10
    # an explicit data_dir wins over the environment
    write_idx_dataset(tmp_path / "other" / "mnist", n_train=12)
    assert load_dataset("mnist", data_dir=tmp_path / "other").size("train") == 12


def test_missing_file_names_the_file(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(LmcError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in e.value.message and str(tmp_path / "mnist") in e.value.message


def test_missing_data_dir_is_reported(tmp_path):
    with pytest.raises(LmcError, match="not a folder"):
        find_dataset("mnist", data_dir=tmp_path / "nope")


def _corrupt(tmp_path, name, mutate, gz=False):
    d = tmp_path / "mnist"
    write_idx_dataset(d, gz=gz)
    p = d / (name + (".gz" if gz else ""))
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(LmcError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(p) in e.value.message, e.value.message
    return e.value


def test_truncated_idx(tmp_path):
    err = _corrupt(tmp_path, "train-images-idx3-ubyte", lambda b: b[:-7])
    assert "truncated" in err.message and err.hint


def test_truncated_gzip(tmp_path):
    err = _corrupt(tmp_path, "train-images-idx3-ubyte", lambda b: b[: len(b) // 2], gz=True)
    assert "gzip" in err.message


def test_corrupt_gzip_body(tmp_path):
    _corrupt(tmp_path, "t10k-images-idx3-ubyte", lambda b: b[:12] + bytes(x ^ 0x5A for x in b[12:]), gz=True)


def test_wrong_magic(tmp_path):
    err = _corrupt(tmp_path, "train-labels-idx1-ubyte", lambda b: b"\x12\x34" + b[2:])
    assert "magic" in err.message


def test_swapped_images_and_labels(tmp_path):
    err = _corrupt(tmp_path, "train-images-idx3-ubyte", lambda b: idx_bytes(np.zeros(20, np.uint8)))
    assert "swapped" in (err.hint or "")


def test_mismatched_counts(tmp_path):
    err = _corrupt(tmp_path, "t10k-labels-idx1-ubyte", lambda b: idx_bytes(np.zeros(9, np.uint8)))
    assert "10 images" in err.message and "9 labels" in err.message


def test_labels_out_of_range(tmp_path):
    d = tmp_path / "mnist"
    write_idx_dataset(d)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 12, np.uint8)))
    with pytest.raises(LmcError, match="12"):
        load_dataset("mnist", data_dir=tmp_path)


def test_parse_idx_header_math():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(arr)), arr)
    with pytest.raises(LmcError, match="longer"):
        parse_idx(idx_bytes(arr) + b"\0")
    with pytest.raises(LmcError, match="too short"):
        parse_idx(b"\0\0")


def test_real_fashion_mnist_header_and_checksums():
    try:
        folder = find_dataset("fashion-mnist")
    except LmcError:
        pytest.skip("Fashion-MNIST not installed")
    from lmckit.data.checksums import KNOWN_CHECKSUMS, check_file

    for stem, ck in KNOWN_CHECKSUMS["fashion-mnist"].items():
        p = folder / stem if (folder / stem).exists() else folder / f"{stem}.gz"
        assert check_file(p, ck)["status"] == "match"


# --------------------------------------------------------------------------- validation split
def test_validation_split_is_a_seeded_partition(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", n_train=30)
    full = load_dataset("mnist", data_dir=tmp_path)
    a = load_dataset("mnist", data_dir=tmp_path, val_size=7, val_seed=1)
    b = load_dataset("mnist", data_dir=tmp_path, val_size=7, val_seed=2)
    assert a.size("val") == 7 and a.size("train") == 23 and a.size("test") == full.size("test")
    # train and val together are exactly the original train set (images stay paired with labels)
    key = lambda x, y: sorted(zip(x.flatten(1).tolist(), y.tolist()))  # noqa: E731
    assert key(torch.cat([a.images["train"], a.images["val"]]), torch.cat([a.labels["train"], a.labels["val"]])) == key(
        full.images["train"], full.labels["train"]
    )
    assert not torch.equal(a.labels["val"], b.labels["val"]) or not torch.equal(a.images["val"], b.images["val"])
    # an empty cache for this check only (the session's cached datasets, e.g. the `synthetic` fixture, stay)
    monkeypatch.setitem(load_dataset.__globals__, "_CACHE", {})
    again = load_dataset("mnist", data_dir=tmp_path, val_size=7, val_seed=1)
    assert torch.equal(again.images["val"], a.images["val"])
    with pytest.raises(LmcError):
        load_dataset("mnist", data_dir=tmp_path, val_size=30)


# --------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("layout,py2", [("python", True), ("python", False), ("binary", False)])
def test_cifar_layouts_load_planted_values(tmp_path, layout, py2):
    want = write_cifar_dataset(tmp_path / "cifar10", layout=layout, py2=py2)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.in_channels == 3 and ds.image_size == 32 and ds.size("train") == 20 and ds.size("test") == 4
    for split, (x, y) in want.items():
        assert torch.equal(ds.images[split], torch.from_numpy(x))
        assert torch.equal(ds.labels[split], torch.from_numpy(y))
    # CIFAR rows are 1024 red, then green, then blue bytes: channel c of image 0 at (r, k) = r*32 + k + 17c (mod 256)
    assert int(ds.images["train"][0, 2, 1, 3]) == (32 + 3 + 34) % 256
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar_found_inside_batches_folder(tmp_path):
    write_cifar_dataset(tmp_path, layout="binary")  # tmp/cifar-10-batches-bin, no cifar10/ level
    assert find_dataset("cifar10", data_dir=tmp_path) == tmp_path / "cifar-10-batches-bin"


def test_py2_and_py3_pickles_agree_with_plain_pickle():
    x, y = planted_images(3, 32, 3)
    for data in (py2_cifar_pickle(x.reshape(3, -1), y), py3_cifar_pickle(x.reshape(3, -1), y, 3)):
        ref = pickle.loads(data, encoding="bytes")  # trusted: we just wrote it
        xi, yi = parse_cifar_batch(data)
        assert np.array_equal(xi.numpy().reshape(3, -1), ref[b"data"]) and yi.tolist() == list(ref[b"labels"])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_restricted_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    for payload in (
        pickle.dumps(_Evil(str(target))),
        pickle.dumps({b"data": _Evil(str(target)), b"labels": [1]}),
        pickle.dumps(np.zeros(3, dtype=object), protocol=4),
        pickle.dumps(np.zeros(3), protocol=5),
    ):
        with pytest.raises(LmcError):
            restricted_unpickle(payload, "evil.pkl")
    assert not target.exists()
    # protocol 2 from Python 3 encodes bytes with _codecs.encode: refused, not run
    with pytest.raises(LmcError, match="_codecs"):
        restricted_unpickle(pickle.dumps(b"abc", protocol=2))


def test_restricted_unpickler_checks_array_state():
    x, y = planted_images(2, 32, 3)
    good = py2_cifar_pickle(x.reshape(2, -1), y)
    # shape claims 3 images but the payload holds 2
    bad = good.replace(b"K\x02M\x00\x0c\x86", b"K\x03M\x00\x0c\x86", 1)
    assert bad != good
    with pytest.raises(LmcError, match="bytes"):
        parse_cifar_batch(bad)
    # an object dtype is never built
    with pytest.raises(LmcError, match="dtype"):
        parse_cifar_batch(good.replace(b"U\x02u1", b"U\x02O8", 1))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b"not a pickle at all", "corrupt"),
        (lambda b: pickle.dumps([1, 2, 3]), "list"),
        (
            lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, protocol=4),
            "2 images but 1 labels",
        ),
        (lambda b: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [1]}, protocol=4), "labels"),
        (lambda b: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, protocol=4), "outside"),
        (lambda b: pickle.dumps({b"data": np.zeros((1, 1000), np.uint8), b"labels": [1]}, protocol=4), "3072"),
    ],
)
def test_corrupt_cifar_batch_names_file(tmp_path, mutate, match):
    write_cifar_dataset(tmp_path / "cifar10")
    p = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(LmcError, match=match) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(p) in e.value.message


def test_corrupt_cifar_bin(tmp_path):
    write_cifar_dataset(tmp_path / "cifar10", layout="binary")
    p = tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(LmcError, match="3073-byte") as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(p) in e.value.message
    rec = np.zeros((2, 3073), np.uint8)
    rec[1, 0] = 11
    with pytest.raises(LmcError, match="outside"):
        parse_cifar_bin(rec.tobytes())


def test_cifar_gzipped_batch_is_read(tmp_path):
    want = write_cifar_dataset(tmp_path / "cifar10", layout="binary")
    p = tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    p.write_bytes(gzip.compress(p.read_bytes()))  # same name, gzipped content: read_bytes sniffs the magic
    assert torch.equal(load_dataset("cifar10", data_dir=tmp_path).images["test"], torch.from_numpy(want["test"][0]))


def test_incomplete_cifar_folder(tmp_path):
    write_cifar_dataset(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar-10-batches-py" / CIFAR_TRAIN[1]).unlink()
    with pytest.raises(LmcError, match="data_batch_2"):
        find_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------- augmentation
def test_random_crop_flip_shape_dtype_and_windows():
    x = torch.from_numpy(planted_images(16, 8, 3)[0]).add(1)  # +1: no zero pixels, so padding is visible
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g, pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        windows = [(dy, dx, padded[i, :, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5)]
        hits = [
            (dy, dx, f) for dy, dx, w in windows for f in (False, True) if torch.equal(out[i], w.flip(-1) if f else w)
        ]
        assert hits, f"sample {i} is not a padded crop (optionally flipped) of its input"
        flips += all(f for _, _, f in hits)
    assert 0 < flips < 16


def test_random_crop_flip_flip_only_and_determinism():
    x = torch.from_numpy(planted_images(64, 8, 1)[0])
    out = random_crop_flip(x, torch.Generator().manual_seed(3), pad=0)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(a or b for a, b in zip(flipped, same)) and 10 < sum(flipped) < 54
    a = random_crop_flip(x, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, torch.from_numpy(planted_images(64, 8, 1)[0]))  # input untouched


def test_batches_with_augment_are_seeded(synthetic_rgb):
    def run(s):
        gen = torch.Generator().manual_seed(s)
        return [
            xb for xb, _ in synthetic_rgb.batches("train", 100, shuffle=True, augment=True, limit=200, generator=gen)
        ]

    a, b = run(0), run(0)
    assert len(a) == 2 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].dtype == torch.float32 and a[0].shape == (100, 3, 32, 32)
