"""Where a run is and what it reports as it goes: the one seeding function, the run's result, its position
(Progress), the training-loss points of an epoch (step_losses) and the live progress bar on a terminal."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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
    status: str = "running"  # running | finished | early_stopped | pruned | preempted
    train_seconds: float = 0.0  # training steps of this process

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch, "status": self.status}


def run_epoch(pos, n_steps: int, every: Optional[int], advance: Callable[[int], None],
              at_boundary: Callable[[], bool]) -> bool:
    """The epoch in progress, for a single run and a population alike: train to its n_steps-th batch, stopping
    at each mid-epoch checkpoint boundary (a multiple of checkpoint.every_steps global steps) or a stop request.
    pos: where the run is (.batch of the epoch, .step global); advance(stop) trains batches up to `stop` (or
    until a stop is asked for), moving pos; at_boundary() saves the mid-epoch checkpoints and says whether to go
    on (False: a stop, or nothing left to train). True when the epoch's batches are done."""
    while pos.batch < n_steps:
        advance(n_steps if every is None else min(n_steps, pos.batch + every - (pos.step % every)))
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
