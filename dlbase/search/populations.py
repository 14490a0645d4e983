"""A sweep's trials trained as populations (sweep spec `population: auto | K`): a worker takes up to K slots
from the study at once, the sampler chooses each one's values (TPE's constant liar counts the others as
running), trials of one shape train as one population (dlbase/population/train.py) with each trial's folds as
members, and each trial is then told its result, as a trial trained alone would be.

Per trial, as alone: its run folder (fold-K/ folders with cross-validation), the pruner hearing each epoch's
metric (a pruned member leaves the population at the epoch's end; with cross-validation the folds train
together, so they are not pruned one by one), a diverged member a `diverged` result, and a signal saving every
member and stopping the sweep. A retry whose folder already holds a checkpoint goes on alone, from it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace


from dlbase.training import checkpoint
from dlbase.core.errors import ConfigError, SweepStopped


def population_size(spec, cfg) -> int:
    """How many trials a worker takes at once: spec.population, or for auto as many as fit in memory."""
    if spec.method == "pbt":  # every trial a member of one population (pbt.check_spec)
        return spec.trials
    if spec.population != "auto":
        return int(spec.population)
    from dlbase.training.engine import resolve_device
    from dlbase.population.train import choose_k
    members = spec.cv_folds or 1  # each trial is that many members
    return max(1, choose_k(cfg, resolve_device(cfg.device)) // members)


def run_population(sweep, study, trials: list, prefix: str) -> None:
    """Train the taken trials (optuna Trials, RUNNING) as populations and tell each one's result."""
    from optuna.trial import TrialState

    from dlbase.population.train import group_by_shape
    from dlbase.search.space import decode, distributions, suggest
    from dlbase.search.study import SLOT

    spec, alone, ready = sweep.spec, [], []
    for trial in trials:
        slot = int(trial.user_attrs[SLOT])
        values = decode(spec.params, {k: suggest(trial, k, d) for k, d in distributions(spec.params).items()})
        try:
            cfg = sweep.config_for(values, slot)
        except ConfigError as e:  # as alone: a draw the config checks refuse is an invalid result
            sweep.tell(study, trial, {"trial": f"trial-{slot:03d}", **values, "status": "invalid", "score": None,
                                       "std": None, "epochs": None, "seconds": 0.0, "error": str(e)},
                        TrialState.FAIL, prefix)
            continue
        started = any((run / "last.ckpt").exists() for run in _runs(sweep, cfg))
        together = spec.method == "pbt" or spec.pruner == "halving"  # searched inside: never resumed alone
        (alone if started and not together else ready).append((trial, values, cfg))
    for trial, values, cfg in alone:  # a retry with a checkpoint: resumed alone, exactly where it stopped
        sweep.run_trial(study, trial, prefix, values=values, cfg=cfg)
    for group in group_by_shape([cfg for _, _, cfg in ready]):
        _train_group(sweep, study, [ready[i] for i in group], prefix)


def _runs(sweep, cfg) -> list:
    folder = sweep.root / cfg.name
    return [folder / f"fold-{f + 1}" for f in range(sweep.folds)] if sweep.spec.cv_folds else [folder]


def _train_group(sweep, study, group: list, prefix: str) -> None:
    """One population: every fold of every trial in the group a member; then each trial told its result."""
    from dlbase.population.resume import resume_members
    from dlbase.population.train import train_population
    from dlbase.search.pbt import PBT, check_together, controller

    spec = sweep.spec
    configs, folders, folds, hooks, owner = [], [], [], [], []
    for t, (trial, values, cfg) in enumerate(group):
        for f, run in enumerate(_runs(sweep, cfg)):
            configs.append(replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(run.parent)), name=run.name))
            folders.append(run)
            folds.append((f, sweep.folds) if spec.cv_folds else None)
            hooks.append(_reporter(trial, spec) if spec.pruner not in ("none", "halving") and not spec.cv_folds
                         else None)
            owner.append(t)
    t0 = time.perf_counter()
    resumed = check_together(folders, spec) if spec.method == "pbt" or spec.pruner == "halving" else False
    after = controller(sweep, [c.name for c in configs], resumed)
    if resumed:  # a population searched inside goes on together, from every member's checkpoint
        done = resume_members(folders, log=lambda line: None, after_epoch=after, data=_data(sweep, configs[0]))
        results = [done[f] for f in folders]
    else:  # on an error: _work gives back
        results = train_population(configs, folders, folds if spec.cv_folds else None, log=lambda line: None,
                                   on_epoch=hooks, data=_data(sweep, configs[0]), after_epoch=after)
    if isinstance(after, PBT) and not any(r.status == "preempted" for r in results):  # at its end only
        after.finish(results, configs[0].train.epochs)
    seconds = round(time.perf_counter() - t0, 2)
    stopped = [r for r in results if r.status == "preempted"]
    if stopped or len(results) < len(configs):  # every member saved: each trial's retry goes on from its files
        code = stopped[0].exit_code if stopped else 143
        raise SweepStopped(f"sweep {spec.name} stopped by a signal during a population of {len(group)} trials; "
                           f"every member is saved; rerun the same command to go on from there", code)
    for t, (trial, values, cfg) in enumerate(group):
        outcome = _outcome(spec, [(r, run) for r, run, o in zip(results, folders, owner) if o == t], seconds)
        sweep.tell(study, trial, {"trial": cfg.name, **values, **outcome}, _state(outcome["status"]), prefix, cfg)


def _data(sweep, cfg):
    """The training and test sets on the device once per data config for the whole sweep, as the trials
    trained alone share theirs (sweep.cache)."""
    from dlbase.training.engine import plan_run, resolve_device
    from dlbase.population.data import load_population_data
    device = resolve_device(cfg.device)
    dtype = plan_run(cfg, device).data_dtype
    key = ("population", repr(cfg.data), str(device), str(dtype))
    if key not in sweep.cache:
        sweep.cache[key] = load_population_data(cfg, device, dtype)
    return sweep.cache[key]


def _outcome(spec, members: list, seconds: float) -> dict:
    """A trial's row from its members' results: diverged if any fold diverged; pruned if it was pruned."""
    if any(r.status == "diverged" for r, _ in members):
        fold = next(i for i, (r, _) in enumerate(members) if r.status == "diverged")
        return {"status": "diverged", "score": None, "std": None, "epochs": None, "seconds": seconds,
                "error": "training loss became non-finite" + (f" (fold {fold + 1})" if spec.cv_folds else "")}
    scores = [checkpoint.load(run / "best.ckpt")["metrics"][spec.metric] for _, run in members]
    epochs = [r.epochs_done for r, _ in members]
    pruned = next((r for r, _ in members if r.status == "pruned"), None)
    return {"status": "pruned" if pruned else "finished", "score": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "epochs": max(epochs),
            "seconds": seconds, **({"pruned_at": f"epoch {pruned.epochs_done}"} if pruned else {})}


def _state(status: str):
    from optuna.trial import TrialState
    return {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(status, TrialState.FAIL)


def _reporter(trial, spec):
    def report(epoch: int, metrics: dict) -> bool:
        value = metrics.get(spec.metric)
        if not isinstance(value, float) or not math.isfinite(value):
            return False
        trial.report(value, epoch)
        return trial.should_prune()
    return report
