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
from dlbase.core.config import Config
from dlbase.core.data import Batcher, Dataset, load_dataset
from dlbase.training.engine import Engine, plan_run, resolve_device, set_matmul_precision
from dlbase.core.errors import TrainingDiverged
from dlbase.training.evaluate import evaluate
from dlbase.core.loss import build_eval_loss, build_loss
from dlbase.core.model import build_model, standardizes
from dlbase.core.optim import build_optimizer, build_schedule
from dlbase.training.phases import Phases
from dlbase.training.preempt import Preemption
from dlbase.core.augment import augmenter
from dlbase.core.backprop import layer_norms
from dlbase.core.curvature import epoch_curvature
from dlbase.training.state import Monitor, rng_state
from dlbase.training.resume import nothing_to_do, restore, resume_folder
from dlbase.training.progress import (Bar, Progress, RunResult, Snapshots, epoch_sizes, run_epoch,  # noqa: F401
                                      run_epochs, seed_everything)  # the loop's names
from dlbase.training.runrecord import RunRecord



class Trainer:
    """One run: `Trainer(cfg, ...).fit()` sets up, restores, trains epoch by epoch and finishes."""

    def __init__(self, cfg: Config, resume: Optional[Path] = None, resume_payload: Optional[checkpoint.Payload] = None,
                 log: Callable[[str], None] = print, folder: Optional[Path] = None,
                 dataset: Optional[Dataset] = None, on_epoch: Optional[Callable[[int, dict], bool]] = None):
        self.cfg, self.log, self.progress, self.phases = cfg, log, Progress(), Phases()
        self.resume, self.payload = resume, resume_payload
        # its folder, metrics rows, monitor, events and status; on_epoch: after each epoch's checkpoints,
        # (epoch, metrics) -> True to stop (a sweep's pruner)
        self.run = RunRecord(cfg=cfg, monitor=None, folder=None, on_epoch=on_epoch, log=log)
        try:
            self._setup(folder, dataset)
        except BaseException:  # a refusal, or Ctrl-C during start-up: give back a folder that holds nothing yet
            self.run.close()
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
                self.log = self.run.log = _no_log  # rank 0 speaks and writes; the others train
                self.run.writes = False
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
            self.run.folder = self._run_folder(folder)
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
        sizes = epoch_sizes(cfg, n)
        self.n_used, self.steps_per_epoch, self.total_steps = sizes.n_used, sizes.steps_per_epoch, sizes.total_steps
        self.batcher = Batcher(n, cfg.train.batch_size, self.device, cfg.seed)  # a permutation of every sample
        self.schedule = build_schedule(cfg.schedule, cfg.optim.lr, self.steps_per_epoch, self.total_steps)
        # train.augment's own generator (each rank's own under torchrun), restored with the other RNGs
        self.augmenter = augmenter(cfg.train.augment, self.data.input_shape, self.device, cfg.seed, self.group.rank)
        self.loss_fn = build_loss(cfg.train.loss, cfg.model.output, cfg.train.label_smoothing)
        self.eval_loss = build_eval_loss(cfg.train.loss, cfg.model.output)
        self.run.monitor = Monitor(cfg, self.data.val is not None)

    def _build_engine(self) -> None:
        """DDP's wrapper under torchrun, and the Engine that runs the steps."""
        cfg, forward = self.cfg, None
        if self.group.enabled:  # gradients are averaged across ranks inside backward()
            if cfg.model.uses_batch_norm:  # one set of batch statistics for the global batch, the same on all ranks
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._seed_rank()
        self.engine = Engine(self.model, self.optimizer, self.loss_fn, self.data.train, cfg.train, self.schedule,
                             self.device, self.plan, cfg.model, forward=forward,
                             shard=(self.group.rank, self.group.world), augment=self.augmenter)
        self.snaps = Snapshots(cfg.train.log_every, self.steps_per_epoch, self.engine.loss_sum)
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
            folder = self.run.claim(folder)
        return Path(self.group.broadcast(str(folder) if self.group.main else None))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        """Train to train.epochs / train.max_steps, an early stop or a signal; returns what happened."""
        p, run, ended = self.progress, self.run, False
        try:
            if self.payload is not None:
                run.resume_rows(Path(self.resume).parent if self.resume is not None else run.folder, self.payload)
                self.log(f"resuming {run.folder} from {self.resume} (epoch {p.epoch}, step {p.step})")
            if p.step >= self.total_steps or run.monitor.should_stop:
                result, ended = nothing_to_do(self), True
                return result
            run.start(p.step)
            if self.payload is None:  # a fresh run keeps its initial weights (init.ckpt); a resume has them
                run.keep_init(self._payload({}))
            self._announce()
            with self.phases("start-up"):
                warmed = self.engine.prewarm()
            if warmed:
                self.log(f"start-up: CUDA kernels loaded on a throwaway copy in {self.engine.prewarm_seconds:.2f}s")
            with Preemption() as self.preempt:
                try:
                    run_epochs(lambda: p.step < self.total_steps and run.status == "running", self._train_epoch,
                               self._end_epoch)
                except TrainingDiverged:
                    run.status = "diverged"
                    run.mark(p.step)
                    raise
            result = self._finish()
            ended = True  # every rank ends here, or in _nothing_to_do, the same way (rank 0 decides the stops)
            return result
        finally:
            run.close()  # stopped before anything was written: no empty run folder
            self.group.close(together=ended)

    def _announce(self) -> None:
        d = self.data
        self.log(f"run folder: {self.run.folder}  (config.yaml, metrics.csv, last.ckpt, best.ckpt, curves.png, "
                 f"gradnorms.png)")
        fold = f" (fold {d.fold[0] + 1} of {d.fold[1]} validates)" if d.fold is not None else ""
        self.log(f"data: {d.folder}  train {len(d.train)}, val {len(d.val) if d.val else 0}{fold}, test {len(d.test)} "
                 f"on {self.device}  ({self.plan.describe()})")
        if self.n_used < len(d.train):
            self.log(f"batch norm: {len(d.train)} samples at batch {self.cfg.train.batch_size} would leave a "
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
        self.snaps.begin(p.step, p.batch)
        run_epoch(p, n_steps, every, self.engine, lambda: perm, lambda s: self._on_step(s, bar), self._should_stop,
                  self._at_boundary)
        bar.close()
        return self.run.status == "running"

    def _at_boundary(self) -> bool:
        """A mid-epoch boundary (every_steps reached, or asked to stop): the NaN guard, last.ckpt, the stop."""
        self._check_finite()
        self._save("last.ckpt", self._payload({}))
        if self._stop_agreed:
            self.run.status = "preempted"
            return False
        return True

    def _end_epoch(self) -> None:
        """The epoch's one sync, validation, the metrics row, the monitor, then best -> metrics -> last."""
        p, run = self.progress, self.run
        self._check_finite()
        read = self.group.sum(torch.cat([self.engine.take_loss_sum(), self.snaps.taken()])).tolist()  # note: sync, per epoch
        train_loss, ce_sum = read[0] / max(1, self._seen), read[1] / max(1, self._seen)
        train_ce = ce_sum if self.engine.plain_ce else None  # label smoothing: the unsmoothed cross-entropy
        losses = self.snaps.losses(read[2:], 0, 1, self._start_sum, self.cfg.train.batch_size, self.n_used,
                                   end=(p.step, read[0]))
        self._start_sum = 0.0
        p.epoch, p.batch, p.epoch_rng = p.epoch + 1, 0, None
        train_seconds = time.perf_counter() - self._t0  # after the sync: the steps' GPU work is done
        p.train_seconds += train_seconds
        self.phases.add("training", train_seconds)
        with self.phases("validation"):
            val = evaluate(self.model, self.data.val, self.eval_loss) if self.data.val is not None else None
        lr = self.schedule(p.step - 1)
        norms = {**layer_norms(self.model), **self._curvature()}
        metrics = runrecord.epoch_metrics(train_loss, train_ce, val, lr, time.perf_counter() - self._t0,
                                          train_seconds, norms)
        run.end_epoch(p.epoch, p.step, self.epochs_planned(), metrics, lambda: self._payload(metrics), losses,
                      self.phases)
        run.decide(p.epoch, metrics, p.step < self.total_steps, self._agree_stop, self.group.broadcast)

    def _curvature(self) -> dict:
        """train.hessian_every: the Hessian's extreme eigenvalues on the first train.hessian_samples training
        samples, at this epoch's end (rank 0, which writes the metrics); {} in the other epochs."""
        every, n = self.cfg.train.hessian_every, self.cfg.train.hessian_samples
        if not every or self.progress.epoch % every or not self.group.main:
            return {}
        with self.phases("curvature"):
            return epoch_curvature(self.model, self.data.train.x[:n].float(), self.data.train.y[:n], self.eval_loss)

    def _finish(self) -> RunResult:
        """The summary line, the resume or eval command, then the plots (after the result is printed)."""
        p, run = self.progress, self.run
        if run.status == "running":
            run.status = "finished"
        code = self.preempt.exit_code if run.status == "preempted" else 0
        peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
                if self.device.type == "cuda" else "")
        stopped = (runrecord.stopped_line(self.preempt.signum, p.step, p.epoch, p.batch, self.steps_per_epoch)
                   if run.status == "preempted" else "")
        run.finish(self.result(code), p.step, stopped, f"training steps {p.train_seconds:.2f}s{peak}")
        if run.status == "preempted":
            return self.result(code)
        if run.rows and self.group.main:
            from dlbase.training.report import plot_run
            with self.phases("plots"):
                plot_run(run.folder)  # curves.png, gradnorms.png; a write failure is one line (exit 2), the run is saved
        self.log(self.phases.line())
        return self.result(0)

    def result(self, exit_code: int) -> RunResult:
        p, run, m = self.progress, self.run, self.run.monitor
        return RunResult(run.folder, p.epoch, m.metric, m.value, m.epoch, run.rows[-1] if run.rows else {},
                         p.train_seconds, run.status, exit_code)

    # ------------------------------------------------------------------ helpers of the phases
    def _payload(self, metrics: dict) -> checkpoint.Payload:
        """A checkpoint of the current position. Mid-epoch (progress.batch > 0) it also holds the data order's
        generator state at its epoch's start and the partial epoch's loss sum."""
        p, rng, in_epoch = self.progress, rng_state(self.batcher, self.device, self.augmenter), None
        if p.batch:
            rng["batcher"] = p.epoch_rng
            total = self.group.sum(torch.stack([self.engine.loss_sum, self.engine.ce_sum]))  # all ranks' partial sums
            loss_sum, ce_sum = total.tolist()  # note: sync, at a checkpoint
            in_epoch = {"batch": p.batch, "loss_sum": loss_sum, "ce_sum": ce_sum}
        return runrecord.payload(self.cfg, self.data.input_shape, self.model, self.optimizer.state_dict(),
                                 {"epoch": p.epoch, "step": p.step, "steps_per_epoch": self.steps_per_epoch},
                                 metrics, self.run.monitor.state(), rng, self.data.fold, in_epoch)

    def _save(self, name: str, payload: checkpoint.Payload) -> None:
        if self.group.main:
            with self.phases("checkpoints"):
                checkpoint.save(self.run.folder / name, payload)

    def _check_finite(self) -> None:
        """The NaN guard, at every check (checkpoints, epoch ends): stop before anything non-finite is saved."""
        p = self.progress
        if not math.isfinite(self.group.sum(self.engine.loss_sum.clone()).item()):  # note: sync, at a boundary
            raise TrainingDiverged(runrecord.diverged_text(p.epoch + 1, p.step, self.schedule(max(0, p.step - 1)),
                                                           runrecord.kept_text(self.run.folder)))

    def _on_step(self, step: int, bar: "Bar") -> None:
        """After each step is launched (host only): the bar, and every log_every steps a device-to-device copy of
        the epoch's running loss sum, read with the epoch's one sync (TensorBoard's training-loss points)."""
        bar.on_step(step)
        self.snaps.on_step(step, self.engine.loss_sum)

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
