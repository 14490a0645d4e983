"""Hyperparameter sweeps: grid or random search, optional k-fold cross-validation, resumable, test set once.

Selection uses validation data only (a held-out split, or the folds of the training set); the test set is
evaluated once, for the winner, and reported apart. A diverged trial is a result (failed, ranked last); a trial's
result or checkpoint is reused only while its whole resolved config is unchanged; every file goes through
rundir.write_atomic.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import random
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from dlbase import checkpoint, rundir
from dlbase.config import Config, config_from_dict, parse_yaml, read_config_file, to_dict, to_yaml
from dlbase.errors import ConfigError, DlbaseError, TrainingDiverged

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SWEEP_KEYS = ("name", "method", "trials", "seed", "params", "metric", "mode", "cv_folds")
NAME_RULE = {f.name: f.metadata for f in dataclasses.fields(Config)}["name"]  # a sweep is named like a run


@dataclass(frozen=True)
class SweepSpec:
    """A search space and how to score it."""
    name: str
    method: str = "grid"  # grid | random
    trials: int = 10  # random: how many
    seed: int = 0  # random: the sampler's seed
    params: dict = field(default_factory=dict)  # dotted key -> list of values, or a distribution mapping
    metric: str = "val_accuracy"  # val_accuracy | val_loss
    mode: str = "max"  # max | min
    cv_folds: Optional[int] = None  # k-fold cross-validation on the training set


def _fail(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {msg}")


def parse_spec(raw: Any, source: str, default_name: str) -> SweepSpec:
    """Check a sweep mapping (from --sweep, a `sweep:` section, or --grid) into a SweepSpec."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep must be a mapping with params:, method:, metric:, ...")
    for k in raw:
        if k not in SWEEP_KEYS:
            raise _fail(source, f"sweep.{k}", f"unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise _fail(source, "sweep.method", f"{method!r} is not one of grid, random")
    metric = raw.get("metric", "val_accuracy")
    if metric not in ("val_accuracy", "val_loss"):
        raise _fail(source, "sweep.metric", f"{metric!r} is not one of val_accuracy, val_loss (selection never "
                                            f"looks at the test set)")
    mode = raw.get("mode", "max" if metric == "val_accuracy" else "min")
    if mode not in ("max", "min"):
        raise _fail(source, "sweep.mode", f"{mode!r} is not one of max, min")
    ints = {}
    for key, lo, default in (("trials", 1, 10), ("seed", 0, 0), ("cv_folds", 2, None)):
        v = raw.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo or v > 10**6):
            raise _fail(source, f"sweep.{key}", f"{v!r} is not an integer >= {lo}")
        ints[key] = v
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(source, "sweep.params", "needs at least one dotted key with a list of values or a distribution, "
                                            "e.g. optim.lr: [0.1, 0.01]")
    for key, space in params.items():
        where = f"sweep.params.{key}"
        if isinstance(space, list):
            if not space:
                raise _fail(source, where, "an empty list: give at least one value")
        elif isinstance(space, dict):
            dist = space.get("distribution")
            if dist not in DISTRIBUTIONS:
                raise _fail(source, where, f"distribution {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
            if method == "grid":
                raise _fail(source, where, "a distribution needs method: random (grid takes lists)")
            if dist == "choice":
                if not isinstance(space.get("values"), list) or not space["values"]:
                    raise _fail(source, where, "choice needs values: [a non-empty list]")
            else:
                lo, hi = space.get("low"), space.get("high")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
                    raise _fail(source, where, f"{dist} needs numbers low and high, got low={lo!r}, high={hi!r}")
                if lo >= hi:
                    raise _fail(source, where, f"low ({lo}) must be below high ({hi})")
                if dist == "log_uniform" and lo <= 0:
                    raise _fail(source, where, f"log_uniform needs low > 0, got {lo}")
                if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
                    raise _fail(source, where, "int_uniform needs integer low and high")
        else:
            raise _fail(source, where, f"{space!r} is neither a list of values nor a distribution mapping")
    name = raw.get("name", default_name)
    name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
    if not isinstance(name, str) or not re.fullmatch(NAME_RULE["pattern"], name):  # it names a folder
        raise _fail(source, "sweep.name", f"{name!r} is not allowed; expected {NAME_RULE['allowed']}")
    return SweepSpec(name=name, method=method, trials=ints["trials"], seed=ints["seed"], params=params,
                     metric=metric, mode=mode, cv_folds=ints["cv_folds"])


def parse_grid_option(text: str) -> tuple[str, list]:
    """--grid optim.lr=[0.1,0.01] -> ("optim.lr", [0.1, 0.01])."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--grid {text}: expected KEY=[v1,v2,...], e.g. --grid optim.lr=[0.1,0.01]")
    values = parse_yaml(value, f"--grid {text}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"--grid {text}: the value must be a non-empty list, e.g. [0.1, 0.01]")
    return key.strip(), values


def sample(spec: SweepSpec) -> list[dict]:
    """The trials: the full product (grid) or `trials` seeded draws (random)."""
    keys = list(spec.params)
    if spec.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.params[k] for k in keys))]
    rng = random.Random(spec.seed)
    out = []
    for _ in range(spec.trials):
        trial = {}
        for k in keys:
            space = spec.params[k]
            if isinstance(space, list):
                trial[k] = rng.choice(space)
            elif space["distribution"] == "choice":
                trial[k] = rng.choice(space["values"])
            elif space["distribution"] == "uniform":
                trial[k] = rng.uniform(space["low"], space["high"])
            elif space["distribution"] == "log_uniform":
                trial[k] = math.exp(rng.uniform(math.log(space["low"]), math.log(space["high"])))
            else:
                trial[k] = rng.randint(int(space["low"]), int(space["high"]))
        out.append(trial)
    return out


def trial_config(base_raw: dict, values: dict, name: str, ckpt_dir: str, source: str, sets: list[str],
                 metric: str = "val_accuracy") -> Config:
    """The base config with --set, then the trial's values, validated like any config. The sweep's metric
    also picks each trial's best.ckpt, so a trial's score is its best epoch by that metric."""
    overrides = [*sets, *(f"{k}={json.dumps(v)}" for k, v in values.items()), f"name={name}",
                 f"checkpoint.dir={json.dumps(ckpt_dir)}", f"train.early_stop.metric={metric}"]
    try:
        return config_from_dict(base_raw, source, overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep trial {values}: {e}") from None


def load_sweep(config: Path, sweep: Optional[Path], grids: list[str], sets: list[str]) -> tuple[dict, SweepSpec, str]:
    """(base config mapping without its sweep: section, the spec, the base's source name)."""
    raw = read_config_file(config)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{config}: the top level must be a mapping of keys")
    section = raw.pop("sweep", None)
    base = config_from_dict(raw, str(config), sets)  # the base must be valid on its own
    if sweep is not None:
        spec_raw, source = read_config_file(sweep), str(sweep)
    elif section is not None:
        spec_raw, source = section, f"{config} (sweep:)"
    else:
        spec_raw, source = {"method": "grid", "params": {}}, "--grid"
    if grids:
        spec_raw = dict(spec_raw or {})
        spec_raw["params"] = {**(spec_raw.get("params") or {}), **dict(parse_grid_option(g) for g in grids)}
    return raw, parse_spec(spec_raw, source, f"{base.name[:122]}_sweep"), str(config)


RESULT_FILE = "result.json"  # a finished (or diverged) trial's row and resolved config: reruns reuse it
WHERE_KEYS = ("name", "checkpoint.dir")  # where a run's files go, not what it learns: not compared on reuse


class Sweep:
    """One sweep's folder: every check before any trial runs, then each trial run (or reused), the ranking, and
    the test set once, for the winner. `Sweep(...).run()` returns winner.json's contents."""

    def __init__(self, base_raw: dict, spec: SweepSpec, source: str, sets: list[str],
                 log: Callable[[str], None] = print):
        self.spec, self.source, self.sets, self.log = spec, source, list(sets), log
        self.base = config_from_dict(base_raw, source, sets)
        if self.base.data.val_size == 0 and "data.val_size" not in spec.params:  # not as the metric override's
            where = next((f"--set {t}" for t in sets if t.partition("=")[0].strip() == "data.val_size"), source)
            raise ConfigError(f"{where}: data.val_size: 0 leaves no validation data, and the sweep chooses on "
                              f"{spec.metric} of validation data; set data.val_size (with sweep.cv_folds the folds "
                              f"validate and it is not used, but every trial's config must be valid on its own)")
        self.root = Path(self.base.checkpoint.dir).expanduser() / spec.name
        self.trials = sample(spec)
        self.folds = spec.cv_folds or 1
        # every sampled config is validated before any trial runs
        self.configs = [trial_config(base_raw, t, f"trial-{i:03d}", str(self.root), source, sets, spec.metric)
                        for i, t in enumerate(self.trials)]
        if spec.cv_folds and any(c.data.subset is not None and c.data.subset < spec.cv_folds for c in self.configs):
            raise ConfigError(f"{source}: data.subset is smaller than sweep.cv_folds")
        self.done: dict[str, dict] = {}  # trial name -> its stored result row
        self.cache: dict = {}  # the data goes to the device once per (data config, seed, fold): shared by trials

    # ------------------------------------------------------------------ checks, before any trial runs
    def _check_folder(self) -> None:
        """The folder is writable, holds this sweep or none, and every trial in it was trained with the config
        this sweep gives it now; then sweep.yaml records the sweep."""
        rundir.check_writable(self.root)  # checkpoint.dir read-only, or a file: one line now, not a traceback later
        record = yaml.safe_load(yaml.safe_dump({"base": self.source, "set": self.sets, **self.spec.__dict__}))
        stored = self.root / "sweep.yaml"
        if stored.exists():  # a rerun resumes only the same sweep: trials are named by their index in it
            try:
                before = yaml.safe_load(stored.read_text())
            except yaml.YAMLError:
                before = None
            if not isinstance(before, dict) or any(before.get(k) != v for k, v in record.items() if k != "base"):
                raise ConfigError(f"{stored}: this folder holds another sweep (other params, spec or --set); give "
                                  f"the new one another name (sweep name: or --set checkpoint.dir=...), or delete "
                                  f"{self.root}")
        for cfg in self.configs:
            self._check_trial(cfg)
        rundir.write_atomic(stored, yaml.safe_dump(record, sort_keys=False), "sweep.yaml")

    def _check_trial(self, cfg: Config) -> None:
        """Refuse a trial folder whose result or checkpoint came from another config (the base changed)."""
        folder = self.root / cfg.name
        done = folder / RESULT_FILE
        if done.exists():
            try:
                row = json.loads(done.read_text())
            except ValueError:
                raise ConfigError(f"{done}: unreadable; delete it and rerun to redo {cfg.name}") from None
            stored = row["config"] if "config" in row else _config_yaml(folder)  # older results: config.yaml
            self._refuse_if_changed(done, stored, cfg, self.root)
            self.done[cfg.name] = row
            return
        for run in ([folder / f"fold-{f + 1}" for f in range(self.folds)] if self.spec.cv_folds else [folder]):
            if (run / "last.ckpt").exists():  # an interrupted trial goes on from here: with its own config only
                self._refuse_if_changed(run / "last.ckpt", checkpoint.load(run / "last.ckpt")["config"], cfg,
                                        self.root)

    def _refuse_if_changed(self, path: Path, stored: Optional[dict], cfg: Config, redo: Path) -> None:
        """A result or checkpoint is reused only if its whole resolved config is the one cfg resolves to now."""
        changes = changed_keys(stored, to_dict(cfg)) if isinstance(stored, dict) else ["no config stored with it"]
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise ConfigError(f"{path}: {cfg.name} was trained with another config than {self.source} gives it now "
                              f"({shown}); to keep both, give this sweep another name (sweep name: or --set "
                              f"checkpoint.dir=...); to redo it, delete {rundir.quote(redo)}")

    # ------------------------------------------------------------------ the trials
    def run(self) -> dict:
        """Run (or reuse) every trial, rank them, write results.csv and best.yaml, test the winner once."""
        from tqdm.auto import tqdm

        spec = self.spec
        self._check_folder()
        self.log(f"sweep {spec.name}: {len(self.trials)} trials{f' x {self.folds} folds' if spec.cv_folds else ''}, "
                 f"{spec.metric} ({spec.mode}) on validation data -> {self.root}")
        rows = []
        bar = tqdm(total=len(self.trials), desc="trials", unit="trial", disable=None, position=0)
        try:
            for values, cfg in zip(self.trials, self.configs):
                rows.append(self.done.get(cfg.name) or self._run_trial(values, cfg))
                bar.update(1)
        finally:
            bar.close()
        ranked = rank(rows, spec.mode)
        self._write_results(ranked)
        if not finished(ranked[0]):
            raise DlbaseError(f"sweep {spec.name}: every trial diverged ({len(rows)} of {len(rows)}; see "
                              f"{self.root / 'results.csv'}); "
                              f"no winner, and the test set was not used; lower optim.lr or set train.grad_clip, "
                              f"and run the new sweep under another name")
        return self._test_winner(ranked[0], ranked)

    def _run_trial(self, values: dict, cfg: Config) -> dict:
        """Train one trial (each fold with cross-validation); a diverged trial is a result too. Writes result.json."""
        from dlbase.train import train

        spec, folder = self.spec, self.root / cfg.name
        t0 = time.perf_counter()
        scores, epochs, failure = [], [], None
        for f in range(self.folds):
            fold = (f, self.folds) if spec.cv_folds else None
            run = folder / f"fold-{f + 1}" if spec.cv_folds else folder
            fcfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(run.parent)), name=run.name)
            last = run / "last.ckpt"
            payload = checkpoint.load(last) if last.exists() else None  # an interrupted trial goes on
            try:
                result = train(fcfg, resume=last if payload else None, resume_payload=payload, folder=run,
                               dataset=self._dataset(fcfg, fold), log=lambda line: None)
            except TrainingDiverged as e:  # scored as failed, ranked last; the sweep goes on
                failure = str(e).split(";")[0] + (f" (fold {f + 1})" if spec.cv_folds else "")
                break
            if result.status == "preempted":  # the trial saved its last.ckpt; the whole sweep stops here
                raise SweepStopped(f"sweep {spec.name} stopped by a signal during {run.relative_to(self.root)}; "
                                   f"rerun the same command to go on from there", result.exit_code)
            scores.append(checkpoint.load(run / "best.ckpt")["metrics"][spec.metric])
            epochs.append(result.epochs_done)
        row = {"trial": cfg.name, **{k: values[k] for k in spec.params},
               "status": "diverged" if failure else "finished",
               "score": None if failure else statistics.mean(scores),
               "std": None if failure else statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "epochs": max(epochs) if epochs and not failure else None,
               "seconds": round(time.perf_counter() - t0, 2),
               **({"error": failure} if failure else {}), "config": to_dict(cfg)}
        folder.mkdir(parents=True, exist_ok=True)
        rundir.write_atomic(folder / RESULT_FILE, json.dumps(row), "the trial's result")  # reruns reuse it
        if failure:
            self.log(f"{cfg.name}: {values}  diverged, recorded as failed: {failure}")
        else:
            self.log(f"{cfg.name}: {values}  {spec.metric} {row['score']:.4f}"
                     + (f" +- {row['std']:.4f}" if self.folds > 1 else ""))
        return row

    def _dataset(self, cfg: Config, fold: Optional[tuple[int, int]]):
        from dlbase.data import load_dataset
        from dlbase.engine import plan, resolve_device
        device = resolve_device(cfg.device)
        dtype = plan(cfg.train, device, cfg.model.encoding.name, cfg.optim.name).data_dtype
        key = (repr(cfg.data), cfg.seed, str(device), str(dtype), fold)
        if key not in self.cache:
            self.cache[key] = load_dataset(cfg.data, cfg.seed, device, dtype, fold=fold)
        return self.cache[key]

    def _write_results(self, ranked: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields(), lineterminator="\n")
        w.writeheader()
        for i, r in enumerate(ranked, 1):
            w.writerow(self._cells(i, r))
        rundir.write_atomic(self.root / "results.csv", buf.getvalue(), "results.csv")

    def fields(self) -> list[str]:
        return ["rank", "trial", *self.spec.params, "status", "score", "std", "epochs", "seconds"]

    def _cells(self, rank: int, row: dict) -> dict:
        """A row of results.csv (and of the table in the log); None for a failed trial's score, std, epochs."""
        return {"rank": rank, **{k: row.get(k) for k in self.fields()[1:]}, "status": row.get("status", "finished")}

    # ------------------------------------------------------------------ the winner, and the test set once
    def _test_winner(self, winner: dict, ranked: list[dict]) -> dict:
        """best.yaml; with cross-validation the winner's retraining on every training image; then the test set,
        once, on the winner's checkpoint; winner.json."""
        from dlbase.data import load_dataset
        from dlbase.engine import resolve_device
        from dlbase.evaluate import evaluate
        from dlbase.loss import build_eval_loss
        from dlbase.state import load_for_eval

        spec, root = self.spec, self.root
        win_cfg = next(c for c in self.configs if c.name == winner["trial"])
        final_cfg, epochs_note = self._final_config(win_cfg) if spec.cv_folds else (win_cfg, "")
        best_cfg = replace(final_cfg, name=f"{spec.name[:123]}_best",
                           checkpoint=replace(final_cfg.checkpoint, dir=self.base.checkpoint.dir))
        how = f", as retrained on every training image for {epochs_note}" if spec.cv_folds else ""
        head = (f"# the winner of sweep {spec.name} ({winner['trial']}), resolved{how}; train it with\n"
                f"#   dlbase train --config {rundir.quote(root / 'best.yaml')}\n")
        rundir.write_atomic(root / "best.yaml", head + to_yaml(best_cfg), "best.yaml")
        if spec.cv_folds:  # the folds' models each saw part of the data: retrain the winner on all of it, once
            trained_on = f"all {self._retrain(final_cfg)} training images, {epochs_note}"
            ckpt = root / final_cfg.name / "last.ckpt"  # its last epoch: no validation data to choose another
            self.log(f"winner {winner['trial']} retrained on {trained_on}")
        else:
            ckpt = root / win_cfg.name / "best.ckpt"
        device = resolve_device(win_cfg.device)
        cfg, model, payload = load_for_eval(ckpt, device)
        if not spec.cv_folds:
            trained_on = (f"the training images less the {cfg.data.val_size} held out for validation; its best "
                          f"epoch by {spec.metric} (epoch {payload['epoch']})")
        test = evaluate(model, load_dataset(cfg.data, cfg.seed, device).test,
                        build_eval_loss(cfg.train.loss, cfg.model.output))
        summary = {"winner": {k: v for k, v in winner.items() if k != "config"}, "trained_on": trained_on,
                   "test_accuracy": test["accuracy"], "test_loss": test["loss"], "checkpoint": str(ckpt),
                   "results": str(root / "results.csv"), "best_yaml": str(root / "best.yaml")}
        rundir.write_atomic(root / "winner.json", json.dumps(summary, indent=2), "winner.json")
        if cfg.train.tensorboard:  # the winner's HParams row gets its test accuracy, as `dlbase eval` gives a run's
            from dlbase.tblog import write_eval
            write_eval(ckpt.parent, int(payload["step"]), test["accuracy"], {})

        self.log("")
        self.log(" ".join(f"{h:>12}" for h in self.fields()))
        for i, r in enumerate(ranked, 1):
            self.log(" ".join(f"{_fmt(v):>12}" for v in self._cells(i, r).values()))
        self.log(f"winner {winner['trial']} ({spec.metric} {winner['score']:.4f}); test accuracy, measured once: "
                 f"{100 * test['accuracy']:.2f}%  -> {root / 'best.yaml'}")
        return summary

    def _final_config(self, cfg: Config) -> tuple[Config, str]:
        """The winner's config for its retraining: every training image (no validation split) for the mean over
        folds of each fold's best epoch (rounded half up, at least 1); no early stopping, nothing to monitor but
        train_loss. And those epochs in words."""
        chosen = [checkpoint.load(self.root / cfg.name / f"fold-{f + 1}" / "best.ckpt")["epoch"]
                  for f in range(self.folds)]
        epochs = max(1, math.floor(statistics.mean(chosen) + 0.5))
        stop = replace(cfg.train.early_stop, metric=None, patience=None)  # null: train_loss, with no val data
        train_cfg = replace(cfg.train, epochs=epochs, max_steps=None, early_stop=stop)
        note = (f"{epochs} epoch{'s' if epochs != 1 else ''} (mean best epoch over {self.folds} folds: "
                f"{', '.join(map(str, chosen))})")
        return replace(cfg, name="winner", data=replace(cfg.data, val_size=0), train=train_cfg), note

    def _retrain(self, cfg: Config) -> int:
        """Train (or finish) the winner's final run in <sweep>/winner/; returns how many images it trained on."""
        from dlbase.train import train

        folder = self.root / cfg.name
        last = folder / "last.ckpt"
        payload = checkpoint.load(last) if last.exists() else None
        if payload is not None:
            self._refuse_if_changed(last, payload["config"], cfg, folder)
        data = self._dataset(cfg, None)
        try:
            result = train(cfg, resume=last if payload else None, resume_payload=payload, folder=folder,
                           dataset=data, log=lambda line: None)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"sweep {self.spec.name}: retraining the winner on every training image: "
                                   f"{e}") from None
        if result.status == "preempted":
            raise SweepStopped(f"sweep {self.spec.name} stopped by a signal while retraining the winner; rerun the "
                               f"same command to go on", result.exit_code)
        return len(data.train)


