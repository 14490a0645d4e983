"""A sweep's folder: sweep.yaml (what makes the sweep this sweep, and its resolved base config), each trial's
result.json, and the checks, before any trial runs, that a rerun resumes only the same sweep, from the same base
config, reusing no result or checkpoint that another config trained. Every function takes the Sweep
(dlbase/search/sweep.py) it checks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from dlbase.core import rundir
from dlbase.core.config import Config, to_dict
from dlbase.core.errors import ConfigError
from dlbase.search.spec import changed_keys
from dlbase.training import checkpoint

RESULT_FILE = "result.json"  # a finished (or diverged) trial's row and resolved config: reruns reuse it


def check_folder(sweep) -> None:
    """The folder is writable and holds this sweep or none. Writes nothing: sweep.yaml is written once every
    check passed (write_record), so a refused rerun leaves it as it was."""
    rundir.check_writable(sweep.root)  # checkpoint.dir read-only, or a file: one line now, not a traceback later
    record = sweep.record()
    stored = sweep.root / "sweep.yaml"
    if stored.exists():  # a rerun resumes only the same sweep: trials are named by their slot in it
        try:
            before = yaml.safe_load(stored.read_text())
        except yaml.YAMLError:
            before = None
        if not isinstance(before, dict) or any(before.get(k) != v for k, v in record.items()):
            changes = (changed_keys({k: before.get(k) for k in record}, record) if isinstance(before, dict)
                       else ["unreadable"])
            raise ConfigError(f"{stored}: this folder holds another sweep ({_shown(changes)}); give the new one "
                              f"another name (sweep name: or --set checkpoint.dir=...), or delete {sweep.root}")


def check_base(sweep, study) -> None:
    """The study was made from this base config (and --set), on this machine or another sharing it."""
    from dlbase.search.study import hide_password

    stored = study.base
    changes = changed_keys(stored, sweep.base_record()) if isinstance(stored, dict) else []
    if changes:
        where = (f"{sweep.root / 'study.db'}" if not sweep.storage_text else
                 f"--storage {hide_password(study.url)}")
        redo = (f"delete {rundir.quote(sweep.root)}" if not sweep.storage_text else
                f"delete the study (optuna delete-study --study-name {sweep.spec.name})")
        raise ConfigError(f"{where}: study {sweep.spec.name!r} was made from another base config than "
                          f"{sweep.source} and --set give now ({_shown(changes)}); to keep both, give this sweep "
                          f"another name (sweep name: or --set checkpoint.dir=...); to redo it, {redo}")


def write_record(sweep) -> None:
    rundir.write_atomic(sweep.root / "sweep.yaml",
                        yaml.safe_dump({"base": sweep.source, **sweep.record(), "base_config": sweep.base_record()},
                                       sort_keys=False), "sweep.yaml")


def check_trials(sweep, study) -> None:
    """Refuse a trial folder here whose result or checkpoint came from another config than its slot's
    values give now (the base config or --set changed)."""
    for folder in sorted(sweep.root.glob("trial-[0-9][0-9][0-9]*")):
        try:
            slot = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        values = study.params_of(slot)
        if values is None:
            continue
        cfg = sweep.config_for(values, slot)
        done = folder / RESULT_FILE
        if done.exists():
            try:
                row = json.loads(done.read_text())
            except ValueError:
                raise ConfigError(f"{done}: unreadable; delete it and rerun to redo {cfg.name}") from None
            stored = row["config"] if "config" in row else _config_yaml(folder)
            refuse_if_changed(sweep, done, stored, cfg, sweep.root)
            continue
        for run in ([folder / f"fold-{f + 1}" for f in range(sweep.folds)] if sweep.spec.cv_folds else [folder]):
            if (run / "last.ckpt").exists():  # an interrupted trial goes on from here: with its own config only
                refuse_if_changed(sweep, run / "last.ckpt", checkpoint.load(run / "last.ckpt")["config"], cfg,
                                  sweep.root)


def refuse_if_changed(sweep, path: Path, stored: Optional[dict], cfg: Config, redo: Path) -> None:
    """A result or checkpoint is reused only if its whole resolved config is the one cfg resolves to now."""
    changes = changed_keys(stored, to_dict(cfg)) if isinstance(stored, dict) else ["no config stored with it"]
    from dlbase.search.pbt import drifting
    changes = [c for c in changes if c.partition(":")[0] not in drifting(sweep.spec)]  # PBT moved them itself
    if changes:
        shown = _shown(changes)
        raise ConfigError(f"{path}: {cfg.name} was trained with another config than {sweep.source} gives it now "
                          f"({shown}); to keep both, give this sweep another name (sweep name: or --set "
                          f"checkpoint.dir=...); to redo it, delete {rundir.quote(redo)}")


def _shown(changes: list[str]) -> str:
    return "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")


def _config_yaml(folder: Path) -> Optional[dict]:
    """A trial's config from its config.yaml (result.json files written before they held the config)."""
    for path in (folder / "config.yaml", folder / "fold-1" / "config.yaml"):
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        return raw if isinstance(raw, dict) else None
    return None
