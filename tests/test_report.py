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
    for name in ("confusion.png", "mistakes.png", "filters.png"):  # an MLP on plain pixels: its rows as filters
        w, h = png_size(out / name)
        assert w >= 400 and h >= 150
    assert j["report_files"] == [str(out / n) for n in ("confusion.png", "mistakes.png", "filters.png")]
    assert not (out / "featuremaps.png").exists()  # an MLP has no maps


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


# ----------------------------------------------------------------------------- a CNN's filters and feature maps


@pytest.fixture
def cnn_run(tmp_path, tiny_data):
    """A tiny CNN trained one epoch on the tiny data: 6 kernels of 5x5, then 20 maps (more than a row shows)
    through batch norm, max pooling and dropout."""
    cfg = tmp_path / "cnn.yaml"
    cfg.write_text(f"""
name: tinycnn
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model:
  conv: [{{channels: 6, kernel: 5, pool: 2}}, {{channels: 20, kernel: 3, norm: batch, pool: 2, dropout: 0.1}}]
  hidden: [16]
train: {{epochs: 1, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return train(load_config(cfg), log=lambda s: None)


def test_eval_report_of_a_cnn_draws_its_filters_and_feature_maps(cnn_run, tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["eval", str(cnn_run.folder / "best.ckpt"), "--report", str(out)])
    assert r.exit_code == 0, r.output
    names = ("confusion.png", "mistakes.png", "filters.png", "featuremaps.png")
    assert f"report: {', '.join(str(out / n) for n in names)}" in r.stdout  # the output names every file
    for name in names:
        w, h = png_size(out / name)
        assert 400 <= w <= 3000 and 150 <= h <= 3000, (name, w, h)
        assert (out / name).stat().st_size > 5_000, name  # drawn, not blank
    assert png_size(out / "featuremaps.png")[1] > png_size(out / "mistakes.png")[1] / 2  # the input and 2 rows


def stage_outputs(model, x):
    """The oracle: forward hooks on the model's own modules during its own forward, each on the module whose
    output the next convolution (or the flattening) takes: the one before each Conv2d after the first, and the last."""
    from torch import nn
    mods = list(model.features)
    ends = [i - 1 for i, m in enumerate(mods) if isinstance(m, nn.Conv2d) and i > 0] + [len(mods) - 1]
    seen = []
    handles = [mods[i].register_forward_hook(lambda m, inp, out: seen.append(out.detach()[0].clone())) for i in ends]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def drawn(fig) -> list:
    """The arrays of every image a figure draws (its subfigures' included), in the order its axes were made."""
    return [torch.from_numpy(im.get_array().data.copy()) for ax in fig.axes for im in ax.get_images()]


def test_the_maps_and_filters_drawn_are_what_the_model_computes(cnn_run):
    from dlbase.core.data import load_dataset
    from dlbase.training.filters import MAX_MAPS, featuremaps_figure, feature_maps, filters_figure, first_filters
    from dlbase.training.report import pyplot
    from dlbase.training.state import load_for_eval

    cfg, model, _ = load_for_eval(cnn_run.folder / "best.ckpt", torch.device("cpu"))
    x = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.x[:1]  # the split's first image
    maps = feature_maps(model, x)
    expected = stage_outputs(model, x)
    assert [tuple(m.shape) for _, m in maps] == [(6, 12, 12), (20, 5, 5)]  # 28 -5+1 = 24, /2; 12 -3+1 = 10, /2
    assert [what for what, _ in maps] == ["conv 1: Conv2d 5x5 > ReLU > MaxPool2d 2",
                                          "conv 2: Conv2d 3x3 > BatchNorm2d > ReLU > MaxPool2d 2"]
    for (_, m), e in zip(maps, expected):
        assert torch.equal(m, e)
    plt = pyplot()
    fig = featuremaps_figure(plt, x[0].view(28, 28), maps, "test")
    images = drawn(fig)
    assert torch.equal(images[0], x[0].view(28, 28))  # the digit itself
    channels = [e[c] for e in expected for c in range(min(MAX_MAPS, e.shape[0]))]  # 6 + the first 16 of 20
    assert len(images) == 1 + len(channels) == 1 + 6 + 16
    for image, e in zip(images[1:], channels):
        assert torch.equal(image, e.float())
    plt.close(fig)
    weights, what = first_filters(model, (28, 28))
    assert what == "Conv2d weight (6, 1, 5, 5)"
    fig = filters_figure(plt, weights, what, "test")
    images = drawn(fig)
    assert len(images) == 6 and all(torch.equal(i, w) for i, w in zip(images, model.features[0].weight[:, 0]))
    plt.close(fig)


def test_an_mlp_s_filters_are_its_first_rows_unless_its_inputs_are_encoded():
    from dlbase.core.model import build_model
    from dlbase.training.filters import first_filters

    model = build_model(load_config(None, ["model.hidden=[20]"]), (28, 28), torch.device("cpu"))
    weights, what = first_filters(model, (28, 28))
    assert weights.shape == (20, 28, 28) and torch.equal(weights.view(20, 784), model.net[0].weight)
    assert what == "Linear weight (20, 784), rows as 28x28 images"
    encoded = build_model(load_config(None, ["model.hidden=[20]", "model.encoding.name=fourier"]), (28, 28),
                          torch.device("cpu"))
    assert first_filters(encoded, (28, 28)) is None  # its first layer sees sinusoids of pixels, not pixels
