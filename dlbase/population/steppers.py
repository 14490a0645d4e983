"""The population's stepper: its members stacked into one model (the hand-stacked MLP or torch.func over any
model; base.py's MemberStack interface), and PopStepper, which trains them all in one batched step behind the same
contract as the single run's Engine (training/progress.py's Stepper)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from dlbase.core.augment import Draws, apply
from dlbase.core.model import MLP
from dlbase.population.stacked import StackedMLP, clip_grad_norms, member_losses
from dlbase.training.engine import autocast
from dlbase.population.vmapped import LoopedModel, VmappedModel

# how a population's members are stacked: the hand-stacked MLP (torch.baddbmm; stacked.py), or torch.func over
# whatever build_model makes (vmapped.py), with one vmap over the members or a loop over them. On this CPU
# scripts/population_bench.py measured the hand-stacked one faster for MLPs (9% of the steps for 4 x [512, 512],
# 32% for 4 x [64]) and, for CNNs (4 x mnist_cnn_cpu_speedrun), the loop faster than vmap (one step: loop 0.68x of
# vmap's time; BENCHMARKS.md). So auto takes the hand-stacked MLP for MLPs, and for other models the loop on the
# CPU and vmap on CUDA (where one vmap'd kernel per layer should beat K small ones: not measured yet).
STEPPERS = ("auto", "stacked", "vmap", "loop")


def stack_members(models: Sequence[torch.nn.Module], cfgs: Sequence, stepper: str = "auto"):
    """The members' models as one stacked model (StackedMLP, VmappedModel or LoopedModel: one interface)."""
    from dlbase.core.errors import ConfigError
    if stepper not in STEPPERS:
        raise ConfigError(f"population stepper {stepper!r} is not one of {', '.join(STEPPERS)}")
    mlp = all(type(m) is MLP for m in models)
    if stepper == "stacked" and not mlp:
        raise ConfigError("population stepper 'stacked' is the hand-stacked MLP; this model needs 'vmap' or 'loop' "
                          "(or auto)")
    if stepper == "auto":
        on_cuda = next(models[0].parameters()).device.type == "cuda"
        stepper = "stacked" if mlp else ("vmap" if on_cuda else "loop")
    return {"vmap": VmappedModel, "loop": LoopedModel, "stacked": StackedMLP}[stepper](models, cfgs)


class PopStepper:
    """The population's stepper (training/progress.py's Stepper contract, as the single run's Engine): one step
    trains every member on its own batch, with device work only. net: the stacked members (stack_members); opt:
    their stacked optimiser (optim.py); x, y: the shared data on the device; smoothing, clip: (K,) per-member
    label smoothing and gradient clipping, or None when no member uses it."""

    def __init__(self, net, opt, x: torch.Tensor, y: torch.Tensor, cfg, run_plan, device: torch.device,
                 smoothing: Optional[torch.Tensor], clip: Optional[torch.Tensor]):
        self.net, self.opt, self.x, self.y, self.cfg, self.plan, self.device = net, opt, x, y, cfg, run_plan, device
        self.smoothing, self.clip = smoothing, clip
        self.augmenters: list = []  # each member's train.augment (core/augment.py), in the stacked order; [] = off
        self.B = cfg.train.batch_size
        self.loss_sum = torch.zeros(net.K, device=device)  # (K,) summed per-sample training loss, this epoch
        self.ce_sum = torch.zeros(net.K, device=device)  # (K,) the same for the plain cross-entropy

    def epoch(self, order: torch.Tensor, step: int, start: int, stop: int, on_step: Callable[[int], None],
              should_stop: Callable[[], bool]) -> int:
        """Batches start..stop-1 of order ((K, N) indices into x; batch b is order[:, b*B:(b+1)*B]); batch `start`
        is global step `step`. Returns the batches trained."""
        k = start
        while k < stop and not should_stop():  # a host flag: no sync
            self._step(order[:, k * self.B:(k + 1) * self.B])
            on_step(step + k - start)
            k += 1
        return k - start

    def _step(self, ids: torch.Tensor) -> None:
        """ids (K, b): gather, forward, loss, backward, clip, update, and the loss sums."""
        K, b = ids.shape
        flat = ids.reshape(-1)
        x = self.x.index_select(0, flat).view(K, b, *self.x.shape[1:])  # (K, b, D)
        y = self.y.index_select(0, flat).view(K, b)  # (K, b)
        if self.augmenters:  # each member's own draws (its lone run's), applied to the (K*b) batch at once
            a = self.augmenters[0]
            x = apply(x.reshape(K * b, -1), Draws.cat([m.draw(b) for m in self.augmenters]), a.cfg,
                      a.shape).view(x.shape)
        with autocast(self.plan, self.device):
            logits = self.net.forward(x)  # (K, b, C)
        losses, ce = member_losses(logits, y, self.cfg.train.loss, self.cfg.model.output, self.smoothing)  # (K,)
        for p in self.net.params:
            p.grad = None
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        if self.clip is not None:
            clip_grad_norms(self.net.params, self.clip)
        self.opt.step()
        self.loss_sum.add_(losses.detach(), alpha=b)
        if self.smoothing is not None:
            self.ce_sum.add_(ce.detach(), alpha=b)

    def take_sums(self) -> torch.Tensor:
        """(2K,): the epoch's loss sums then plain cross-entropy sums, on the device; both restart at zero."""
        out = torch.cat([self.loss_sum, self.ce_sum])
        self.loss_sum.zero_()
        self.ce_sum.zero_()
        return out

    def keep(self, idx: torch.Tensor) -> None:
        """Members idx stay: every (K, ...) tensor is cut to them."""
        self.net.keep(idx)
        self.opt.keep(idx, self.net.params)
        self.loss_sum, self.ce_sum = self.loss_sum.index_select(0, idx), self.ce_sum.index_select(0, idx)
        if self.smoothing is not None:
            self.smoothing = self.smoothing.index_select(0, idx)
        if self.clip is not None:
            self.clip = self.clip.index_select(0, idx)
