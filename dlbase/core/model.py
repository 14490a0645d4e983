"""The MLP: encoded pixels -> hidden layers -> class logits. forward() only; it knows nothing about the loop."""
from __future__ import annotations

import torch
from torch import nn

from dlbase.core.schema import Config, ModelConfig
from dlbase.core.encoding import build_encoding

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU,
               "gelu": nn.GELU, "silu": nn.SiLU}
# nn.init's gain names; gelu and silu are relu-like
_GAIN = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "leaky_relu": "leaky_relu",
         "gelu": "relu", "silu": "relu"}


def _norm(kind: str, width: int) -> nn.Module | None:
    return {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[kind](width) if kind != "none" else None


def zero_grad_before_batch_norm(bias: torch.Tensor) -> None:
    """The bias of a Linear just before a batch norm has a gradient that is zero in exact arithmetic (the norm
    subtracts the batch mean, bias included); what backward computes there is float rounding noise (~1e-9), which
    an adaptive optimiser (Adam divides by the root of its own square) turns into lr-sized steps in a random
    direction that differ between implementations. Make that gradient the exact zero it is."""
    bias.register_hook(torch.zeros_like)


class MLP(nn.Module):
    """encoding -> (Linear -> norm? -> activation -> dropout?) per `cfg.hidden` width -> Linear to the logits.

    forward() returns logits; `cfg.output` (softmax or sigmoid) is applied by the loss and by predictions.
    """

    def __init__(self, cfg: ModelConfig, in_features: int = 784, num_classes: int = 10, standardize: bool = False):
        super().__init__()
        self.encoding = build_encoding(cfg.encoding, in_features, standardize)
        layers: list[nn.Module] = []
        # the parameters whose gradient is exactly zero (zero_grad_before_batch_norm): a stacked population of
        # this model gives its own stacked copies the same exact zero
        self.exact_zero_grad: list[str] = []
        width = self.encoding.out_features
        for h in cfg.hidden:
            layers.append(nn.Linear(width, h))
            norm = _norm(cfg.norm, h)
            if norm is not None:
                layers.append(norm)
            if cfg.norm == "batch":
                zero_grad_before_batch_norm(layers[-2].bias)
                self.exact_zero_grad.append(f"net.{len(layers) - 2}.bias")
            layers.append(ACTIVATIONS[cfg.activation]())
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if cfg.init != "default":
            self._init(cfg.init, _GAIN[cfg.activation])

    def _init(self, scheme: str, nonlinearity: str) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                if scheme.startswith("xavier"):
                    getattr(nn.init, scheme + "_")(m.weight, gain=nn.init.calculate_gain(nonlinearity))
                else:
                    getattr(nn.init, scheme + "_")(m.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) float in [0, 1] (pixels / 255) -> logits (B, num_classes)."""
        return self.net(self.encoding(x))


def standardizes(cfg: Config) -> bool:
    """Does this config's model standardise its inputs (data.normalize: standard, and no sinusoid encoding)?"""
    return cfg.data.normalize == "standard" and cfg.model.encoding.name == "none"


def build_model(cfg: Config, input_shape: tuple[int, int], device: torch.device) -> MLP:
    """The run's MLP for images of input_shape (height, width), on device."""
    return MLP(cfg.model, in_features=input_shape[0] * input_shape[1], standardize=standardizes(cfg)).to(device)
