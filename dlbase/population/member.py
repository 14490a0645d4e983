"""One member of a population: what the loop keeps for it (what train()'s Trainer keeps for a single run), and
what it returns for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from dlbase.core.config import Config
from dlbase.core.data import Batcher, DeviceSplit
from dlbase.core.model import MLP
from dlbase.training.state import Monitor
from dlbase.training.train import RunResult


@dataclass
class MemberResult(RunResult):
    """A RunResult, plus what the population measured: peak memory per member (bytes; on CUDA the allocator's
    peak over the members, on the CPU the stacked state and one step's activations) and the population size."""
    peak_bytes: int = 0
    population: int = 1


@dataclass
class Member:
    """One member's own side of the run: what train()'s Trainer keeps for a single run."""
    cfg: Config
    model: MLP  # its own MLP: the stacked weights are copied in at boundaries (validation, checkpoints)
    optimizer: torch.optim.Optimizer  # its own torch optimiser, only to write its state in torch's format
    batcher: Batcher
    val: Optional[DeviceSplit]
    monitor: Monitor
    torch_rng: torch.Tensor  # the global RNG state a lone run of this config holds after building its model
    folder: Path
    on_epoch: Optional[Callable[[int, dict], bool]] = None
    rows: list = field(default_factory=list)
    events: object = None
    status: str = "running"  # running | finished | early_stopped | pruned | preempted | diverged
    epoch_rng: Optional[torch.Tensor] = None
    epochs_done: int = 0
    steps_done: int = 0
    fold: Optional[tuple[int, int]] = None  # (k, K): its cross-validation fold, recorded in its checkpoints
    train_seconds: float = 0.0  # its share of the population's training steps (their time / members in them)
    warned: bool = False  # the vanishing-gradient warning was said
