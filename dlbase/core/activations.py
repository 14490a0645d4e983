"""Each activation the hand-written backward knows, written out with its derivative: name -> (f(z), f'(z)).

Its own module, below the two delta-rule modules that read it (backprop.py for the MLP, convprop.py for a CNN's
feature stack), so that either can import the other without a circle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sig(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z)


# activation name -> (f(z), f'(z)), written out
ACTIVATIONS = {
    "sigmoid": (_sig, lambda z: _sig(z) * (1 - _sig(z))),
    "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
    "relu": (torch.relu, lambda z: (z > 0).to(z.dtype)),
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.01), lambda z: torch.where(z > 0, torch.ones_like(z),
                                                                          torch.full_like(z, 0.01))),
    # exact GELU: z * Phi(z); derivative Phi(z) + z * phi(z)
    "gelu": (lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
             lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)),
    "silu": (lambda z: z * _sig(z), lambda z: _sig(z) * (1 + z * (1 - _sig(z)))),
}
