"""Input encodings of each pixel value p in [0, 1]: none, fourier, gaussian, learned. One small nn.Module each."""
from __future__ import annotations

import math

import torch
from torch import nn

from dlbase.core.schema import EncodingConfig


class NoEncoding(nn.Module):
    """p itself, (B, D) -> (B, D); or, standardised, (p - mean) / std with the training split's one mean and std
    (buffers: they travel in checkpoints and exported graphs, which so still take pixels in [0, 1])."""

    def __init__(self, in_features: int, standardize: bool = False):
        super().__init__()
        self.out_features = in_features
        self.standardize = standardize
        if standardize:
            self.register_buffer("mean", torch.zeros(()))
            self.register_buffer("std", torch.ones(()))

    @torch.no_grad()
    def set_stats(self, x: torch.Tensor) -> None:
        """Take the mean and std over all pixels of x (N, D), on its device: no host round trip."""
        xf = x.float()
        self.mean.copy_(xf.mean())
        self.std.copy_(xf.std().clamp_min(1e-6))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.mean) / self.std if self.standardize else p


class _Sinusoids(nn.Module):
    """sin/cos pairs of (frequency * p + phase) per input value, laid out as NeRF's gamma(p).

    Subclasses define `_angles(p) -> (B, D, F)`; this lays out
    (p?, sin(a_0), cos(a_0), ..., sin(a_{F-1}), cos(a_{F-1})) per input value and flattens to (B, D*(2F+inc)).
    """

    def __init__(self, in_features: int, num_freqs: int, include_input: bool):
        super().__init__()
        self.include_input = include_input
        self.out_features = in_features * (2 * num_freqs + int(include_input))

    def _features(self, p: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        enc = torch.stack((sin, cos), dim=-1).flatten(-2)  # (B, D, 2F): sin, cos interleaved per frequency
        if self.include_input:
            enc = torch.cat((p.unsqueeze(-1), enc), dim=-1)  # (B, D, 2F + 1)
        return enc.flatten(1)  # (B, D * (2F + inc))


class FourierEncoding(_Sinusoids):
    """NeRF: gamma(p) = (sin(2^0 pi p), cos(2^0 pi p), ..., sin(2^(L-1) pi p), cos(2^(L-1) pi p))."""

    def __init__(self, in_features: int, num_freqs: int, include_input: bool):
        super().__init__(in_features, num_freqs, include_input)
        # (L,) 2^k: exact in every dtype, times pi in forward, so float64 matches the formula to rounding
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        angles = p.unsqueeze(-1) * self.freqs.to(p.dtype) * math.pi  # (B, D, L) radians
        return self._features(p, angles.sin(), angles.cos())


class GaussianEncoding(_Sinusoids):
    """Random Fourier features (Tancik et al. 2020), per input value: sin/cos(2 pi b_ij p_i), b_ij ~ N(0, sigma^2).

    The frequency matrix B (D, L) is fixed, drawn from its own seeded generator, and saved as a buffer.
    """

    def __init__(self, in_features: int, num_freqs: int, include_input: bool, sigma: float, seed: int):
        super().__init__(in_features, num_freqs, include_input)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(in_features, num_freqs, generator=g) * sigma)  # (D, L) cycles

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * p.unsqueeze(-1) * self.B.to(p.dtype)  # (B, D, L)
        return self._features(p, angles.sin(), angles.cos())


class LearnedEncoding(_Sinusoids):
    """A position *embedding*: sin(pi (w_k p + phi_k)) and sin(pi (w_k p + psi_k)) with trainable w, phi, psi.

    Initialised to the fourier encoding (w_k = 2^k, phi = 0, psi = 1/2, since sin(x + pi/2) = cos x) and
    shared by all input values; trained with the network. Frequencies and phases are in units of pi.
    """

    def __init__(self, in_features: int, num_freqs: int, include_input: bool):
        super().__init__(in_features, num_freqs, include_input)
        self.freqs = nn.Parameter(2.0 ** torch.arange(num_freqs))  # (L,) half-cycles per unit p
        self.phases = nn.Parameter(torch.stack((torch.zeros(num_freqs), torch.full((num_freqs,), 0.5))))  # (2, L)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        angles = p.unsqueeze(-1) * self.freqs  # (B, D, L), in units of pi
        return self._features(p, ((angles + self.phases[0]) * math.pi).sin(),
                              ((angles + self.phases[1]) * math.pi).sin())


def build_encoding(cfg: EncodingConfig, in_features: int, standardize: bool = False) -> nn.Module:
    """The configured encoding; its `out_features` is the first layer's width. standardize: the inputs of the
    plain (none) encoding are standardised; the sinusoid encodings take p in [0, 1], where gamma(p) is defined."""
    if cfg.name == "fourier":
        return FourierEncoding(in_features, cfg.num_freqs, cfg.include_input)
    if cfg.name == "gaussian":
        return GaussianEncoding(in_features, cfg.num_freqs, cfg.include_input, cfg.sigma, cfg.seed)
    if cfg.name == "learned":
        return LearnedEncoding(in_features, cfg.num_freqs, cfg.include_input)
    assert cfg.name == "none", cfg.name
    return NoEncoding(in_features, standardize)
