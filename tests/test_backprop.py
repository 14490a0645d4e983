"""The hand-written delta rule against autograd (float64), the manual engine against autograd training, and
the vanishing-gradient warning."""
import csv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dlbase.core import backprop
from dlbase.cli import app
from dlbase.core.config import ACTIVATIONS, ModelConfig, load_config
from dlbase.core.model import MLP
from dlbase.training.train import train

REPO = Path(__file__).resolve().parents[1]
LOSSES = [("cross_entropy", "softmax"), ("mse", "softmax"), ("mse", "sigmoid")]
runner = CliRunner()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss,output", LOSSES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_delta_rule_equals_autograd(activation, loss, output, depth):
    torch.manual_seed(depth)
    hidden = (9, 7, 5)[:depth - 1]  # depth = number of Linear layers
    cfg = ModelConfig(hidden=hidden, activation=activation, output=output, dropout=0.25 if depth == 3 else 0.0)
    model = MLP(cfg, in_features=12).double()
    x, y = torch.rand(10, 12, dtype=torch.float64), torch.randint(0, 10, (10,))
    rows = backprop.gradcheck(model, cfg, x, y, loss, 0.1 if loss == "cross_entropy" else 0.0)
    assert len(rows) == depth
    for r in rows:
        assert r["weight_rel_diff"] < 1e-10 and r["bias_rel_diff"] < 1e-10, r


def test_a_planted_wrong_derivative_is_caught(monkeypatch):
    f, _ = backprop.ACTIVATIONS["sigmoid"]
    monkeypatch.setitem(backprop.ACTIVATIONS, "sigmoid", (f, lambda z: torch.sigmoid(z)))  # forgot (1 - s)
    cfg = ModelConfig(hidden=(8, 6), activation="sigmoid")
    model = MLP(cfg, in_features=10).double()
    rows = backprop.gradcheck(model, cfg, torch.rand(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,)),
                              "cross_entropy")
    assert rows[-1]["weight_rel_diff"] < 1e-10  # the output layer does not use f'
    assert rows[0]["weight_rel_diff"] > 1e-3  # the hidden layers do


def test_gradcheck_command(tmp_path):
    r = runner.invoke(app, ["gradcheck", "--config", str(REPO / "configs" / "mnist_sigmoid_mse.yaml"), "--batch", "4"])
    assert r.exit_code == 0, r.output
    assert "OK: largest relative difference" in r.stdout and "784->128" in r.stdout


def test_gradcheck_command_fails_on_a_planted_error(monkeypatch):
    f, _ = backprop.ACTIVATIONS["relu"]
    monkeypatch.setitem(backprop.ACTIVATIONS, "relu", (f, lambda z: torch.ones_like(z)))  # relu' = 1 everywhere
    r = runner.invoke(app, ["gradcheck", "--config", str(REPO / "configs" / "mnist_mlp.yaml"), "--batch", "4"])
    assert r.exit_code == 1 and "FAIL" in r.stdout


def test_gradcheck_refuses_what_the_rule_does_not_cover():
    r = runner.invoke(app, ["gradcheck", "--config", str(REPO / "configs" / "mnist_mlp.yaml"), "--set",
                            "model.norm=batch"])
    assert r.exit_code == 2 and "model.norm" in r.stderr


@pytest.mark.parametrize("sets", [
    ["model.activation=sigmoid", "model.output=sigmoid", "train.loss=mse", "optim.name=sgd", "optim.lr=3.0"],
    ["model.activation=tanh", "train.label_smoothing=0.1", "optim.name=momentum", "optim.lr=0.05"],
    ["model.activation=gelu", "model.dropout=0.2", "model.encoding.name=fourier", "model.encoding.num_freqs=2",
     "optim.lr=0.001"],
])
def test_manual_engine_tracks_autograd(tiny_config, tmp_path, sets):
    def losses(engine):
        cfg = load_config(tiny_config, sets + [f"train.engine={engine}", f"checkpoint.dir={tmp_path / engine}"])
        result = train(cfg, log=lambda s: None)
        with open(result.folder / "metrics.csv") as fh:
            return [float(r["train_loss"]) for r in csv.DictReader(fh)], result
    auto, _ = losses("autograd")
    manual, result = losses("manual")
    if any("dropout" in s for s in sets):  # the manual engine draws its own dropout masks: same law, other draws
        assert manual == pytest.approx(auto, rel=0.3, abs=0.05)
    else:
        assert manual == pytest.approx(auto, rel=1e-4, abs=1e-6)
    assert manual[-1] < manual[0] and result.best_value >= 0.5  # it learns


