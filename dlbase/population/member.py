"""One member of a population: its run's record (training/runrecord.py's RunRecord, as a single run keeps it) and
what the population keeps for it besides, and what it returns for it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dlbase.core.augment import Augmenter
from dlbase.core.data import Batcher, DeviceSplit
from dlbase.training.progress import RunResult
from dlbase.training.runrecord import RunRecord


@dataclass
class MemberResult(RunResult):
    """A RunResult, plus what the population measured: peak memory per member (bytes; on CUDA the allocator's
    peak over the members, on the CPU the stacked state and one step's activations) and the population size."""
    peak_bytes: int = 0
    population: int = 1


@dataclass(kw_only=True)
class Member(RunRecord):
    """A RunRecord (config, folder, rows, monitor, events, status), and the member's own side of the step."""
    model: torch.nn.Module  # its own model: the stacked weights are copied in at boundaries (validation, checkpoints)
    optimizer: torch.optim.Optimizer  # its own torch optimiser, only to write its state in torch's format
    batcher: Batcher
    val: Optional[DeviceSplit]
    torch_rng: torch.Tensor  # the global RNG state a lone run of this config holds after building its model
    epoch_rng: Optional[torch.Tensor] = None
    epochs_done: int = 0
    steps_done: int = 0
    fold: Optional[tuple[int, int]] = None  # (k, K): its cross-validation fold, recorded in its checkpoints
    train_seconds: float = 0.0  # its share of the population's training steps (their time / members in them)
    augmenter: Optional[Augmenter] = None  # train.augment with its own generator, as its lone run's (None: off)
    metrics: Optional[dict] = None  # its last epoch end's metrics (numbers): what search in a population ranks
