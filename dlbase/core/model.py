"""The model families: the MLP (encoded pixels -> hidden layers -> class logits) and the CNN (model.conv's
convolutions, then the same hidden layers), and the shape check of model.conv against the data's images.
forward() only; they know nothing about the loop."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlbase.core.errors import ConfigError
from dlbase.core.schema import Config, ConvLayerConfig, ModelConfig
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


def _init_weights(m: nn.Module, scheme: str, nonlinearity: str) -> None:
    """model.init for one Linear or Conv2d: its weight by the scheme with the gain of the nonlinearity after it,
    its bias (where it has one) to 0."""
    if scheme.startswith("xavier"):
        getattr(nn.init, scheme + "_")(m.weight, gain=nn.init.calculate_gain(nonlinearity))
    else:
        getattr(nn.init, scheme + "_")(m.weight, nonlinearity=nonlinearity)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _dense(cfg: ModelConfig, width: int, num_classes: int, zero_grad: list[str]) -> nn.Sequential:
    """(Linear -> norm? -> activation -> dropout?) per `cfg.hidden` width, then Linear to the logits: the MLP's
    layers, and the CNN's after its convolutions. zero_grad gets the names (in the Sequential, as `net.i.bias`)
    of the biases whose gradient is exactly zero (zero_grad_before_batch_norm)."""
    layers: list[nn.Module] = []
    for h in cfg.hidden:
        layers.append(nn.Linear(width, h))
        norm = _norm(cfg.norm, h)
        if norm is not None:
            layers.append(norm)
        if cfg.norm == "batch":
            zero_grad_before_batch_norm(layers[-2].bias)
            zero_grad.append(f"net.{len(layers) - 2}.bias")
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    net = nn.Sequential(*layers)
    if cfg.init != "default":
        for m in net:
            if isinstance(m, nn.Linear):
                _init_weights(m, cfg.init, _GAIN[cfg.activation])
    return net


class MLP(nn.Module):
    """encoding -> (Linear -> norm? -> activation -> dropout?) per `cfg.hidden` width -> Linear to the logits.

    forward() returns logits; `cfg.output` (softmax or sigmoid) is applied by the loss and by predictions.
    """

    def __init__(self, cfg: ModelConfig, in_features: int = 784, num_classes: int = 10, standardize: bool = False):
        super().__init__()
        self.encoding = build_encoding(cfg.encoding, in_features, standardize)
        # the parameters whose gradient is exactly zero (zero_grad_before_batch_norm): a stacked population of
        # this model gives its own stacked copies the same exact zero
        self.exact_zero_grad: list[str] = []
        self.net = _dense(cfg, self.encoding.out_features, num_classes, self.exact_zero_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) float in [0, 1] (pixels / 255) -> logits (B, num_classes)."""
        return self.net(self.encoding(x))


# ----------------------------------------------------------------------------- convolutions


def conv_maps(layers: Sequence[ConvLayerConfig], input_shape: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, height, width) of the map each layer of model.conv gives (after its pooling), from 1 channel of
    input_shape; a ConfigError naming the layer and its key where a kernel is larger than the (padded) map it gets
    or a pooling shrinks the map to nothing. Torch's arithmetic: out = (in + 2 padding - kernel) // stride + 1,
    then out // pool (floor mode)."""
    h, w = input_shape
    out = []
    for i, layer in enumerate(layers):
        key, where = f"model.conv[{i}]", f"(layer {i + 1} of model.conv)"
        ph, pw = h + 2 * layer.padding, w + 2 * layer.padding
        if layer.kernel > min(ph, pw):
            padded = f", {ph}x{pw} padded" if layer.padding else ""
            raise ConfigError(f"{key}.kernel: {layer.kernel} is larger than the {h}x{w} map it gets{padded} {where}; "
                              f"allowed: at most {min(ph, pw)}")
        h, w = (ph - layer.kernel) // layer.stride + 1, (pw - layer.kernel) // layer.stride + 1
        if layer.pool > min(h, w):
            raise ConfigError(f"{key}.pool: {layer.pool} shrinks the {h}x{w} map of the convolution to nothing "
                              f"{where}; allowed: at most {min(h, w)} (1 = no pooling)")
        h, w = h // layer.pool, w // layer.pool
        out.append((layer.channels, h, w))
    return out


