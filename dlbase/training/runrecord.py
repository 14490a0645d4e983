"""What a run writes and says at the loop's boundaries, in one place for a single run (train.py) and for every
member of a population (population/loop.py): the checkpoint payload, the save order best -> metrics -> last,
status.json, the epoch line with the generalisation gap, the vanishing-gradient warning, and the lines that say
why a run stopped (early stop, pruned, diverged, a signal)."""
from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.backprop import VANISHING_RATIO
from dlbase.core.config import Config, to_dict, to_yaml

Timed = Callable[[str], ContextManager]  # dlbase.training.phases.Phases, or nothing
INIT_CKPT = "init.ckpt"  # a run's initial weights, beside best.ckpt and last.ckpt


def _untimed(name: str) -> ContextManager:
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- files
def payload(cfg: Config, input_shape, model: torch.nn.Module, optimizer_state: dict, position: dict,
            metrics: dict, best: checkpoint.Best, rng: dict, fold: Optional[tuple[int, int]] = None,
            in_epoch: Optional[dict] = None) -> checkpoint.Payload:
    """A checkpoint of a run at position {"epoch", "step", "steps_per_epoch"}: its config, weights (on the CPU,
    without compile/DDP prefixes), optimiser state in torch's format, the epoch's metrics, the monitor, the RNG
    states; a cross-validation fold's (k, K); mid-epoch, the batch reached and the partial loss sums."""
    out: checkpoint.Payload = {
        "format_version": checkpoint.FORMAT_VERSION,
        "config": to_dict(cfg),
        "input_shape": list(input_shape),
        # note: device-to-host copies (a sync), only at a checkpoint
        "model": checkpoint.strip_prefixes({k: v.detach().cpu().contiguous()  # a channels_last CNN too
                                             for k, v in model.state_dict().items()}),
        "optimizer": optimizer_state,
        "epoch": position["epoch"],
        "step": position["step"],
        "steps_per_epoch": position["steps_per_epoch"],
        "metrics": metrics,
        "best": best,
        "rng": rng,
    }
    if fold is not None:
        out["fold"] = list(fold)
    if in_epoch is not None:
        out["in_epoch"] = in_epoch
    return out


def epoch_metrics(train_loss: float, train_ce: Optional[float], val: Optional[dict], lr: float, seconds: float,
                  train_seconds: float, norms: dict) -> dict:
    """An epoch's row of metrics.csv, as numbers (the checkpoint carries it too, so a run killed between its
    checkpoint and metrics.csv gets the row back when it resumes): the training loss, the plain cross-entropy
    beside label smoothing, validation loss and accuracy, the lr, the epoch's seconds and its training steps',
    and each layer's gradient and weight norms."""
    return {"train_loss": train_loss, **({"train_ce": train_ce} if train_ce is not None else {}),
            **({"val_loss": val["loss"], "val_accuracy": val["accuracy"]} if val else {}),
            "lr": lr, "seconds": seconds, "train_seconds": train_seconds, **norms}


def save_epoch(folder: Path, rows: list[dict], ckpt: checkpoint.Payload, improved: bool,
               timed: Timed = _untimed) -> None:
    """An epoch's files in the order that keeps a killed run resumable: best, then metrics, then last. A kill
    between them leaves last.ckpt at the previous epoch, and resuming from the folder's newest checkpoint redoes
    or skips this epoch, rewriting what follows it."""
    with timed("checkpoints"):
        if improved:
            checkpoint.save(folder / "best.ckpt", ckpt)
        rundir.write_metrics(folder / "metrics.csv", rows)
        checkpoint.save(folder / "last.ckpt", ckpt)


def mark(folder: Path, status: str, step: int) -> None:
    """status.json: how this process left the run (finished, early_stopped, pruned, preempted, diverged) and at
    which step, for `dlbase runs`; a later process that resumes the run writes its own."""
    rundir.write_atomic(folder / "status.json", json.dumps({"status": status, "step": step}), "status")


# ----------------------------------------------------------------------------- lines
def epoch_line(epoch: int, planned: int, metrics: dict, improved: bool) -> str:
    """`epoch 3/10  train_loss 0.1234 (cross-entropy 0.1000)  val_loss 0.1500 (gap +0.0266)  val_acc 97.10%
    lr 0.001  2.1s  *best`. The gap compares the validation loss with the training loss of the same kind: the
    plain cross-entropy when label smoothing adds to the training loss."""
    train_loss, train_ce = metrics["train_loss"], metrics.get("train_ce")
    like = train_ce if train_ce is not None else train_loss
    ce_text = f" (cross-entropy {train_ce:.4f})" if train_ce is not None else ""
    val_text = (f"  val_loss {metrics['val_loss']:.4f} (gap {metrics['val_loss'] - like:+.4f})  val_acc "
                f"{100 * metrics['val_accuracy']:.2f}%") if "val_loss" in metrics else ""
    return (f"epoch {epoch}/{planned}  train_loss {train_loss:.4f}{ce_text}{val_text}  lr {metrics['lr']:.3g}  "
            f"{metrics['seconds']:.1f}s{'  *best' if improved else ''}")