def run_sweep(base_raw: dict, spec: SweepSpec, source: str, sets: list[str],
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a sweep: see Sweep."""
    return Sweep(base_raw, spec, source, sets, log).run()


def rank(rows: list[dict], mode: str) -> list[dict]:
    """Finished trials by score (best first, ties in trial order), then the failed ones in trial order."""
    ok = sorted((r for r in rows if finished(r)), key=lambda r: r["score"], reverse=mode == "max")
    return ok + [r for r in rows if not finished(r)]


def finished(row: dict) -> bool:
    return row.get("status", "finished") == "finished"  # results written before failures were recorded finished


_ABSENT = object()


def changed_keys(stored: dict, now: dict) -> list[str]:
    """'key: old -> new' for each dotted key whose value differs between two resolved configs (to_dict); where
    the files go (WHERE_KEYS) is not compared."""
    a, b = _flat(stored), _flat(now)
    return [f"{k}: {_fmt(a.get(k, '(absent)'))} -> {_fmt(b.get(k, '(absent)'))}"
            for k in sorted(a.keys() | b.keys()) if k not in WHERE_KEYS and a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_yaml(folder: Path) -> Optional[dict]:
    """A trial's config from its config.yaml (result.json files written before they held the config)."""
    for path in (folder / "config.yaml", folder / "fold-1" / "config.yaml"):
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        return raw if isinstance(raw, dict) else None
    return None


class SweepStopped(DlbaseError):
    """SIGTERM/SIGINT during a sweep: the running trial is saved, and the sweep resumes when rerun."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(v).replace(" ", "")
    return str(v)
