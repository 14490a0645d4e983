"""Run folders and the one atomic write that every run file goes through (checkpoints, metrics.csv,
config.yaml, plots' data, sweep files): temp file in the same folder, fsync, os.replace, fsync of the folder."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dlbase.core.errors import CheckpointError

# seconds: the whole epoch (training, validation, checkpoints); train_seconds: the training steps alone
METRICS_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "train_seconds")
CLAIM = ".dlbase-run"  # created with O_EXCL in a run folder: whoever creates it owns the folder
# any of these in a folder means a run lives there (also runs from before the claim file existed)
RUN_FILES = (CLAIM, "last.ckpt", "best.ckpt", "init.ckpt", "metrics.csv", "config.yaml", "curves.png", "gradnorms.png")


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


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str], what: str = "file") -> None:
    """Write data to path so that a crash at any instant leaves the old file or the new one, never part of one.

    A failure (full disk, read-only folder, a directory in the way) is one CheckpointError naming the path;
    the temp file is removed and whatever was at path before is untouched."""
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # OSError, or an interrupt: never leave a temp file behind
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{path}: cannot write {what}: {e.strerror or e}; the files already on disk are "
                              f"untouched") from None
    _fsync_dir(path.parent)


def has_run(folder: Path) -> bool:
    """Does a run (finished, running or broken off) live in folder? Any dlbase run file says so."""
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def _claim(folder: Path) -> bool:
    """Atomically make folder ours: create it if needed, then its claim file with O_EXCL. False: taken."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if has_run(folder):
            return False
        fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False  # another process claimed it between our look and our create
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir: cannot write to {folder}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(f"pid {os.getpid()}\n")
    return True


def new_run_dir(parent: Union[str, os.PathLike], name: str) -> Path:
    """Claim <parent>/<name>/, or <name>-2, -3, ... when a run already lives there: never share, never
    overwrite. Two processes started together get two folders."""
    base = Path(parent).expanduser() / name
    folder, k = base, 1
    while not _claim(folder):
        k += 1
        folder = base.with_name(f"{name}-{k}")
    return folder


def claim_existing(folder: Path) -> None:
    """Mark a folder given by the caller (a sweep's trial) as a run's, if nobody has yet."""
    try:
        fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
    except OSError:
        pass


def check_writable(folder: Path, what: str = "checkpoint.dir") -> None:
    """Create folder and prove a file can be written there, before any training time is spent; what: the key or
    option that named it, for the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{what}: cannot write to {folder}: {e.strerror or e}") from None


def remove_if_empty(folder: Path) -> None:
    """Give back a run folder that never got past start-up (only our claim file in it)."""
    try:
        if {p.name for p in folder.iterdir()} <= {CLAIM}:
            (folder / CLAIM).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass


def write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.csv: the fixed columns, then whatever per-layer columns the rows carry."""
    # per-layer norms, and the curvature of the epochs that measured it, in the order they first appear
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in METRICS_FIELDS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*METRICS_FIELDS, *extra], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue(), "metrics")


def metrics_row(epoch: int, step: int, m: dict) -> dict:
    """One row of metrics.csv from an epoch's metrics (numbers)."""
    def f(key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else ""
    return {"epoch": epoch, "step": step, "train_loss": f("train_loss", ".6f"), "val_loss": f("val_loss", ".6f"),
            "val_accuracy": f("val_accuracy", ".6f"), "lr": f("lr", ".6g"), "seconds": f("seconds", ".3f"),
            "train_seconds": f("train_seconds", ".4f"), **({"train_ce": f("train_ce", ".6f")} if "train_ce" in m else {}),
            **{k: format(v, ".6g") for k, v in m.items() if k.startswith(("grad_norm_", "weight_norm_", "hessian_"))}}


def number(text: Any) -> Optional[float]:
    """A metrics.csv (or JSON) cell as a finite float, or None (empty, text, nan, inf)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_metrics(path: Path, upto_epoch: Optional[int] = None) -> list[dict]:
    """The rows of metrics.csv with a whole-number epoch (up to upto_epoch); [] when there is none."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if str(r.get("epoch") or "").isdigit()]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [r for r in rows if upto_epoch is None or int(r["epoch"]) <= upto_epoch]


def quote(path: Union[str, os.PathLike]) -> str:
    """A path as a shell word, for the commands we print (folders may hold spaces)."""
    return shlex.quote(str(path))


def cell(v: Any) -> str:
    """A value as one short table cell: '-' for none, 4 significant digits, a list or mapping as compact JSON
    (`dlbase runs`, a sweep's results table and its changed-key messages)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v).replace(" ", "")
    return str(v)


def folder_list(folders: Sequence[Path], show: int = 4) -> str:
    """Folders for one line: all of a few; of many, the first and last few, the count and their parent."""
    if len(folders) <= 2 * show:
        return ", ".join(str(f) for f in folders)
    parents = {f.parent for f in folders}
    where = f" in {next(iter(parents))}" if len(parents) == 1 else ""
    return (", ".join(str(f.name if where else f) for f in folders[:show]) + ", ..., "
            + ", ".join(str(f.name if where else f) for f in folders[-show:]) + f" ({len(folders)} folders{where})")
