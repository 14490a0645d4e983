"""`dlbase lr-find`: the learning-rate range test (Smith 2017, as fastai's and Lightning's lr finders run it) on a
config's own model, data, optimiser and training step (training/engine.py's Engine), in memory: no run folder is
claimed or written. The lr rises exponentially (core/optim.py's RangeSchedule), the loss of every step is
smoothed (an EMA with bias correction), the test stops once the smoothed loss passes `threshold` times its best,
and the suggestion is the lr at the steepest descent of the smoothed loss (Lightning's rule). `--population K`
(tools/lrpop.py) then trains K learning rates around it for a short real budget, as one population."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from dlbase.core.config import Config
from dlbase.core.errors import ConfigError

BETA = 0.98  # the loss's EMA decay (fastai, Lightning)
THRESHOLD = 4.0  # stop once the smoothed loss passes this many times its best (fastai's 4, Lightning's 4.0)
SKIP_BEGIN, SKIP_END = 10, 1  # Lightning's suggestion() leaves these points out of the steepest-descent search
READ_EVERY = 10  # steps between reads of the losses (one host sync each); the stop is decided per step all the same
RULE = "steepest descent of the smoothed loss (Lightning's suggestion)"


@dataclass
class Watch:
    """The smoothed loss and the stop rule, fed one step's loss at a time (host floats): smoothed_i = avg_i / (1 -
    beta ** (i + 1)) with avg_i = beta * avg_(i-1) + (1 - beta) * loss_i; the test stops at the first step i > 0
    whose smoothed loss passes threshold * the best smoothed loss before it, or that is not finite."""
    threshold: float = THRESHOLD
    beta: float = BETA
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    stop: str = ""  # why the test stopped early ("": it did not)
    _avg: float = field(default=0.0, init=False, repr=False)  # the EMA before its bias correction
    _best: float = field(default=math.inf, init=False, repr=False)  # the best smoothed loss so far

    def add(self, loss: float) -> bool:
        """One step's loss; True when the test stops at this step (its point is kept)."""
        i = len(self.losses)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        s = self._avg / (1 - self.beta ** (i + 1))
        self.losses.append(loss)
        self.smoothed.append(s)
        if not math.isfinite(s):
            self.stop = f"the loss is not finite at step {i + 1}"
        elif i > 0 and s > self.threshold * self._best:
            self.stop = (f"the smoothed loss {s:.4g} passed {self.threshold:g}x its best {self._best:.4g} at step "
                         f"{i + 1}")
        self._best = min(self._best, s)
        return bool(self.stop)


def steepest(smoothed: list[float], skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END) -> Optional[int]:
    """Lightning's suggestion rule: the index of the most negative slope (torch.gradient, unit steps: the lrs are
    evenly spaced in log lr) of the smoothed loss, leaving out the first skip_begin and last skip_end points;
    None when fewer than two points are left."""
    ys = smoothed[skip_begin:len(smoothed) - skip_end]
    if len(ys) < 2 or not all(math.isfinite(y) for y in ys):
        return None
    return skip_begin + int(torch.argmin(torch.gradient(torch.tensor(ys, dtype=torch.float64))[0]))


@dataclass
class RangeResult:
    lrs: list  # the lr of each step taken
    losses: list  # each step's training-batch loss (before its update)
    smoothed: list
    stop: str  # why it stopped early, or ""
    suggestion: Optional[int]  # index into lrs (steepest), or None

    @property
    def suggested_lr(self) -> Optional[float]:
        return self.lrs[self.suggestion] if self.suggestion is not None else None

    @property
    def minimum_lr(self) -> float:
        """fastai's other rule: the lr of the smallest smoothed loss, divided by 10."""
        finite = [(s, i) for i, s in enumerate(self.smoothed) if math.isfinite(s)]
        return self.lrs[min(finite)[1]] / 10 if finite else math.nan


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise ConfigError(f"--start-lr {start_lr:g} --end-lr {end_lr:g}: need 0 < start-lr < end-lr, both finite "
                          f"(e.g. 1e-7 and 10)")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: the range test needs at least 2 steps (e.g. 100)")


