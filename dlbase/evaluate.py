"""evaluate(): accuracy and mean loss of a model on a device-resident split."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.data import DeviceSplit, normalize


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceSplit, batch_size: int = 4096) -> dict[str, float]:
    """{"n", "accuracy" (fraction), "loss" (mean cross-entropy, nats)}; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        xb = normalize(split.x[start:start + batch_size])
        yb = split.y[start:start + batch_size]
        logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = len(split)
    # note: a CPU-GPU sync point, once per evaluation
    return {"n": n, "accuracy": correct.item() / n, "loss": loss_sum.item() / n}
