"""The device-resident dataset (read once through dlbase/core/idx.py, normalised once on the device), its
validation split or cross-validation folds, and its batcher."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from dlbase.core.errors import DataError
from dlbase.core.idx import read_checked


@dataclass
class DeviceSplit:
    """A split resident on the device: x (N, H*W) pixels normalised once to [0, 1] (float32 or bfloat16),
    y (N,) int64 labels."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Dataset:
    train: DeviceSplit
    val: Optional[DeviceSplit]
    test: DeviceSplit
    input_shape: tuple[int, int]
    folder: Path
    fold: Optional[tuple[int, int]] = None  # (k, K): part k of K-fold cross-validation validates; None: val_size

    def split(self, name: str) -> DeviceSplit:
        if name == "val" and self.val is None:
            raise DataError("--split val: this run has no validation split (data.val_size is 0)")
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def fold_indices(n: int, seed: int, fold: int, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of k-fold cross-validation: a seeded permutation cut into `folds` parts;
    part `fold` validates. The parts partition range(n)."""
    parts = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tensor_split(folds)
    return torch.cat([p for j, p in enumerate(parts) if j != fold]).sort().values, parts[fold].sort().values


def split_indices(n: int, seed: int, val_size: int, fold: Optional[tuple[int, int]] = None
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(train, validation) indices into the n (subset) training samples: fold[0] of fold[1] validates
    (cross-validation, val_size does not apply), else val_size seeded samples; (None, None): all train, no val.
    load_dataset and population training (one dataset, many members' splits) both cut the set here."""
    if fold is not None:
        return fold_indices(n, seed, *fold)
    if val_size:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[val_size:].sort().values, perm[:val_size].sort().values
    return None, None


def load_dataset(cfg, seed: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 fold: Optional[tuple[int, int]] = None, phases=None) -> Dataset:
    """Find, check and load a dataset (a DataConfig) onto the device once, normalised once (to `dtype`).

    The files' uint8 pixels travel to the device as uint8 (4x less to copy) and are normalised there, so no
    step ever converts pixels again. The validation split is drawn from the (subset of the) training set by a
    permutation seeded with `seed`. phases: a dlbase.training.phases.Phases that times "data" and "to device".
    """
    timed = phases or (lambda name: contextlib.nullcontext())
    with timed("data"):
        folder, train, test = read_checked(cfg)
        x, y = train.images, train.labels
        if cfg.subset is not None:
            x, y = x[:cfg.subset], y[:cfg.subset]
        n = x.shape[0]
        if fold is None and cfg.val_size >= n:
            raise DataError(f"data.val_size: {cfg.val_size} leaves no training samples out of {n}"
                            f"{' (data.subset)' if cfg.subset is not None else ''}; use a value below {n}")
        h, w = train.images.shape[1:]
        flat = x.reshape(n, h * w)
        train_idx, val_idx = split_indices(n, seed, cfg.val_size, fold)
    with timed("to device"):
        val = None
        if val_idx is not None:
            val = DeviceSplit(normalize(flat[val_idx].to(device), dtype), y[val_idx].to(device))
            flat, y = flat[train_idx], y[train_idx]
        return Dataset(
            train=DeviceSplit(normalize(flat.to(device), dtype), y.to(device)),
            val=val,
            test=DeviceSplit(normalize(test.images.reshape(-1, h * w).to(device), dtype), test.labels.to(device)),
            input_shape=(int(h), int(w)),
            folder=folder,
            fold=fold,
        )


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> p = x / 255 in [0, 1], the model's input, on x's device. (N, D) -> (N, D) dtype."""
    # integers 0-255 are exact in bf16 and fp32, and the division rounds once: no float32 temporary for bf16
    return x.to(dtype).div_(255.0).contiguous()


class Batcher:
    """Shuffled index batches over a device-resident split: one randperm per epoch, a batch is a slice of it.

    The permutation comes from a seeded generator on the data's device, so no host round trip is needed and
    the order is reproducible (and resumable, through the generator's state).
    """

    def __init__(self, n: int, batch_size: int, device: torch.device, seed: int):
        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def perm(self) -> torch.Tensor:
        """This epoch's order: a permutation (N,) of the sample indices, made on the device."""
        return torch.randperm(self.n, generator=self.generator, device=self.device)

    def epoch(self) -> Iterator[torch.Tensor]:
        """Index tensors (B,) covering every sample exactly once; the last batch may be smaller."""
        return iter(self.perm().split(self.batch_size))
