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


# ---- the CNN: its feature stack (core/convprop.py) below the MLP head's rule ------------------------------------

from dlbase.core.model import CNN  # noqa: E402
from dlbase.core.schema import ConvLayerConfig as Conv  # noqa: E402

# model.conv stacks over a 12x12 image, each with its head (hidden, dropout) and loss: max and average pooling,
# stride 2, padding, batch norm, dropout in the maps and in the head, a per-layer activation, a 1x1 convolution
CNNS = {
    "maxpool_pad": (dict(conv=(Conv(channels=3, kernel=3, padding=1, pool=2), Conv(channels=4, kernel=3)),
                         hidden=(7,)), "cross_entropy", "softmax"),
    "stride2_bn_avg": (dict(conv=(Conv(channels=3, kernel=5, stride=2, padding=2, norm="batch", pool=2,
                                       pool_type="avg"), Conv(channels=2, kernel=1, norm="batch")), hidden=()),
                       "cross_entropy", "softmax"),
    "dropout": (dict(conv=(Conv(channels=4, kernel=3, stride=2, pool=2, dropout=0.3), Conv(channels=3, kernel=2)),
                     hidden=(6, 5), dropout=0.25), "cross_entropy", "softmax"),
    "bn_mixed_mse": (dict(conv=(Conv(channels=3, kernel=3, norm="batch", activation="tanh", pool=3),
                                Conv(channels=5, kernel=2, padding=1, pool=2, pool_type="avg", dropout=0.2)),
                          hidden=(8,)), "mse", "sigmoid"),
    "bn_max_mse": (dict(conv=(Conv(channels=3, kernel=3, padding=1, norm="batch", pool=2),
                              Conv(channels=4, kernel=3, stride=2, activation="gelu")), hidden=(5,)),
                   "mse", "softmax"),
}


def cnn(name: str, activation: str, seed: int = 0) -> tuple[CNN, ModelConfig, str]:
    fields, loss, output = CNNS[name]
    cfg = ModelConfig(activation=activation, output=output, **fields)
    torch.manual_seed(seed)
    return CNN(cfg, (12, 12)).double(), cfg, loss


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", CNNS)
def test_cnn_delta_rule_equals_autograd(name, activation):
    """Every conv, batch norm and Linear gradient of the CNN by hand against autograd, float64, training mode (batch
    norm on the batch's statistics, the same dropout masks)."""
    model, cfg, loss = cnn(name, activation)
    x, y = torch.rand(6, 144, dtype=torch.float64), torch.randint(0, 10, (6,))
    rows = backprop.gradcheck(model, cfg, x, y, loss, 0.1 if loss == "cross_entropy" else 0.0)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("conv") == 2 and kinds.count("linear") == len(cfg.hidden) + 1
    assert kinds.count("batchnorm") == sum(c.norm == "batch" for c in cfg.conv)
    for r in rows:
        assert r["weight_rel_diff"] < 1e-10 and (r["bias_rel_diff"] or 0.0) < 1e-10, r
    convs = [r for r in rows if r["kind"] == "conv"]
    assert [r["bias_rel_diff"] is None for r in convs] == [c.norm == "batch" for c in cfg.conv]  # no bias before BN


def test_a_planted_wrong_convolution_backward_is_caught(monkeypatch):
    from dlbase.core import convprop
    right = convprop.conv2d_backward

    def wrong(delta, weight, cache):
        dx, dW, db = right(delta, weight, cache)
        return dx, dW.flip(-1), db  # the kernel's gradient mirrored
    monkeypatch.setattr(convprop, "conv2d_backward", wrong)
    model, cfg, loss = cnn("maxpool_pad", "relu")
    rows = backprop.gradcheck(model, cfg, torch.rand(4, 144, dtype=torch.float64), torch.randint(0, 10, (4,)), loss)
    assert all(r["weight_rel_diff"] < 1e-10 for r in rows if r["kind"] == "linear")  # above the convolutions
    assert all(r["weight_rel_diff"] > 1e-3 for r in rows if r["kind"] == "conv")


def test_a_bias_before_a_batch_norm_gets_its_exact_zero():
    """A conv bias just before a batch norm (the CNN builds none, but a model listing one in exact_zero_grad): its
    gradient is exactly zero by hand, and gradcheck compares it in absolute terms (autograd's is rounding noise)."""
    model, cfg, loss = cnn("stride2_bn_avg", "relu")
    old = model.features[0]
    model.features[0] = torch.nn.Conv2d(1, 3, 5, 2, 2).double()
    with torch.no_grad():
        model.features[0].weight.copy_(old.weight)
    model.exact_zero_grad = ["features.0.bias"]
    x, y = torch.rand(5, 144, dtype=torch.float64), torch.randint(0, 10, (5,))
    _, grads = backprop.manual_gradients(model, cfg, x, y, loss, train=False)  # eval: the running stats stay
    bias = dict((id(p), g) for p, g in grads)[id(model.features[0].bias)]
    assert torch.equal(bias, torch.zeros(3, dtype=torch.float64))
    rows = backprop.gradcheck(model, cfg, x, y, loss)
    assert rows[0]["kind"] == "conv" and rows[0]["bias_rel_diff"] < 1e-14, rows[0]
    assert max(max(r["weight_rel_diff"], r["bias_rel_diff"] or 0.0) for r in rows) < 1e-10


