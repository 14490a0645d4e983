"""A population going on from its members' checkpoints (`dlbase train --resume` of a --seeds member): each
member's weights, monitor, data order and rows, then the population's position, the stacked optimiser's state
and the partial epoch's loss sums. Functions of the Population (population/loop.py), which calls them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dlbase.core.errors import CheckpointError
from dlbase.training import checkpoint
from dlbase.training.state import Monitor, load_model_state


def restore_member(pop, m, path: Path, payload: checkpoint.Payload) -> None:
    """Population pop's member m from its checkpoint: its weights (before they are stacked), monitor, data order
    and metrics rows."""
    if tuple(payload["input_shape"]) != pop.data.input_shape:
        raise CheckpointError(f"{path}: trained on {tuple(payload['input_shape'])} images, the data now is "
                              f"{pop.data.input_shape}")
    load_model_state(m.model, payload["model"], path)
    m.monitor = Monitor(m.cfg, m.val is not None, payload["best"])
    rng = payload["rng"]
    m.batcher.generator.set_state(rng["batcher"])  # mid-epoch: the state before the epoch drew its order
    m.torch_rng = rng["torch"]
    m.epoch_rng = rng["batcher"] if payload.get("in_epoch") else None
    if m.augmenter is not None and "augment" in rng:
        m.augmenter.generator.set_state(rng["augment"])
    m.epochs_done, m.steps_done = payload["epoch"], payload["step"]
    m.resume_rows(path.parent, payload)


def restore_position(pop, resumed: Sequence[tuple[Path, checkpoint.Payload]]) -> list[float]:
    """The population's position, each member's optimiser state and partial-epoch loss sums."""
    path, first = resumed[0]
    in_epoch = first.get("in_epoch") or {}
    if first["steps_per_epoch"] != pop.steps_per_epoch:
        raise CheckpointError(f"{path}: saved with {first['steps_per_epoch']} steps per epoch; the config now "
                              f"makes {pop.steps_per_epoch} (train.batch_size or the data changed); a population "
                              f"resumes with its own settings (resume a member alone to change them)")
    position, st = pop.progress, pop.stepper
    position.epoch, position.step, position.batch = first["epoch"], first["step"], int(in_epoch.get("batch", 0))
    st.opt.restart_at(position.step)
    for k, (p, payload) in enumerate(resumed):
        st.opt.load_member_state(k, payload["optimizer"], p)
        ie = payload.get("in_epoch") or {}
        st.loss_sum[k] = float(ie.get("loss_sum", 0.0))
        st.ce_sum[k] = float(ie.get("ce_sum", 0.0))
    return st.loss_sum.tolist()  # note: sync, once at resume: the epoch in progress's TensorBoard points start here
