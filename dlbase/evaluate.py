"""evaluate(): accuracy and mean loss of a model on a device-resident split."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.data import DeviceSplit
from dlbase.loss import LossFn


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceSplit, loss_fn: Optional[LossFn] = None,
             batch_size: int = 4096) -> dict[str, float]:
    """{"n", "accuracy" (fraction), "loss" (mean of loss_fn, default cross-entropy)}; one host sync at the end."""
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y))
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        xb = split.x[start:start + batch_size].float()  # (B, D); eval runs in fp32 whatever trained
        yb = split.y[start:start + batch_size]
        logits = model(xb).float()
        loss_sum += loss_fn(logits, yb) * yb.shape[0]
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = len(split)
    # note: a CPU-GPU sync point, once per evaluation
    return {"n": n, "accuracy": correct.item() / n, "loss": loss_sum.item() / n}