def range_test(cfg: Config, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
               threshold: float = THRESHOLD, beta: float = BETA, read_every: int = READ_EVERY) -> RangeResult:
    """Train cfg's model from its initialisation with lr rising from start_lr to end_lr over `steps` steps through
    the Engine `dlbase train` uses (its device, precision, compile mode, loss, augmentation; on CUDA one replayed
    graph), stopping by Watch's rule. Each step's loss is copied on the device and read every read_every steps;
    the stop then cuts the curve at the step that decided it (a few more steps may have run, never recorded).
    Everything lives in memory: no run folder, no checkpoint."""
    from dlbase.core.augment import augmenter
    from dlbase.core.data import Batcher, load_dataset
    from dlbase.core.loss import build_loss
    from dlbase.core.model import build_model, standardizes
    from dlbase.core.optim import RangeSchedule, build_optimizer
    from dlbase.training.engine import Engine, plan_run, resolve_device, set_matmul_precision
    from dlbase.training.progress import epoch_sizes, seed_everything
    check_range(start_lr, end_lr, steps)
    device = resolve_device(cfg.device)
    run_plan = plan_run(cfg, device)
    set_matmul_precision(run_plan, device)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed, device, run_plan.data_dtype)
    model = build_model(cfg, data.input_shape, device)
    if standardizes(cfg):
        model.encoding.set_stats(data.train.x)
    schedule = RangeSchedule(start_lr, end_lr, steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device, graph=run_plan.compile == "graph")
    engine = Engine(model, optimizer, build_loss(cfg.train.loss, cfg.model.output, cfg.train.label_smoothing),
                    data.train, cfg.train, schedule, device, run_plan, cfg.model,
                    augment=augmenter(cfg.train.augment, data.input_shape, device, cfg.seed, 0))
    sizes, batcher = epoch_sizes(cfg, len(data.train)), Batcher(len(data.train), cfg.train.batch_size, device, cfg.seed)
    losses = torch.zeros(steps, device=device)  # (steps,) each step's loss, copied on the device
    watch, step, batch, perm = Watch(threshold, beta), 0, 0, None
    model.train()
    while step < steps and not watch.stop:
        if perm is None or batch == sizes.steps_per_epoch:  # a new epoch's order when the test outlasts one
            perm, batch = batcher.perm()[:sizes.n_used], 0
        stop = min(sizes.steps_per_epoch, batch + read_every, batch + steps - step)
        done = engine.epoch(perm, step, batch, stop, lambda s: losses[s].copy_(engine.last_loss))
        for loss in losses[step:step + done].tolist():  # note: sync, every read_every steps
            if watch.add(loss):
                break
        step, batch = step + done, batch + done
    n = len(watch.losses)
    return RangeResult(schedule.table()[:n], watch.losses, watch.smoothed, watch.stop, steepest(watch.smoothed))


def csv_text(r: RangeResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "lr", "loss", "smoothed_loss", "suggested"])
    for i, (lr, loss, s) in enumerate(zip(r.lrs, r.losses, r.smoothed)):
        w.writerow([i + 1, f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}", int(i == r.suggestion)])
    return buf.getvalue()


def plot(r: RangeResult, path: Path, title: str) -> None:
    """The loss (faint) and smoothed loss against the lr on a log axis, the suggestion marked."""
    from dlbase.training.report import pyplot, save_png
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(r.lrs, r.losses, color="tab:blue", alpha=0.3, lw=1, label="loss of the step's batch")
    ax.plot(r.lrs, r.smoothed, color="tab:blue", lw=2, label=f"smoothed (EMA {BETA}, bias-corrected)")
    if r.suggestion is not None:
        ax.plot([r.suggested_lr], [r.smoothed[r.suggestion]], "o", color="tab:red", ms=8,
                label=f"suggestion {r.suggested_lr:.2e} (steepest descent)")
    finite = [s for s in r.smoothed if math.isfinite(s)]
    if finite:  # the diverging tail would squash the interesting part
        low = min(finite + [v for v in r.losses if math.isfinite(v)])
        ax.set_ylim(max(0.0, low * 0.9), max(min(4.5 * min(finite), max(finite)), finite[0]) * 1.1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(plt, fig, path)


def summary_line(r: RangeResult) -> str:
    stopped = f"stopped: {r.stop}" if r.stop else "ran every step"
    if r.suggestion is None:
        return (f"no suggestion: {len(r.lrs)} steps are too few for the steepest-descent rule (it leaves out the "
                f"first {SKIP_BEGIN} and the last {SKIP_END}); {stopped}; use a lower --start-lr or more --steps")
    return (f"suggested lr {r.suggested_lr:.3g} ({RULE}; minimum/10: {r.minimum_lr:.3g}); {len(r.lrs)} steps "
            f"from {r.lrs[0]:.3g} to {r.lrs[-1]:.3g}, {stopped}")


def lr_find(cfg: Config, out: Path, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            population: Optional[int] = None, lr_range: Optional[str] = None, epochs: int = 1,
            log: Callable[[str], None] = print) -> RangeResult:
    """The command: the range test, lr_find.csv and lr_find.png in out, the suggestion in one line; with
    population, K learning rates trained together (tools/lrpop.py) into out/population/."""
    from dlbase.core.rundir import check_writable, write_atomic
    check_range(start_lr, end_lr, steps)
    lrs = None
    if population is not None:
        from dlbase.tools.lrpop import check_population_args
        lrs = check_population_args(cfg, population, lr_range, epochs, out)  # every refusal before any training
    check_writable(out, "--out")
    r = range_test(cfg, start_lr, end_lr, steps)
    write_atomic(out / "lr_find.csv", csv_text(r), "lr_find.csv")
    plot(r, out / "lr_find.png", f"lr range test: {cfg.name} ({cfg.optim.name}, batch {cfg.train.batch_size})")
    log(summary_line(r))
    log(f"wrote {out / 'lr_find.csv'}, {out / 'lr_find.png'}")
    if population is not None:
        from dlbase.tools.lrpop import lr_population
        lr_population(cfg, out, population, lrs, r.suggested_lr, epochs, log)
    return r
