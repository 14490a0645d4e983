"""How training steps run: eager, torch.compile, or whole-step CUDA graphs; precision; no host syncs inside.

An Engine trains one epoch at a time over a device-resident split whose x is already normalised. The loss of
every step is summed into a device tensor that the loop reads once per epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dlbase.core import backprop
from dlbase.core.augment import Augmenter
from dlbase.core.data import DeviceSplit
from dlbase.core.errors import ConfigError
from dlbase.core.loss import LossFn
from dlbase.core.optim import RangeSchedule, Schedule, update_rule
from dlbase.core.schema import GRAPH_OPTIMIZERS, Config, ModelConfig, TrainConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS workspaces, optimiser state)


@dataclass(frozen=True)
class Plan:
    """The resolved execution choices for a run (what `auto` became on this device)."""
    precision: str  # fp32 | bf16 | tf32
    compile: str  # none | graph | a torch.compile mode
    data_dtype: torch.dtype  # how the normalised inputs are stored on the device

    engine: str = "autograd"  # autograd | manual

    def describe(self) -> str:
        return f"precision {self.precision}, compile {self.compile}, engine {self.engine}"


def resolve_device(spec: str) -> torch.device:
    """device: auto | cpu | cuda | cuda:N -> the torch device, refusing what this machine does not have."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but CUDA is not available here; use auto or cpu")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


def _resolve(cfg: TrainConfig, device: torch.device, optimizer: str) -> tuple[str, str]:
    """What train.precision and train.compile's `auto` become on this device."""
    cuda, manual = device.type == "cuda", cfg.engine == "manual"  # the hand-written backward runs eagerly, fp32
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda and not manual else "fp32")
    mode = cfg.compile
    if mode == "auto":
        mode = "graph" if cuda and optimizer in GRAPH_OPTIMIZERS and not manual else "none"
    return precision, mode


def reasons(cfg: Config, device: torch.device, world: int = 1) -> list[tuple[str, str]]:
    """Every reason this (valid) config cannot run on this device with this many torchrun ranks, as
    (dotted key, why). The device-independent rules are the config's own (schema.cross_checks)."""
    precision, mode = _resolve(cfg.train, device, cfg.optim.name)
    bad = []
    if precision == "tf32" and device.type != "cuda":
        bad.append(("train.precision", f"tf32 is a CUDA matmul mode; the device is {device} (use fp32)"))
    if mode == "graph" and device.type != "cuda":
        bad.append(("train.compile", f"graph captures CUDA graphs; the device is {device} (use none, or a "
                                     f"torch.compile mode)"))
    if cfg.train.hessian_every and importlib.util.find_spec("scipy") is None:
        bad.append(("train.hessian_every", f"{cfg.train.hessian_every} needs scipy (its Lanczos), which is not "
                                           f"installed here: pip install scipy, or use 0"))
    if world > 1:
        t = cfg.train
        if t.batch_size % world:
            bad.append(("train.batch_size", f"{t.batch_size} is the global batch and must divide among the {world} "
                                            f"ranks (each takes batch_size / {world})"))
        if t.engine == "manual":
            bad.append(("train.engine", "manual computes gradients without DDP's all-reduce; use autograd with "
                                        "torchrun"))
        if t.compile not in ("auto", "none"):
            bad.append(("train.compile", f"{t.compile} is not supported under torchrun yet; use auto or none"))
        if cfg.model.uses_batch_norm and device.type != "cuda":
            key = "model.norm" if cfg.model.norm == "batch" else "model.conv"  # a convolution's norm: batch
            bad.append((key, "batch under torchrun normalises across ranks with SyncBatchNorm, which torch runs on "
                             "CUDA only; use layer (model.norm) or none, or one process on the CPU"))
    return bad


def plan_run(cfg: Config, device: torch.device, world: int = 1) -> "Plan":
    """The Plan for this config on this device, or one ConfigError naming every reason it cannot run here."""
    bad = reasons(cfg, device, world)
    if bad:
        raise ConfigError("; ".join(f"{key}: {why}" for key, why in bad))
    p = plan(cfg.train, device, cfg.model.encoding.name, cfg.optim.name)
    return dataclasses.replace(p, compile="none") if world > 1 else p  # DDP steps run eagerly


def plan(cfg: TrainConfig, device: torch.device, encoding: str, optimizer: str = "adam") -> Plan:
    """Resolve train.precision and train.compile for this device (plan_run checks first that it can run)."""
    precision, mode = _resolve(cfg, device, optimizer)
    # bf16 inputs save a cast per step; encodings compute sin/cos of p and want fp32 inputs
    data_dtype = torch.bfloat16 if precision == "bf16" and encoding == "none" and device.type == "cuda" \
        else torch.float32
    return Plan(precision, mode, data_dtype, cfg.engine)


