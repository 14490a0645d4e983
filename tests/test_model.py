import pytest
import torch

from dlbase.config import ModelConfig
from dlbase.model import MLP


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
