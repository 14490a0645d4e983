import math

import pytest
import torch

from dlbase.core.config import EncodingConfig, ModelConfig
from dlbase.core.encoding import build_encoding
from dlbase.core.model import MLP


def gamma(p: float, L: int, include_input: bool) -> list[float]:
    """NeRF's formula, written out in plain Python floats."""
    out = [p] if include_input else []
    for k in range(L):
        out += [math.sin(2 ** k * math.pi * p), math.cos(2 ** k * math.pi * p)]
    return out


@pytest.mark.parametrize("L", [1, 4, 10])
@pytest.mark.parametrize("include_input", [True, False])
def test_fourier_equals_the_formula_in_float64(L, include_input):
    enc = build_encoding(EncodingConfig(name="fourier", num_freqs=L, include_input=include_input), 3).double()
    points = torch.tensor([[0.0, 0.5, 1.0], [1 / 3, 0.123456789, 0.999]], dtype=torch.float64)  # (2, 3)
    out = enc(points)
    width = 2 * L + include_input
    assert out.shape == (2, 3 * width) and enc.out_features == 3 * width
    for b in range(2):
        for i in range(3):
            want = torch.tensor(gamma(points[b, i].item(), L, include_input), dtype=torch.float64)
            assert torch.allclose(out[b, i * width:(i + 1) * width], want, rtol=0, atol=1e-12)


def test_gaussian_is_reproducible_from_its_seed_and_scaled_by_sigma():
    cfg = EncodingConfig(name="gaussian", num_freqs=8, sigma=3.0, seed=5)
    a, b = build_encoding(cfg, 784), build_encoding(cfg, 784)
    assert torch.equal(a.B, b.B) and a.B.shape == (784, 8)
    c = build_encoding(EncodingConfig(name="gaussian", num_freqs=8, sigma=3.0, seed=6), 784)
    assert not torch.equal(a.B, c.B)
    assert abs(a.B.std().item() - 3.0) < 0.15  # 6,272 draws from N(0, 3^2)
    p = torch.rand(2, 784, dtype=torch.float64)
    out = a.double()(p).reshape(2, 784, 17)
    angle = 2 * math.pi * p[1, 10] * a.B[10, 3]
    assert torch.allclose(out[1, 10, 0], p[1, 10]) and torch.allclose(out[1, 10, 7], angle.sin())
    assert torch.allclose(out[1, 10, 8], angle.cos())
    assert "encoding.B" in MLP(ModelConfig(encoding=cfg)).state_dict()  # travels in checkpoints


def test_learned_starts_as_fourier_and_its_frequencies_learn():
    learned = build_encoding(EncodingConfig(name="learned", num_freqs=5), 20).double()
    fourier = build_encoding(EncodingConfig(name="fourier", num_freqs=5), 20).double()
    p = torch.rand(4, 20, dtype=torch.float64)
    assert torch.allclose(learned(p), fourier(p), atol=1e-12)
    model = MLP(ModelConfig(hidden=(16,), encoding=EncodingConfig(name="learned", num_freqs=5)), in_features=20)
    before = model.encoding.freqs.detach().clone(), model.encoding.phases.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(32, 20), torch.randint(0, 10, (32,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model.encoding.freqs.grad.abs().sum() > 0 and model.encoding.phases.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model.encoding.freqs, before[0]) and not torch.equal(model.encoding.phases, before[1])


@pytest.mark.parametrize("name,L,inc,width", [("none", 6, True, 784), ("fourier", 6, True, 784 * 13),
                                              ("fourier", 2, False, 784 * 4), ("gaussian", 3, True, 784 * 7),
                                              ("learned", 4, False, 784 * 8)])
def test_first_layer_width_follows_the_encoding(name, L, inc, width):
    m = MLP(ModelConfig(hidden=(8,), encoding=EncodingConfig(name=name, num_freqs=L, include_input=inc)))
    assert m.net[0].in_features == width
    assert m(torch.rand(2, 784)).shape == (2, 10)
