import pytest
import torch

from dlbase.core.config import ModelConfig
from dlbase.core.model import MLP


@pytest.mark.parametrize("hidden", [(), (16,), (512, 512), (8, 4, 2)])
def test_shapes_and_parameter_count(hidden):
    m = MLP(ModelConfig(hidden=hidden), in_features=784)
    out = m(torch.rand(5, 784))
    assert out.shape == (5, 10)
    widths = (784, *hidden, 10)
    expected = sum(a * b + b for a, b in zip(widths, widths[1:]))  # weights + biases of each layer
    assert sum(p.numel() for p in m.parameters()) == expected


def test_dropout_only_in_training():
    m = MLP(ModelConfig(hidden=(64,), dropout=0.5))
    x = torch.rand(4, 784)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    assert not torch.equal(a, m(x))


def test_bias_before_batch_norm_gets_an_exact_zero_gradient():
    """Oracle: the same MLP through F.batch_norm by hand without the hook. The batch norm subtracts the batch
    mean, so d loss / d bias is zero in exact arithmetic; the model makes it exactly 0 and leaves every other
    gradient as autograd computes it."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(8,), norm="batch"), in_features=6)
    x, y = torch.randn(32, 6), torch.randint(0, 10, (32,))
    F.cross_entropy(model(x), y).backward()
    lin, bn, out = model.net[0], model.net[1], model.net[3]
    params = [t.detach().clone().requires_grad_() for t in (lin.weight, lin.bias, bn.weight, bn.bias, out.weight,
                                                                out.bias)]
    w, b, g, beta, wo, bo = params
    h = F.batch_norm(x @ w.T + b, None, None, g, beta, training=True)
    F.cross_entropy(torch.relu(h) @ wo.T + bo, y).backward()
    assert torch.equal(lin.bias.grad, torch.zeros(8))
    assert b.grad.abs().max() < 1e-6 and b.grad.abs().max() > 0  # autograd's own: float noise, not zero
    for mine, theirs in zip((lin.weight, bn.weight, bn.bias, out.weight, out.bias), (w, g, beta, wo, bo)):
        torch.testing.assert_close(mine.grad, theirs.grad)


# ----------------------------------------------------------------------------- convolutions (model.conv)

from dlbase.core.errors import ConfigError  # noqa: E402
from dlbase.core.model import CNN, build_model, conv_maps  # noqa: E402
from dlbase.core.schema import ConvLayerConfig as Conv  # noqa: E402

CNNS = [
    ((Conv(channels=4, kernel=5, pool=2),), (16,), "none"),
    ((Conv(channels=6, kernel=5, padding=2, pool=2, pool_type="avg", activation="tanh"), Conv(channels=16, kernel=5,
      pool=2, pool_type="avg", activation="tanh")), (120, 84), "none"),  # LeNet-5's shape
    ((Conv(channels=3, kernel=3, stride=2, norm="batch"), Conv(channels=5, kernel=3, padding=1, pool=3, dropout=0.25)),
     (), "batch"),
    ((Conv(channels=2, kernel=28),), (8,), "layer"),  # the kernel covers the whole image: a 1x1 map
]


def conv_param_count(layers, hidden, norm, side=28, classes=10) -> int:
    """The closed formula: per convolution c_in c_out k^2 weights, plus c_out biases (none before its batch norm,
    which has 2 c_out); its map (side + 2p - k) // s + 1, then // pool; then the MLP's Linear (and norm) layers
    from c h w features."""
    total, c_in = 0, 1
    for L in layers:
        total += c_in * L.channels * L.kernel ** 2 + (2 * L.channels if L.norm == "batch" else L.channels)
        side = ((side + 2 * L.padding - L.kernel) // L.stride + 1) // L.pool
        c_in = L.channels
    widths = (c_in * side * side, *hidden, classes)
    total += sum(a * b + b for a, b in zip(widths, widths[1:]))
    return total + (2 * sum(hidden) if norm != "none" else 0)


@pytest.mark.parametrize("layers,hidden,norm", CNNS)
def test_cnn_shapes_and_parameter_count(layers, hidden, norm):
    cfg = ModelConfig(conv=layers, hidden=hidden, norm=norm)
    m = CNN(cfg, (28, 28), standardize=True)
    m.eval()
    assert m(torch.rand(5, 784)).shape == (5, 10)
    assert sum(p.numel() for p in m.parameters()) == conv_param_count(layers, hidden, norm)
    # conv_maps (the shape check's arithmetic) against what the layers really give
    image, shapes = torch.rand(2, 1, 28, 28), []
    for i, module in enumerate(m.features):
        if isinstance(module, torch.nn.Conv2d) and i > 0:  # a new layer starts: the map the last one gave
            shapes.append(tuple(image.shape[1:]))
        image = module(image)
    assert shapes + [tuple(image.shape[1:])] == conv_maps(layers, (28, 28))


def test_cnn_forward_is_the_layers_written_out():
    """Oracle: the same weights through torch.nn.functional by hand, on the standardised image."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    layers = (Conv(channels=3, kernel=3, pool=2, activation="tanh"), Conv(channels=4, kernel=3, pool=2,
                                                                           pool_type="avg"))
    m = CNN(ModelConfig(conv=layers, hidden=(7,)), (12, 12), standardize=True)
    x = torch.rand(6, 144)
    m.encoding.set_stats(x)
    c1, c2, l1, l2 = m.features[0], m.features[3], m.net[0], m.net[2]
    z = ((x - x.mean()) / x.std()).view(6, 1, 12, 12)
    z = F.max_pool2d(torch.tanh(F.conv2d(z, c1.weight, c1.bias)), 2)  # (6, 3, 5, 5)
    z = F.avg_pool2d(torch.relu(F.conv2d(z, c2.weight, c2.bias)), 2)  # (6, 4, 1, 1)
    expected = torch.relu(z.flatten(1) @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(m(x), expected)


def test_cnn_init_batch_norm_and_dropout():
    torch.manual_seed(0)
    layers = (Conv(channels=8, kernel=5, norm="batch", dropout=0.5), Conv(channels=8, kernel=3, activation="tanh"))
    m = CNN(ModelConfig(conv=layers, hidden=(16,), init="xavier_normal"), (28, 28))
    first, second = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert first.bias is None and isinstance(m.features[1], torch.nn.BatchNorm2d)  # no bias before the batch norm
    assert torch.equal(second.bias, torch.zeros(8))  # model.init: biases start at 0
    # xavier_normal with the tanh gain (5/3): std = gain * sqrt(2 / (fan_in + fan_out)), fan = channels * k^2
    std = 5 / 3 * (2 / (8 * 9 + 8 * 9)) ** 0.5
    assert abs(second.weight.std().item() / std - 1) < 0.15
    x = torch.rand(4, 784)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))  # dropout and batch statistics while training


