"""Hyperparameter sweeps on Optuna (grid, random, TPE; pruning; a study in a database shared by workers),
optional k-fold cross-validation, resumable, test set once. The spec is dlbase/search/spec.py's; the study,
dlbase/search/study.py's; the folder's record and the checks before any trial runs, dlbase/search/folder.py's; the
ranking and the winner's one test, dlbase/search/results.py's.

Selection uses validation data only (a held-out split, or the folds of the training set); the test set is
evaluated once, for the winner, and reported apart. A diverged trial is a result (failed, ranked last); a trial's
result or checkpoint is reused only while its whole resolved config is unchanged; every file goes through
rundir.write_atomic.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import yaml

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.config import Config, config_from_dict, to_dict
from dlbase.core.errors import ConfigError, DlbaseError, SweepStopped, TrainingDiverged
from dlbase.search.folder import RESULT_FILE, check_base, check_folder, check_trials, write_record
from dlbase.search.results import finished, measure_winner, rank, write_results
from dlbase.search.spec import (DISTRIBUTIONS, SWEEP_KEYS, WHERE_KEYS, SweepSpec, flat,  # noqa: F401
                              load_sweep, parse_grid_option, parse_spec, sample, trial_config)


class Sweep:
    """One sweep's folder and Optuna study: every check before any trial runs, the trials this process takes
    (or N worker processes take), the ranking, and the test set once, for the winner. `Sweep(...).run()` returns
    winner.json's contents."""

    def __init__(self, base_raw: dict, spec: SweepSpec, source: str, sets: list[str],
                 log: Callable[[str], None] = print, storage: Optional[str] = None):
        self.spec, self.source, self.sets, self.log = spec, source, list(sets), log
        self.base_raw = base_raw
        self.storage_text = storage or spec.storage
        self.base = config_from_dict(base_raw, source, sets)
        if self.base.data.val_size == 0 and "data.val_size" not in spec.params:  # not as the metric override's
            where = next((f"--set {t}" for t in sets if t.partition("=")[0].strip() == "data.val_size"), source)
            raise ConfigError(f"{where}: data.val_size: 0 leaves no validation data, and the sweep chooses on "
                              f"{spec.metric} of validation data; set data.val_size (with sweep.cv_folds the folds "
                              f"validate and it is not used, but every trial's config must be valid on its own)")
        self.root = Path(self.base.checkpoint.dir).expanduser() / spec.name
        self.folds = spec.cv_folds or 1
        from dlbase.search.pbt import check_spec
        self.spec = spec = check_spec(self)  # pbt's and halving's rules; pbt: every trial one member
        self.configs = self._check_space()  # before any trial runs
        if spec.cv_folds and any(c.data.subset is not None and c.data.subset < spec.cv_folds for c in self.configs):
            raise ConfigError(f"{source}: data.subset is smaller than sweep.cv_folds")
        if spec.cv_folds and spec.population != 1:
            self._check_equal_folds()
        self.cache: dict = {}  # the data goes to the device once per (data config, seed, fold): shared by trials

    def _check_equal_folds(self) -> None:
        """A population trains members on one training-set size: folds that cut n unevenly cannot share one."""
        from dlbase.core.idx import training_size
        k = self.spec.cv_folds
        for cfg in [self.base, *self.configs]:
            n = training_size(cfg.data)
            if n is not None and n % k:
                raise ConfigError(
                    f"{self.source}: sweep.population: {self.spec.population} with sweep.cv_folds: {k} on {n} "
                    f"training images: the folds' training sets differ in size ({n - n // k - 1} and "
                    f"{n - n // k}), and one population trains on one size; use a data.subset that {k} divides "
                    f"(e.g. {n - n % k}) or sweep.population: 1")

    def config_for(self, values: dict, slot: int) -> Config:
        return trial_config(self.base_raw, values, f"trial-{slot:03d}", str(self.root), self.source, self.sets,
                            self.spec.metric)

    def _check_space(self) -> list[Config]:
        """Every trial fixed in advance (grid, random, TPE's start-up) validated as a config; for TPE also each
        value of each list and both ends of each range, alone on the base."""
        spec = self.spec
        configs = [self.config_for(values, i) for i, values in enumerate(sample(spec))]
        if spec.method == "tpe":
            for key, space in spec.params.items():
                values = space if isinstance(space, list) else space.get("values") or [space["low"], space["high"]]
                for v in values:
                    trial_config(self.base_raw, {key: v}, "trial-000", str(self.root), self.source, self.sets,
                                 spec.metric)
        return configs

    def record(self) -> dict:
        """What makes this sweep this sweep (sweep.yaml, and the study's own record): where its database is
        does not count, so several machines can name it differently. The base config and --set are recorded
        apart, resolved (base_record), so a change names its keys."""
        how = ("storage", "heartbeat", "retries", "population")  # how it runs, not what it finds
        from dlbase.search.pbt import unused_keys
        skip = (*how, *unused_keys(self.spec))  # pbt's and halving's keys only where they are used: older sweeps
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in self.spec.__dict__.items() if k not in skip}
        return yaml.safe_load(yaml.safe_dump(spec))

    def base_record(self) -> dict:
        """The resolved base config (with --set) as dotted key -> value, less what no trial takes from it: the
        swept keys, where the files go (each machine its folder) and the early-stop metric (the sweep's)."""
        skip = {*self.spec.params, *WHERE_KEYS, "train.early_stop.metric"}
        return yaml.safe_load(yaml.safe_dump({k: v for k, v in flat(to_dict(self.base)).items() if k not in skip}))

    # ------------------------------------------------------------------ the study
    def open_study(self, rank: int = 0):
        from dlbase.search.study import Study
        return Study(self.spec, self.root, self.storage_text, self.record(), rank,
                     self.folds if self.spec.cv_folds else self.base.train.epochs, self.log, self.base_record())

    def run(self, workers: int = 1, worker_argv: Optional[list[str]] = None, worker: Optional[int] = None) -> dict:
        """Take trials until the study has none left (here, or in `workers` processes started with worker_argv),
        then rank them, write results.csv and best.yaml, and test the winner once. worker: this process is that
        worker of another `dlbase sweep`, which ranks and tests: it only takes trials."""
        from dlbase.search.study import storage_errors, storage_url
        with storage_errors(storage_url(self.storage_text, self.root)):
            return self._run(workers, worker_argv, worker)

    def _run(self, workers: int, worker_argv: Optional[list[str]], worker: Optional[int]) -> dict:
        from dlbase.search.study import hide_password

        spec = self.spec
        check_folder(self)
        study = self.open_study(worker or 0)
        check_trials(self, study)
        check_base(self, study)
        write_record(self)
        if worker is not None:
            self._work(study, f"[worker {worker}] ")
            return {}
        rows, open_ = study.rows()
        pruning = f", pruner {spec.pruner}" if spec.pruner != "none" else ""
        self.log(f"sweep {spec.name}: {spec.method}, {len(rows) + open_} trials"
                 f"{f' x {self.folds} folds' if spec.cv_folds else ''}{pruning}, {spec.metric} ({spec.mode}) on "
                 f"validation data -> {self.root}  (study: {hide_password(study.url)}; {len(rows)} done)")
        if open_ and workers > 1:
            from dlbase.search.workers import run_workers
            run_workers(worker_argv or [], workers, self.base.device, self.log)
        elif open_:
            self._work(study, "")
        rows, open_ = study.rows()
        ranked = rank(list(rows.values()), spec.mode)
        write_results(self, ranked)
        if open_:
            raise DlbaseError(f"sweep {spec.name}: {open_} trial(s) are still running elsewhere or could not be "
                              f"taken; results.csv ranks the {len(rows)} done; rerun the same command to finish")
        if not finished(ranked[0]):
            kinds = collections.Counter(r.get("status") for r in ranked)
            what = (f"every trial {next(iter(kinds))} ({len(rows)} of {len(rows)}" if len(kinds) == 1 else
                     f"no trial finished ({', '.join(f'{n} {k}' for k, n in kinds.items())} of {len(rows)}")
            raise DlbaseError(f"sweep {spec.name}: {what}; see {self.root / 'results.csv'}); "
                              f"no winner, and the test set was not used; lower optim.lr or set train.grad_clip, "
                              f"and run the new sweep under another name")
        return measure_winner(self, study, ranked[0], ranked)

    def _work(self, study, prefix: str) -> None:
        """Take slots until none is left; while other workers still run trials, wait: one may die, and its
        trial comes back here as a retry."""
        from tqdm.auto import tqdm

        rows, open_ = study.rows()
        bar = tqdm(total=len(rows) + open_, initial=len(rows), desc="trials", unit="trial", disable=None,
                   position=0)
        from dlbase.search.populations import population_size, run_population

        k = population_size(self.spec, self.base)
        try:
            while True:
                taken = []
                while len(taken) < k and (trial := study.take()) is not None:
                    taken.append(trial)
                if not taken:
                    if study.running() == 0:
                        return
                    time.sleep(min(2.0, self.spec.heartbeat / 2))  # another worker's trial: it may yet die
                    continue
                try:
                    with contextlib.ExitStack() as beats:  # every taken trial beats until it is told
                        for trial in taken:
                            beats.enter_context(study.beating(trial))
                        if k == 1:
                            self.run_trial(study, taken[0], prefix)
                        else:
                            run_population(self, study, taken, prefix)
                except BaseException as e:  # a signal, an error: what is not told yet is retried, from its files
                    # a stop the user asked for (SIGTERM, Ctrl-C) is not a failure: it uses up no retry
                    study.give_back(taken, counts=not isinstance(e, (SweepStopped, KeyboardInterrupt)))
                    if isinstance(e, SweepStopped):
                        raise SweepStopped(prefix + str(e), e.exit_code) from None
                    raise
                bar.update(len(taken))
        finally:
            bar.close()

    def run_trial(self, study, trial, prefix: str, values: Optional[dict] = None,
                   cfg: Optional[Config] = None) -> dict:
        """Train one trial (each fold with cross-validation), reporting to the pruner; tell the study how it
        ended. A diverged or invalid trial is a result; a stopped one is retried when the sweep is rerun.
        values, cfg: already drawn and built (a population's worker)."""
        from optuna.trial import TrialState

        from dlbase.search.space import decode, distributions, suggest
        from dlbase.search.study import SLOT

        spec = self.spec
        slot = int(trial.user_attrs[SLOT])
        name = f"trial-{slot:03d}"
        if values is None:
            values = decode(spec.params, {k: suggest(trial, k, d) for k, d in distributions(spec.params).items()})
        try:
            cfg = cfg or self.config_for(values, slot)
        except ConfigError as e:  # a TPE draw the config checks refuse (e.g. a combination): a failed result
            return self.tell(study, trial, {"trial": name, **values, "status": "invalid", "score": None,
                                             "std": None, "epochs": None, "seconds": 0.0, "error": str(e)},
                              TrialState.FAIL, prefix)
        outcome = self._train_folds(trial, values, cfg)  # a signal or an error: _work gives the trial back
        state = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(outcome["status"], TrialState.FAIL)
        return self.tell(study, trial, {"trial": name, **values, **outcome}, state, prefix, cfg)

    def tell(self, study, trial, row: dict, state, prefix: str, cfg: Optional[Config] = None) -> dict:
        import socket

        from optuna.trial import TrialState

        from dlbase.search.study import ROW

        spec, folder = self.spec, self.root / row["trial"]
        row = {**row, "host": socket.gethostname()}
        if cfg is not None:
            folder.mkdir(parents=True, exist_ok=True)
            rundir.write_atomic(folder / RESULT_FILE, json.dumps({**row, "config": to_dict(cfg)}),
                                "the trial's result")
        trial.set_user_attr(ROW, row)  # results.csv comes from the study: every machine's trials
        if state == TrialState.COMPLETE:
            study.study.tell(trial, row["score"])
        else:
            study.study.tell(trial, state=state)
        shown = {k: row[k] for k in spec.params}
        if row["status"] == "finished":
            self.log(f"{prefix}{row['trial']}: {shown}  {spec.metric} {row['score']:.4f}"
                     + (f" +- {row['std']:.4f}" if self.folds > 1 else ""))
        elif row["status"] == "pruned":
            self.log(f"{prefix}{row['trial']}: {shown}  pruned after {row['pruned_at']} ({spec.metric} "
                     f"{row['score']:.4f} so far)")
        else:
            self.log(f"{prefix}{row['trial']}: {shown}  {row['status']}, recorded as failed: {row.get('error')}")
        return row

    def _train_folds(self, trial, values: dict, cfg: Config) -> dict:
        """Each fold (one without cross-validation) trained or resumed; the pruner hears each epoch's metric, or
        with cross-validation the running mean after each fold."""
        from dlbase.training.train import train

        spec, folder = self.spec, self.root / cfg.name
        t0 = time.perf_counter()
        scores, epochs, failure, pruned_at = [], [], None, None

        def report(epoch: int, metrics: dict) -> bool:  # after each epoch's checkpoints
            value = metrics.get(spec.metric)
            if not isinstance(value, float) or not math.isfinite(value):
                return False
            trial.report(value, epoch)
            return trial.should_prune()

        for f in range(self.folds):
            fold = (f, self.folds) if spec.cv_folds else None
            run = folder / f"fold-{f + 1}" if spec.cv_folds else folder
            fcfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(run.parent)), name=run.name)
            last = run / "last.ckpt"
            payload = checkpoint.load(last) if last.exists() else None  # an interrupted trial goes on
            try:
                result = train(fcfg, resume=last if payload else None, resume_payload=payload, folder=run,
                               dataset=self.dataset(fcfg, fold), log=lambda line: None,
                               on_epoch=None if spec.cv_folds or spec.pruner == "none" else report)
            except TrainingDiverged as e:  # scored as failed, ranked last; the sweep goes on
                failure = str(e).split(";")[0] + (f" (fold {f + 1})" if spec.cv_folds else "")
                break
            if result.status == "preempted":  # the trial saved its last.ckpt; the whole sweep stops here
                raise SweepStopped(f"sweep {spec.name} stopped by a signal during {run.relative_to(self.root)}; "
                                   f"rerun the same command to go on from there", result.exit_code)
            scores.append(checkpoint.load(run / "best.ckpt")["metrics"][spec.metric])
            epochs.append(result.epochs_done)
            if result.status == "pruned":
                pruned_at = f"epoch {result.epochs_done}"
                break
            if spec.cv_folds and spec.pruner != "none" and f + 1 < self.folds:
                trial.report(statistics.mean(scores), f + 1)  # a bad trial stops after its first fold
                if trial.should_prune():
                    pruned_at = f"fold {f + 1} of {self.folds}"
                    break
        return {"status": "diverged" if failure else "pruned" if pruned_at else "finished",
                "score": None if failure else statistics.mean(scores),
                "std": None if failure else statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "epochs": max(epochs) if epochs and not failure else None,
                "seconds": round(time.perf_counter() - t0, 2),
                **({"error": failure} if failure else {}), **({"pruned_at": pruned_at} if pruned_at else {})}

    def dataset(self, cfg: Config, fold: Optional[tuple[int, int]]):
        """The data of a trial's run (fold: its part of cross-validation), loaded onto the device once (cache)."""
        from dlbase.core.data import load_dataset
        from dlbase.training.engine import plan, resolve_device
        device = resolve_device(cfg.device)
        dtype = plan(cfg.train, device, cfg.model.encoding.name, cfg.optim.name).data_dtype
        key = (repr(cfg.data), cfg.seed, str(device), str(dtype), fold)
        if key not in self.cache:
            self.cache[key] = load_dataset(cfg.data, cfg.seed, device, dtype, fold=fold)
        return self.cache[key]


def run_sweep(base_raw: dict, spec: SweepSpec, source: str, sets: list[str],
              log: Callable[[str], None] = print, storage: Optional[str] = None, workers: int = 1,
              worker_argv: Optional[list[str]] = None, worker: Optional[int] = None) -> dict:
    """Run (or resume, or join) a sweep: see Sweep."""
    return Sweep(base_raw, spec, source, sets, log, storage).run(workers, worker_argv, worker)
