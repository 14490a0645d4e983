"""`dlbase runs`: every run folder under a folder (sweep trials and folds included), what became of it, and the
hyperparameters that set it apart from the others. Read from the run's files only; a broken folder is a row."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.errors import CheckpointError, DlbaseError

STATUSES = ("finished", "early-stopped", "pruned", "preempted", "diverged", "unfinished", "broken")
STATUS_FILE = "status.json"  # written by train.py when a run ends: {"status": ..., "step": N} (see the note below)
RESULT_FILE = "result.json"  # a sweep trial's row (dlbase/search/sweep.py): "diverged" lives there
WINNER_FILE = "winner.json"  # a sweep's test of its winner (dlbase/search/results.py)
NOT_HPARAMS = ("name", "checkpoint.dir")  # where a run's files go, not what it learns (as sweep.WHERE_KEYS)
COLUMNS = ("name", "status", "epochs", "best_val_accuracy", "test_accuracy", "train_seconds")
HEADERS = {"name": "run", "status": "status", "epochs": "epochs", "best_val_accuracy": "best val acc",
           "test_accuracy": "test acc", "train_seconds": "train s"}
DESCENDING = ("best_val_accuracy", "test_accuracy")  # --sort by these puts the best first


@dataclass
class Run:
    name: str  # the folder, relative to the folder listed
    status: str  # one of STATUSES
    epochs: Optional[int] = None
    step: Optional[int] = None
    best_val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    train_seconds: Optional[float] = None
    reason: Optional[str] = None  # why broken (or what else is odd about the folder)
    config: dict = field(default_factory=dict)  # flat dotted keys


def find_runs(root: Path) -> list[Path]:
    """Every folder under root (root itself included) where a run lives, in path order; hidden folders and
    symbolic links to folders are not followed, a folder that cannot be listed is passed over (as os.walk with
    onerror ignoring), and so is one whose files' paths are too long for the system (PATH_MAX). An explicit
    stack, not os.walk: Python 3.11's os.walk recurses once per level, and a tree 1,000 folders deep raised
    RecursionError and lost the whole listing."""
    found, todo = [], [Path(root)]
    while todo:
        here = todo.pop()
        try:
            with os.scandir(here) as entries:
                subs = sorted(e.name for e in entries if not e.name.startswith(".") and _real_folder(e))
            if rundir.has_run(here):
                found.append(here)
        except OSError:  # ENAMETOOLONG for a file in a folder just short of PATH_MAX, too
            continue
        todo.extend(here / name for name in reversed(subs))  # popped first to last: path order
    return found


def _real_folder(entry: os.DirEntry) -> bool:
    """A folder, not a symbolic link to one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def read_run(folder: Path, root: Path, winners: dict[Path, float]) -> Run:
    """One run folder as a Run; any failure to read it is status 'broken' with the reason, never an exception."""
    name = str(folder.relative_to(root)) if folder != root else "."
    try:
        return _read(folder, name, winners)
    except Exception as e:  # noqa: BLE001 - a hostile folder (RecursionError, MemoryError, ...) is one broken row
        return Run(name, "broken", reason=f"{type(e).__name__}: {e}" if not isinstance(e, DlbaseError) else str(e))