def set_matmul_precision(p: Plan, device: torch.device) -> None:
    """fp32 means fp32: TF32 matmuls and convolutions only when train.precision is tf32 (cuDNN's convolutions
    default to TF32 in torch, so a CNN at fp32 would not be). torch keeps this process-wide."""
    if device.type == "cuda":
        tf32 = p.precision == "tf32"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
            torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        else:  # pragma: no cover - older torch
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
            torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
        else:  # pragma: no cover - older torch
            torch.backends.cudnn.allow_tf32 = tf32


def autocast(p: Plan, device: torch.device):
    if p.precision == "bf16":
        # no weight-cast cache: each step's context is new anyway, and a cache must not outlive a graph capture
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class Engine:
    """Runs training steps; `epoch(perm, ...)` trains over the batches of one permutation.

    Eager and torch.compile modes launch each step from Python. Graph mode captures the whole step (gather,
    forward, loss, backward, clipping, optimiser update, loss accumulation) as one CUDA graph over static
    index and lr tensors; each step then costs the host one index copy, one lr fill (only when the lr moves)
    and one replay, and the GPU the step's own kernels. A smaller last batch runs eagerly on the same tensors.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, split: DeviceSplit,
                 cfg: TrainConfig, schedule: Schedule | RangeSchedule, device: torch.device, run_plan: Plan,
                 model_cfg: Optional[ModelConfig] = None, forward: Optional[nn.Module] = None,
                 shard: tuple[int, int] = (0, 1), augment: Optional[Augmenter] = None):
        self.model, self.optimizer, self.loss_fn, self.split = model, optimizer, loss_fn, split
        self.augment = augment  # train.augment inside the step, on the training batch only (None: off)
        self.model_cfg = model_cfg
        self.manual = cfg.engine == "manual"
        assert not self.manual or model_cfg is not None, "the manual engine needs the model's config"
        self.cfg, self.schedule, self.device, self.plan = cfg, schedule, device, run_plan
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.update = update_rule(optimizer)  # optimizer.step without the wrapper that imports torch._dynamo
        self.loss_sum = torch.zeros((), device=device)  # sum over samples of the per-sample loss, this epoch
        # with label smoothing the objective is not the cross-entropy that validation reports: sum that too, so
        # the generalisation gap compares like with like (a few more kernels per step, only then)
        self.plain_ce = cfg.loss == "cross_entropy" and cfg.label_smoothing > 0
        self.ce_sum = torch.zeros((), device=device)
        self.forward = forward if forward is not None else model  # DDP's wrapper under torchrun
        self.shard = shard  # (rank, world): this process trains on its slice of every global batch
        if run_plan.compile in COMPILE_MODES:
            self.forward = torch.compile(model, mode=run_plan.compile)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.constant_lr = schedule.constant
        if run_plan.compile == "graph":
            # the lr lives on the device so the captured optimiser kernels read it; we fill it between replays
            self.lr = torch.tensor(schedule(0), device=device)
            for group in optimizer.param_groups:
                group["lr"] = self.lr
            self.static_idx = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
        self.last_loss: Optional[torch.Tensor] = None
        self.prewarm_seconds = 0.0

    def prewarm(self, steps: int = 2) -> float:
        """One-time start-up on CUDA: run a few steps on a throwaway copy of the model and optimiser, so CUDA's
        lazily loaded kernels, cuBLAS handles and the allocator are ready before the first timed epoch. The
        real model, optimiser, data order and RNG streams are untouched. Returns the seconds it took."""
        if self.device.type != "cuda":
            return 0.0
        import copy
        import time
        t0 = time.perf_counter()
        rng = torch.cuda.get_rng_state(self.device)
        aug = self.augment.generator.get_state() if self.augment is not None else None
        model, optimizer = copy.deepcopy((self.model, self.optimizer))  # one memo: the copy steps the copy
        real = (self.model, self.optimizer, self.update, self.forward, self.loss_sum, self.ce_sum, self.last_loss,
                self.params)
        self.model, self.optimizer, self.update = model, optimizer, update_rule(optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = torch.compile(model, mode=self.plan.compile) if self.plan.compile in COMPILE_MODES else model
        self.loss_sum, self.ce_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        idx = torch.arange(min(self.cfg.batch_size, len(self.split)), device=self.device)
        for _ in range(steps):
            self._step(idx, idx.shape[0])
        torch.cuda.synchronize(self.device)  # note: a sync at start-up, outside any epoch
        (self.model, self.optimizer, self.update, self.forward, self.loss_sum, self.ce_sum, self.last_loss,
         self.params) = real
        torch.cuda.set_rng_state(rng, self.device)
        if aug is not None:
            self.augment.generator.set_state(aug)
        self.prewarm_seconds = time.perf_counter() - t0
        return self.prewarm_seconds

    # ---- one step, as code (eager, compiled, or being captured)
    def _step(self, idx: torch.Tensor, n: int, weight: float = 1.0) -> None:
        x = self.split.x.index_select(0, idx)  # (B, D), already normalised
        y = self.split.y.index_select(0, idx)  # (B,)
        if self.augment is not None:
            x = self.augment(x)  # (B, D) from the run's own generator: device work only
        if self.manual:  # gradients by the delta rule, written out in backprop.py; no autograd graph at all
            # (every parameter's, a CNN's convolutions and batch norms included; their running statistics move too)
            logits, grads = backprop.manual_gradients(self.model, self.model_cfg, x.float(), y, self.cfg.loss,
                                                      self.cfg.label_smoothing)
            loss = self.loss_fn(logits, y)
            for p, g in grads:
                p.grad = g
        else:
            with autocast(self.plan, self.device):
                logits = self.forward(x)
            loss = self.loss_fn(logits, y)
            for p in self.params:  # zero_grad(set_to_none=True), without its dynamo-disable wrapper
                p.grad = None
            (loss * weight if weight != 1.0 else loss).backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=self.device.type == "cuda")
        self.update()
        self.loss_sum.add_(loss.detach(), alpha=n)
        if self.plain_ce:
            self.ce_sum.add_(torch.nn.functional.cross_entropy(logits.detach().float(), y), alpha=n)
        self.last_loss = loss.detach()

    def _shard_step(self, idx: torch.Tensor) -> None:
        """This rank's slice of a global batch of b samples. DDP averages the ranks' gradients, so each rank's mean
        loss is weighted by n_rank * world / b: the average is then the gradient of the global batch's mean, also
        when the last batch does not divide evenly. A rank left without a sample (b < world) still takes part in
        the collective, on one sample with weight 0."""
        rank, world = self.shard
        part = idx.tensor_split(world)[rank]
        n = part.shape[0]
        if n == 0:
            self._step(idx[:1], 0, weight=0.0)
        else:
            self._step(part, n, weight=n * world / idx.shape[0])

    def _set_lr(self, step: int) -> None:
        lr = self.schedule(step)  # a host float from the closed form: no sync
        if self.plan.compile == "graph":
            if not self.constant_lr:
                self.lr.fill_(lr)  # a scalar fill kernel, no host-device copy
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def _capture(self, perm: torch.Tensor, k0: int, step: int, on_step: Callable[[int], None]) -> int:
        """Warm up eagerly on a side stream (real steps: batches k0.. of perm, global steps step..), then
        capture one step. Returns the steps taken."""
        B = self.cfg.batch_size
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for j in range(GRAPH_WARMUP_STEPS):
                self._set_lr(step + j)
                self.static_idx.copy_(perm[(k0 + j) * B:(k0 + j + 1) * B])
                self._step(self.static_idx, B)
                on_step(step + j)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        if self.augment is not None and hasattr(self.graph, "register_generator_state"):
            import warnings
            with warnings.catch_warnings():  # a deprecated no-op in newer torch; needed before (augment.py)
                warnings.simplefilter("ignore")
                self.graph.register_generator_state(self.augment.generator)
        with torch.cuda.graph(self.graph):  # records only: nothing below runs now
            self._step(self.static_idx, B)
        return GRAPH_WARMUP_STEPS

    def epoch(self, perm: torch.Tensor, step: int, start: int, stop: int, on_step: Callable[[int], None],
              should_stop: Callable[[], bool] = lambda: False) -> int:
        """Train batches start..stop-1 of perm (batch k is perm[k*B:(k+1)*B]); batch `start` is global step `step`.

        on_step(global_step) runs after each step is launched (host only: the progress bar); should_stop() is
        asked before each step (a host flag, e.g. a signal) and ends the call early. Returns batches trained.
        """
        B = self.cfg.batch_size
        n = perm.shape[0]
        k = start
        if self.plan.compile == "graph":
            full = min(stop, n // B)  # whole batches; a smaller last batch runs eagerly
            if self.graph is None and full - k > GRAPH_WARMUP_STEPS and not should_stop():
                k += self._capture(perm, k, step + k - start, on_step)
            if self.graph is not None:
                while k < full and not should_stop():
                    self._set_lr(step + k - start)
                    self.static_idx.copy_(perm[k * B:(k + 1) * B])  # device-to-device, async
                    self.graph.replay()
                    on_step(step + k - start)
                    k += 1
        while k < stop and not should_stop():
            self._set_lr(step + k - start)
            idx = perm[k * B:(k + 1) * B]
            if self.shard[1] > 1:  # torchrun: this rank's part of the global batch
                self._shard_step(idx)
            else:
                self._step(idx, idx.shape[0])
            on_step(step + k - start)
            k += 1
        return k - start

    def set_loss_sum(self, value: float, ce: float = 0.0) -> None:
        """Restore a partial epoch's summed loss (and plain cross-entropy) when resuming mid-epoch."""
        self.loss_sum.fill_(value)
        self.ce_sum.fill_(ce)

    def take_loss_sum(self) -> torch.Tensor:
        """The epoch's summed objective and plain cross-entropy, (2,) on the device; both restart at zero."""
        out = torch.stack([self.loss_sum, self.ce_sum])
        self.loss_sum.zero_()
        self.ce_sum.zero_()
        return out
