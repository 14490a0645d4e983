"""Checkpoint files: save() atomically, load() safely (weights_only), FORMAT_VERSION."""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from dlbase.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model", "input_shape", "epoch", "step")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's `_orig_mod.` and DDP's `module.` prefixes so any build of the model loads it."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not let a directory be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write payload to path atomically: a temp file in the same folder, fsync, os.replace, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buf = io.BytesIO()
    torch.save(payload, buf)  # serialise in memory first: a full disk then fails a plain write with ENOSPC
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # OSError (disk full, permissions) or an interrupt: never leave a temp file
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{path}: cannot write checkpoint: {e.strerror or e}; "
                              f"the previous checkpoints are untouched") from None
    _fsync_dir(path.parent)


def load(path: str | os.PathLike) -> dict[str, Any]:
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
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a complete dlbase checkpoint (missing {', '.join(missing)})")
    if not isinstance(payload["model"], dict) or not all(isinstance(v, torch.Tensor)
                                                         for v in payload["model"].values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    return payload