@pytest.mark.parametrize("name", ["stride2_bn_avg", "bn_max_mse"])  # no dropout: the same steps
def test_manual_steps_of_a_cnn_equal_autograd_steps_in_float64(name):
    """Eight Adam steps by hand and eight by autograd from the same weights: the same weights, batch norm running
    statistics and step count afterwards, and so the same eval-mode outputs."""
    models = {engine: cnn(name, "silu", seed=3)[0] for engine in ("autograd", "manual")}
    _, cfg, loss = cnn(name, "silu")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 144, dtype=torch.float64, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(8)]
    from dlbase.core.loss import build_loss
    loss_fn = build_loss(loss, cfg.output)
    for engine, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model.train()
        for x, y in batches:
            if engine == "manual":
                for p, grad in backprop.manual_gradients(model, cfg, x, y, loss)[1]:
                    p.grad = grad
            else:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
            opt.step()
    auto, manual = (models[e].state_dict() for e in ("autograd", "manual"))
    assert auto["features.1.num_batches_tracked"] == manual["features.1.num_batches_tracked"] == 8
    for key, a in auto.items():
        m = manual[key].double()
        assert ((m - a).abs().max() / a.double().abs().max().clamp_min(1e-30)).item() < 1e-10, key
    x = batches[0][0]
    with torch.no_grad():
        a, m = (models[e].eval()(x) for e in ("autograd", "manual"))
    assert (a - m).abs().max().item() < 1e-10


TINY_CNN_MANUAL = ("model.conv=[{channels: 4, kernel: 3, stride: 2, padding: 1, norm: batch, pool: 2}, "
                   "{channels: 6, kernel: 3, pool: 2, pool_type: avg}]")


def test_gradcheck_command_on_a_cnn(tiny_config):
    r = runner.invoke(app, ["gradcheck", "--config", str(tiny_config), "--set", TINY_CNN_MANUAL, "--batch", "4"])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [row[1] for row in rows] == ["conv", "batchnorm", "conv", "linear", "linear"], r.stdout
    assert "1->4 3x3/2 p1" in r.stdout and "4 maps" in r.stdout and "24->32" in r.stdout
    assert "OK: largest relative difference" in r.stdout and "float64" in r.stdout


def test_gradcheck_command_on_a_cnn_fails_on_a_planted_error(tiny_config, monkeypatch):
    from dlbase.core import convprop
    right = convprop.avgpool2d_backward
    monkeypatch.setattr(convprop, "avgpool2d_backward", lambda delta, cache: 2 * right(delta, cache))
    r = runner.invoke(app, ["gradcheck", "--config", str(tiny_config), "--set", TINY_CNN_MANUAL, "--batch", "4"])
    assert r.exit_code == 1 and "FAIL" in r.stdout


@pytest.mark.parametrize("sets", [[], ["model.conv[0].dropout=0.2", "model.dropout=0.3", "model.activation=tanh"]])
def test_manual_engine_trains_a_cnn_as_autograd_does(tiny_config, tmp_path, sets):
    """`dlbase train` of a CNN (stride 2, padding, batch norm, max and average pooling) with train.engine: manual
    against autograd, same config and seed, 3 epochs of 10 Adam steps in float32: the same weights and batch norm
    running statistics after the last step, to 1e-5 relative (float32 rounding: convolution by im2col and matmul
    here, torch's own kernel there; measured 1.2e-6), and the same per-epoch training losses to 1e-5. With dropout
    the manual engine draws its own masks: the same law, other draws, so only the losses, loosely."""
    from dlbase.training import checkpoint
    runs = {}
    for engine in ("autograd", "manual"):
        args = ["--set", TINY_CNN_MANUAL, "--set", f"train.engine={engine}", "--set",
                f"checkpoint.dir={tmp_path / engine}"] + [a for s in sets for a in ("--set", s)]
        r = runner.invoke(app, ["train", "--config", str(tiny_config), *args])
        assert r.exit_code == 0, r.output
        folder = tmp_path / engine / "tiny"
        with open(folder / "metrics.csv") as fh:
            losses = [float(row["train_loss"]) for row in csv.DictReader(fh)]
        runs[engine] = checkpoint.load(folder / "last.ckpt")["model"], losses
    (auto, auto_losses), (manual, manual_losses) = runs["autograd"], runs["manual"]
    assert manual_losses[-1] < 0.5 * manual_losses[0]  # it learns
    if sets:
        assert manual_losses == pytest.approx(auto_losses, rel=0.3, abs=0.05)
        return
    assert manual_losses == pytest.approx(auto_losses, rel=1e-5)
    assert auto.keys() == manual.keys() and "features.1.running_var" in manual
    for key, a in auto.items():
        diff = ((manual[key].double() - a.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)).item()
        assert diff < 1e-5, (key, diff)
