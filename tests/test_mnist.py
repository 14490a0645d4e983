"""Accuracy on the real MNIST: the default recipe must reach 98% test accuracy (about a minute on 2 CPU cores)."""
from pathlib import Path

import pytest
import torch

from dlbase.config import load_config
from dlbase.data import load_dataset
from dlbase.evaluate import evaluate
from dlbase.train import load_for_eval, train

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
