import gzip
import os
import struct

import pytest
import torch

from conftest import make_dataset, synthetic_digits, write_idx
from dlbase.core.config import DataConfig
from dlbase.core.data import Batcher, load_dataset
from dlbase.core.idx import locate, read_idx
from dlbase.core.errors import DataError


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    images, labels = synthetic_digits(37, seed=0)
    p = write_idx(tmp_path / "imgs", images, gz=gz)
    got, _ = read_idx(p, 3)
    assert got.dtype == torch.uint8 and got.shape == (37, 28, 28) and torch.equal(got, images)
    got, _ = read_idx(write_idx(tmp_path / "lbls", labels, gz=gz), 1)
    assert torch.equal(got, labels)


def test_wrong_magic(tmp_path):
    images, _ = synthetic_digits(5, seed=0)
    p = write_idx(tmp_path / "x", images)
    with pytest.raises(DataError, match=r"x: wrong magic number 2051 .*expected 2049"):
        read_idx(p, 1)
    p.write_bytes(b"\x00\x00\x0d\x03" + p.read_bytes()[4:])  # float data type
    with pytest.raises(DataError, match="wrong magic"):
        read_idx(p, 3)


@pytest.mark.parametrize("cut", [0, 2, 10, 100, -1])
def test_truncated(tmp_path, cut):
    images, _ = synthetic_digits(5, seed=0)
    p = write_idx(tmp_path / "x", images)
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(DataError, match=str(p)):
        read_idx(p, 3)


def test_truncated_gzip_and_garbage(tmp_path):
    images, _ = synthetic_digits(5, seed=0)
    p = write_idx(tmp_path / "x.gz", images)
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match="x.gz"):
        read_idx(p, 3)
    p.write_bytes(b"\x1f\x8b" + b"nonsense" * 10)
    with pytest.raises(DataError, match="cannot read"):
        read_idx(p, 3)


def test_trailing_bytes(tmp_path):
    images, _ = synthetic_digits(5, seed=0)
    p = write_idx(tmp_path / "x", images)
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="found more"):
        read_idx(p, 3)


def cfg(root, **kw):
    return DataConfig(root=str(root), download=False, **{"val_size": 50, **kw})


def test_load_dataset_split_and_shapes(tiny_data):
    d = load_dataset(cfg(tiny_data), seed=0, device=torch.device("cpu"))
    assert d.input_shape == (28, 28)
    assert len(d.train) == 550 and len(d.val) == 50 and len(d.test) == 200
    assert d.train.x.dtype == torch.float32 and d.train.x.shape == (550, 784)
    assert d.train.x.min() >= 0 and d.train.x.max() <= 1  # normalised once, at load: p = x / 255
    # the validation split is seeded and disjoint from training: together they are the training file
    images, labels = synthetic_digits(600, seed=1)
    flat = images.reshape(600, -1).float() / 255
    rows = {tuple(r.tolist()) for r in flat}
    got = [tuple(r.tolist()) for r in torch.cat([d.train.x, d.val.x])]
    assert len(got) == 600 and set(got) == rows
    again = load_dataset(cfg(tiny_data), seed=0, device=torch.device("cpu"))
    assert torch.equal(again.val.x, d.val.x)
    other = load_dataset(cfg(tiny_data), seed=1, device=torch.device("cpu"))
    assert not torch.equal(other.val.x, d.val.x)


def test_subset_and_val_size_checks(tiny_data):
    d = load_dataset(cfg(tiny_data, subset=120, val_size=20), seed=0, device=torch.device("cpu"))
    assert len(d.train) == 100 and len(d.val) == 20
    with pytest.raises(DataError, match=r"data.val_size: 120 leaves no training samples out of 120"):
        load_dataset(cfg(tiny_data, subset=120, val_size=120), seed=0, device=torch.device("cpu"))
    d = load_dataset(cfg(tiny_data, val_size=0), seed=0, device=torch.device("cpu"))
    assert d.val is None and len(d.train) == 600


