"""build_optimizer(): optimiser names from the config -> torch.optim objects."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from dlbase.config import OptimConfig


def _sgd(params, cfg: OptimConfig, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def _adam(params, cfg: OptimConfig, **kw) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


# name -> constructor; config.OPTIMIZERS lists the same names (a test keeps them equal).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adam": _adam}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](list(params), cfg)
