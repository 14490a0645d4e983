"""What a run writes and says at the loop's boundaries, in one place for a single run (train.py) and for every
member of a population (population/loop.py): the checkpoint payload, the save order best -> metrics -> last,
status.json, the epoch line with the generalisation gap, the vanishing-gradient warning, and the lines that say
why a run stopped (early stop, pruned, diverged, a signal)."""
from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.backprop import VANISHING_RATIO
from dlbase.core.config import Config, to_dict

Timed = Callable[[str], ContextManager]  # dlbase.training.phases.Phases, or nothing


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
        "model": checkpoint.strip_prefixes({k: v.detach().cpu() for k, v in model.state_dict().items()}),
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
    norms: backprop.layer_norms (grad_norm_i, weight_norm_i per Linear layer)."""
    n_layers = len(norms) // 2
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