def vanishing_warning(norms: dict) -> Optional[str]:
    """The warning when the first layer's gradient norm is below VANISHING_RATIO of the last layer's, else None.
    norms: backprop.layer_norms (grad_norm_i, weight_norm_i per layer), or an epoch's metrics that hold them."""
    n_layers = sum(1 for key in norms if key.startswith("grad_norm_"))
    if n_layers < 2:
        return None
    first_g, last_g = norms["grad_norm_1"], norms[f"grad_norm_{n_layers}"]
    if not first_g < VANISHING_RATIO * last_g:
        return None
    return (f"warning: vanishing gradients: layer 1's gradient norm ({first_g:.2e}) is "
            f"{first_g / max(last_g, 1e-300):.1e} of layer {n_layers}'s ({last_g:.2e}); the first layers "
            f"barely learn (try relu, or a better init)")


def early_stop_line(monitor) -> str:
    return (f"early stop: no {monitor.metric} improvement for {monitor.bad_epochs} epochs "
            f"(train.early_stop.patience={monitor.patience})")


def pruned_line(epoch: int) -> str:
    return f"pruned after epoch {epoch}: the sweep's pruner stopped this trial"


def diverged_text(epoch: int, step: int, lr: Optional[float], kept: str, others: bool = False) -> str:
    """The NaN guard's words: in which epoch, at which step (and lr), what is kept, what to do."""
    at = f"detected at step {step}" + (f", lr {lr:.3g}" if lr is not None else "")
    what = "this member is stopped, the others go on" if others else "stopped without saving"
    return (f"training loss became non-finite in epoch {epoch} ({at}); {what}: {kept}; lower optim.lr or set "
            f"train.grad_clip")


def kept_text(folder: Path, whose: str = "") -> str:
    return (f"{folder / 'last.ckpt'} and best.ckpt keep {whose}the last finite weights"
            if (folder / "last.ckpt").exists() else "no checkpoint had been written yet")


def stopped_line(signum: int, step: int, epoch: int, batch: int, steps_per_epoch: int) -> str:
    """`stopped by SIGTERM at step 195 (in epoch 4, 23 of its 57 steps done)`: epoch counts completed epochs,
    batch the steps of the epoch in progress."""
    where = (f"in epoch {epoch + 1}, {batch} of its {steps_per_epoch} steps done" if batch
             else f"after epoch {epoch}")
    return f"stopped by {signal.Signals(signum).name} at step {step} ({where})"


