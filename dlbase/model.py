"""The MLP: input pixels -> hidden layers -> class logits. forward() only; it knows nothing about the loop."""
from __future__ import annotations

import torch
from torch import nn

from dlbase.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU}


class MLP(nn.Module):
    """Linear -> activation -> dropout, once per `cfg.hidden` width, then a linear layer to the logits."""

    def __init__(self, cfg: ModelConfig, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in cfg.hidden:
            layers.append(nn.Linear(width, h))
            layers.append(ACTIVATIONS[cfg.activation]())
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) float in [0, 1] -> logits (B, num_classes)."""
        return self.net(x)