def _read(folder: Path, name: str, winners: dict[Path, float]) -> Run:
    rows = rundir.read_metrics(folder / "metrics.csv")
    accs = [a for a in (rundir.number(r.get("val_accuracy")) for r in rows) if a is not None]
    seconds = [s for s in (rundir.number(r.get("train_seconds")) for r in rows) if s is not None]
    run = Run(name, "unfinished", best_val_accuracy=max(accs) if accs else None,
              train_seconds=round(sum(seconds), 3) if seconds else None)
    payload, problems, found = None, [], []
    for rank, n in enumerate(("last.ckpt", "best.ckpt")):  # each loaded once: the load is most of the time
        path = folder / n
        if not path.exists():
            continue
        try:
            p = checkpoint.load(path)
            found.append((p["step"], -rank, p))
        except CheckpointError as e:  # a checkpoint that does not load is worth a note even when the other does
            problems.append(str(e))
    if problems and not found:
        return Run(name, "broken", reason="; ".join(problems))
    if found:
        payload = max(found, key=lambda t: (t[0], t[1]))[2]  # the newest, as checkpoint.newest picks it
    raw = payload["config"] if payload is not None else _config_yaml(folder)
    if isinstance(raw, dict):
        run.config = _flat(raw)
    if payload is not None:
        run.epochs, run.step = int(payload["epoch"]), int(payload["step"])
        run.status = _status_from_checkpoint(payload, raw if isinstance(raw, dict) else {})
    elif rows:
        run.epochs = int(rows[-1]["epoch"])
    marker = _json(folder / STATUS_FILE)
    said = marker.get("status") if isinstance(marker, dict) else None
    if said in ("preempted", "finished", "early_stopped", "pruned") and payload is None:
        return Run(name, "broken", reason=f"{STATUS_FILE} says {said} but neither last.ckpt nor best.ckpt is there",
                   epochs=run.epochs, best_val_accuracy=run.best_val_accuracy, train_seconds=run.train_seconds,
                   config=run.config)
    # a marker of this position only (a resumed run's stale one is older); diverged ends a run after its newest
    # checkpoint, so a later step counts for it too
    step = marker.get("step") if isinstance(marker, dict) else None
    if said in ("preempted", "diverged", "finished", "early_stopped", "pruned") and (
            run.step is None or step in (None, run.step)
            or (said == "diverged" and isinstance(step, int) and step > run.step)):
        run.status = str(said).replace("_", "-")
    if _diverged_in_sweep(folder):
        run.status = "diverged"
    run.test_accuracy = _test_accuracy(folder, winners)
    if problems:
        run.reason = "; ".join(problems)
    return run


def _status_from_checkpoint(payload: dict, cfg: dict) -> str:
    """finished, early-stopped or unfinished, from where the run's newest checkpoint stands against its config."""
    train = cfg.get("train") or {}
    spe = int(payload["steps_per_epoch"])
    total = train.get("max_steps") or (train.get("epochs") or 0) * spe
    if payload["step"] >= total and "in_epoch" not in payload:
        return "finished"
    best, patience = payload.get("best") or {}, (train.get("early_stop") or {}).get("patience")
    if patience is not None and "in_epoch" not in payload and best.get("bad_epochs", 0) >= patience:
        return "early-stopped"
    return "unfinished"


def _diverged_in_sweep(folder: Path) -> bool:
    """A sweep records a diverged trial in its result.json (the trial's folder, or its parent for a fold)."""
    row = _json(folder / RESULT_FILE)
    if isinstance(row, dict):
        return row.get("status") == "diverged"
    row = _json(folder.parent / RESULT_FILE)
    if isinstance(row, dict) and row.get("status") == "diverged" and folder.name.startswith("fold-"):
        return str(row.get("error", "")).endswith(f"(fold {folder.name[5:]})")
    return False


def _test_accuracy(folder: Path, winners: dict[Path, float]) -> Optional[float]:
    """What `dlbase eval` measured on the test split (best.ckpt's first, then last.ckpt's), or the sweep's test
    of its winner when this folder holds the winner's checkpoint."""
    record = _json(folder / "eval.json")
    if isinstance(record, dict):
        for name in ("best.ckpt", "last.ckpt", *sorted(record)):
            acc = rundir.number(((record.get(name) or {}).get("test") or {}).get("accuracy")
                       if isinstance(record.get(name), dict) else None)
            if acc is not None:
                return acc
    return winners.get(folder.resolve())


def _sweep_winners(runs: list[Path]) -> dict[Path, float]:
    """The test accuracy each sweep's winner.json measured, by the folder of the checkpoint it tested."""
    out = {}
    for parent in {p.parent for p in runs} | {p.parent.parent for p in runs}:
        w = _json(parent / WINNER_FILE)
        if isinstance(w, dict) and isinstance(w.get("checkpoint"), str) and rundir.number(w.get("test_accuracy")) is not None:
            out[Path(w["checkpoint"]).parent.resolve()] = float(w["test_accuracy"])
    return out


