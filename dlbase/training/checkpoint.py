"""Checkpoint files: what they hold (Payload, FORMAT_VERSION), save() atomically, load() safely (weights_only)
and checked, newest() of a run folder."""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, TypedDict

import torch

from dlbase.core.errors import CheckpointError
from dlbase.core.rundir import write_atomic

FORMAT_VERSION = 1
MAX_INPUT_PIXELS = 1 << 20  # an input_shape above this (a 1024x1024 image) is not a dlbase checkpoint's


class InEpoch(TypedDict):
    """Where a mid-epoch checkpoint stopped inside its epoch."""
    batch: int  # batches of the epoch already trained
    loss_sum: float  # their summed per-sample loss (all ranks')
    ce_sum: float  # their summed plain cross-entropy (with label smoothing; 0 otherwise); absent in older files


class Best(TypedDict):
    """The monitor's state: the metric that picks best.ckpt, its best value and epoch, early stopping's count."""
    metric: str
    value: float
    epoch: int
    bad_epochs: int


class _Required(TypedDict):
    """What a .ckpt file holds (format 1): plain values and tensors only, so weights_only loading opens it.
    Every reader (train, eval, sweep, export) reads these names; load() checks each one's type and size."""
    format_version: int  # FORMAT_VERSION
    config: dict  # the resolved config (config.to_dict)
    input_shape: list  # [height, width] of the images trained on
    model: dict  # state_dict, CPU tensors, no _orig_mod./module. prefixes
    optimizer: dict  # torch optimizer state_dict
    epoch: int  # completed epochs
    step: int  # optimiser steps taken
    steps_per_epoch: int  # at the batch size it was trained with
    metrics: dict  # the epoch's metrics ({} mid-epoch)
    best: Best
    rng: dict  # torch (CPU), batcher (the data order's generator; mid-epoch: at the epoch's start), cuda


class Payload(_Required, total=False):
    __doc__ = _Required.__doc__
    in_epoch: InEpoch  # only in a mid-epoch checkpoint
    fold: list  # [k, K]: a cross-validation fold's run, trained on all but part k of K (0-based); absent otherwise


