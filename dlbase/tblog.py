"""TensorBoard event files in a run's folder: per-epoch metrics, the training loss every train.log_every steps,
and the run's hyperparameters with its final metrics. torch.utils.tensorboard is imported only here, and only
when train.tensorboard is on: without the tensorboard package a run goes on without event files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from dlbase.config import Config

# metrics.csv names -> TensorBoard tags, grouped as TensorBoard groups them (by the part before the slash)
TAGS = {"train_loss": "loss/train", "train_ce": "loss/train_cross_entropy", "val_loss": "loss/val",
        "val_accuracy": "accuracy/val", "lr": "lr", "seconds": "time/epoch_seconds",
        "train_seconds": "time/train_seconds"}


class EventLog:
    """One SummaryWriter on the run folder. A resumed run opens it with purge_step at the step it resumes from,
    so TensorBoard drops anything a killed process wrote past that point: no rewound or duplicated steps."""

    def __init__(self, folder: Path, cfg: Config, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.cfg = cfg
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step or None)

    def epoch(self, epoch: int, step: int, metrics: dict, step_losses: list[tuple[int, float]]) -> None:
        """An epoch's metrics at its last step; the training-loss points at their own steps."""
        w = self.writer
        for s, loss in step_losses:
            w.add_scalar("loss/train_steps", loss, s)
        for key, value in metrics.items():
            tag = TAGS.get(key) or (f"norms/{key}" if key.startswith(("grad_norm_", "weight_norm_")) else None)
            if tag is not None:
                w.add_scalar(tag, value, step)
        w.add_scalar("epoch", epoch, step)
        w.flush()

    def finish(self, result) -> None:
        """Written when a run ends (finished, early-stopped, preempted)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_events(folder: Path, cfg: Config, start_step: int, log: Callable[[str], None]) -> Optional[EventLog]:
    """The run's event log, or None (with a note) when the tensorboard package is not installed."""
    try:
        return EventLog(folder, cfg, start_step)
    except ImportError:
        log("note: the tensorboard package is not installed: no TensorBoard event files (pip install tensorboard)")
        return None
