"""Search inside a population (a sweep's trials trained together, search/populations.py): population-based training
(`method: pbt`, Jaderberg et al. 2017, with Ray Tune's defaults) and successive halving (`pruner: halving`).

PBT: the `trials` members are random draws trained as one population. Every `interval` epochs, ranked on the
validation metric of that epoch, each member of the bottom `quantile` copies the weights, optimiser state and
hyperparameters of a member of the top `quantile` (chosen at random), in place on the device
(population/exploit.py), then explores: each swept hyperparameter is drawn anew from its distribution with
probability `resample`, else multiplied by one of `perturb` (a choice moves to a neighbouring value), and kept
within the distribution's bounds. Only hyperparameters population/exploit.py's MUTABLE lists can be swept. The lr
is the base lr the schedule scales: a new lr is a point of the member's schedule.table_epochs/table_factors from
that epoch on, in its config, so its checkpoints record it and best.yaml replays it as an ordinary run. The draws
come from one seeded generator saved with the lineage in pbt.json at every exploit: a stopped PBT sweep goes on
from its members' checkpoints with the same lineage and the same draws.

Halving: at the rungs min_epochs * reduction^i epochs, only the best 1/reduction of the members still training
(at least one) go on; the others leave the population as pruned trials.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Optional

from dlbase.core import rundir
from dlbase.core.errors import ConfigError, DlbaseError
from dlbase.population.exploit import MUTABLE

PBT_KEYS = ("interval", "quantile", "perturb", "resample")
HALVING_KEYS = ("reduction", "min_epochs")
STATE_FILE = "pbt.json"  # the lineage so far, each member's hyperparameters over time, the generator's state


def unused_keys(spec) -> tuple:
    """The spec keys this sweep does not use (not part of its record: sweeps made before them stay the same)."""
    return (*(PBT_KEYS if spec.method != "pbt" else ()), *(HALVING_KEYS if spec.pruner != "halving" else ()))


def drifting(spec) -> tuple:
    """The config keys a PBT member's checkpoints may hold other values of than its slot gave it."""
    return (*spec.params, "schedule.table_epochs", "schedule.table_factors") if spec.method == "pbt" else ()