def test_label_count_mismatch(tmp_path):
    folder = make_dataset(tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte.gz", torch.zeros(599, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: 599 labels for 600 images"):
        load_dataset(cfg(folder), 0, torch.device("cpu"))


def test_label_out_of_range(tmp_path):
    folder = make_dataset(tmp_path / "d")
    labels = torch.zeros(200, dtype=torch.uint8)
    labels[17] = 12
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 12 at index 17; labels must be 0-9"):
        load_dataset(cfg(folder), 0, torch.device("cpu"))


def test_file_claiming_to_be_original_is_md5_checked(tmp_path):
    folder = make_dataset(tmp_path / "d", n_test=10000)
    with pytest.raises(DataError, match=r"t10k-.*md5 .* does not match the original mnist"):
        load_dataset(cfg(folder), 0, torch.device("cpu"))
    load_dataset(DataConfig(root=str(folder), download=False, verify=False, val_size=50), 0, torch.device("cpu"))


def test_missing_files_named(tmp_path):
    folder = make_dataset(tmp_path / "d")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"mnist not found: looked in .*d"):
        load_dataset(cfg(folder), 0, torch.device("cpu"))


def test_torchvision_layout_and_plain_files(tmp_path):
    make_dataset(tmp_path / "root" / "MNIST" / "raw", gz=False)
    assert locate(str(tmp_path / "root"), "mnist", download=False) == tmp_path / "root" / "MNIST" / "raw"
    make_dataset(tmp_path / "r2" / "FashionMNIST" / "raw")
    assert locate(str(tmp_path / "r2"), "fashion_mnist", False) == tmp_path / "r2" / "FashionMNIST" / "raw"


def test_env_var_is_searched(tmp_path, monkeypatch):
    folder = make_dataset(tmp_path / "envdata")
    monkeypatch.setenv("DLBASE_DATA", str(folder))
    assert locate(None, "mnist", download=False) == folder


def test_different_image_sizes_work(tmp_path):
    folder = make_dataset(tmp_path / "d", size=20)
    d = load_dataset(cfg(folder), 0, torch.device("cpu"))
    assert d.input_shape == (20, 20) and d.train.x.shape[1] == 400


@pytest.mark.parametrize("n,bs", [(550, 128), (100, 100), (7, 3), (5, 64)])
def test_batcher_covers_every_sample_once_per_epoch(n, bs):
    b = Batcher(n, bs, torch.device("cpu"), seed=0)
    orders = []
    for _ in range(3):
        batches = list(b.epoch())
        assert len(batches) == len(b) == -(-n // bs)
        assert all(len(x) == bs for x in batches[:-1]) and 0 < len(batches[-1]) <= bs
        idx = torch.cat(batches)
        assert torch.equal(idx.sort().values, torch.arange(n))
        orders.append(idx)
    if n > 5:
        assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    b2 = Batcher(n, bs, torch.device("cpu"), seed=0)
    assert torch.equal(torch.cat(list(b2.epoch())), orders[0])  # reproducible from the seed


def test_large_gzipped_files_are_decompressed_and_hashed_once(tmp_path, monkeypatch):
    """Issue 15: the second read comes from the user cache (no gunzip, no md5); a changed file is read anew, and
    a damaged cache entry falls back to the file."""
    import gzip as gz

    from dlbase.core import idx as D
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = make_dataset(tmp_path / "big", n_train=1500, n_test=10)
    path = folder / "train-images-idx3-ubyte.gz"
    first, md5 = read_idx(path, 3)
    entries = list((tmp_path / "cache" / "dlbase" / "idx").glob("*.idx"))
    assert len(entries) == 1
    opened = []
    real_open = gz.open
    monkeypatch.setattr(D.gzip, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    again, md5_again = read_idx(path, 3)
    assert opened == [] and md5_again == md5 and torch.equal(again, first)
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # damaged: read the file itself
    assert torch.equal(read_idx(path, 3)[0], first) and len(opened) == 1
    images, labels = synthetic_digits(1500, 9)
    write_idx(path, images)  # a new file at the same path: a new cache key
    os.utime(path, ns=(1, 1))
    assert torch.equal(read_idx(path, 3)[0], images)
