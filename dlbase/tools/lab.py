"""What the insight commands over a finished run share (`dlbase landscape`, `dlbase hessian`): a run folder or
checkpoint resolved to its final and initial checkpoints, a checkpoint's model rebuilt on a device with the data
it was trained on, the first N samples of its splits, and the options' checks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dlbase.core.config import Config
from dlbase.core.data import Dataset, DeviceSplit
from dlbase.core.errors import CheckpointError, DlbaseError
from dlbase.training.runrecord import INIT_CKPT

SPLITS = ("train", "val", "test")


def resolve_run(target: Path) -> tuple[Path, Optional[Path]]:
    """A run folder -> (its best.ckpt, else last.ckpt; its init.ckpt or None); a .ckpt file -> (it, the init.ckpt
    beside it or None). Runs made before init.ckpt existed have none."""
    target = Path(target)
    if target.is_dir():
        final = next((target / n for n in ("best.ckpt", "last.ckpt") if (target / n).is_file()), None)
        if final is None:
            raise CheckpointError(f"{target}: no best.ckpt or last.ckpt in this folder; give a run folder of dlbase "
                                  f"train or a .ckpt file")
    elif target.exists():
        final = target
    else:
        raise CheckpointError(f"{target}: no such run folder or checkpoint")
    init = final.parent / INIT_CKPT
    return final, (init if init.is_file() else None)


@dataclass
class Loaded:
    """A checkpoint's config, model (on the device, eval mode) and payload, and the data it was trained on."""
    path: Path
    cfg: Config
    model: nn.Module
    payload: dict
    data: Dataset


def load(ckpt: Path, device: torch.device, data_root: Optional[Path] = None) -> Loaded:
    from dlbase.training.evaluate import checkpoint_data
    from dlbase.training.state import load_for_eval

    cfg, model, payload = load_for_eval(ckpt, device)
    model.eval()
    return Loaded(Path(ckpt), cfg, model, payload, checkpoint_data(ckpt, cfg, payload, device, data_root))


def load_weights(into: Loaded, ckpt: Path) -> dict[str, torch.Tensor]:
    """Another checkpoint's state dict (init.ckpt's), checked to fit into's model, on its device."""
    from dlbase.training import checkpoint

    state = checkpoint.strip_prefixes(checkpoint.load(ckpt)["model"])
    mine = into.model.state_dict()
    if state.keys() != mine.keys() or any(state[k].shape != mine[k].shape for k in mine):
        raise CheckpointError(f"{ckpt}: its weights do not have the shapes of {into.path}'s model")
    return {k: v.to(mine[k].device) for k, v in state.items()}


def parse_splits(text: Optional[str], data: Dataset) -> list[str]:
    """--split a,b: names from SPLITS; None: train and val (val only where the run has one)."""
    if text is None:
        return ["train", "val"] if data.val is not None else ["train"]
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise DlbaseError(f"--split: {text!r}: unknown split {bad[0] if bad else '(none)'}; allowed: a comma-separated "
                          f"list of {', '.join(SPLITS)}")
    for s in names:
        data.split(s)  # a run without a validation split refuses val in one line
    return list(dict.fromkeys(names))


def first(split: DeviceSplit, n: int) -> DeviceSplit:
    """The split's first n samples (all of them when it has fewer)."""
    return DeviceSplit(split.x[:n], split.y[:n])


def check_range(option: str, value, lo, hi) -> None:
    if not lo <= value <= hi:
        raise DlbaseError(f"{option}: {value} is out of range; allowed: {lo} to {hi}")


def device_of(spec: str) -> torch.device:
    from dlbase.training.engine import resolve_device
    return resolve_device(spec)


def default_out(final: Path, out: Optional[Path]) -> Path:
    """--out, else the checkpoint's own folder."""
    return Path(out) if out is not None else final.parent