class CNN(nn.Module):
    """standardised pixels as a (B, 1, H, W) image -> per model.conv layer (Conv2d -> BatchNorm2d? -> activation
    -> pooling? -> dropout?) -> flattened maps -> the MLP's hidden layers (model.hidden, norm, dropout) -> Linear
    to the logits. forward takes (B, H*W) as the MLP does, so eval, export, checkpoints, populations and DDP take
    it unchanged. build_model puts its convolution weights in train.memory_format (channels_last on CUDA)."""

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int] = (28, 28), num_classes: int = 10,
                 standardize: bool = False):
        super().__init__()
        assert cfg.encoding.name == "none", "schema.cross_checks refuses an encoding with model.conv"
        self.input_shape = tuple(input_shape)
        self.encoding = build_encoding(cfg.encoding, input_shape[0] * input_shape[1], standardize)
        maps = conv_maps(cfg.conv, self.input_shape)
        layers: list[nn.Module] = []
        channels = 1
        for layer in cfg.conv:
            activation = layer.activation or cfg.activation
            # a bias before batch norm is cancelled by its mean: none, rather than one with an exact-zero gradient
            conv = nn.Conv2d(channels, layer.channels, layer.kernel, layer.stride, layer.padding,
                             bias=layer.norm == "none")
            if cfg.init != "default":
                _init_weights(conv, cfg.init, _GAIN[activation])
            layers.append(conv)
            if layer.norm == "batch":
                layers.append(nn.BatchNorm2d(layer.channels))
            layers.append(ACTIVATIONS[activation]())
            if layer.pool > 1:
                layers.append((nn.MaxPool2d if layer.pool_type == "max" else nn.AvgPool2d)(layer.pool))
            if layer.dropout > 0:
                layers.append(nn.Dropout(layer.dropout))
            channels = layer.channels
        self.features = nn.Sequential(*layers)
        c, h, w = maps[-1]
        self.exact_zero_grad: list[str] = []  # as MLP's: the hidden Linear biases before a batch norm
        self.net = _dense(cfg, c * h * w, num_classes, self.exact_zero_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W) float in [0, 1] (pixels / 255) -> logits (B, num_classes)."""
        image = self.encoding(x).view(-1, 1, *self.input_shape)  # (B, 1, H, W), standardised
        return self.net(self.features(image).flatten(1))  # (B, C*h*w) -> (B, num_classes)


def standardizes(cfg: Config) -> bool:
    """Does this config's model standardise its inputs (data.normalize: standard, and no sinusoid encoding)?"""
    return cfg.data.normalize == "standard" and cfg.model.encoding.name == "none"


def channels_last(cfg: Config, device: torch.device) -> bool:
    """Does this config's CNN keep its convolutions channels_last on this device (train.memory_format)?"""
    fmt = cfg.train.memory_format
    return bool(cfg.model.conv) and (fmt == "channels_last" or (fmt == "auto" and device.type == "cuda"))


def build_model(cfg: Config, input_shape: tuple[int, int], device: torch.device) -> nn.Module:
    """The run's model for images of input_shape (height, width), on device: a CNN when model.conv has layers
    (refusing, as one ConfigError, a model.conv these images are too small for), else the MLP."""
    if cfg.model.conv:
        cnn = CNN(cfg.model, input_shape, standardize=standardizes(cfg)).to(device)
        # channels_last weights make every convolution's output NHWC too (the input has one channel, so it is
        # both layouts at once): the layout cuDNN's tensor-core kernels take without a transpose per layer
        return cnn.to(memory_format=torch.channels_last) if channels_last(cfg, device) else cnn
    return MLP(cfg.model, in_features=input_shape[0] * input_shape[1], standardize=standardizes(cfg)).to(device)
