"""A cross-validation fold's checkpoint carries its fold: eval --split val/train and --resume use that fold's
parts (issue 21, items 1 and 8). Oracle: the fold's held-out images cut from the IDX files by hand (a seeded
permutation in K parts) and a plain forward pass of the checkpoint's weights over them."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import synthetic_digits
from dlbase.training import checkpoint
from dlbase.cli import app
from dlbase.training.state import load_for_eval

runner = CliRunner()
N_TRAIN, SEED, K = 600, 0, 3


def _config(tmp_path: Path, tiny_data: Path, name: str, epochs: int) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: {name}
seed: {SEED}
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [16]}}
train: {{epochs: {epochs}, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return cfg


def _cv_sweep(tmp_path: Path, tiny_data: Path, epochs: int = 2) -> Path:
    cfg = _config(tmp_path, tiny_data, "base", epochs)
    spec = tmp_path / "cv.yaml"
    spec.write_text(yaml.safe_dump({"name": "cv", "cv_folds": K, "params": {"optim.lr": [0.03]}}))
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    return tmp_path / "ckpt" / "cv"


def _fold_parts(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of fold k, by the closed rule: randperm(N, seed) cut in K parts, part k held out."""
    parts = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(SEED)).tensor_split(K)
    return torch.cat([p for j, p in enumerate(parts) if j != k]), parts[k]


def _oracle_accuracy(ckpt: Path, idx: torch.Tensor) -> float:
    images, labels = synthetic_digits(N_TRAIN, 1)  # the tiny set's training images, as conftest wrote them
    _, model, _ = load_for_eval(ckpt, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        x = images[idx].reshape(len(idx), -1).float() / 255
        return (model(x).argmax(1) == labels[idx].long()).float().mean().item()


def test_a_fold_checkpoint_records_its_fold_and_eval_uses_its_held_out_part(tmp_path, tiny_data):
    root = _cv_sweep(tmp_path, tiny_data)
    ckpt = root / "trial-000" / "fold-2" / "best.ckpt"
    assert checkpoint.load(ckpt)["fold"] == [1, K]
    for split, part in (("val", 1), ("train", 0)):
        r = runner.invoke(app, ["eval", str(ckpt), "--split", split, "--json"])
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        idx = _fold_parts(1)[part]
        assert got["n"] == len(idx)
        assert got["accuracy"] == pytest.approx(_oracle_accuracy(ckpt, idx), abs=1e-6)


def test_a_fold_checkpoint_written_before_folds_were_recorded_is_placed_by_its_folder(tmp_path, tiny_data):
    root = _cv_sweep(tmp_path, tiny_data)
    ckpt = root / "trial-000" / "fold-3" / "best.ckpt"
    payload = torch.load(ckpt, weights_only=True)
    del payload["fold"]  # as today's code before this fix wrote it
    torch.save(payload, ckpt)
    r = runner.invoke(app, ["eval", str(ckpt), "--split", "val", "--json"])
    assert r.exit_code == 0, r.output
    idx = _fold_parts(2)[1]
    got = json.loads(r.stdout)
    assert got["n"] == len(idx) and got["accuracy"] == pytest.approx(_oracle_accuracy(ckpt, idx), abs=1e-6)


def test_resuming_a_fold_by_hand_trains_on_the_folds_data_as_the_uninterrupted_fold(tmp_path, tiny_data):
    """Oracle: the sweep's own fold trained without a stop. A copy of fold-2 cut back to its epoch-1 checkpoint
    and resumed by hand must end with the same weights."""
    root = _cv_sweep(tmp_path, tiny_data, epochs=3)
    run = root / "trial-000" / "fold-2"
    # an epoch-1 checkpoint of that fold: train the same fold for 1 epoch in a scratch sweep and take its last.ckpt
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    root1 = _cv_sweep(scratch, tiny_data, epochs=1)
    copy = tmp_path / "copy" / "fold-2"
    copy.parent.mkdir()
    shutil.copytree(root1 / "trial-000" / "fold-2", copy)
    (copy / "best.ckpt").unlink()
    r = runner.invoke(app, ["train", "--resume", str(copy), "--set", "train.epochs=3"])
    assert r.exit_code == 0, r.output
    assert f"train {N_TRAIN - 200}, val 200 (fold 2 of 3 validates)" in r.stdout
    want, got = checkpoint.load(run / "last.ckpt"), checkpoint.load(copy / "last.ckpt")
    assert got["fold"] == [1, K] and got["epoch"] == want["epoch"] == 3
    for name, w in want["model"].items():
        torch.testing.assert_close(got["model"][name], w, rtol=0, atol=0)


def test_population_fold_members_record_their_folds_for_eval(tmp_path, tiny_data):
    """Folds trained as one population (a sweep's population: K) carry their folds too."""
    from dlbase.core.config import load_config
    from dlbase.population.train import train_population
    cfg_file = _config(tmp_path, tiny_data, "p", 1)
    import dataclasses
    base = load_config(cfg_file)
    cfgs = [dataclasses.replace(base, name=f"f{k}") for k in range(K)]
    results = train_population(cfgs, folds=[(k, K) for k in range(K)], log=lambda line: None)
    for k, r in enumerate(results):
        assert checkpoint.load(r.folder / "best.ckpt")["fold"] == [k, K]
    r = runner.invoke(app, ["eval", str(results[2].folder / "best.ckpt"), "--split", "val", "--json"])
    assert r.exit_code == 0, r.output
    idx = _fold_parts(2)[1]
    got = json.loads(r.stdout)
    assert got["n"] == len(idx) and got["accuracy"] == pytest.approx(
        _oracle_accuracy(results[2].folder / "best.ckpt", idx), abs=1e-6)


def test_a_population_of_unequal_folds_is_refused_before_the_study_exists(tmp_path):
    """Item 10: 3 folds of 601 images train on 400 or 401 images, which one population cannot stack. Refused up
    front in one line naming both keys and n, exit 2, with no study.db and no trial folder; the same spec with
    population: 1 trains (the check is about populations, not folds)."""
    from conftest import make_dataset
    data = make_dataset(tmp_path / "odd", n_train=601, n_test=50)
    cfg = _config(tmp_path, data, "base", 1)
    spec = tmp_path / "cv.yaml"
    spec.write_text(yaml.safe_dump({"name": "cv", "cv_folds": K, "population": 4,
                                    "params": {"optim.lr": [0.03, 0.01]}}))
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for part in ("sweep.population: 4", "sweep.cv_folds: 3", "601", "400 and 401", "data.subset that 3 divides (e.g. 600)"):
        assert part in line, line
    assert not (tmp_path / "ckpt" / "cv" / "study.db").exists() and not list((tmp_path / "ckpt").glob("cv/trial-*"))
    ok = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--set", "data.subset=600"])
    assert ok.exit_code == 0, ok.output