# ----------------------------------------------------------------------------- one run's record
@dataclass(kw_only=True)
class RunRecord:
    """One run's own side of the loop, the same for a single run (training/train.py) and for each member of a
    population (population/loop.py, whose Member extends it): its config, run folder, metrics rows, monitor,
    TensorBoard events and status, and what it writes and says at each boundary, in that order."""
    cfg: Config
    monitor: Any  # training.state.Monitor: which epoch is best, early stopping's patience
    folder: Optional[Path] = None  # claimed at set-up
    on_epoch: Optional[Callable[[int, dict], bool]] = None  # (epoch, metrics) -> True to prune (a sweep's pruner)
    log: Callable[[str], None] = print
    prefix: str = ""  # before each line it says: "[name] " for a population's member
    writes: bool = True  # rank 0 writes the files; under torchrun the other ranks only train
    rows: list = field(default_factory=list)  # metrics.csv
    events: Any = None  # its TensorBoard event log (training/tblog.py), when train.tensorboard and installed
    status: str = "running"  # running | finished | early_stopped | pruned | preempted | diverged
    warned: bool = False  # the vanishing-gradient warning is said once per process

    def say(self, line: str) -> None:
        self.log(self.prefix + line)

    def claim(self, folder: Optional[Path]) -> Path:
        """Its run folder: the one given (a sweep's trial, a resumed run's own), checked and claimed, or a new
        <checkpoint.dir>/<name>[-N]."""
        if folder is None:
            self.folder = rundir.new_run_dir(self.cfg.checkpoint.dir, self.cfg.name)
        else:
            self.folder = Path(folder)
            rundir.check_writable(self.folder)
            rundir.claim_existing(self.folder)
        return self.folder

    def resume_rows(self, source: Path, payload: checkpoint.Payload) -> None:
        """metrics.csv's rows up to the checkpoint's epoch, from the folder the checkpoint is in (a branch starts
        from its parent's history), and the checkpoint's own row when a kill came between it and metrics.csv."""
        self.rows = rundir.read_metrics(source / "metrics.csv", payload["epoch"])
        saved = payload["metrics"]
        if "lr" in saved and (not self.rows or int(self.rows[-1]["epoch"]) < payload["epoch"]):
            self.rows.append(rundir.metrics_row(payload["epoch"], payload["step"], saved))

    def start(self, step: int) -> None:
        """Before the first step: config.yaml, and the TensorBoard event file when train.tensorboard."""
        if not self.writes:
            return
        rundir.write_atomic(self.folder / "config.yaml", to_yaml(self.cfg), "config.yaml")
        if self.cfg.train.tensorboard:
            from dlbase.training.tblog import open_events
            self.events = open_events(self.folder, self.cfg, step, self.log)

    def keep_init(self, ckpt: checkpoint.Payload) -> None:
        """init.ckpt: the weights a fresh run starts from, in the format of best and last (`dlbase landscape`
        draws the line from it to them); written before the first step of a fresh run, never on a resume."""
        if self.writes:
            checkpoint.save(self.folder / INIT_CKPT, ckpt)

    def end_epoch(self, epoch: int, step: int, planned: int, metrics: dict, ckpt: Callable[[], checkpoint.Payload],
                  losses: list[tuple[int, float]], timed: Timed = _untimed) -> bool:
        """An epoch's end: the monitor, the metrics row, best -> metrics -> last (ckpt() builds the checkpoint
        after the monitor's update, so it holds the new best), TensorBoard (losses: the epoch's training-loss
        points), the epoch line and the vanishing-gradient warning. True when the epoch is the best so far."""
        improved = self.monitor.update(metrics, epoch)
        payload_ = ckpt()
        self.rows.append(rundir.metrics_row(epoch, step, metrics))
        if self.writes:
            save_epoch(self.folder, self.rows, payload_, improved, timed)
        if self.events is not None:
            self.events.epoch(epoch, step, metrics, losses)
        self.say(epoch_line(epoch, planned, metrics, improved))
        warning = vanishing_warning(metrics)
        if warning is not None and not self.warned:
            self.warned = True
            self.say(warning)
        return improved

    def decide(self, epoch: int, metrics: dict, more: bool, stop: Callable[[], bool],
               agree: Callable[[bool], bool] = bool) -> None:
        """After an epoch's files, whether it stops: early (patience), on a signal (the epoch's checkpoint is the
        stop; with the run's last step it is finished instead), or as the sweep's pruner says. more: steps are
        left; agree: the ranks' agreement on early stopping under torchrun (rank 0 decides for all)."""
        if agree(self.monitor.should_stop):
            self.say(early_stop_line(self.monitor))
            self.status = "early_stopped"
        elif more and stop():
            self.status = "preempted"
        elif self.on_epoch is not None and more and self.on_epoch(epoch, metrics):
            self.say(pruned_line(epoch))
            self.status = "pruned"

    def mark(self, step: int) -> None:
        """status.json with its status (rank 0)."""
        if self.writes:
            mark(self.folder, self.status, step)

    def finish(self, result, step: int, stopped: str, spent: str, how_to_go_on: bool = True) -> None:
        """Its end (a diverged run's was said when it diverged): status.json, TensorBoard's HParams, and what
        it says: after a signal, where everything is (stopped: stopped_line's words) and, how_to_go_on, the
        command; else the best epoch and how to test it. spent: e.g. "training steps 1.23s"."""
        if self.status == "running":
            self.status = "finished"
        if self.status == "diverged":
            return
        self.mark(step)
        if self.events is not None:
            self.events.finish(result)
        last, best = self.folder / "last.ckpt", self.folder / "best.ckpt"
        if self.status == "preempted":
            self.say(f"{stopped}; everything up to it is in {last}" + (". To go on:" if how_to_go_on else ""))
            if how_to_go_on:
                self.say(f"  dlbase train --resume {rundir.quote(last)}")
        elif best.exists():
            self.say(f"done: {self.monitor.describe()} -> {best}  ({spent})")
            self.say(f"test it: dlbase eval {rundir.quote(best)}")
        else:  # resumed from a checkpoint copied here: the best epoch was saved in the folder it came from
            self.say(f"done: {self.monitor.describe()}, saved before this folder was used (no best.ckpt here); "
                     f"the last weights: {last}  ({spent})")
            self.say(f"test it: dlbase eval {rundir.quote(last)}")

    def close(self) -> None:
        """Its event file closed; a folder that holds nothing yet given back."""
        if self.events is not None:
            self.events.close()
        if self.writes and self.folder is not None:
            rundir.remove_if_empty(self.folder)
