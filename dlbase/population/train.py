"""Population training, the entry points: which configs can train together (same_shape, group_by_shape), how many
fit in memory (choose_k), the one device-resident dataset they share, train_population() for a list of configs
(a sweep's trials, k-fold members) and train_seeds() for one config over several seeds. The loop that trains a
population is dlbase/population/loop.py; its model and optimisers are stacked.py and optim.py beside it."""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dlbase.core.config import Config, to_dict
from dlbase.core.errors import ConfigError, TrainingDiverged
from dlbase.core.schema import OPTIM_INFO
from dlbase.population.stacked import activation_bytes_per_member, state_bytes_per_member
from dlbase.population.data import PopulationData, load_population_data  # noqa: F401 - the entry points' names
from dlbase.population.loop import Population
from dlbase.population.member import MemberResult

# The keys that must agree for configs to share one stacked model and one step (dotted, as in a config file).
# Everything else (lr and schedule, weight decay, momentum, betas, eps, alpha, rho, dropout, label smoothing,
# grad clip, init, seed, early stopping, names and folders) may differ per member.
SHAPE_KEYS = ("device", "data", "model.conv", "model.hidden", "model.activation", "model.norm", "model.output",
              "model.encoding.name", "model.encoding.num_freqs", "model.encoding.include_input", "optim.name",
              "train.epochs", "train.max_steps", "train.batch_size", "train.loss", "train.engine", "train.augment",
              "train.precision", "train.compile", "checkpoint.every_steps")
MEMORY_FRACTION = 0.5  # of the free device memory (or available RAM) that choose_k plans to fill


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def same_shape(a: Config, b: Config) -> list[str]:
    """The SHAPE_KEYS on which a and b differ, as 'key (a's value vs b's)'; [] when they can train together."""
    da, db = to_dict(a), to_dict(b)
    return [f"{k} ({_get(da, k)!r} vs {_get(db, k)!r})" for k in SHAPE_KEYS if _get(da, k) != _get(db, k)]


def group_by_shape(configs: Sequence[Config]) -> list[list[int]]:
    """Indices of configs, grouped so that each group can be one population (first-seen order kept)."""
    groups: list[list[int]] = []
    for i, cfg in enumerate(configs):
        for g in groups:
            if not same_shape(configs[g[0]], cfg):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def check_population(configs: Sequence[Config], folds: Optional[Sequence] = None,
                     folders: Optional[Sequence] = None) -> None:
    """One ConfigError, one line, for anything that stops these configs training as one population."""
    if not configs:
        raise ConfigError("population: no configs to train")
    for name, given in (("folds", folds), ("folders", folders)):
        if given is not None and len(given) != len(configs):
            raise ConfigError(f"population: {len(given)} {name} for {len(configs)} configs; give one per config")
    for i, cfg in enumerate(configs[1:], 1):
        diff = same_shape(configs[0], cfg)
        if diff:
            raise ConfigError(f"population: member {i} ({cfg.name}) differs from member 0 ({configs[0].name}) in "
                              f"{'; '.join(diff)}; members must share these keys ({', '.join(SHAPE_KEYS)}); "
                              f"group them with dlbase.population.train.group_by_shape")
    cfg = configs[0]
    if cfg.train.engine != "autograd":
        raise ConfigError(f"train.engine: {cfg.train.engine} is not supported in a population (its batched step "
                          f"uses autograd); use autograd")
    if cfg.train.compile not in ("auto", "none"):
        raise ConfigError(f"train.compile: {cfg.train.compile} is not supported in a population (it runs its own "
                          f"batched eager step); use auto or none")
    names = [c.name for c in configs]
    if folders is None and len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"name: {dup!r} names two members; give each its own name (or pass folders)")


