"""A sweep's spec: the keys of a sweep mapping checked into a SweepSpec (from --sweep, a `sweep:` section or
--grid), the trials fixed in advance, each trial's config, and which keys differ between two resolved configs.
dlbase/search/sweep.py runs what this describes."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from dlbase.core.config import Config, config_from_dict, parse_yaml, read_config_file, to_dict
from dlbase.core.errors import ConfigError
from dlbase.core.schema import UNSWEPT_KEYS
from dlbase.search.space import METHODS, PRUNERS, decode, encode, slots
from dlbase.core.rundir import cell

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SWEEP_KEYS = ("name", "method", "trials", "seed", "params", "metric", "mode", "cv_folds", "pruner", "prune_after",
              "storage", "heartbeat", "retries", "population", "interval", "quantile", "perturb", "resample",
              "reduction", "min_epochs")
MAX_TRIALS = 10_000  # a sweep's trials at most: more would take minutes and gigabytes just to enqueue
NAME_RULE = {f.name: f.metadata for f in dataclasses.fields(Config)}["name"]  # a sweep is named like a run


@dataclass(frozen=True)
class SweepSpec:
    """A search space, how to search it and how to score it."""
    name: str
    method: str = "grid"  # grid | random | tpe (default tpe when a param is a distribution, else grid)
    trials: int = 10  # random, tpe: how many
    seed: int = 0  # random, tpe: the samplers' seed
    params: dict = field(default_factory=dict)  # dotted key -> list of values, or a distribution mapping
    metric: str = "val_accuracy"  # val_accuracy | val_loss
    mode: str = "max"  # max | min
    cv_folds: Optional[int] = None  # k-fold cross-validation on the training set
    pruner: str = "none"  # none | median | hyperband (default median for random and tpe, none for grid)
    prune_after: int = 3  # median: trials that must finish before any is pruned
    storage: Optional[str] = None  # the study's database URL or journal file; None: <sweep folder>/study.db
    heartbeat: int = 30  # seconds between a running trial's beats; 3 missed beats and it is retried elsewhere
    retries: int = 3  # how often a trial whose worker died (or was stopped) is retried
    population: Any = 1  # trials a worker trains at once as one population (dlbase/population/train.py): K or auto
    interval: int = 1  # pbt: epochs between exploits
    quantile: float = 0.25  # pbt: the bottom (and top) fraction of the members at each exploit
    perturb: tuple = (1.2, 0.8)  # pbt: the factors a copied hyperparameter is multiplied by (one drawn)
    resample: float = 0.25  # pbt: the probability that a copied hyperparameter is drawn anew from its distribution
    reduction: int = 3  # halving: eta, 1/eta of the members go on at each rung
    min_epochs: int = 1  # halving: the first rung (epochs); then min_epochs * eta^i


def _fail(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {msg}")


def parse_spec(raw: Any, source: str, default_name: str) -> SweepSpec:
    """Check a sweep mapping (from --sweep, a `sweep:` section, or --grid) into a SweepSpec."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep must be a mapping with params:, method:, metric:, ...")
    for k in raw:
        if k not in SWEEP_KEYS:
            raise _fail(source, f"sweep.{k}", f"unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(source, "sweep.params", "needs at least one dotted key with a list of values or a distribution, "
                                            "e.g. optim.lr: [0.1, 0.01]")
    method, metric, mode, pruner = _how(raw, source, params)
    ints = _ints(raw, source, method)
    reals = _reals(raw, source)
    population = raw.get("population", 1)
    bad = population_error(population)
    if bad:
        raise _fail(source, "sweep.population", bad + " (auto: as many trials as fit in memory)")
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        raise _fail(source, "sweep.storage", f"{storage!r} is not a database URL (sqlite:///study.db, "
                                             f"postgresql://user@host/db) or a journal file path (study.log)")
    for key, space in params.items():
        _check_param(source, key, space, method)
    if method == "grid":
        points = math.prod(len(v) for v in params.values())
        if points > MAX_TRIALS:
            raise _fail(source, "sweep.params", f"the grid has {points:,} points "
                                                f"({' x '.join(str(len(v)) for v in params.values())}); at most "
                                                f"{MAX_TRIALS:,} trials per sweep")
    name = raw.get("name", default_name)
    name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
    if not isinstance(name, str) or not re.fullmatch(NAME_RULE["pattern"], name):  # it names a folder
        raise _fail(source, "sweep.name", f"{name!r} is not allowed; expected {NAME_RULE['allowed']}")
    return SweepSpec(name=name, method=method, trials=ints["trials"], seed=ints["seed"], params=params,
                     metric=metric, mode=mode, cv_folds=ints["cv_folds"], pruner=pruner,
                     prune_after=ints["prune_after"], storage=storage, heartbeat=ints["heartbeat"],
                     retries=ints["retries"], population=population, interval=ints["interval"],
                     reduction=ints["reduction"], min_epochs=ints["min_epochs"], **reals)


