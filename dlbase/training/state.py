"""Training state in and out of checkpoints: the monitor that picks best.ckpt, RNG and optimiser state, and
rebuilding a model from a checkpoint alone (eval, export, sweeps)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.config import Config, config_from_dict, load_config
from dlbase.core.augment import Augmenter
from dlbase.core.data import Batcher
from dlbase.core.errors import CheckpointError, ConfigError
from dlbase.core.model import MLP, build_model


class Monitor:
    """Tracks the metric that picks best.ckpt, and early stopping's patience (in epochs)."""

    def __init__(self, cfg: Config, has_val: bool, state: Optional[checkpoint.Best] = None):
        self.metric = cfg.train.early_stop.metric or ("val_accuracy" if has_val else "train_loss")
        self.sign = 1.0 if self.metric.endswith("accuracy") else -1.0  # +1: higher is better
        self.patience, self.min_delta = cfg.train.early_stop.patience, cfg.train.early_stop.min_delta
        self.value, self.epoch, self.bad_epochs = -math.inf * self.sign, 0, 0
        if state is not None and state["metric"] == self.metric:  # another metric now: start its record anew
            self.value, self.epoch, self.bad_epochs = state["value"], state["epoch"], state.get("bad_epochs", 0)

    def update(self, metrics: dict, epoch: int) -> bool:
        """Record an epoch's metrics; True when it is the best so far."""
        value = metrics[self.metric]
        if self.sign * (value - self.value) > self.min_delta or self.epoch == 0:
            self.value, self.epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> checkpoint.Best:
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch, "bad_epochs": self.bad_epochs}

    def describe(self) -> str:
        shown = f"{100 * self.value:.2f}%" if self.metric.endswith("accuracy") else f"{self.value:.4f}"
        return f"best {self.metric} {shown} at epoch {self.epoch}"


def rng_state(batcher: Batcher, device: torch.device, augmenter: Optional[Augmenter] = None) -> dict:
    """The run's random streams: torch's (dropout), the data order's, CUDA's, and train.augment's own."""
    state = {"torch": torch.get_rng_state(), "batcher": batcher.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if augmenter is not None:
        state["augment"] = augmenter.generator.get_state()  # seed and offset, a host read: no sync
    return state


def restore_rng(state: dict, batcher: Batcher, device: torch.device, path: Optional[Path] = None,
                augmenter: Optional[Augmenter] = None) -> None:
    try:
        torch.set_rng_state(state["torch"])
        batcher.generator.set_state(state["batcher"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        if augmenter is not None and "augment" in state:  # a run saved without augmentation starts its draws anew
            augmenter.generator.set_state(state["augment"])
    except (RuntimeError, KeyError, TypeError) as e:
        was = "cuda" if "cuda" in state else "cpu"
        raise CheckpointError(f"{path}: its random-number state was saved on {was} and cannot be restored on "
                              f"{device} ({str(e).splitlines()[0][:80]}); resume on the same kind of device, "
                              f"or start a new run from its weights") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Optional[Path], cfg: Config) -> None:
    """Load the saved moments and step counts, but keep this run's settings (fused, capturable, betas, weight
    decay, ...: torch's load_state_dict would bring back the saved ones), and put step counters where fused or
    capturable kernels want them (on the parameters' device)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit optim.name={cfg.optim.name} ({e})") from None
    for group, keep in zip(optimizer.param_groups, settings):
        group.update(keep)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):  # once, at resume: not in any step
                st["step"] = st["step"].to(p.device, torch.float32) if on_device else st["step"].cpu()


def load_model_state(model: torch.nn.Module, state: dict, path: Optional[Path]) -> None:
    try:
        model.load_state_dict(checkpoint.strip_prefixes(state))
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({detail})") from None


def stored_config(payload: checkpoint.Payload, path: Path, sets=()) -> Config:
    """The resolved config stored in a checkpoint (with --set applied), validated again (it may predate a rule).
    Keys added since it was written mean what the run did then: data.normalize absent is unit."""
    raw = payload["config"]
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "normalize" not in raw["data"]:
        raw = {**raw, "data": {**raw["data"], "normalize": "unit"}}
    return config_from_dict(raw, f"{path} (its stored config)", sets)


def config_of(payload: checkpoint.Payload, path: Path) -> Config:
    """The resolved config stored in a checkpoint, validated again (it may predate a rule)."""
    return stored_config(payload, path)


def load_for_eval(path: Path, device: torch.device) -> tuple[Config, MLP, checkpoint.Payload]:
    """Rebuild the model a checkpoint describes, from the checkpoint alone."""
    payload = checkpoint.load(path)
    cfg = config_of(payload, path)
    model = build_model(cfg, tuple(payload["input_shape"]), device)
    load_model_state(model, payload["model"], path)
    return cfg, model, payload


@dataclass
class Invocation:
    """What `dlbase train` was asked to do: the config, and the checkpoint (or run folder) to go on from."""
    cfg: Config
    resume: Optional[Path] = None  # the checkpoint file resumed from
    payload: Optional[checkpoint.Payload] = None
    folder: Optional[Path] = None  # a run folder to start over in (it holds no checkpoint yet)


def configure(config: Optional[Path], sets: Sequence[str], resume: Optional[Path],
              log: Callable[[str], None] = print) -> Invocation:
    """The config (the file's, or the resumed checkpoint's own, with --set applied) and where to resume from.
    A run folder means its newest readable checkpoint; a folder killed before its first checkpoint starts over
    in place from its config.yaml (or --config)."""
    if resume is None:
        if config is None:
            raise ConfigError("train: --config PATH is required (or --resume RUN_FOLDER); see dlbase train --help")
        return Invocation(load_config(config, sets))
    resume = Path(resume)
    if resume.is_dir() and not any((resume / n).exists() for n in ("last.ckpt", "best.ckpt")):
        stored = resume / "config.yaml"
        if config is None and not stored.exists():
            raise CheckpointError(f"{resume}: no checkpoint and no config.yaml to resume from; start a new run with "
                                  f"dlbase train --config PATH (or --resume {rundir.quote(resume)} --config PATH "
                                  f"to start it over in this folder)")
        log(f"{resume}: no checkpoint yet; starting the run over in this folder from "
            f"{config if config is not None else stored}")
        return Invocation(load_config(config if config is not None else stored, sets), folder=resume)
    if resume.is_dir():
        resume, payload = checkpoint.newest(resume)
    else:
        payload = checkpoint.load(resume)
    cfg = load_config(config, sets) if config is not None else stored_config(payload, resume, sets)
    return Invocation(cfg, resume, payload)
