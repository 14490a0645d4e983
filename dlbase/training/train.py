"""The training loop as a Trainer whose phases read like the algorithm: set up, restore, train an epoch, end an
epoch, finish. Its position is one small Progress object. The hot step (dlbase/training/engine.py) has no host syncs;
validation, logging and checkpoints happen at boundaries."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dlbase.training import checkpoint, distributed, runrecord
from dlbase.core import rundir
from dlbase.core.config import Config, to_yaml
from dlbase.core.data import Batcher, Dataset, load_dataset
from dlbase.training.engine import Engine, plan_run, resolve_device, set_matmul_precision
from dlbase.core.errors import TrainingDiverged
from dlbase.training.evaluate import evaluate
from dlbase.core.loss import build_eval_loss, build_loss
from dlbase.core.model import build_model, standardizes
from dlbase.core.optim import build_optimizer, build_schedule
from dlbase.training.phases import Phases
from dlbase.training.preempt import Preemption
from dlbase.core.backprop import layer_norms
from dlbase.training.state import Monitor, rng_state
from dlbase.training.resume import nothing_to_do, restore, resume_folder
from dlbase.training.progress import (Bar, Progress, RunResult, run_epoch, run_epochs,  # noqa: F401 - the loop's names
                                      seed_everything, step_losses)



class Trainer:
    """One run: `Trainer(cfg, ...).fit()` sets up, restores, trains epoch by epoch and finishes."""

    def __init__(self, cfg: Config, resume: Optional[Path] = None, resume_payload: Optional[checkpoint.Payload] = None,
                 log: Callable[[str], None] = print, folder: Optional[Path] = None,
                 dataset: Optional[Dataset] = None, on_epoch: Optional[Callable[[int, dict], bool]] = None):
        self.cfg, self.log, self.progress, self.phases = cfg, log, Progress(), Phases()
        self.on_epoch = on_epoch  # after each epoch's checkpoints: (epoch, metrics) -> True to stop (a sweep's pruner)
        self.resume, self.payload = resume, resume_payload
        self.rows: list[dict] = []  # metrics.csv
        self.folder: Optional[Path] = None
        try:
            self._setup(folder, dataset)
        except BaseException:  # a refusal, or Ctrl-C during start-up: give back a folder that holds nothing yet
            if self.folder is not None:
                rundir.remove_if_empty(self.folder)
            raise

    # ------------------------------------------------------------------ set up
    def _setup(self, folder: Optional[Path], dataset: Optional[Dataset]) -> None:
        """Device, plan, data, run folder, model, optimiser, engine: every check before any file is written."""
        cfg, phases = self.cfg, self.phases
        with phases("device"):
            self.group, device_spec = distributed.setup(cfg.device)  # torchrun: one process per device
            self.device = resolve_device(device_spec)
            self.plan = plan_run(cfg, self.device, self.group.world)  # every reason it cannot run here, at once
            if not self.group.main:
                self.log = _no_log  # rank 0 speaks and writes; the others train
            set_matmul_precision(self.plan, self.device)
            if self.device.type == "cuda":
                torch.empty(1, device=self.device)  # CUDA's context, here rather than inside the data's copy
        seed_everything(cfg.seed)
        # a cross-validation fold's run resumes on its own fold's split, never on the val_size split
        fold = checkpoint.fold_of(self.payload) if self.payload is not None else None
        self.data = dataset or load_dataset(cfg.data, cfg.seed, self.device, self.plan.data_dtype, fold=fold,
                                            phases=phases)
        with phases("set-up"):
            self._build()
            if self.payload is not None:
                restore(self, self.payload, self.resume)  # before any file is written: a refusal leaves no trace
            self.folder = self._run_folder(folder)
            self._build_engine()

    def _build(self) -> None:
        """The model, optimiser, batcher, schedule and losses this config describes."""
        cfg = self.cfg
        self.model = build_model(cfg, self.data.input_shape, self.device)
        if standardizes(cfg):
            self.model.encoding.set_stats(self.data.train.x)  # once, on the device; a resume restores the same
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, self.device,
                                         graph=self.plan.compile == "graph")
        n = len(self.data.train)
        # batch norm cannot normalise a batch of one: leave one (random) sample out of each epoch instead
        self.n_used = n - 1 if cfg.model.norm == "batch" and n % cfg.train.batch_size == 1 and n > 1 else n
        self.batcher = Batcher(n, cfg.train.batch_size, self.device, cfg.seed)  # a permutation of every sample
        self.steps_per_epoch = -(-self.n_used // cfg.train.batch_size)  # over its first n_used
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.schedule = build_schedule(cfg.schedule, cfg.optim.lr, self.steps_per_epoch, self.total_steps)
        self.loss_fn = build_loss(cfg.train.loss, cfg.model.output, cfg.train.label_smoothing)
        self.eval_loss = build_eval_loss(cfg.train.loss, cfg.model.output)
        self.monitor = Monitor(cfg, self.data.val is not None)

    def _build_engine(self) -> None:
        """DDP's wrapper under torchrun, and the Engine that runs the steps."""
        cfg, forward = self.cfg, None
        if self.group.enabled:  # gradients are averaged across ranks inside backward()
            if cfg.model.norm == "batch":  # one set of batch statistics for the global batch, the same on all ranks
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._seed_rank()
        self.engine = Engine(self.model, self.optimizer, self.loss_fn, self.data.train, cfg.train, self.schedule,
                             self.device, self.plan, cfg.model, forward=forward,
                             shard=(self.group.rank, self.group.world))
        self._snaps = torch.zeros(self.steps_per_epoch // cfg.train.log_every + 1, device=self.device)
        self._start_sum = 0.0  # the loss sum the epoch in progress started this process with (a mid-epoch resume)
        if self.payload is not None and "in_epoch" in self.payload:  # the saved sums are all ranks'
            ie = self.payload["in_epoch"]
            self._start_sum = float(ie["loss_sum"])
            if self.group.main:
                self.engine.set_loss_sum(float(ie["loss_sum"]), float(ie.get("ce_sum", 0.0)))

    def _seed_rank(self) -> None:
        """Each rank draws its own dropout masks (the weights were set from one seed and DDP broadcast rank 0's):
        a stream per rank, from the seed, the rank and the step the run starts at."""
        if self.group.rank:
            seed = (self.cfg.seed * 1_000_003 + self.group.rank * 7919 + self.progress.step) % 2**63
            torch.manual_seed(seed)  # every device's generator too

    def _run_folder(self, folder: Optional[Path]) -> Path:
        """The folder this run writes: the one given (a sweep's trial), the resumed run's own, or a new claim.
        Every rank agrees on rank 0's choice."""
        if self.group.main:
            if folder is None and self.resume is not None:
                folder = resume_folder(self, Path(self.resume))
            if folder is None:
                folder = rundir.new_run_dir(self.cfg.checkpoint.dir, self.cfg.name)
            else:
                rundir.check_writable(Path(folder))
                rundir.claim_existing(Path(folder))
        return Path(self.group.broadcast(str(folder) if self.group.main else None))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        """Train to train.epochs / train.max_steps, an early stop or a signal; returns what happened."""
        p, ended = self.progress, False
        try:
            if self.payload is not None:
                source = Path(self.resume).parent if self.resume is not None else self.folder  # a branch starts
                self.rows = rundir.read_metrics(source / "metrics.csv", p.epoch)  # from its parent's history
                saved = self.payload["metrics"]
                if "lr" in saved and (not self.rows or int(self.rows[-1]["epoch"]) < self.payload["epoch"]):
                    self.rows.append(rundir.metrics_row(self.payload["epoch"], self.payload["step"], saved))
                self.log(f"resuming {self.folder} from {self.resume} (epoch {p.epoch}, step {p.step})")
            if p.step >= self.total_steps or self.monitor.should_stop:
                result, ended = nothing_to_do(self), True
                return result
            if self.group.main:
                rundir.write_atomic(self.folder / "config.yaml", to_yaml(self.cfg), "config.yaml")
                self._open_events()
            self._announce()
            with self.phases("start-up"):
                warmed = self.engine.prewarm()
            if warmed:
                self.log(f"start-up: CUDA kernels loaded on a throwaway copy in {self.engine.prewarm_seconds:.2f}s")
            with Preemption() as self.preempt:
                try:
                    run_epochs(lambda: p.step < self.total_steps and p.status == "running", self._train_epoch,
                               self._end_epoch)
                except TrainingDiverged:
                    self._mark("diverged")
                    raise
            result = self._finish()
            ended = True  # every rank ends here, or in _nothing_to_do, the same way (rank 0 decides the stops)
            return result
        finally:
            if self.events is not None:
                self.events.close()
            if self.group.main and self.folder is not None:
                rundir.remove_if_empty(self.folder)  # stopped before anything was written: no empty run folder
            self.group.close(together=ended)

    events = None  # the run's TensorBoard event log (dlbase/training/tblog.py), rank 0 only, when enabled and installed

    def _open_events(self) -> None:
        if self.cfg.train.tensorboard:
            from dlbase.training.tblog import open_events
            self.events = open_events(self.folder, self.cfg, self.progress.step, self.log)

    def _announce(self) -> None:
        d = self.data
        self.log(f"run folder: {self.folder}  (config.yaml, metrics.csv, last.ckpt, best.ckpt, curves.png, "
                 f"gradnorms.png)")
        fold = f" (fold {d.fold[0] + 1} of {d.fold[1]} validates)" if d.fold is not None else ""
        self.log(f"data: {d.folder}  train {len(d.train)}, val {len(d.val) if d.val else 0}{fold}, test {len(d.test)} "
                 f"on {self.device}  ({self.plan.describe()})")
        if self.n_used < len(d.train):
            self.log(f"model.norm: batch: {len(d.train)} samples at batch {self.cfg.train.batch_size} would leave a "
                     f"last batch of 1, which batch norm cannot normalise; each epoch leaves one random sample out")

    def _train_epoch(self) -> bool:
        """Train the epoch in progress up to its end, stopping at mid-epoch checkpoint boundaries (and there on
        a stop request). True when the epoch is complete."""
        p, every = self.progress, self.cfg.checkpoint.every_steps
        if p.batch == 0 or p.epoch_rng is None:
            p.epoch_rng = self.batcher.generator.get_state()  # before this epoch's draw
        self._t0 = time.perf_counter()
        self.model.train()
        perm = self.batcher.perm()[:self.n_used]  # (N,) on the device; drawn every epoch, even a partial last one
        n_steps = min(self.steps_per_epoch, p.batch + self.total_steps - p.step)  # max_steps may cut it
        self._seen = min(self.n_used, n_steps * self.cfg.train.batch_size)
        bar = self._bar(n_steps)
        self._snap_steps: list[int] = []  # global steps (after the step) whose running loss sum was snapshot
        self._snap_from = (p.step - p.batch, p.batch)  # this epoch's first global step; batches done before this call
        def advance(stop: int) -> None:
            done = self.engine.epoch(perm, p.step, p.batch, stop, lambda s: self._on_step(s, bar), self._should_stop)
            p.batch += done
            p.step += done

        run_epoch(p, n_steps, every, advance, self._at_boundary)
        bar.close()
        return p.status == "running"

    def _at_boundary(self) -> bool:
        """A mid-epoch boundary (every_steps reached, or asked to stop): the NaN guard, last.ckpt, the stop."""
        self._check_finite()
        self._save("last.ckpt", self._payload({}))
        if self._stop_agreed:
            self.progress.status = "preempted"
            return False
        return True

    def _end_epoch(self) -> None:
        """The epoch's one sync, validation, the metrics row, the monitor, then best -> metrics -> last."""
        p = self.progress
        self._check_finite()
        k = len(self._snap_steps)
        read = self.group.sum(torch.cat([self.engine.take_loss_sum(), self._snaps[:k]])).tolist()  # note: sync, per epoch
        train_loss, ce_sum = read[0] / max(1, self._seen), read[1] / max(1, self._seen)
        train_ce = ce_sum if self.engine.plain_ce else None  # label smoothing: the unsmoothed cross-entropy
        step_losses = self._step_losses(read[2:], self._start_sum, read[0])
        self._start_sum = 0.0
        p.epoch, p.batch, p.epoch_rng = p.epoch + 1, 0, None
        train_seconds = time.perf_counter() - self._t0  # after the sync: the steps' GPU work is done
        p.train_seconds += train_seconds
        self.phases.add("training", train_seconds)
        with self.phases("validation"):
            val = evaluate(self.model, self.data.val, self.eval_loss) if self.data.val is not None else None
        lr = self.schedule(p.step - 1)
        norms = layer_norms(self.model)
        self._warn_vanishing(norms)
        metrics = runrecord.epoch_metrics(train_loss, train_ce, val, lr, time.perf_counter() - self._t0,
                                          train_seconds, norms)
        improved = self.monitor.update(metrics, p.epoch)
        ckpt = self._payload(metrics)
        self.rows.append(rundir.metrics_row(p.epoch, p.step, metrics))
        if self.group.main:
            runrecord.save_epoch(self.folder, self.rows, ckpt, improved, self.phases)
        if self.events is not None:
            self.events.epoch(p.epoch, p.step, metrics, step_losses)
        self.log(runrecord.epoch_line(p.epoch, self.epochs_planned(), metrics, improved))
        if self.group.broadcast(self.monitor.should_stop):  # rank 0 decides for all: no rank left waiting
            self.log(runrecord.early_stop_line(self.monitor))
            p.status = "early_stopped"
        elif p.step < self.total_steps and self._agree_stop():  # came with the epoch's last step: its checkpoint
            # is the stop; with the run's last step the run is finished, and status.json says so
            p.status = "preempted"
        elif self.on_epoch is not None and p.step < self.total_steps and self.on_epoch(p.epoch, metrics):
            self.log(runrecord.pruned_line(p.epoch))
            p.status = "pruned"

    def _finish(self) -> RunResult:
        """The summary line, the resume or eval command, then the plots (after the result is printed)."""
        p, folder = self.progress, self.folder
        if p.status == "running":
            p.status = "finished"
        self._mark(p.status)
        if self.events is not None:  # hparams and the run's final metrics, in its own event file
            self.events.finish(self.result(self.preempt.exit_code if p.status == "preempted" else 0))
        if p.status == "preempted":
            self.log(f"{runrecord.stopped_line(self.preempt.signum, p.step, p.epoch, p.batch, self.steps_per_epoch)}; "
                     f"everything up to it is in {folder / 'last.ckpt'}. To go on:")
            self.log(f"  dlbase train --resume {rundir.quote(folder / 'last.ckpt')}")
            return self.result(self.preempt.exit_code)
        peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
                if self.device.type == "cuda" else "")
        best = folder / "best.ckpt"
        if best.exists():
            self.log(f"done: {self.monitor.describe()} -> {best}  (training steps {p.train_seconds:.2f}s{peak})")
            self.log(f"test it: dlbase eval {rundir.quote(best)}")
        else:  # resumed from a checkpoint copied here: the best epoch was saved in the folder it came from
            self.log(f"done: {self.monitor.describe()}, saved before this folder was used (no best.ckpt here); "
                     f"the last weights: {folder / 'last.ckpt'}  (training steps {p.train_seconds:.2f}s{peak})")
            self.log(f"test it: dlbase eval {rundir.quote(folder / 'last.ckpt')}")
        if self.rows and self.group.main:
            from dlbase.training.report import plot_run
            with self.phases("plots"):
                plot_run(folder)  # curves.png, gradnorms.png; a write failure is one line (exit 2), the run is saved
        self.log(self.phases.line())
        return self.result(0)

    def result(self, exit_code: int) -> RunResult:
        p, m = self.progress, self.monitor
        return RunResult(self.folder, p.epoch, m.metric, m.value, m.epoch, self.rows[-1] if self.rows else {},
                         p.train_seconds, p.status, exit_code)

    # ------------------------------------------------------------------ helpers of the phases
    def _payload(self, metrics: dict) -> checkpoint.Payload:
        """A checkpoint of the current position. Mid-epoch (progress.batch > 0) it also holds the data order's
        generator state at its epoch's start and the partial epoch's loss sum."""
        p, rng, in_epoch = self.progress, rng_state(self.batcher, self.device), None
        if p.batch:
            rng["batcher"] = p.epoch_rng
            total = self.group.sum(torch.stack([self.engine.loss_sum, self.engine.ce_sum]))  # all ranks' partial sums
            loss_sum, ce_sum = total.tolist()  # note: sync, at a checkpoint
            in_epoch = {"batch": p.batch, "loss_sum": loss_sum, "ce_sum": ce_sum}
        return runrecord.payload(self.cfg, self.data.input_shape, self.model, self.optimizer.state_dict(),
                                 {"epoch": p.epoch, "step": p.step, "steps_per_epoch": self.steps_per_epoch},
                                 metrics, self.monitor.state(), rng, self.data.fold, in_epoch)

    def _mark(self, status: str) -> None:
        """status.json: how this process left the run (finished, early_stopped, preempted, diverged) and at which
        step, for `dlbase runs`; a later process that resumes the run writes its own."""
        if self.group.main:
            runrecord.mark(self.folder, status, self.progress.step)

    def _save(self, name: str, payload: checkpoint.Payload) -> None:
        if self.group.main:
            with self.phases("checkpoints"):
                checkpoint.save(self.folder / name, payload)

    def _check_finite(self) -> None:
        """The NaN guard, at every check (checkpoints, epoch ends): stop before anything non-finite is saved."""
        p = self.progress
        if not math.isfinite(self.group.sum(self.engine.loss_sum.clone()).item()):  # note: sync, at a boundary
            raise TrainingDiverged(runrecord.diverged_text(p.epoch + 1, p.step, self.schedule(max(0, p.step - 1)),
                                                           runrecord.kept_text(self.folder)))

    def _on_step(self, step: int, bar: "Bar") -> None:
        """After each step is launched (host only): the bar, and every log_every steps a device-to-device copy of
        the epoch's running loss sum, read with the epoch's one sync (TensorBoard's training-loss points)."""
        bar.on_step(step)
        if (step + 1) % self.cfg.train.log_every == 0 and len(self._snap_steps) < self._snaps.shape[0]:
            self._snaps[len(self._snap_steps)].copy_(self.engine.loss_sum)
            self._snap_steps.append(step + 1)

    def _step_losses(self, snaps: list[float], start_sum: float, total: float) -> list[tuple[int, float]]:
        return step_losses(self._snap_steps, snaps, start_sum, self._snap_from, self.cfg.train.batch_size,
                           self.n_used, end=(self.progress.step, total))

    _stop_agreed = False  # a stop request every rank has agreed on (one process: the local flag)
    _stop_calls = 0

    def _agree_stop(self) -> bool:
        requested = self.preempt.requested
        self._stop_agreed = self.group.any(requested, self.device) if self.group.enabled else requested
        return self._stop_agreed

    def _should_stop(self) -> bool:
        """Asked before each step; under torchrun the ranks agree every STOP_CHECK_EVERY steps."""
        if not self.group.enabled:
            return self._agree_stop()
        self._stop_calls += 1
        return self._agree_stop() if self._stop_calls % distributed.STOP_CHECK_EVERY == 0 else self._stop_agreed

    _warned = False  # the vanishing-gradient warning is said once per process

    def _warn_vanishing(self, norms: dict) -> None:
        warning = runrecord.vanishing_warning(norms)
        if warning is not None and not self._warned:
            self._warned = True
            self.log(warning)

    def epochs_planned(self) -> int:
        """The epoch count shown in the epoch lines: the last may be partial when max_steps decides."""
        p = self.progress
        return p.epoch + max(0, -(-(self.total_steps - p.step) // self.steps_per_epoch))

    def _bar(self, n_steps: int) -> "Bar":
        show = sys.stderr.isatty() and self.group.main  # a live bar only on a terminal; logs get epoch lines
        return Bar(self, n_steps, show)


def _no_log(line: str) -> None:
    pass


def train(cfg: Config, resume: Optional[Path] = None, resume_payload: Optional[checkpoint.Payload] = None,
          log: Callable[[str], None] = print, folder: Optional[Path] = None,
          dataset: Optional[Dataset] = None, on_epoch: Optional[Callable[[int, dict], bool]] = None) -> RunResult:
    """Train cfg from scratch, or continue the run that resume_payload (loaded from `resume`) came from.

    folder: use this run folder (a sweep's trial) instead of <checkpoint.dir>/<name>[-N]; dataset: data already
    on the device (a sweep loads it once for all its trials); on_epoch: called after each epoch's checkpoints
    with (epoch, metrics), True stops the run as `pruned` (a sweep's pruner)."""
    return Trainer(cfg, resume, resume_payload, log, folder, dataset, on_epoch).fit()