def available_memory(device: torch.device) -> int:
    """Free bytes to plan with: the CUDA device's free memory, or the host's available RAM (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_member(cfg: Config, input_shape: tuple[int, int] = (28, 28)) -> int:
    """A member's planned footprint: parameters, gradients, optimiser state and one step's activations."""
    from dlbase.core.model import build_model
    with torch.device("meta"):  # shapes only: no memory, no RNG
        model = build_model(cfg, input_shape, torch.device("meta"))
    d_in = model.encoding.out_features
    return (state_bytes_per_member(model, len(OPTIM_INFO[cfg.optim.name].state_keys))
            + activation_bytes_per_member(cfg.model, d_in, cfg.train.batch_size, input_shape))


def choose_k(cfg: Config, device: torch.device, max_members: Optional[int] = None,
             free_bytes: Optional[int] = None, input_shape: tuple[int, int] = (28, 28)) -> int:
    """How many members of cfg's shape to train at once: MEMORY_FRACTION of the free memory (free_bytes, else
    measured) over bytes_per_member, at least 1, at most max_members."""
    free = available_memory(device) if free_bytes is None else free_bytes
    k = max(1, int(free * MEMORY_FRACTION) // bytes_per_member(cfg, input_shape))
    return min(k, max_members) if max_members else k


# ----------------------------------------------------------------------------- entry points


def train_population(configs: Sequence[Config], folders: Optional[Sequence[Optional[Path]]] = None,
                     folds: Optional[Sequence[Optional[tuple[int, int]]]] = None, log: Callable[[str], None] = print,
                     on_epoch: Optional[Sequence[Optional[Callable[[int, dict], bool]]]] = None,
                     max_members: Optional[int] = None, data: Optional[PopulationData] = None,
                     record: Optional[dict] = None, stepper: str = "auto",
                     after_epoch: Optional[Callable] = None) -> list[MemberResult]:
    """Train configs of one shape (same_shape) as populations of at most choose_k members (or max_members), in
    order; returns one result per config, in the configs' order. folders: each member's run folder (None: a new
    <checkpoint.dir>/<name>[-N]); folds: each member's (fold, folds) of k-fold cross-validation (None: its
    data.val_size split); on_epoch: per member, as train()'s: (epoch, metrics) -> True to prune it; data: the
    dataset already on the device (load_population_data), shared by several calls; record: what
    `dlbase train --resume` needs to go on with the whole population (train_seeds' {"test": ...}), written into
    each member's folder as population.json; stepper: how members are stacked (steppers.STEPPERS); after_epoch:
    Population's (search inside the population, search/pbt.py)."""
    from dlbase.training.engine import plan_run, resolve_device
    from dlbase.training.phases import Phases
    check_population(configs, folds, folders)
    phases = Phases()
    with phases("device"):
        device = resolve_device(configs[0].device)
        run_plan = plan_run(configs[0], device)
    if data is None:  # a caller training several populations on one dataset (a sweep) passes it in
        with phases("data"):
            data = load_population_data(configs[0], device, run_plan.data_dtype)
    k = choose_k(configs[0], device, max_members, input_shape=data.input_shape)
    n = len(configs)
    pick = lambda seq, i: seq[i] if seq is not None else None  # noqa: E731
    results: list[MemberResult] = []
    for start in range(0, n, k):
        idx = range(start, min(n, start + k))
        if k < n:
            log(f"population: members {start + 1}-{idx[-1] + 1} of {n} (at most {k} at once)")
        with phases("set-up"):
            pop = Population([configs[i] for i in idx], [pick(folders, i) for i in idx],
                             [pick(folds, i) for i in idx], data, device, run_plan, log,
                             [pick(on_epoch, i) for i in idx], phases, stepper=stepper, after_epoch=after_epoch)
        if record is not None:
            write_record([m.folder for m in pop.all], record)
        results += pop.fit()
        if any(r.status == "preempted" for r in results):
            break  # a signal stops the whole call: later chunks have not started
    return results


@dataclass
class SeedSummary:
    """train_seeds()'s outcome: each seed's result, and the mean and standard deviation (None for one seed) of
    the best validation metric and, with test, of test accuracy."""
    results: list[MemberResult]
    metric: str
    best_mean: float
    best_sd: Optional[float]
    test: list[float]
    test_mean: Optional[float] = None
    test_sd: Optional[float] = None
    exit_code: int = 0  # 143 / 130: a signal stopped the runs (each saved)

    def lines(self) -> list[str]:
        pct = self.metric.endswith("accuracy")
        fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")  # noqa: E731
        sd = (lambda v: f" ± {100 * v:.2f}") if pct else (lambda v: f" ± {v:.4f}")  # noqa: E731
        n = len(self.results)
        out = [f"{n} seeds: best {self.metric} {fmt(self.best_mean)}"
               f"{sd(self.best_sd) if self.best_sd is not None else ' (one seed: no spread)'} (mean ± sd)"]
        if self.test_mean is not None:
            out.append(f"{n} seeds: test accuracy {100 * self.test_mean:.2f}%"
                       f"{f' ± {100 * self.test_sd:.2f}' if self.test_sd is not None else ''} (mean ± sd, best.ckpt "
                       f"of each)")
        return out


MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """--seeds: a count N (seeds 0..N-1) or a comma-separated list of seeds (0,7,42; brackets allowed)."""
    parts = [t.strip() for t in text.strip().strip("[]").split(",") if t.strip()]
    if not parts or not all(t.isdigit() for t in parts):
        raise ConfigError(f"--seeds {text!r}: give a count (5: seeds 0-4) or a list of seeds >= 0 (0,7,42)")
    values = [int(t) for t in parts]
    if len(parts) == 1 and "," not in text:
        if not 1 <= values[0] <= MAX_SEEDS:
            raise ConfigError(f"--seeds {text!r}: a count from 1 to {MAX_SEEDS}")
        return list(range(values[0]))
    if len(values) > MAX_SEEDS or max(values) > 2**63 - 1:
        raise ConfigError(f"--seeds {text!r}: at most {MAX_SEEDS} seeds, each below 2^63")
    return values


def seed_configs(cfg: Config, seeds: Sequence[int]) -> list[Config]:
    """cfg once per seed, each named <name>-seed<s> (its own run folder under checkpoint.dir)."""
    if len(set(seeds)) < len(seeds):
        dup = next(s for s in seeds if list(seeds).count(s) > 1)
        raise ConfigError(f"--seeds: seed {dup} is listed twice; each seed is one run")
    if not seeds:
        raise ConfigError("--seeds: no seeds given; give a count (3) or a list (0,1,2)")
    # a second --seeds run of the same name is <name>-2-seed<s> (not <name>-seed<s>-2, which reads as a range):
    # the first free base for every seed's folder
    parent = Path(cfg.checkpoint.dir).expanduser()
    base, k = cfg.name, 1
    while any((parent / f"{base}-seed{s}").exists() for s in seeds):
        k += 1
        base = f"{cfg.name}-{k}"
    # a run name is at most 128 characters: the base name gives way to the seed's suffix
    return [dataclasses.replace(cfg, seed=s, name=f"{base[:128 - len(f'-seed{s}')]}-seed{s}") for s in seeds]


def train_seeds(cfg: Config, seeds: Sequence[int], test: bool = False, log: Callable[[str], None] = print,
                max_members: Optional[int] = None) -> SeedSummary:
    """Train cfg once per seed as one population (each seed its own run folder <name>-seed<s>), then print the
    mean ± standard deviation of the best validation metric and, with test, of each best.ckpt's test accuracy."""
    configs = seed_configs(cfg, seeds)
    results = train_population(configs, log=log, max_members=max_members, record={"test": test})
    return summarise(results, test, log)


def summarise(results: list[MemberResult], test: bool, log: Callable[[str], None]) -> SeedSummary:
    """The seeds' summary lines (or, after a signal, how to go on), as train_seeds prints them."""
    stopped = [r for r in results if r.status == "preempted"]
    if stopped:  # every seed that started is saved; the summary would be of unfinished runs
        from dlbase.core.rundir import quote
        log(f"stopped by a signal: {len(stopped)} of {len(results)} seed runs saved mid-way; go on with all of "
            f"them (each exactly where it stopped):")
        log(f"  dlbase train --resume {quote(stopped[0].folder)}")
        return SeedSummary(results, results[0].best_metric, math.nan, None, [], exit_code=stopped[0].exit_code)
    done = [r for r in results if r.status not in ("diverged",) and math.isfinite(r.best_value)]
    if not done:
        raise TrainingDiverged("--seeds: every seed diverged; nothing to summarise (lower optim.lr or set "
                               "train.grad_clip)")
    best = [r.best_value for r in done]
    summary = SeedSummary(results, done[0].best_metric, statistics.fmean(best),
                          statistics.stdev(best) if len(best) > 1 else None, [])
    if test:
        summary.test = [test_accuracy(r.folder) for r in done]
        summary.test_mean = statistics.fmean(summary.test)
        summary.test_sd = statistics.stdev(summary.test) if len(summary.test) > 1 else None
    for line in summary.lines():
        log(line)
    return summary


def test_accuracy(folder: Path) -> float:
    """Test accuracy of a run folder's best.ckpt (last.ckpt when it has none), as `dlbase eval` measures it."""
    from dlbase.training.evaluate import evaluate_checkpoint
    ckpt = folder / "best.ckpt" if (folder / "best.ckpt").exists() else folder / "last.ckpt"
    return float(evaluate_checkpoint(ckpt, "test")["accuracy"])


# ----------------------------------------------------------------------------- resuming a whole population
POPULATION_FILE = "population.json"  # in each member's folder: the members that trained together, by folder name


def write_record(folders: Sequence[Path], record: dict) -> None:
    """population.json in each member folder: the population's member folders (by name, beside each other; by
    path otherwise) and what its command asked for (--test)."""
    import json
    from dlbase.core.rundir import write_atomic
    parents = {f.parent for f in folders}
    names = [f.name if len(parents) == 1 else str(f) for f in folders]
    for f in folders:
        write_atomic(f / POPULATION_FILE, json.dumps({"members": names, **record}), POPULATION_FILE)
