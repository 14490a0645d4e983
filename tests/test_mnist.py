"""Accuracy on the real MNIST: the default recipe must reach 98% test accuracy (about a minute on 2 CPU cores)."""
from pathlib import Path

import pytest
import torch

from dlbase.core.config import load_config
from dlbase.core.data import load_dataset
from dlbase.training.evaluate import evaluate
from dlbase.training.state import load_for_eval
from dlbase.training.train import train

REPO = Path(__file__).resolve().parents[1]


def test_real_mnist_files_load_and_verify(mnist_root):
    cfg = load_config(None, [f"data.root={mnist_root}", "data.download=false"])
    d = load_dataset(cfg.data, 0, torch.device("cpu"))
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.test.y.bincount().tolist()[:2] == [980, 1135]  # the published class counts


def test_default_config_reaches_98_percent(mnist_root, tmp_path):
    cfg = load_config(REPO / "configs" / "mnist_mlp.yaml",
                      [f"data.root={mnist_root}", "data.download=false", f"checkpoint.dir={tmp_path}", "device=cpu"])
    result = train(cfg, log=print)
    _, model, _ = load_for_eval(result.folder / "best.ckpt", torch.device("cpu"))
    test = evaluate(model, load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test)
    print(f"default config: test accuracy {test['accuracy']:.4f} after best epoch {result.best_epoch}")
    assert test["accuracy"] >= 0.98


def test_altered_original_is_caught_by_md5(mnist_root, tmp_path):
    import gzip
    import shutil

    import pytest

    from dlbase.core.errors import DataError
    for f in mnist_root.glob("*-ubyte.gz"):
        shutil.copy(f, tmp_path / f.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8 + 1234] = (raw[8 + 1234] + 1) % 10  # one label changed, still a valid digit
    labels.write_bytes(gzip.compress(bytes(raw)))
    cfg = load_config(None, [f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: md5 .* does not match the original mnist"):
        load_dataset(cfg.data, 0, torch.device("cpu"))


def test_fashion_files_are_not_taken_for_mnist(tmp_path):
    import pytest

    from dlbase.core.errors import DataError
    fashion = Path("/usr/share/datasets/fashion-mnist")
    if not (fashion / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    with pytest.raises(DataError, match="this is fashion_mnist's file, but data.dataset is mnist"):
        load_dataset(load_config(None, [f"data.root={fashion}", "data.download=false"]).data, 0,
                     torch.device("cpu"))
    d = load_dataset(load_config(None, [f"data.root={fashion}", "data.dataset=fashion_mnist"]).data, 0,
                     torch.device("cpu"))
    assert (len(d.train), len(d.test)) == (55000, 10000)
