"""Hyperparameter sweeps: grid or random search, optional k-fold cross-validation, resumable, test set once.

Selection uses validation data only (a held-out split, or the folds of the training set); the test set is
evaluated once, for the winner, and reported apart.
"""
from __future__ import annotations

import csv
import itertools
import os
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from dlbase.config import Config, config_from_dict, parse_yaml, read_config_file, to_dict, to_yaml
from dlbase.errors import ConfigError, DlbaseError

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SWEEP_KEYS = ("name", "method", "trials", "seed", "params", "metric", "mode", "cv_folds")


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
    return SweepSpec(name=str(name), method=method, trials=ints["trials"], seed=ints["seed"], params=params,
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
    return raw, parse_spec(spec_raw, source, f"{base.name}_sweep"), str(config)


RESULT_FILE = "result.json"  # written into a trial's folder when it is finished: reruns skip it


def run_sweep(base_raw: dict, spec: SweepSpec, source: str, sets: list[str],
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every trial, rank them, write results.csv and best.yaml, test the winner once."""
    from tqdm.auto import tqdm

    from dlbase import checkpoint
    from dlbase.data import load_dataset
    from dlbase.evaluate import evaluate
    from dlbase.loss import build_eval_loss
    from dlbase.engine import resolve_device
    from dlbase.state import load_for_eval
    from dlbase.train import train

    base = config_from_dict(base_raw, source, sets)
    root = Path(base.checkpoint.dir).expanduser() / spec.name
    trials = sample(spec)
    folds = spec.cv_folds or 1
    # every sampled config is validated before any trial runs
    configs = [trial_config(base_raw, t, f"trial-{i:03d}", str(root), source, sets, spec.metric)
               for i, t in enumerate(trials)]
    if spec.cv_folds and any(c.data.subset is not None and c.data.subset < spec.cv_folds for c in configs):
        raise ConfigError(f"{source}: data.subset is smaller than sweep.cv_folds")
    record = {"base": source, "set": list(sets), **spec.__dict__}
    stored = root / "sweep.yaml"
    if stored.exists():  # a rerun resumes only the same sweep: trials are named by their index in it
        try:
            before = yaml.safe_load(stored.read_text())
        except yaml.YAMLError:
            before = None
        if not isinstance(before, dict) or {k: before.get(k) for k in record if k != "base"} != {
                k: v for k, v in yaml.safe_load(yaml.safe_dump(record)).items() if k != "base"}:
            raise ConfigError(f"{stored}: this folder holds another sweep (other params, spec or --set); give the "
                              f"new one another name (sweep name: or --set checkpoint.dir=...), or delete {root}")
    root.mkdir(parents=True, exist_ok=True)
    stored.write_text(yaml.safe_dump(record, sort_keys=False))
    log(f"sweep {spec.name}: {len(trials)} trials{f' x {folds} folds' if spec.cv_folds else ''}, "
        f"{spec.metric} ({spec.mode}) on validation data -> {root}")
    cache: dict = {}  # the data goes to the device once per (data config, seed, fold): shared by trials

    def dataset_for(cfg: Config, fold: Optional[tuple[int, int]]):
        from dlbase.engine import plan
        device = resolve_device(cfg.device)
        dtype = plan(cfg.train, device, cfg.model.encoding.name, cfg.optim.name).data_dtype
        key = (repr(cfg.data), cfg.seed, str(device), str(dtype), fold)
        if key not in cache:
            cache[key] = load_dataset(cfg.data, cfg.seed, device, dtype, fold=fold)
        return cache[key]

    rows = []
    bar = tqdm(total=len(trials), desc="trials", unit="trial", disable=None, position=0)
    for i, (values, cfg) in enumerate(zip(trials, configs)):
        folder = root / cfg.name
        done = folder / RESULT_FILE
        if done.exists():
            try:
                rows.append(json.loads(done.read_text()))
            except ValueError:
                raise ConfigError(f"{done}: unreadable; delete it and rerun to redo {cfg.name}") from None
            bar.update(1)
            continue
        t0 = time.perf_counter()
        scores, epochs = [], []
        for f in range(folds):
            fold = (f, folds) if spec.cv_folds else None
            run = folder / f"fold-{f + 1}" if spec.cv_folds else folder
            fcfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(run.parent)), name=run.name)
            last = run / "last.ckpt"
            payload = checkpoint.load(last) if last.exists() else None  # an interrupted trial goes on
            result = train(fcfg, resume=last if payload else None, resume_payload=payload, folder=run,
                           dataset=dataset_for(fcfg, fold), log=lambda line: None)
            if result.status == "preempted":  # the trial saved its last.ckpt; the whole sweep stops here
                bar.close()
                raise SweepStopped(f"sweep {spec.name} stopped by a signal during {run.relative_to(root)}; rerun "
                                   f"the same command to go on from there", result.exit_code)
            best = checkpoint.load(run / "best.ckpt")
            scores.append(best["metrics"][spec.metric])
            epochs.append(result.epochs_done)
        row = {"trial": cfg.name, **{k: values[k] for k in spec.params}, "score": statistics.mean(scores),
               "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "epochs": max(epochs),
               "seconds": round(time.perf_counter() - t0, 2)}
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps(row))
        os.replace(tmp, done)  # whole or absent: a rerun never reads half a result
        rows.append(row)
        bar.update(1)
        log(f"{cfg.name}: {values}  {spec.metric} {row['score']:.4f}" + (f" +- {row['std']:.4f}" if folds > 1 else ""))
    bar.close()

    ranked = sorted(rows, key=lambda r: r["score"], reverse=spec.mode == "max")
    fields = ["rank", "trial", *spec.params, "score", "std", "epochs", "seconds"]
    with open(root / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for rank, r in enumerate(ranked, 1):
            w.writerow({"rank": rank, **{k: r.get(k) for k in fields if k != "rank"}})
    winner = ranked[0]
    win_index = int(winner["trial"].split("-")[1])
    win_cfg = configs[win_index]
    best_cfg = replace(win_cfg, name=f"{spec.name}_best", checkpoint=replace(win_cfg.checkpoint, dir=base.checkpoint.dir))
    (root / "best.yaml").write_text(f"# the winner of sweep {spec.name} ({winner['trial']}), resolved; train it with\n"
                                    f"#   dlbase train --config {root / 'best.yaml'}\n" + to_yaml(best_cfg))

    # the test set, once, for the winner only
    device = resolve_device(win_cfg.device)
    if spec.cv_folds:  # the folds' models each saw part of the data: train the winner on all of it, once
        final = root / "winner"
        last = final / "last.ckpt"
        payload = checkpoint.load(last) if last.exists() else None
        result = train(replace(win_cfg, name="winner"), resume=last if payload else None, resume_payload=payload,
                       folder=final, log=lambda line: None)
        if result.status == "preempted":
            raise SweepStopped(f"sweep {spec.name} stopped by a signal while retraining the winner; rerun the same "
                               f"command to go on", result.exit_code)
        ckpt = final / "best.ckpt"
    else:
        ckpt = root / win_cfg.name / "best.ckpt"
    cfg, model, _ = load_for_eval(ckpt, device)
    test = evaluate(model, load_dataset(cfg.data, cfg.seed, device).test, build_eval_loss(cfg.train.loss,
                                                                                          cfg.model.output))
    summary = {"winner": winner, "test_accuracy": test["accuracy"], "test_loss": test["loss"], "checkpoint": str(ckpt),
               "results": str(root / "results.csv"), "best_yaml": str(root / "best.yaml")}
    (root / "winner.json").write_text(json.dumps(summary, indent=2))

    log("")
    log(" ".join(f"{h:>12}" for h in fields))
    for rank, r in enumerate(ranked, 1):
        log(" ".join(f"{_fmt(v):>12}" for v in [rank, r["trial"], *(r[k] for k in spec.params), r["score"], r["std"],
                                                 r["epochs"], r["seconds"]]))
    log(f"winner {winner['trial']} ({spec.metric} {winner['score']:.4f}); test accuracy, measured once: "
        f"{100 * test['accuracy']:.2f}%  -> {root / 'best.yaml'}")
    return summary


class SweepStopped(DlbaseError):
    """SIGTERM/SIGINT during a sweep: the running trial is saved, and the sweep resumes when rerun."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(v).replace(" ", "")
    return str(v)
