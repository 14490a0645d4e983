"""What both ways of stacking a population's members share (stacked.py's hand-stacked MLP, vmapped.py's torch.func
stack of any model): every parameter and buffer with a leading member axis (K, ...), a member copied back into its
own module, members leaving the stack, and the stack's size."""
from __future__ import annotations

import torch
from torch import nn

from dlbase.core.model import zero_grad_before_batch_norm


class MemberStack:
    """params[i]: (K, *shape) leaf tensors in the members' model.parameters() order; buffers[j] likewise,
    model.buffers(). Subclasses build them and add forward(x (K, B, ...)) -> logits (K, B, C)."""
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    K: int
    exact_zero_grad: list[int]  # indices into params of the biases just before a batch norm (model.py)

    def _hook_exact_zeros(self) -> None:
        """As the model does: the stacked bias of each layer before a batch norm gets an exact zero gradient."""
        for i in self.exact_zero_grad:
            zero_grad_before_batch_norm(self.params[i])

    @torch.no_grad()
    def to_member(self, k: int, model: nn.Module, grads: bool = True) -> None:
        """Copy member k's weights, buffers (and last gradients) into its own model (same parameter order)."""
        for tp, sp in zip(model.parameters(), self.params):
            tp.copy_(sp[k])
            if grads:
                tp.grad = sp.grad[k].clone() if sp.grad is not None else None
        for tb, sb in zip(model.buffers(), self.buffers):
            tb.copy_(sb[k])

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only members idx ((K',) long): new leaf tensors, cut along the member axis."""
        self.params = [p.detach().index_select(0, idx).requires_grad_() for p in self.params]
        self.buffers = [b.index_select(0, idx) for b in self.buffers]
        self.K = idx.shape[0]
        self._hook_exact_zeros()  # the new leaves need their hooks

    def nbytes(self) -> int:
        """Bytes of the stacked parameters and buffers (all members)."""
        return sum(t.numel() * t.element_size() for t in (*self.params, *self.buffers))
