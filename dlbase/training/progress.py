"""Where a run is and what it reports as it goes: the one seeding function, the run's result, its position
(Progress), the training-loss points of an epoch (step_losses) and the live progress bar on a terminal."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch


def seed_everything(seed: int) -> None:
    """The one place global RNGs are seeded (weight init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


@dataclass
class RunResult:
    folder: Path
    epochs_done: int
    best_metric: str
    best_value: float
    best_epoch: int
    last_metrics: dict
    train_seconds: float = 0.0  # the training steps of this call (no validation, checkpoints or start-up)
    status: str = "finished"  # finished | early_stopped | pruned | preempted | nothing_to_do
    exit_code: int = 0  # 143 (SIGTERM) or 130 (SIGINT) when preempted


@dataclass
class Progress:
    """Where the run is. epoch: completed epochs; step: optimiser steps taken; batch: batches of the epoch in
    progress already trained (0 between epochs); epoch_rng: the data order's generator state before the epoch
    in progress drew its permutation (what a mid-epoch checkpoint stores to redraw it)."""
    epoch: int = 0
    step: int = 0
    batch: int = 0
    epoch_rng: Optional[torch.Tensor] = None
    train_seconds: float = 0.0  # training steps of this process


@dataclass(frozen=True)
class EpochSizes:
    """How a run's epochs are cut. n_used: the samples an epoch trains on (batch norm cannot normalise a batch
    of one: with a last batch of one, one random sample is left out of each epoch instead); steps_per_epoch:
    batches of n_used; total_steps: train.max_steps, or train.epochs epochs."""
    n_used: int
    steps_per_epoch: int
    total_steps: int


def epoch_sizes(cfg, n: int) -> EpochSizes:
    """The EpochSizes of config cfg over a training set of n samples (a single run and a population alike)."""
    B = cfg.train.batch_size
    n_used = n - 1 if cfg.model.uses_batch_norm and n % B == 1 and n > 1 else n
    steps_per_epoch = -(-n_used // B)
    return EpochSizes(n_used, steps_per_epoch, cfg.train.max_steps or cfg.train.epochs * steps_per_epoch)


class Stepper(Protocol):
    """What the loop needs of a step engine, for one model (training/engine.py's Engine) or K stacked members
    (population/stepper.py's PopStepper): train batches of an epoch's order, with the loss sums on the device."""
    loss_sum: torch.Tensor  # () or (K,): the epoch's summed per-sample training loss, read once per epoch
    ce_sum: torch.Tensor  # the same for the plain cross-entropy (with label smoothing)

    def epoch(self, order: torch.Tensor, step: int, start: int, stop: int, on_step: Callable[[int], None],
              should_stop: Callable[[], bool]) -> int:
        """Train batches start..stop-1 of order (batch `start` is global step `step`); on_step(global step) after
        each is launched; should_stop() before each. Returns the batches trained."""


class Snapshots:
    """An epoch's running training-loss sums, copied on the device every train.log_every global steps (no sync)
    and read with the epoch's one sync: TensorBoard's training-loss points. Rows are snapshots; each is shaped
    like the stepper's loss_sum (() for one run, (K,) for a population)."""

    def __init__(self, log_every: int, steps_per_epoch: int, like: torch.Tensor):
        self.log_every = log_every
        self.buf = torch.zeros((steps_per_epoch // log_every + 1, *like.shape), device=like.device)
        self.steps: list[int] = []  # the global steps (after the step) whose running sum was copied
        self.start = (0, 0)  # (the epoch's first global step, batches done before this process)

    def begin(self, step: int, batch: int) -> None:
        """A new stretch of the epoch in progress: global step `step`, `batch` of its batches done before."""
        self.steps, self.start = [], (step - batch, batch)

    def on_step(self, step: int, loss_sum: torch.Tensor) -> None:
        """After global step `step` (0-based) was launched: copy the running sum every log_every steps."""
        if (step + 1) % self.log_every == 0 and len(self.steps) < self.buf.shape[0]:
            self.buf[len(self.steps)].copy_(loss_sum)
            self.steps.append(step + 1)

    def taken(self) -> torch.Tensor:
        """The snapshots of this epoch, flattened (n_snaps * K,), to read with the epoch's sync."""
        return self.buf[:len(self.steps)].flatten()

    def keep(self, idx: torch.Tensor) -> None:
        """Members idx stay (a population whose members leave mid-epoch): their columns of the snapshots."""
        self.buf = self.buf.index_select(1, idx)

    def losses(self, read: list[float], k: int, K: int, start_sum: float, batch_size: int, n_used: int,
               end: tuple[int, float]) -> list[tuple[int, float]]:
        """Member k's (of K; 0 of 1 for one run) training-loss points from the read snapshots (step_losses)."""
        return step_losses(self.steps, read[k::K], start_sum, self.start, batch_size, n_used, end=end)


def run_epoch(pos: Progress, n_steps: int, every: Optional[int], stepper: Stepper, order: Callable[[], torch.Tensor],
              on_step: Callable[[int], None], should_stop: Callable[[], bool], at_boundary: Callable[[], bool]) -> bool:
    """The epoch in progress, for a single run and a population alike: train to its n_steps-th batch, stopping
    at each mid-epoch checkpoint boundary (a multiple of checkpoint.every_steps global steps) or a stop request.
    pos: where the run is (.batch of the epoch, .step global), moved by the steps trained; order(): the epoch's
    sample order as the stepper takes it (asked again after each boundary: members may have left); at_boundary()
    saves the mid-epoch checkpoints and says whether to go on (False: a stop, or nothing left to train). True
    when the epoch's batches are done."""
    while pos.batch < n_steps:
        stop = n_steps if every is None else min(n_steps, pos.batch + every - (pos.step % every))
        done = stepper.epoch(order(), pos.step, pos.batch, stop, on_step, should_stop)
        pos.batch += done
        pos.step += done
        if pos.batch < n_steps and not at_boundary():
            return False
    return True


def run_epochs(more: Callable[[], bool], train_epoch: Callable[[], bool], end_epoch: Callable[[], None]) -> None:
    """The loop over epochs: while more() (steps left, and something still training), train the epoch in
    progress and, when it ran to its end, end it (validation, checkpoints, the decisions to stop)."""
    while more():
        if train_epoch():
            end_epoch()


def step_losses(snap_steps: list[int], snaps: list[float], start_sum: float, snap_from: tuple[int, int],
                batch_size: int, n_used: int, end: Optional[tuple[int, float]] = None) -> list[tuple[int, float]]:
    """(global step, mean training loss per sample of the steps since the previous point) for an epoch's
    snapshots of its running loss sum taken after snap_steps (every train.log_every global steps); snap_from:
    (the epoch's first global step, batches done before this process); end: (the epoch's last global step, its
    whole loss sum), so the steps after the epoch's last snapshot get a point of their own at the epoch's end.
    Every step is in exactly one point; a point never spans an epoch boundary."""
    first, done_before = snap_from
    out = []
    prev_sum, prev_n = start_sum, min(done_before * batch_size, n_used)
    if end is not None and (not snap_steps or snap_steps[-1] < end[0]):
        snap_steps, snaps = [*snap_steps, end[0]], [*snaps, end[1]]
    for step, total in zip(snap_steps, snaps):
        n = min((step - first) * batch_size, n_used)
        if n > prev_n:
            out.append((step, (total - prev_sum) / (n - prev_n)))
        prev_sum, prev_n = total, n
    return out


class Bar:
    """The per-epoch progress bar (tqdm), only on a terminal; its loss reading is one sync per log interval."""

    def __init__(self, trainer, n_steps: int, show: bool):
        self.trainer, self.bar = trainer, None
        if show:
            from tqdm.auto import tqdm
            p = trainer.progress
            self.bar = tqdm(total=n_steps, initial=p.batch, desc=f"epoch {p.epoch + 1}/{trainer.epochs_planned()}",
                            leave=False, unit="step")

    def on_step(self, step: int) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        t = self.trainer
        if (step + 1) % t.cfg.train.log_every == 0 and t.engine.last_loss is not None:
            self.bar.set_postfix(loss=f"{t.engine.last_loss.item():.4f}", lr=f"{t.schedule(step):.3g}")  # note: sync

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