def _how(raw: dict, source: str, params: dict) -> tuple[str, str, str, str]:
    """(method, metric, mode, pruner), each checked, with its default from those before it."""
    has_dist = any(isinstance(v, dict) for v in params.values())
    method = raw.get("method", "tpe" if has_dist else "grid")
    if method not in METHODS:
        raise _fail(source, "sweep.method", f"{method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric", "val_accuracy")
    if metric not in ("val_accuracy", "val_loss"):
        raise _fail(source, "sweep.metric", f"{metric!r} is not one of val_accuracy, val_loss (selection never "
                                            f"looks at the test set)")
    mode = raw.get("mode", "max" if metric == "val_accuracy" else "min")
    if mode not in ("max", "min"):
        raise _fail(source, "sweep.mode", f"{mode!r} is not one of max, min")
    pruner = raw.get("pruner", "none" if method in ("grid", "pbt") else "median")
    pruner = "none" if pruner is None else pruner
    if pruner not in PRUNERS:
        raise _fail(source, "sweep.pruner", f"{pruner!r} is not one of {', '.join(PRUNERS)}")
    return method, metric, mode, pruner


def _ints(raw: dict, source: str, method: str) -> dict[str, Optional[int]]:
    """The spec's integer keys, each checked against its lower bound (and trials against MAX_TRIALS)."""
    ints = {}
    for key, lo, default in (("trials", 1, 10), ("seed", 0, 0), ("cv_folds", 2, None), ("prune_after", 0, 3),
                             ("heartbeat", 1, 30), ("retries", 0, 3), ("interval", 1, 1), ("reduction", 2, 3),
                             ("min_epochs", 1, 1)):
        v = raw.get(key)
        v = default if v is None else v  # null is the default, as the JSON Schema has it (cv_folds: none)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo or v > 10**6):
            raise _fail(source, f"sweep.{key}", f"{v!r} is not an integer >= {lo}")
        if key == "trials" and method != "grid" and v > MAX_TRIALS:
            raise _fail(source, "sweep.trials", f"{v:,} trials: at most {MAX_TRIALS:,} per sweep")
        ints[key] = v
    return ints


def _reals(raw: dict, source: str) -> dict:
    """pbt's quantile, resample probability and perturbation factors, each checked against its range."""
    out = {}
    for key, lo, hi, default in (("quantile", 0.0, 0.5, 0.25), ("resample", 0.0, 1.0, 0.25)):
        v = raw.get(key)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi) or (key == "quantile"
                                                                                            and v == 0):
            raise _fail(source, f"sweep.{key}", f"{v!r} is not a number in {'(' if key == 'quantile' else '['}"
                                                f"{lo}, {hi}]")
        out[key] = float(v)
    v = raw.get("perturb")
    v = [1.2, 0.8] if v is None else v
    if not isinstance(v, list) or not v or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1e6 for f in v):
        raise _fail(source, "sweep.perturb", f"{v!r} is not a non-empty list of factors > 0 (e.g. [1.2, 0.8])")
    out["perturb"] = tuple(float(f) for f in v)
    return out


