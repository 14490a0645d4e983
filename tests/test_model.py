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