def check_spec(sweep):
    """The rules that tie pbt's and halving's keys to the rest, before the study exists; the spec to run."""
    spec, where = sweep.spec, sweep.source
    together = spec.method == "pbt" or spec.pruner == "halving"
    if together and spec.cv_folds:
        raise ConfigError(f"{where}: sweep.cv_folds: search inside a population ({_what(spec)}) ranks members on "
                          f"their validation split; use cv_folds: null")
    if spec.method != "pbt":
        if spec.pruner == "halving" and spec.population == 1:
            raise ConfigError(f"{where}: sweep.pruner: halving prunes inside a population; set sweep.population "
                              f"(e.g. 9, or auto), or use pruner: hyperband across trials")
        return spec
    if spec.pruner != "none":
        raise ConfigError(f"{where}: sweep.pruner: {spec.pruner} with method pbt; PBT replaces its bottom members "
                          f"itself: use pruner: none")
    if spec.population not in (1, spec.trials):
        raise ConfigError(f"{where}: sweep.population: {spec.population} with method pbt: the {spec.trials} trials "
                          f"are the members of one population; leave population out (or set it to {spec.trials})")
    if spec.trials < 2:
        raise ConfigError(f"{where}: sweep.trials: {spec.trials}; PBT needs at least 2 members")
    for key, space in spec.params.items():
        if key not in MUTABLE:
            raise ConfigError(f"{where}: sweep.params.{key}: method pbt changes hyperparameters mid-run, and a "
                              f"member cannot change {key} so; mutable: {', '.join(MUTABLE)} (set {key} in the "
                              f"base config)")
        if key == "optim.momentum" and "momentum" not in _reads(sweep.base.optim.name):
            raise ConfigError(f"{where}: sweep.params.optim.momentum: optim.name {sweep.base.optim.name} reads no "
                              f"momentum; use momentum or nesterov")
        values = _choices(space) or [space["low"], space["high"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: sweep.params.{key}: PBT multiplies values; {values!r} are not all numbers")
        for v in values:  # every value a perturbation can reach lies between these, each a valid config
            sweep.config_for({key: v}, 0)
    from dlbase.population.train import choose_k
    from dlbase.training.engine import resolve_device
    fits = choose_k(sweep.base, resolve_device(sweep.base.device), spec.trials)
    if fits < spec.trials:  # one population, or PBT's members could not copy each other
        raise ConfigError(f"{where}: sweep.trials: {spec.trials} PBT members do not fit in memory at once here (at "
                          f"most {fits} of this shape); use fewer trials or a smaller model")
    return replace(spec, population=spec.trials)


def _what(spec) -> str:
    return "method pbt" if spec.method == "pbt" else "pruner halving"


def _reads(optim: str) -> tuple:
    from dlbase.core.schema import OPTIM_INFO
    return OPTIM_INFO[optim].reads


def _choices(space) -> Optional[list]:
    return space if isinstance(space, list) else space.get("values")


def controller(sweep, names: list[str], resumed: bool):
    """The after_epoch hook a population of these trials trains with: PBT, Halving, or None."""
    if sweep.spec.method == "pbt":
        return PBT(sweep.spec, sweep.root, names, resumed, sweep.log)
    if sweep.spec.pruner == "halving":
        return Halving(sweep.spec)
    return None


# ----------------------------------------------------------------------------- explore
def explore(value: float, space, rng: random.Random, perturb: tuple, resample: float):
    """A copied hyperparameter's new value: drawn anew from its space with probability resample, else value times
    one of perturb (a choice: a neighbouring value), always within the space's bounds."""
    values = _choices(space)
    if values is not None:
        if rng.random() < resample:
            return rng.choice(values)
        i = min(range(len(values)), key=lambda j: abs(values[j] - value))  # value is one of them
        return values[min(len(values) - 1, max(0, i + rng.choice((-1, 1))))]
    lo, hi, kind = space["low"], space["high"], space["distribution"]
    if rng.random() < resample:
        if kind == "int_uniform":
            return rng.randint(int(lo), int(hi))
        if kind == "log_uniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return rng.uniform(lo, hi)
    v = min(hi, max(lo, value * rng.choice(perturb)))
    return int(round(v)) if kind == "int_uniform" else v


def current(cfg, key: str, epoch: int) -> float:
    """The value of a mutable key a member trains with in epoch `epoch` (0-based): the lr its table scales to."""
    if key == "optim.lr":
        sc, f = cfg.schedule, 1.0
        for e, factor in zip(sc.table_epochs, sc.table_factors):
            f = factor if e <= epoch else f
        return cfg.optim.lr * f
    return getattr(cfg.optim, key.split(".", 1)[1])


def with_value(cfg, key: str, value: float, epoch: int):
    """cfg training with key = value from epoch `epoch` on (the lr: a point of the schedule's table)."""
    if key == "optim.lr":
        sc = cfg.schedule
        points = [(e, f) for e, f in zip(sc.table_epochs, sc.table_factors) if e < epoch]
        points.append((epoch, value / cfg.optim.lr))
        return replace(cfg, schedule=replace(sc, table_epochs=tuple(e for e, _ in points),
                                             table_factors=tuple(f for _, f in points)))
    return replace(cfg, optim=replace(cfg.optim, **{key.split(".", 1)[1]: value}))


# ----------------------------------------------------------------------------- the two controllers
def ranked(pop, spec) -> list:
    """The members still in the population (running, or stopped by a signal at this epoch's end), best first by
    this epoch's validation metric (a member without one last), ties by name."""
    sign = -1.0 if spec.mode == "max" else 1.0

    def key(m):
        v = (m.metrics or {}).get(spec.metric)
        return (0, sign * v, m.cfg.name) if isinstance(v, float) and math.isfinite(v) else (1, 0.0, m.cfg.name)
    return sorted((m for m in pop.members if m.status in ("running", "preempted")), key=key)


class Halving:
    """Successive halving inside the population: at each rung (min_epochs * reduction^i epochs, while steps are
    left) the best max(1, n // reduction) of the n members still training go on; the others are pruned."""

    def __init__(self, spec):
        self.spec = spec

    def rung(self, epoch: int) -> bool:
        r = self.spec.min_epochs
        while r < epoch:
            r *= self.spec.reduction
        return r == epoch

    def __call__(self, pop) -> None:
        p = pop.progress
        if p.step >= pop.total_steps or not self.rung(p.epoch):
            return
        members = ranked(pop, self.spec)
        for m in members[max(1, len(members) // self.spec.reduction):]:
            pop.prune(m)


class PBT:
    """The exploit-and-explore step between epochs, and its records (pbt.json at every exploit; lineage.csv,
    schedules.csv, pbt.png at the end). names: the members' trial names, in the population's order."""

    def __init__(self, spec, root: Path, names: list[str], resumed: bool, log):
        self.spec, self.root, self.names, self.log = spec, root, list(names), log
        self.rng = random.Random(spec.seed)
        self.exploits: list[dict] = []  # one entry per member copied: epoch, step, member, from, scores, values
        self.history: dict[str, list] = {}  # member -> [[epoch, {key: value}], ...] each time its values changed
        state = root / STATE_FILE
        if resumed and state.exists():
            self._load(state)

    def _load(self, path: Path) -> None:
        saved = json.loads(path.read_text())
        if saved.get("members") != self.names:
            raise DlbaseError(f"{path}: records the members {saved.get('members')}, this population is {self.names}; "
                              f"delete {self.root} to redo the sweep")
        version, inner, gauss = saved["rng"]
        self.rng.setstate((version, tuple(inner), gauss))
        self.exploits, self.history = saved["exploits"], saved["history"]

    def _save(self) -> None:
        state = {"members": self.names, "rng": list(self.rng.getstate()), "exploits": self.exploits,
                 "history": self.history}
        rundir.write_atomic(self.root / STATE_FILE, json.dumps(state), STATE_FILE)

    def values(self, cfg, epoch: int) -> dict:
        return {k: current(cfg, k, epoch) for k in self.spec.params}

    def __call__(self, pop) -> None:
        p, spec = pop.progress, self.spec
        if not self.history:  # the members' values from the start
            self.history = {m.cfg.name: [[0, self.values(m.cfg, 0)]] for m in pop.all}
        if p.step >= pop.total_steps or p.epoch % spec.interval:
            return
        members = ranked(pop, spec)
        n = min(math.ceil(len(members) * spec.quantile), len(members) // 2)
        top, bottom = members[:n], members[len(members) - n:]
        sources = [self.rng.choice(top) for _ in bottom]  # drawn first, in rank order: the same on a resume
        pop.replace_members(bottom, sources)
        for d, s in zip(bottom, sources):
            cfg = d.cfg  # s's hyperparameters now, explored from here
            for key, space in spec.params.items():
                new = explore(current(cfg, key, p.epoch), space, self.rng, spec.perturb, spec.resample)
                cfg = with_value(cfg, key, new, p.epoch)
            pop.set_config(d, cfg)
            pop.save_last(d)  # a stop from here on goes on from the copied weights
            vals = self.values(cfg, p.epoch)
            self.history[d.cfg.name].append([p.epoch, vals])
            self.exploits.append({"epoch": p.epoch, "step": p.step, "member": d.cfg.name, "from": s.cfg.name,
                                  "score": (d.metrics or {}).get(spec.metric),
                                  "from_score": (s.metrics or {}).get(spec.metric), **vals})
        for m in members:
            pop.scalars(m, {f"pbt/{k}": v for k, v in self.values(m.cfg, p.epoch).items()})
        self._save()

    # ------------------------------------------------------------------ records
    def lineage(self, winner: str, epochs: int) -> list[tuple[int, int, str]]:
        """(from epoch, to epoch, member): whose weights the winner's are over time, latest first."""
        out, who, until = [], winner, epochs
        for ex in reversed(self.exploits):
            if ex["member"] == who and ex["epoch"] <= until:
                out.append((ex["epoch"], until, who))
                who, until = ex["from"], ex["epoch"]
        return out + [(0, until, who)]

    def finish(self, results: list, epochs: int) -> Optional[str]:
        """lineage.csv, schedules.csv, pbt.png and the winner's lineage line; returns the winner's name."""
        if not self.history:
            return None
        sign = -1.0 if self.spec.mode == "max" else 1.0
        scored = [(sign * r.best_value, n) for r, n in zip(results, self.names)
                  if r.status != "diverged" and math.isfinite(r.best_value)]
        if not scored:
            return None
        winner = min(scored)[1]
        keys = list(self.spec.params)
        self._csv("lineage.csv", ["epoch", "step", "member", "from", "score", "from_score", *keys], self.exploits)
        rows = [{"epoch": e, "member": n, **self._at(n, e)} for n in self.names for e in range(epochs)]
        self._csv("schedules.csv", ["epoch", "member", *keys], rows)
        line = self.lineage(winner, epochs)
        self.log(f"pbt: winner {winner}'s weights came from " + " <- ".join(
            f"{who} (epochs {a}-{b})" for a, b, who in line) + f"; {len(self.exploits)} exploits -> "
            f"{self.root / 'lineage.csv'}")
        from dlbase.search.pbtplot import plot_schedules
        plot_schedules(self.root / "pbt.png", self.history, keys, epochs, winner, line, self.spec.params)
        return winner

    def _at(self, name: str, epoch: int) -> dict:
        vals = {}
        for e, v in self.history.get(name, []):
            vals = v if e <= epoch else vals
        return vals

    def _csv(self, name: str, fields: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        rundir.write_atomic(self.root / name, buf.getvalue(), name)


def replay_config(sweep, trial: str):
    """The winner's config as it ended (its lr table, its last hyperparameters): best.yaml trains it from scratch."""
    from dlbase.training import checkpoint
    from dlbase.training.state import stored_config
    last = sweep.root / trial / "last.ckpt"
    return stored_config(checkpoint.load(last), last, ())


def check_together(folders: list[Path], spec) -> bool:
    """Whether a population searched inside goes on from its checkpoints (every member has one) or starts."""
    have = [f for f in folders if (f / "last.ckpt").exists()]
    if have and len(have) < len(folders):
        missing = [f.name for f in folders if f not in have]
        raise DlbaseError(f"{_what(spec)}: {', '.join(f.name for f in have)} have checkpoints and "
                          f"{', '.join(missing)} none; its members go on only together: delete "
                          f"{folders[0].parent} to redo the sweep")
    return bool(have)
