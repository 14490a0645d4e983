import dataclasses
import math

import pytest
import torch

from dlbase import checkpoint
from dlbase.config import load_config
from dlbase.errors import CheckpointError, DataError
from dlbase.train import train


def weights(path):
    return checkpoint.load(path)["model"]


def test_train_writes_run_folder(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    logs = []
    result = train(cfg, log=logs.append)
    folder = tmp_path / "ckpt" / "tiny"
    assert result.folder == folder
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt"}
    assert load_config(folder / "config.yaml") == cfg
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert len(rows) == 4 and rows[-1].startswith("3,30,")  # 500 training samples / batch 50 = 10 steps an epoch
    last = checkpoint.load(folder / "last.ckpt")
    assert last["epoch"] == 3 and last["step"] == 30 and last["config"]["name"] == "tiny"
    assert any(str(folder) in line for line in logs)
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # it learns
    assert result.best_value >= 0.9  # the synthetic digits are easy


def test_steps_per_epoch_cover_the_data(tiny_config):
    cfg = load_config(tiny_config, ["train.epochs=1", "train.batch_size=64"])
    train(cfg, log=lambda s: None)
    ck = checkpoint.load(cfg.checkpoint.dir + "/tiny/last.ckpt")
    assert ck["step"] == math.ceil(500 / 64)


def test_resume_is_bit_identical_to_uninterrupted(tiny_config, tmp_path):
    full = load_config(tiny_config, ["model.dropout=0.3", f"checkpoint.dir={tmp_path / 'a'}"])
    train(full, log=lambda s: None)
    part = dataclasses.replace(full, checkpoint=dataclasses.replace(full.checkpoint, dir=str(tmp_path / "b")),
                               train=dataclasses.replace(full.train, epochs=1))
    train(part, log=lambda s: None)
    last = tmp_path / "b" / "tiny" / "last.ckpt"
    assert checkpoint.load(last)["epoch"] == 1
    resumed = dataclasses.replace(part, train=full.train)
    train(resumed, resume=last, resume_payload=checkpoint.load(last), log=lambda s: None)
    a, b = weights(tmp_path / "a" / "tiny" / "last.ckpt"), weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (tmp_path / "a" / "tiny" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "tiny" / "metrics.csv").read_text().splitlines()
    strip = [lambda rows: [",".join(r.split(",")[:-1]) for r in rows]][0]  # all but the seconds column
    assert strip(rows_a) == strip(rows_b)


def test_new_run_never_overwrites_an_old_one(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=1"])
    first = train(cfg, log=lambda s: None)
    before = (first.folder / "last.ckpt").read_bytes()
    second = train(cfg, log=lambda s: None)
    assert second.folder == first.folder.with_name("tiny-2")
    assert (first.folder / "last.ckpt").read_bytes() == before


def test_best_checkpoint_is_the_best_epoch(tiny_config):
    cfg = load_config(tiny_config, ["train.epochs=4", "optim.lr=0.05"])
    result = train(cfg, log=lambda s: None)
    best = checkpoint.load(result.folder / "best.ckpt")
    rows = (result.folder / "metrics.csv").read_text().splitlines()[1:]
    accs = [float(r.split(",")[4]) for r in rows]
    assert best["epoch"] == 1 + accs.index(max(accs))
    assert best["metrics"]["val_accuracy"] == pytest.approx(max(accs), abs=1e-6)


def test_no_validation_split_monitors_train_loss(tiny_config):
    cfg = load_config(tiny_config, ["data.val_size=0", "train.epochs=2"])
    result = train(cfg, log=lambda s: None)
    assert result.best_metric == "train_loss" and (result.folder / "best.ckpt").exists()


def test_problems_reported_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="checkpoint.dir: cannot write"):
        train(load_config(tiny_config, [f"checkpoint.dir={blocker}"]), log=lambda s: None)
    with pytest.raises(DataError, match="not found"):
        train(load_config(tiny_config, [f"data.root={tmp_path / 'nothing'}"]), log=lambda s: None)


def test_sgd_also_trains(tiny_config):
    result = train(load_config(tiny_config, ["optim.name=sgd", "optim.lr=0.1", "train.epochs=3"]),
                   log=lambda s: None)
    assert result.best_value >= 0.8
