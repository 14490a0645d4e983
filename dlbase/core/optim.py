"""build_optimizer() and build_schedule(): names from the config -> torch optimisers and lr schedules."""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

import torch

from dlbase.core.schema import OPTIM_INFO, OptimConfig, ScheduleConfig


# which OptimConfig fields each optimiser reads (the README's table): from the one capability table
OPTIMIZER_PARAMS = {name: info.reads for name, info in OPTIM_INFO.items()}


def _impl_kwargs(cfg: OptimConfig, device: torch.device, graph: bool) -> dict:
    """fused / foreach / capturable flags. auto: torch's fused kernel on CUDA where it exists, else its default.

    graph: the step will be captured in a CUDA graph with the lr as a device tensor, which needs torch's
    fused kernel or its capturable foreach one (OPTIM_INFO says which; the config refuses the others).
    """
    info = OPTIM_INFO[cfg.name]
    if graph:
        assert info.graph_kwargs is not None, f"{cfg.name} cannot be graph-captured (the config check lets it by)"
        return dict(info.graph_kwargs)
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and info.fused else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}.get(impl, {})


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    device: torch.device = torch.device("cpu"), graph: bool = False) -> torch.optim.Optimizer:
    """The torch optimiser OPTIM_INFO names, given the config fields it reads (and no others)."""
    _no_dynamo_import()
    info = OPTIM_INFO[cfg.name]
    kwargs = {k: getattr(cfg, k) for k in info.reads}
    return getattr(torch.optim, info.torch_class)(list(params), **kwargs, **info.extra,
                                                  **_impl_kwargs(cfg, device, graph))


class Schedule:
    """The learning rate at every optimiser step, in closed form.

    lr(s) for step s = 0, 1, ..., total_steps - 1:
      - warm-up (s < W): lr * (s + 1) / W, a straight line reaching lr at step W - 1 (torch's LinearLR from
        1/W to 1 over W - 1 steps);
      - then the named schedule, started after the warm-up as torch's SequentialLR does, over t = s - W of
        T = total_steps - W. Epoch-based ones (step, multistep, exponential) read the epoch of t,
        e = t // steps_per_epoch, so milestones are the epochs a user counts after the warm-up:
        constant:    lr
        step:        lr * gamma ** (e // step_size)
        multistep:   lr * gamma ** (number of milestones <= e)
        exponential: lr * gamma ** e
        cosine:      min_lr + (lr - min_lr) * (1 + cos(pi * t / (T - 1))) / 2     (lr at t = 0, min_lr at the end)
        onecycle:    torch's OneCycleLR (anneal 'cos') step for step: a cosine rise from lr / div_factor to lr
                     until step pct_start * T - 1 (unrounded, as torch has it), then a cosine fall to
                     lr / div_factor / final_div_factor at the last step. torch also cycles momentum (Adam's
                     beta1) between 0.85 and 0.95 by default; dlbase keeps momentum and betas fixed (tested
                     against OneCycleLR(cycle_momentum=False)).
      - times the table's factor (table_epochs, table_factors) at the epoch of the step, E = s // steps_per_epoch
        (counted from the run's start, warm-up included): the factor of the last point with epoch <= E, 1 before
        the first. A PBT member's perturbed lr is this table on its own schedule (search/pbt.py).
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, total_steps: int):
        self.cfg, self.base, self.spe, self.total = cfg, base_lr, steps_per_epoch, total_steps

    def __call__(self, step: int) -> float:
        c = self.cfg
        if not c.table_epochs:
            return self._named(step)
        i = bisect.bisect_right(c.table_epochs, step // self.spe)
        return self._named(step) * (c.table_factors[i - 1] if i else 1.0)

    def _named(self, step: int) -> float:
        c, lr = self.cfg, self.base
        w = c.warmup_steps
        if step < w:
            return lr * (step + 1) / w
        t, T = step - w, max(1, self.total - w)
        e = t // self.spe
        if c.name == "constant":
            return lr
        if c.name == "step":
            return lr * c.gamma ** (e // c.step_size)
        if c.name == "multistep":
            return lr * c.gamma ** bisect.bisect_right(c.milestones, e)
        if c.name == "exponential":
            return lr * c.gamma ** e
        if c.name == "cosine":
            frac = min(1.0, t / (T - 1)) if T > 1 else 0.0
            return c.min_lr + (lr - c.min_lr) * (1 + math.cos(math.pi * frac)) / 2
        assert c.name == "onecycle", c.name
        start, end = lr / c.div_factor, lr / c.div_factor / c.final_div_factor
        up = c.pct_start * T - 1  # the phase boundary, a float as in torch's OneCycleLR
        if t <= up:
            return _cos_anneal(start, lr, t / up) if up > 0 else lr
        down = (T - 1) - up
        return _cos_anneal(lr, end, (t - up) / down) if down > 0 else end

    @property
    def constant(self) -> bool:
        """The lr never moves (a CUDA graph then never refills it)."""
        return self.cfg.name == "constant" and self.cfg.warmup_steps == 0

    def table(self) -> list[float]:
        return [self(s) for s in range(self.total)]


class RangeSchedule:
    """The learning-rate range test's lr (Smith 2017; Lightning's _ExponentialLR, which ends at end_lr): rising
    exponentially from start_lr at step 0 to end_lr at step steps - 1, lr(s) = start * (end / start) ** (s /
    (steps - 1)), the closed form of torch's ExponentialLR with gamma = (end / start) ** (1 / (steps - 1)).
    Beyond the last step it stays at end_lr. The Engine takes it as it takes a Schedule."""

    constant = False

    def __init__(self, start_lr: float, end_lr: float, steps: int):
        assert 0 < start_lr < end_lr and steps >= 2, (start_lr, end_lr, steps)
        self.start, self.end, self.steps = start_lr, end_lr, steps

    def __call__(self, step: int) -> float:
        frac = min(step, self.steps - 1) / (self.steps - 1)
        return self.start * (self.end / self.start) ** frac

    def table(self) -> list[float]:
        return [self(s) for s in range(self.steps)]


def _cos_anneal(a: float, b: float, frac: float) -> float:
    """From a (frac = 0) to b (frac = 1) along half a cosine."""
    return b + (a - b) * (1 + math.cos(math.pi * frac)) / 2


def build_schedule(cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, total_steps: int) -> Schedule:
    return Schedule(cfg, base_lr, steps_per_epoch, total_steps)


def _no_dynamo_import() -> None:
    """torch marks Optimizer.add_param_group, zero_grad, state_dict and load_state_dict with _disable_dynamo, whose
    first call imports torch._dynamo (with sympy, FSDP and inductor's config: 1-3 s of start-up) only to mark them
    never-compiled. dlbase never compiles an optimiser: give each the plain function, as torch caches it after
    that first call. Once torch._dynamo is loaded anyway (torch.compile modes), torch's own path stays."""
    import sys
    if "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        fn = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            fn.__dynamo_disable = fn


def update_rule(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """optimizer.step() without torch's two wrappers around it: the profiler hook (no hooks here) and the
    grad-mode guard, which imports torch._dynamo to mark a graph break for torch.compile. The update rule itself
    runs as torch wrote it, under no_grad as the guard would. Falls back to optimizer.step when torch's layout
    is not the one this expects."""
    import sys
    cls = type(optimizer)
    raw = cls.step
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__
    if "torch._dynamo" in sys.modules or raw is cls.step or not raw.__qualname__.endswith(".step") \
            or optimizer.defaults.get("differentiable"):
        return optimizer.step

    def step() -> None:
        with torch.no_grad():
            raw(optimizer)
    return step