def test_manual_engine_refuses_learned_encodings(tiny_config):
    from dlbase.core.errors import ConfigError
    with pytest.raises(ConfigError, match="model.encoding.name: learned has trainable parameters"):
        load_config(tiny_config, ["train.engine=manual", "model.encoding.name=learned"])


def test_manual_engine_on_the_notes_network_matches_autograd_on_mnist(mnist_root, tmp_path):
    from dlbase.core.data import load_dataset
    from dlbase.training.evaluate import evaluate
    from dlbase.training.state import load_for_eval
    accs = {}
    for engine in ("autograd", "manual"):
        cfg = load_config(REPO / "configs" / "mnist_sigmoid_mse.yaml",
                          [f"data.root={mnist_root}", "device=cpu", "train.epochs=2", f"train.engine={engine}",
                           f"checkpoint.dir={tmp_path / engine}"])
        result = train(cfg, log=lambda s: None)
        _, model, _ = load_for_eval(result.folder / "best.ckpt", torch.device("cpu"))
        accs[engine] = evaluate(model, load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test)["accuracy"]
    print(accs)
    assert abs(accs["manual"] - accs["autograd"]) <= 0.003


def vanishing_warned(config, mnist_root, tmp_path, sets=()):
    logs = []
    cfg = load_config(REPO / "configs" / config, [f"data.root={mnist_root}", "device=cpu", "train.epochs=1",
                                                 "data.subset=3000", "data.val_size=500",
                                                 f"checkpoint.dir={tmp_path}", *sets])
    result = train(cfg, log=logs.append)
    with open(result.folder / "metrics.csv") as fh:
        row = list(csv.DictReader(fh))[-1]
    return any("vanishing gradients" in line for line in logs), row


def test_vanishing_gradient_warning_on_deep_sigmoid_not_relu(mnist_root, tmp_path):
    warned, row = vanishing_warned("mnist_deep_sigmoid.yaml", mnist_root, tmp_path / "sig")
    assert warned and float(row["grad_norm_1"]) < 1e-3 * float(row["grad_norm_9"])
    warned, row = vanishing_warned("mnist_deep_sigmoid.yaml", mnist_root, tmp_path / "relu", ["model.activation=relu"])
    assert not warned and float(row["grad_norm_1"]) > 1e-3 * float(row["grad_norm_9"])


def test_layer_norms_cover_the_convolutions_first():
    """A CNN's per-layer norms: its Conv2d layers (1, 2, ...) before its Linear ones, each the norm of that
    layer's own weight and gradient; an MLP's are its Linear layers, as before."""
    from dlbase.core.model import CNN
    from dlbase.core.schema import ConvLayerConfig as Conv
    torch.manual_seed(0)
    model = CNN(ModelConfig(conv=(Conv(channels=3, kernel=3, pool=2, norm="batch"), Conv(channels=4, kernel=3)),
                            hidden=(8,)), (12, 12))
    torch.nn.functional.cross_entropy(model(torch.rand(5, 144)), torch.arange(5)).backward()
    norms = backprop.layer_norms(model)
    layers = [model.features[0], model.features[4], model.net[0], model.net[2]]
    assert len(norms) == 2 * len(layers)
    for i, layer in enumerate(layers, 1):
        assert norms[f"grad_norm_{i}"] == pytest.approx(layer.weight.grad.norm().item())
        assert norms[f"weight_norm_{i}"] == pytest.approx(layer.weight.norm().item())
    mlp = MLP(ModelConfig(hidden=(6, 4)), in_features=10)
    assert backprop.weight_layers(mlp) == backprop.linears(mlp)
    assert list(backprop.layer_norms(mlp)) == [f"grad_norm_{i}" for i in (1, 2, 3)] + [f"weight_norm_{i}" for i in
                                                                                        (1, 2, 3)]


def test_gradcheck_refuses_convolutions():
    r = runner.invoke(app, ["gradcheck", "--config", str(REPO / "configs" / "mnist_mlp.yaml"), "--set",
                            "model.conv=[{channels: 2, kernel: 3}]"])
    assert r.exit_code == 2 and "model.conv" in r.stderr and len(r.stderr.strip().splitlines()) == 1
