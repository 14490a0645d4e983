"""Plots and evaluation reports: real PNG files of sensible size; the confusion matrix adds up."""
import json
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.config import load_config
from dlbase.train import train

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
    from dlbase.data import load_dataset
    cfg = load_config(tiny_config)
    test_labels = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.y
    assert cm.shape == (10, 10)
    assert cm.sum(1).tolist() == torch.bincount(test_labels, minlength=10).tolist()  # rows = class counts
    assert cm.diag().sum().item() / cm.sum().item() == pytest.approx(j["accuracy"])
    assert len(j["per_class"]) == 10 and all(0 <= a <= 1 for a in j["per_class"])
    for name in ("confusion.png", "mistakes.png"):
        w, h = png_size(out / name)
        assert w >= 400 and h >= 150