def _check_param(source: str, key: str, space: Any, method: str) -> None:
    """One swept key's space: a non-empty list of distinct values, or a distribution mapping."""
    where = f"sweep.params.{key}"
    if key in UNSWEPT_KEYS:
        raise _fail(source, where, "every trial sets it itself (its folder, or the sweep's metric): sweeping it "
                                   "would run identical trials")
    if isinstance(space, list):
        if not space:
            raise _fail(source, where, "an empty list: give at least one value")
        _distinct(source, where, space, encode)
    elif isinstance(space, dict):
        _check_distribution(source, where, space, method)
    else:
        raise _fail(source, where, f"{space!r} is neither a list of values nor a distribution mapping")


def _check_distribution(source: str, where: str, space: dict, method: str) -> None:
    """A distribution mapping: its name, its keys, a method that samples, and its values or its range."""
    dist = space.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise _fail(source, where, f"distribution {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    allowed = ("distribution", "values") if dist == "choice" else ("distribution", "low", "high")
    extra = [k for k in space if k not in allowed]
    if extra:
        raise _fail(source, where, f"unknown key {extra[0]!r} in a {dist} distribution; allowed: "
                                   f"{', '.join(allowed)}")
    if method == "grid":
        raise _fail(source, where, "a distribution needs method: tpe or random (grid takes lists)")
    if dist == "choice":
        if not isinstance(space.get("values"), list) or not space["values"]:
            raise _fail(source, where, "choice needs values: [a non-empty list]")
        _distinct(source, where, space["values"], encode)
        return
    lo, hi = space.get("low"), space.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        raise _fail(source, where, f"{dist} needs numbers low and high, got low={lo!r}, high={hi!r}")
    if lo >= hi:
        raise _fail(source, where, f"low ({lo}) must be below high ({hi})")
    if dist == "log_uniform" and lo <= 0:
        raise _fail(source, where, f"log_uniform needs low > 0, got {lo}")
    if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise _fail(source, where, "int_uniform needs integer low and high")


def _distinct(source: str, where: str, values: list, encode: Callable) -> None:
    # as Optuna compares choices: 1, 1.0 and True are one value; a string is also the value its YAML text is
    # ("0.1" and 0.1 give one config)
    seen = [encode(_as_yaml(v)) for v in values]
    if any(a == b for i, a in enumerate(seen) for b in seen[i + 1:]):
        raise _fail(source, where, f"{values!r} repeats a value (a list and its JSON text count as one)")


def _as_yaml(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return parse_yaml(value, "a value")
    except ConfigError:
        return value


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
    """The trials fixed in advance: the full product (grid), `trials` seeded draws of Optuna's RandomSampler
    (random), or TPE's seeded start-up draws (the rest TPE chooses as results come in)."""
    return [decode(spec.params, s) for s in slots(spec) if s]


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


WHERE_KEYS = ("name", "checkpoint.dir")  # where a run's files go, not what it learns: not compared on reuse


_ABSENT = object()


def changed_keys(stored: dict, now: dict) -> list[str]:
    """'key: old -> new' for each dotted key whose value differs between two resolved configs (to_dict); where
    the files go (WHERE_KEYS) is not compared. A key the stored config lacks because it was added to dlbase
    since (model.conv, train.augment, ...) is no change while it keeps its default: that is what the run did."""
    a, b = flat(stored), flat(now)
    defaults = flat(to_dict(Config()))

    def changed(k: str) -> bool:
        if k not in a and k in defaults and b.get(k, _ABSENT) == defaults[k]:
            return False
        return a.get(k, _ABSENT) != b.get(k, _ABSENT)
    return [f"{k}: {cell(a.get(k, '(absent)'))} -> {cell(b.get(k, '(absent)'))}"
            for k in sorted(a.keys() | b.keys()) if k not in WHERE_KEYS and changed(k)]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def population_error(value) -> Optional[str]:
    """The spec's population value, or an error message."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
        return None
    return f"{value!r} is not auto or an integer from 1 to 4096"
