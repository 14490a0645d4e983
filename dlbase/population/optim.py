"""Optimisers over stacked parameters: K members' weights in one (K, ...) tensor each, updated by one batched
rule whose hyperparameters (lr per step, weight decay, momentum, betas, eps, alpha, rho) are (K,) device tensors.

Each rule is torch's single-tensor update (torch/optim/*.py) written out as tensor ops on the stacked tensors, so
member k moves exactly as torch.optim would move it alone (tests/test_population.py checks this against torch).
Per-step scalars (bias corrections, the lr) are computed in float64 on the device, as torch computes them in
Python floats, and cast to the parameters' dtype once: no host sync, and a CUDA graph could replay the step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dlbase.core.errors import ConfigError
from dlbase.core.schema import OPTIM_INFO, OptimConfig

def _hyper(cfgs: Sequence[OptimConfig], name: str, device: torch.device) -> torch.Tensor:
    """One OptimConfig field over the members, (K,) float64 on the device; fields an optimiser does not read
    count as torch's default for it (sgd's momentum is 0)."""
    if name == "momentum" and cfgs[0].name == "sgd":
        return torch.zeros(len(cfgs), dtype=torch.float64, device=device)
    if name in ("beta1", "beta2"):
        values = [c.betas[0 if name == "beta1" else 1] for c in cfgs]
    else:
        values = [getattr(c, name) for c in cfgs]
    return torch.tensor(values, dtype=torch.float64, device=device)


class PopOptimizer:
    """step() updates every stacked parameter (K, ...) from its .grad with member k's own hyperparameters and
    its own lr at the current step, lr_table[k, step] ((K, total_steps) float64 on the device)."""

    def __init__(self, params: list[torch.Tensor], cfgs: Sequence[OptimConfig], lr_table: torch.Tensor):
        names = {c.name for c in cfgs}
        if len(names) != 1:
            raise ConfigError(f"optim.name: a population trains one optimiser, the members ask for {sorted(names)}")
        self.name = cfgs[0].name
        self.info = OPTIM_INFO[self.name]  # its state keys, step count and update rule: the single run's table
        self._rule = getattr(self, "_" + (self.info.stacked_rule or self.name))
        self.params, device = params, params[0].device
        self.lr_table = lr_table  # (K, T) float64
        self.hp = {n: _hyper(cfgs, n, device) for n in ("weight_decay", "momentum", "beta1", "beta2", "eps",
                                                          "alpha", "rho")}  # each (K,) float64
        # host-known choices (from the configs, never from tensor values): skip what no member uses
        self.any_wd = any(c.weight_decay != 0 for c in cfgs)
        self.state = {key: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
                      for key in self.info.state_keys}  # each (K, *shape) like its parameter
        self.t = torch.zeros((), dtype=torch.float64, device=device)  # steps taken, as torch's `step` (all members)
        self.t_idx = torch.zeros(1, dtype=torch.long, device=device)  # the same count, to index the lr table

    # ---- per-step scalars, (K,) float64 -> (K, 1, ...) in p's dtype
    @staticmethod
    def _v(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))

    def lr(self) -> torch.Tensor:
        """(K,) float64: every member's lr at the step about to be taken (a device gather, no sync)."""
        return self.lr_table.index_select(1, self.t_idx).squeeze(1)

    @torch.no_grad()
    def step(self) -> None:
        lr, hp = self.lr(), self.hp
        self.t.add_(1)
        self.t_idx.add_(1)
        rule = self._rule
        for i, p in enumerate(self.params):
            g = p.grad
            if self.any_wd and self.name != "adamw":  # L2: grad + wd * p (adamw decays the weights instead)
                g = g.addcmul(p, self._v(hp["weight_decay"], p))
            rule(i, p, g, lr)

    def _sgd(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        if self.name != "sgd":  # buf = m * buf + g; zeros at first make buf = g, as torch's clone
            m = self._v(self.hp["momentum"], p)
            buf = self.state["momentum_buffer"][i].mul_(m).add_(g)
            g = g.addcmul(buf, m) if self.name == "nesterov" else buf
        p.addcmul_(g, self._v(-lr, p))

    def _adagrad(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        s, tmp = self.state["sum"][i].addcmul_(g, g), self._scratch(i, p)
        std = torch.sqrt(s, out=tmp).add_(self._v(self.hp["eps"], p))
        p.addcmul_(torch.div(g, std, out=tmp), self._v(-lr, p))  # clr = lr (lr_decay 0)

    def _rmsprop(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        a, tmp = self.hp["alpha"], self._scratch(i, p)
        sq = self.state["square_avg"][i].mul_(self._v(a, p)).addcmul_(torch.mul(g, g, out=tmp), self._v(1 - a, p))
        avg = torch.sqrt(sq, out=tmp).add_(self._v(self.hp["eps"], p))
        p.addcmul_(torch.div(g, avg, out=tmp), self._v(-lr, p))

    def _adadelta(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        rho, eps = self._v(self.hp["rho"], p), self._v(self.hp["eps"], p)
        one_minus = self._v(1 - self.hp["rho"], p)
        sq = self.state["square_avg"][i].mul_(rho).addcmul_(g.mul(g), one_minus)
        std = sq.add(eps).sqrt_()
        acc = self.state["acc_delta"][i]
        delta = acc.add(eps).sqrt_().div_(std).mul_(g)
        acc.mul_(rho).addcmul_(delta.mul(delta), one_minus)
        p.addcmul_(delta, self._v(-lr, p))

    def _scratch(self, i: int, p: torch.Tensor) -> torch.Tensor:
        """A buffer like parameter i, kept between steps: the update is built in it. (A fresh (K, ...) tensor per
        op each step cost the CPU more than the arithmetic: large allocations are new pages, faulted in anew.)"""
        if self._tmp is None:
            self._tmp = [torch.empty_like(q) for q in self.params]
        return self._tmp[i]

    _tmp = None

    def _adam(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        hp = self.hp
        b1, b2 = hp["beta1"], hp["beta2"]
        if self.any_wd and self.name == "adamw":  # decoupled: p *= 1 - lr * wd
            p.mul_(self._v(1 - lr * hp["weight_decay"], p))
        tmp = self._scratch(i, p)
        if i == 0:  # this step's (K,) float64 scalars, as torch's Python floats: once per step, not per parameter
            bc1, bc2_sqrt = 1 - b1 ** self.t, (1 - b2 ** self.t).sqrt()
            self._now = {"1-b1": 1 - b1, "b2": b2, "1-b2": 1 - b2, "bc2": bc2_sqrt, "step": -lr / bc1}
        now = self._now
        m = self.state["exp_avg"][i].lerp_(g, self._v(now["1-b1"], p))
        v = self.state["exp_avg_sq"][i].mul_(self._v(now["b2"], p)).addcmul_(torch.mul(g, g, out=tmp),
                                                                           self._v(now["1-b2"], p))
        denom = torch.sqrt(v, out=tmp).div_(self._v(now["bc2"], p)).add_(self._v(hp["eps"], p))
        p.addcmul_(torch.div(m, denom, out=tmp), self._v(now["step"], p))  # the same ops as before, in place


    # ---- membership and checkpoints
    def keep(self, idx: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Keep only the members idx (a (K',) long tensor): state, hyperparameters and lr table shrink with the
        stacked parameters, which the caller has already cut (params)."""
        self.params = params
        self._tmp = None  # scratch buffers follow the new member count
        self.lr_table = self.lr_table.index_select(0, idx)
        self.hp = {n: v.index_select(0, idx) for n, v in self.hp.items()}
        self.state = {key: [s.index_select(0, idx) for s in states] for key, states in self.state.items()}

    @torch.no_grad()
    def gather(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Members dst take members src's state, hyperparameters and lr table rows ((n,) long each): a gather
        along the stacked axis, in place on the device (population/exploit.py)."""
        for t in (*(s for states in self.state.values() for s in states), *self.hp.values(), self.lr_table):
            t.index_copy_(0, dst, t.index_select(0, src))

    @torch.no_grad()
    def set_member(self, k: int, cfg: OptimConfig, lr_row: torch.Tensor) -> None:
        """Member k's hyperparameters from cfg, and its lr at every step (lr_row (T,) float64): set mid-run."""
        for n, v in self.hp.items():
            v[k] = _hyper([cfg], n, v.device)[0]
        self.lr_table[k].copy_(lr_row)
        self.any_wd = self.any_wd or cfg.weight_decay != 0  # host-known: the config, not a tensor

    @torch.no_grad()
    def restart_at(self, step: int) -> None:
        """Go on from a checkpoint taken after `step` steps: the step count and the lr table's index."""
        self.t.fill_(step)
        self.t_idx.fill_(step)

    @torch.no_grad()
    def load_member_state(self, k: int, saved: dict, path=None) -> None:
        """Member k's state from its torch optimiser's state_dict (what torch_state_dict wrote): each parameter's
        tensors under torch's keys, in the stacked order. No state (a checkpoint before the first step): zeros."""
        from dlbase.core.errors import CheckpointError
        state = saved.get("state", {}) if isinstance(saved, dict) else {}
        for i in range(len(self.params)):
            st = state.get(i, {})
            for key in self.info.state_keys:
                if key not in st and st:
                    raise CheckpointError(f"{path}: optimizer state has no {key!r} for optim.name={self.name}")
                if key in st:
                    self.state[key][i][k].copy_(st[key].to(self.state[key][i].device, self.state[key][i].dtype))

    def member_state(self, k: int) -> list[dict]:
        """Member k's state per parameter with torch's keys and types (CPU tensors, step a float32 scalar), to
        load into its torch optimiser. note: device-to-host copies (a sync), only at a checkpoint."""
        step = self.t.to("cpu", torch.float32)
        out = []
        for i in range(len(self.params)):
            st = {key: self.state[key][i][k].detach().cpu().clone() for key in self.info.state_keys}
            if self.info.counts_steps:
                st["step"] = step.clone()
            out.append(st)
        return out

    def torch_state_dict(self, k: int, optimizer: torch.optim.Optimizer) -> dict:
        """Member k's state as `optimizer` (its own torch optimiser over its own parameters, in the stacked
        order) would save it: what `dlbase train --resume` loads."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert len(params) == len(self.params), (len(params), len(self.params))
        optimizer.state.clear()
        if self.t.item() > 0:  # note: sync, at a checkpoint; torch has no state before the first step
            for p, st in zip(params, self.member_state(k)):
                if st:
                    optimizer.state[p] = st
        return optimizer.state_dict()

