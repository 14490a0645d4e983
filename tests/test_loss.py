import math

import pytest
import torch

from dlbase.core.loss import build_loss, squared_error


def test_mse_on_sigmoid_outputs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid -> (0.5, 0.75)
    y = torch.tensor([1])  # one-hot (0, 1)
    # 1/2 * ((0.5 - 0)^2 + (0.75 - 1)^2) = 1/2 * (0.25 + 0.0625) = 0.15625
    assert squared_error(logits, y, "sigmoid").item() == pytest.approx(0.15625)
    assert build_loss("mse", "sigmoid")(logits, y).item() == pytest.approx(0.15625)


def test_mse_on_softmax_outputs_by_hand():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)], [0.0, 0.0]])  # softmax -> (0.25, 0.75), (0.5, 0.5)
    y = torch.tensor([0, 1])
    # sample 1: 1/2 ((0.25-1)^2 + 0.75^2) = 0.5625; sample 2: 1/2 (0.25 + 0.25) = 0.25; mean 0.40625
    assert build_loss("mse", "softmax")(logits, y).item() == pytest.approx(0.40625)


def test_cross_entropy_by_hand_with_and_without_smoothing():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)]])  # p = (0.25, 0.75)
    y = torch.tensor([1])
    assert build_loss("cross_entropy", "softmax")(logits, y).item() == pytest.approx(-math.log(0.75))
    # smoothing 0.2 over 2 classes: target (0.1, 0.9)
    want = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75))
    assert build_loss("cross_entropy", "softmax", 0.2)(logits, y).item() == pytest.approx(want)