def list_runs(root: Path, sort: Optional[str] = None) -> tuple[list[Run], list[str]]:
    """The runs under root and the hyperparameters (dotted keys) whose values differ between them.
    DlbaseError when root is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise DlbaseError(f"{root}: no such folder; give the folder that holds run folders (checkpoint.dir)")
    if not root.is_dir():
        raise DlbaseError(f"{root}: not a folder; give the folder that holds run folders (checkpoint.dir)")
    folders = find_runs(root)
    winners = _sweep_winners(folders)
    runs = [read_run(f, root, winners) for f in folders]
    keys = differing_keys([r.config for r in runs if r.config])
    if sort is not None:
        runs = sort_runs(runs, sort, keys)
    return runs, keys


def differing_keys(configs: list[dict]) -> list[str]:
    """Dotted keys whose value is not the same in every config (absent counts as a value), NOT_HPARAMS aside."""
    keys = sorted({k for c in configs for k in c} - set(NOT_HPARAMS))
    return [k for k in keys
            if len({json.dumps(c[k], sort_keys=True, default=str) if k in c else "<absent>" for c in configs}) > 1]


def sort_runs(runs: list[Run], key: str, hparams: list[str]) -> list[Run]:
    """By a column (accuracies best first, the others ascending) or a hyperparameter; runs without it last."""
    columns = (*COLUMNS, "step")
    if key not in columns and key not in hparams:
        raise DlbaseError(f"--sort: {key!r} is not a column; sort by one of {', '.join(columns)}"
                          + (f", or a hyperparameter that differs: {', '.join(hparams)}" if hparams else ""))

    def value(r: Run) -> Any:
        return getattr(r, key) if key in columns else r.config.get(key)
    have = [r for r in runs if value(r) is not None]
    have.sort(key=lambda r: (0, value(r)) if isinstance(value(r), (int, float)) else (1, str(value(r))),
              reverse=key in DESCENDING)
    return have + [r for r in runs if value(r) is None]


def as_json(run: Run, keys: list[str]) -> dict:
    """One run as the JSON object `dlbase runs --json` prints: its columns and its differing hyperparameters."""
    d = asdict(run)
    d.pop("config")
    d["hparams"] = {k: run.config.get(k) for k in keys}
    return _finite(d)


def _finite(v: Any) -> Any:
    """v with every non-finite float (a hand-edited .nan, inf) as None: JSON has no NaN, json.dumps would write it."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


NAME_WIDTH = 60  # a run's name longer than this is shown with its middle elided, so one deep folder widens no row


def _short(name: str) -> str:
    if len(name) <= NAME_WIDTH:
        return name
    keep = NAME_WIDTH - 1
    return name[:keep // 2] + "…" + name[-(keep - keep // 2):]


def table(runs: list[Run], keys: list[str]) -> str:
    """The runs as aligned text columns, one line each; a broken run's reason follows its line."""
    head = [HEADERS[c] for c in COLUMNS] + keys
    lines = [[_short(r.name), r.status, rundir.cell(r.epochs), _pct(r.best_val_accuracy), _pct(r.test_accuracy),
              rundir.cell(r.train_seconds)] + [rundir.cell(r.config.get(k)) if r.config else "" for k in keys] for r in runs]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    for r, cells in zip(runs, lines):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out.append(line + (f"  ({r.reason})" if r.reason else ""))
    return "\n".join(out)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"



def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _config_yaml(folder: Path) -> Optional[dict]:
    """A run's config.yaml as a dict (a run killed before its first checkpoint has nothing else)."""
    import yaml
    try:
        raw = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    except RecursionError:
        raise DlbaseError(f"{folder / 'config.yaml'}: nested too deep to read") from None
    return raw if isinstance(raw, dict) else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
