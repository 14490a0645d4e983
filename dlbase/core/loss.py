"""Losses from the config: cross-entropy on softmax outputs, or the note's squared error 1/2 sum_k (o_k - t_k)^2."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) are lifted to float32 for the loss; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def outputs(logits: torch.Tensor, output: str) -> torch.Tensor:
    """The network's output units o (B, C): softmax or sigmoid of the logits."""
    return logits.softmax(dim=-1) if output == "softmax" else logits.sigmoid()


def squared_error(logits: torch.Tensor, y: torch.Tensor, output: str) -> torch.Tensor:
    """Mean over the batch of 1/2 sum_k (o_k - t_k)^2, t the one-hot target. Scalar."""
    o = outputs(_upcast(logits), output)  # (B, C)
    t = F.one_hot(y, o.shape[-1]).to(o.dtype)  # (B, C)
    return 0.5 * (o - t).square().sum(dim=-1).mean()


def build_loss(loss: str, output: str, label_smoothing: float = 0.0) -> LossFn:
    """The training loss: (logits (B, C), labels (B,)) -> mean loss over the batch."""
    if loss == "mse":
        return lambda logits, y: squared_error(logits, y, output)
    assert loss == "cross_entropy" and output == "softmax", (loss, output)
    return lambda logits, y: F.cross_entropy(_upcast(logits), y, label_smoothing=label_smoothing)


def build_eval_loss(loss: str, output: str) -> LossFn:
    """The loss reported on val/test: the training loss without label smoothing (a regulariser, not a measure)."""
    return build_loss(loss, output, 0.0)
