"""K members of any model `build_model` makes, stacked with torch.func: `stack_module_state` gives every parameter
and buffer a leading member axis (K, ...), and one `vmap` of `functional_call` runs all K members' forwards as
one batched computation. The same interface as the hand-stacked MLP (stacked.py), so the population's loop,
its losses, clipping and stacked optimisers (optim.py) take either; population_bench.py measures the two.

Batch norm's running statistics are buffers with the member axis, updated in place under vmap as each member's
own; dropout draws each member's own masks (vmap's randomness="different"), at one rate for all members (a
rate per member needs the hand-stacked MLP).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from dlbase.core.errors import ConfigError
from dlbase.core.schema import ModelConfig
from dlbase.population.base import MemberStack


class VmappedModel(MemberStack):
    """params[i]: (K, *shape) leaf tensors in model.parameters() order; buffers[j] likewise, model.buffers()."""

    def __init__(self, models: Sequence[nn.Module], cfgs: Sequence[ModelConfig]):
        rates = sorted({c.dropout for c in cfgs})
        if len(rates) > 1:
            raise ConfigError(f"model.dropout: the members ask for {rates}; a population of this model trains one "
                              f"rate (per-member rates: the stacked MLP)")
        first = models[0]
        params, buffers = torch.func.stack_module_state(list(models))  # leaves, (K, ...) each
        self.names, self.buffer_names = list(params), list(buffers)
        self.params, self.buffers = list(params.values()), list(buffers.values())
        self.K = len(models)
        self.template = copy.deepcopy(first).to("meta")  # its structure only: functional_call brings the tensors
        self.encoding = first.encoding  # what the loop reads of it (out_features)
        names = [n for n, _ in first.named_parameters()]
        self.exact_zero_grad = [names.index(n) for n in getattr(first, "exact_zero_grad", ())]
        self._hook_exact_zeros()

    def forward(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """x (K, B, ...) -> logits (K, B, C): member k's forward with its own tensors on its own batch x[k]."""
        self.template.train(training)

        def one(params: dict, buffers: dict, xk: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.template, (params, buffers), (xk,))
        return torch.func.vmap(one, randomness="different")(dict(zip(self.names, self.params)),
                                                            dict(zip(self.buffer_names, self.buffers)), x)

class LoopedModel(VmappedModel):
    """The same stacked tensors, each member's forward run in turn (functional_call on row k of every stacked
    parameter and buffer, a Python loop over the members), then the logits stacked. scripts/population_bench.py
    measured this faster than vmap for CNNs on the CPU (vmap'd convolutions cost more than K small ones there).
    Batch norm updates its running statistics in place on the row views, i.e. in the stacked buffers."""

    def forward(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """x (K, B, ...) -> logits (K, B, C)."""
        self.template.train(training)
        out = []
        for k in range(self.K):
            tensors = ({n: p[k] for n, p in zip(self.names, self.params)},
                       {n: b[k] for n, b in zip(self.buffer_names, self.buffers)})
            out.append(torch.func.functional_call(self.template, tensors, (x[k],)))
        return torch.stack(out)


@torch.no_grad()
def evaluate_stacked(template: nn.Module, stacked: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, loss_fn, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """K weight vectors of one model evaluated together (`dlbase landscape`'s grid points): stacked holds the
    tensors that differ, (K, *shape) each, shared the rest (the same for all K). Returns (K,) mean loss and (K,)
    accuracy over (x, y), each summed as training/evaluate.py's evaluate sums them, in eval mode (dropout off,
    batch norm on the running statistics it is given). No host sync."""
    was = template.training
    template.eval()

    def one(tensors: dict, xb: torch.Tensor, yb: torch.Tensor):
        logits = torch.func.functional_call(template, (tensors, shared), (xb,)).float()
        return loss_fn(logits, yb) * yb.shape[0], (logits.argmax(dim=1) == yb).sum()
    K = next(iter(stacked.values())).shape[0]
    loss_sum = torch.zeros(K, device=x.device)
    correct = torch.zeros(K, device=x.device, dtype=torch.long)
    many = torch.func.vmap(one, in_dims=(0, None, None))
    for start in range(0, len(y), batch_size):
        losses, right = many(stacked, x[start:start + batch_size], y[start:start + batch_size])  # (K,), (K,)
        loss_sum += losses
        correct += right
    template.train(was)
    return loss_sum / len(y), correct.double() / len(y)