def test_build_model_takes_the_mlp_or_the_cnn():
    from dlbase.core.config import load_config
    assert type(build_model(load_config(None), (28, 28), torch.device("cpu"))) is MLP
    cnn = build_model(load_config(None, ["model.conv=[{channels: 2, kernel: 3}]"]), (8, 8), torch.device("cpu"))
    assert type(cnn) is CNN and cnn(torch.rand(3, 64)).shape == (3, 10)


@pytest.mark.parametrize("layers,shape,message", [
    ([Conv(kernel=29)], (28, 28), "model.conv[0].kernel: 29 is larger than the 28x28 map it gets (layer 1 of "
                                  "model.conv); allowed: at most 28"),
    ([Conv(kernel=31, padding=1)], (28, 28), "model.conv[0].kernel: 31 is larger than the 28x28 map it gets, 30x30 "
                                             "padded (layer 1 of model.conv); allowed: at most 30"),
    ([Conv(kernel=5, pool=2), Conv(kernel=5, pool=2), Conv(kernel=5)], (28, 28),
     "model.conv[2].kernel: 5 is larger than the 4x4 map it gets (layer 3 of model.conv); allowed: at most 4"),
    ([Conv(kernel=3), Conv(kernel=3, pool=25)], (28, 28), "model.conv[1].pool: 25 shrinks the 24x24 map of the "
                                                          "convolution to nothing (layer 2 of model.conv); allowed: "
                                                          "at most 24"),
    ([Conv(kernel=3, stride=4, pool=2), Conv(kernel=3, pool=2)], (28, 28), "model.conv[1].pool: 2 shrinks the 1x1"),
    ([Conv(kernel=5)], (4, 28), "model.conv[0].kernel: 5 is larger than the 4x28 map"),
])
def test_conv_shapes_that_cannot_work_are_refused_naming_layer_and_key(layers, shape, message):
    with pytest.raises(ConfigError) as e:
        CNN(ModelConfig(conv=tuple(layers)), shape)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert conv_maps([Conv(kernel=3, padding=1, pool=2)] * 3, (28, 28)) == [(32, 14, 14), (32, 7, 7), (32, 3, 3)]


def test_channels_last_cnn_equals_the_contiguous_one():
    """train.memory_format: channels_last (auto's choice on CUDA) keeps every 4-D weight NHWC and changes only the
    layout: the same logits and gradients as the contiguous CNN from the same weights; the checkpoint's tensors
    are contiguous either way; auto is contiguous on the CPU and an MLP ignores the key."""
    from dlbase.core.config import load_config
    from dlbase.core.model import channels_last
    conv = "model.conv=[{channels: 4, kernel: 3, norm: batch, pool: 2}, {channels: 6, kernel: 3}]"
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    plain = build_model(load_config(None, [conv, "model.hidden=[8]"]), (12, 12), cpu)
    nhwc = build_model(load_config(None, [conv, "model.hidden=[8]", "train.memory_format=channels_last"]),
                       (12, 12), cpu)
    nhwc.load_state_dict(plain.state_dict())
    weights = [p for p in nhwc.parameters() if p.dim() == 4]
    assert len(weights) == 2 and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not weights[1].is_contiguous()  # (6, 4, 3, 3) NHWC (the first, with one input channel, is both)
    x, y = torch.rand(5, 144), torch.tensor([0, 1, 2, 3, 4])
    for m in (plain, nhwc):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(nhwc(x), plain(x))
    for (name, a), b in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    assert not channels_last(load_config(None, [conv]), cpu)
    assert channels_last(load_config(None, [conv]), torch.device("cuda"))
    assert not channels_last(load_config(None, ["train.memory_format=channels_last"]), torch.device("cuda"))


def test_a_channels_last_run_writes_contiguous_checkpoints_and_trains_as_the_contiguous_one(tiny_config, tmp_path):
    from dlbase.core.config import load_config
    from dlbase.training.train import train
    sets = ["model.conv=[{channels: 3, kernel: 3, pool: 2}]", "model.hidden=[]", "train.epochs=1", "device=cpu"]
    out = {}
    for fmt in ("contiguous", "channels_last"):
        cfg = load_config(tiny_config, sets + [f"train.memory_format={fmt}", f"checkpoint.dir={tmp_path / fmt}",
                                               "name=r"])
        train(cfg)
        out[fmt] = torch.load(tmp_path / fmt / "r" / "last.ckpt", weights_only=True)["model"]
    assert out["channels_last"].keys() == out["contiguous"].keys()
    for k, v in out["channels_last"].items():
        assert v.is_contiguous(), k
        torch.testing.assert_close(v, out["contiguous"][k], msg=k)