def fold_of(payload: dict) -> "tuple[int, int] | None":
    """The cross-validation fold (k, K) a checkpoint was trained on, None for a plain run (load() checked it)."""
    fold = payload.get("fold")
    return None if fold is None else (int(fold[0]), int(fold[1]))


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problems(p: dict) -> Iterator[str]:
    """What is wrong with a payload's structure, types and sizes (format 1), one phrase each."""
    missing = [k for k in Payload.__required_keys__ if k not in p]
    if missing:
        yield f"missing {', '.join(sorted(missing))}"
        return
    if not isinstance(p["config"], dict):
        yield "config is not a mapping"
    shape = p["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(s, 1) for s in shape)):
        yield f"input_shape {shape!r} is not [height, width]"
    elif shape[0] * shape[1] > MAX_INPUT_PIXELS:
        yield f"input_shape {list(shape)} is over {MAX_INPUT_PIXELS} pixels"
    if not isinstance(p["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in p["model"].items()):
        yield "model is not a state dict of tensors"
    opt = p["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) for g in opt["param_groups"])):
        yield "optimizer is not an optimizer state dict"
    for key, lo in (("epoch", 0), ("step", 0), ("steps_per_epoch", 1)):
        if not _is_int(p[key], lo):
            yield f"{key} {p[key]!r} is not an integer >= {lo}"
    if not isinstance(p["metrics"], dict) or not all(_is_num(v) for v in p["metrics"].values()):
        yield "metrics is not a mapping of numbers"
    best = p["best"]
    if not (isinstance(best, dict) and isinstance(best.get("metric"), str) and _is_num(best.get("value"))
            and _is_int(best.get("epoch")) and _is_int(best.get("bad_epochs", 0))):
        yield "best is not {metric, value, epoch, bad_epochs}"
    rng = p["rng"]
    if not (isinstance(rng, dict) and all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8
                                          for k in ("torch", "batcher"))):
        yield "rng does not hold the torch and batcher generator states"
    if "fold" in p:
        f = p["fold"]
        if not (isinstance(f, (list, tuple)) and len(f) == 2 and _is_int(f[0]) and _is_int(f[1], 2) and f[0] < f[1]):
            yield f"fold {f!r} is not [k, K] with 0 <= k < K"
    if "in_epoch" in p:
        ie = p["in_epoch"]
        if not (isinstance(ie, dict) and _is_int(ie.get("batch"), 1) and _is_num(ie.get("loss_sum"))):
            yield "in_epoch is not {batch, loss_sum}"
        elif _is_int(p["steps_per_epoch"], 1) and ie["batch"] >= p["steps_per_epoch"]:
            yield f"in_epoch.batch {ie['batch']} is not inside an epoch of {p['steps_per_epoch']} steps"


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's `_orig_mod.` and DDP's `module.` prefixes so any build of the model loads it."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def save(path: str | os.PathLike, payload: Payload) -> None:
    """Write payload to path atomically (rundir.write_atomic): a crash at any moment leaves either the old file
    or the new one, never a partial one."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)  # serialise in memory first: a full disk then fails a plain write with ENOSPC
    write_atomic(path, buf.getvalue(), "checkpoint")


def load(path: str | os.PathLike) -> Payload:
    """Read a dlbase checkpoint with torch.load(weights_only=True): tensors and plain values, never code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .ckpt file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files we refuse anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|[Uu]nsupported global: GLOBAL ([\w.]+)", str(e))
        if found or "global" in str(e).lower():
            name = next((g for g in found.groups() if g), "") if found else ""
            raise CheckpointError(f"{path}: refused: it asks to import {name or 'a Python object'}, which could "
                                  f"run code when loaded; dlbase checkpoints hold only tensors and plain "
                                  f"values") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file of tensors and plain "
                              f"values)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError,
            AttributeError, IndexError, OverflowError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                              f"{first[:200]})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not a dlbase checkpoint (no format_version)")
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this dlbase reads "
                              f"({FORMAT_VERSION}); upgrade dlbase")
    if version < 1:
        raise CheckpointError(f"{path}: format_version {version} is not a dlbase format")
    problem = next(_problems(payload), None)
    if problem is not None:
        raise CheckpointError(f"{path}: not a complete dlbase checkpoint ({problem})")
    if "fold" not in payload:
        fold = _fold_from_layout(path)
        if fold is not None:
            payload["fold"] = list(fold)
    return payload  # type: ignore[return-value]


def _fold_from_layout(path: Path) -> "tuple[int, int] | None":
    """The fold of a checkpoint written before checkpoints carried it: <sweep>/trial-NNN/fold-N/*.ckpt, with
    cv_folds in <sweep>/sweep.yaml. None for any other place."""
    run = path.parent
    found = re.fullmatch(r"fold-([1-9][0-9]*)", run.name)
    if found is None or not re.fullmatch(r"trial-[0-9]{3,}", run.parent.name):
        return None
    try:
        import yaml
        record = yaml.safe_load((run.parent.parent / "sweep.yaml").read_text())
        folds = record.get("cv_folds") if isinstance(record, dict) else None
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None
    k = int(found.group(1)) - 1
    return (k, folds) if _is_int(folds, 2) and k < folds else None


def newest(folder: Path) -> tuple[Path, Payload]:
    """The readable checkpoint in a run folder that is furthest along (by step; last.ckpt wins a tie), and its
    payload: after a kill at any instant, one of last.ckpt and best.ckpt is whole."""
    found: list[tuple[int, int, Path, Payload]] = []
    errors = []
    for rank, name in enumerate(("last.ckpt", "best.ckpt")):
        path = folder / name
        if not path.exists():
            continue
        try:
            payload = load(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        found.append((payload["step"], -rank, path, payload))
    if not found:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise CheckpointError(f"{folder}: no readable checkpoint (last.ckpt or best.ckpt) to resume from{why}")
    _, _, path, payload = max(found, key=lambda t: (t[0], t[1]))
    return path, payload
