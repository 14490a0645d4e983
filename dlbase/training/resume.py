"""A single run going on from a checkpoint: where it goes on (its own folder, or a branch beside it when the
checkpoint is not its newest), restoring the model, optimiser, RNGs, monitor and position, and what it says
when there is nothing left to train. Functions of the Trainer (training/train.py), which calls them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dlbase.core import rundir
from dlbase.core.errors import CheckpointError
from dlbase.training import checkpoint
from dlbase.training.progress import Progress, RunResult
from dlbase.training.report import PLOTS
from dlbase.training.state import Monitor, load_model_state, load_optimizer_state, restore_rng


def resume_folder(trainer, path: Path) -> Path:
    """Go on in the checkpoint's folder when it is that run's newest checkpoint; otherwise branch into a new
    folder beside it, so the run's later history (last.ckpt, metrics.csv) is never rewritten."""
    folder = path.parent
    try:
        newest, newest_payload = checkpoint.newest(folder)
    except CheckpointError:
        return folder
    if newest.resolve() == path.resolve() or trainer.payload["step"] >= newest_payload["step"]:
        return folder
    branch = rundir.new_run_dir(folder.parent, folder.name)
    trainer.log(f"{path} is not the newest checkpoint of {folder} ({newest.name} is further along): branching "
             f"into {branch}, so {folder} keeps its later history")
    return branch


def restore(trainer, payload: checkpoint.Payload, path: Optional[Path]) -> None:
    """Model, optimiser, RNGs, monitor and position from a checkpoint, checked against this config."""
    if tuple(payload["input_shape"]) != trainer.data.input_shape:
        raise CheckpointError(f"{path}: trained on {tuple(payload['input_shape'])} images, the data now is "
                              f"{trainer.data.input_shape}")
    load_model_state(trainer.model, payload["model"], path)
    saved_optim = (payload["config"].get("optim") or {}).get("name") if isinstance(payload["config"], dict) else None
    if saved_optim not in (None, trainer.cfg.optim.name):
        trainer.log(f"optim.name is {trainer.cfg.optim.name} now, {saved_optim} in {path}: the new optimiser starts "
                 f"fresh from the saved weights")
    else:
        load_optimizer_state(trainer.optimizer, payload["optimizer"], path, trainer.cfg)
    epoch, step, saved_spe = payload["epoch"], payload["step"], payload["steps_per_epoch"]
    in_epoch = payload.get("in_epoch")
    if saved_spe != trainer.steps_per_epoch:
        if in_epoch:
            raise CheckpointError(f"{path}: saved mid-epoch with {saved_spe} steps per epoch; the config now "
                                  f"makes {trainer.steps_per_epoch} (train.batch_size or the data changed); resume "
                                  f"from an epoch's end, or with the run's own settings")
        step = epoch * trainer.steps_per_epoch  # progress counts in epochs when the epoch's step count changed
        trainer.log(f"{trainer.steps_per_epoch} steps per epoch now ({saved_spe} in {path}): going on after epoch "
                 f"{epoch}, as step {step}")
    restore_rng(payload["rng"], trainer.batcher, trainer.device, path, trainer.augmenter)  # mid-epoch: the state at epoch start
    trainer.progress = Progress(epoch=epoch, step=step, batch=in_epoch["batch"] if in_epoch else 0)
    trainer.run.monitor = Monitor(trainer.cfg, trainer.data.val is not None, payload["best"])


def nothing_to_do(trainer) -> RunResult:
    """The run has reached train.epochs / train.max_steps or stopped early: say so and how to train on."""
    p, t = trainer.progress, trainer.cfg.train
    if trainer.run.monitor.should_stop:
        why, how = "stopped early", "raise train.early_stop.patience (or set it to null)"
    elif t.max_steps is not None:
        why = f"finished {p.step} of train.max_steps={t.max_steps} steps"
        how = "raise train.max_steps (--set train.max_steps=N), or train by epochs (--set train.max_steps=null)"
    else:
        why, how = f"finished {p.epoch} of train.epochs={t.epochs} epochs", "raise train.epochs (--set train.epochs=N)"
    run = trainer.run
    trainer.log(f"nothing to do: the run in {run.folder} {why}; {how} to train on")
    run.status = "nothing_to_do"
    if run.rows and run.writes and not all((run.folder / n).exists() for n in PLOTS):
        from dlbase.training.report import plot_run
        plot_run(run.folder)  # a run stopped between its last checkpoint and its plots
    return trainer.result(0)
