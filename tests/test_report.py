"""Plots and evaluation reports: real PNG files of sensible size; the confusion matrix adds up."""
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core import rundir
from dlbase.core.config import load_config
from dlbase.training.report import plot_run
from dlbase.training.train import train

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_run_draws_its_curves(tiny_config):
    result = train(load_config(tiny_config), log=lambda s: None)
    for name in ("curves.png", "gradnorms.png"):
        w, h = png_size(result.folder / name)
        assert 800 <= w <= 3000 and 300 <= h <= 2000, (name, w, h)
        assert (result.folder / name).stat().st_size > 10_000  # drawn, not blank


def test_plot_command_redraws(tiny_config):
    result = train(load_config(tiny_config), log=lambda s: None)
    (result.folder / "curves.png").unlink()
    r = runner.invoke(app, ["plot", str(result.folder)])
    assert r.exit_code == 0 and png_size(result.folder / "curves.png")[0] > 800


def test_plot_needs_a_run_folder(tmp_path):
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and "no metrics.csv" in r.stderr


def test_eval_report_and_json_confusion(tiny_config, tmp_path):
    result = train(load_config(tiny_config), log=lambda s: None)
    out = tmp_path / "report"
    r = runner.invoke(app, ["eval", str(result.folder / "best.ckpt"), "--json", "--report", str(out)])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    cm = torch.tensor(j["confusion"])
    from dlbase.core.data import load_dataset
    cfg = load_config(tiny_config)
    test_labels = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.y
    assert cm.shape == (10, 10)
    assert cm.sum(1).tolist() == torch.bincount(test_labels, minlength=10).tolist()  # rows = class counts
    assert cm.diag().sum().item() / cm.sum().item() == pytest.approx(j["accuracy"])
    assert len(j["per_class"]) == 10 and all(0 <= a <= 1 for a in j["per_class"])
    for name in ("confusion.png", "mistakes.png"):
        w, h = png_size(out / name)
        assert w >= 400 and h >= 150


def write_norms(folder: Path, layers: int, grad: float, weight: float) -> None:
    """A metrics.csv of three epochs as train.py writes it for an MLP of `layers` Linear layers."""
    folder.mkdir()
    norms = {**{f"grad_norm_{i}": grad for i in range(1, layers + 1)},
             **{f"weight_norm_{i}": weight for i in range(1, layers + 1)}}
    rundir.write_metrics(folder / "metrics.csv", [rundir.metrics_row(e, 10 * e, {
        "train_loss": 2.3, "val_loss": 2.3, "val_accuracy": 0.1, "lr": 0.01, "seconds": 1.0, "train_seconds": 0.5,
        **norms}) for e in (1, 2, 3)])


def test_a_deep_net_and_an_all_zero_norm_draw_without_a_matplotlib_warning(tmp_path):
    # 65 Linear layers (model.hidden of 64, the most the schema takes): the legend of one entry per layer was
    # taller than the figure and constrained_layout gave up with a UserWarning; a dead net (every gradient norm
    # 0) left a log axis without a positive value, another UserWarning
    for name, layers, grad, weight in (("deep", 65, 1e-3, 1.5), ("dead", 2, 0.0, 0.0)):
        write_norms(tmp_path / name, layers, grad, weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plot_run(tmp_path / name)
        w, h = png_size(tmp_path / name / "gradnorms.png")
        assert 800 <= w <= 3000 and 300 <= h <= 2000, (name, w, h)
