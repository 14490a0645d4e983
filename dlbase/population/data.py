"""A population's data: the training set (the subset) once on the device, normalised once, from which every member
gathers its batches by index, and each member's training indices and validation split, cut exactly as a lone
run cuts them (dlbase/core/data.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dlbase.core.config import Config
from dlbase.core.data import DeviceSplit, normalize, split_indices
from dlbase.core.idx import read_checked
from dlbase.core.errors import DataError


@dataclass
class PopulationData:
    """The training set (the subset), once on the device, normalised once: x (N, D), y (N,); members gather
    their batches from it by index. test: the test split."""
    x: torch.Tensor
    y: torch.Tensor
    test: DeviceSplit
    input_shape: tuple[int, int]
    folder: Path

    def member_split(self, cfg: Config, fold: Optional[tuple[int, int]]) -> tuple[torch.Tensor, Optional[DeviceSplit]]:
        """Member cfg's training indices (N_k,) into x, on the device, and its validation split: cut exactly as
        load_dataset cuts them when the member trains alone (its seed, data.val_size or its fold)."""
        n = self.x.shape[0]
        if fold is None and cfg.data.val_size >= n:
            raise DataError(f"data.val_size: {cfg.data.val_size} leaves no training samples out of {n}"
                            f"{' (data.subset)' if cfg.data.subset is not None else ''}; use a value below {n}")
        train_idx, val_idx = split_indices(n, cfg.seed, cfg.data.val_size, fold)
        if train_idx is None:
            return torch.arange(n, device=self.x.device), None
        val_idx = val_idx.to(self.x.device)
        return train_idx.to(self.x.device), DeviceSplit(self.x.index_select(0, val_idx), self.y.index_select(0, val_idx))


def load_population_data(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> PopulationData:
    """Read and check the files of cfg.data once; the (subset of the) training set and the test set to the device."""
    folder, train, test = read_checked(cfg.data)
    x, y = train.images, train.labels
    if cfg.data.subset is not None:
        x, y = x[:cfg.data.subset], y[:cfg.data.subset]
    h, w = train.images.shape[1:]
    return PopulationData(normalize(x.reshape(x.shape[0], h * w).to(device), dtype), y.to(device),
                          DeviceSplit(normalize(test.images.reshape(-1, h * w).to(device), dtype),
                                      test.labels.to(device)),
                          (int(h), int(w)), folder)
