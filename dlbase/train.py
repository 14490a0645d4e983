"""The training loop. The hot step has no host syncs; eval, logging and checkpoints happen at epoch boundaries."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dlbase import checkpoint, distributed
from dlbase.config import Config, config_from_dict, to_dict, to_yaml
from dlbase.data import Batcher, Dataset, load_dataset
from dlbase.engine import Engine, plan, set_matmul_precision
from dlbase.errors import CheckpointError, ConfigError, TrainingDiverged
from dlbase.evaluate import evaluate
from dlbase.model import MLP
from dlbase.loss import build_eval_loss, build_loss
from dlbase.optim import build_optimizer, build_schedule
from dlbase.preempt import Preemption

# seconds: the whole epoch (training, validation, checkpoints); train_seconds: the training steps alone
METRICS_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "train_seconds")


def seed_everything(seed: int) -> None:
    """The one place global RNGs are seeded (weight init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but CUDA is not available here; use auto or cpu")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


def build_model(cfg: Config, input_shape: tuple[int, int], device: torch.device) -> MLP:
    return MLP(cfg.model, in_features=input_shape[0] * input_shape[1]).to(device)


# ----------------------------------------------------------------------------- run folder


def _has_run(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.ckpt"))


def new_run_dir(cfg: Config) -> Path:
    """<checkpoint.dir>/<name>/, or <name>-2, -3, ... when that folder already holds a run: never overwrite."""
    base = Path(cfg.checkpoint.dir).expanduser() / cfg.name
    folder, k = base, 1
    while _has_run(folder):
        k += 1
        folder = base.with_name(f"{cfg.name}-{k}")
    return folder


def check_writable(folder: Path) -> None:
    """Create folder and prove a file can be written there, before any training time is spent."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir: cannot write to {folder}: {e.strerror or e}") from None


def _write_atomic(path: Path, write: Callable) -> None:
    """Write a small run file through a temp file and os.replace; a full disk is a clear error, not a trace."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write: {e.strerror or e}; the checkpoints already on disk are "
                              f"untouched") from None


def layer_norms(model: torch.nn.Module) -> dict[str, float]:
    """Per Linear layer (1 = the first): the L2 norm of its weight gradient from the last step, and of its
    weights. One host sync for all of them."""
    from dlbase.backprop import linears
    layers = linears(model)
    zero = torch.zeros((), device=layers[0].weight.device)
    values = torch.stack([lin.weight.grad.norm() if lin.weight.grad is not None else zero for lin in layers]
                         + [lin.weight.detach().norm() for lin in layers]).tolist()  # note: sync, per epoch
    n = len(layers)
    return {**{f"grad_norm_{i + 1}": values[i] for i in range(n)},
            **{f"weight_norm_{i + 1}": values[n + i] for i in range(n)}}


VANISHING_RATIO = 1e-3  # first layer's gradient norm below this fraction of the last layer's: warn


def _write_metrics(path: Path, rows: list[dict]) -> None:
    extra = [k for k in (rows[-1] if rows else {}) if k not in METRICS_FIELDS]  # per-layer norms
    def write(fh):
        w = csv.DictWriter(fh, fieldnames=[*METRICS_FIELDS, *extra], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _write_atomic(path, write)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= upto_epoch]


# ----------------------------------------------------------------------------- the loop


@dataclass
class RunResult:
    folder: Path
    epochs_done: int
    best_metric: str
    best_value: float
    best_epoch: int
    last_metrics: dict
    train_seconds: float = 0.0  # the training steps of this call (no validation, checkpoints or start-up)
    status: str = "finished"  # finished | early_stopped | preempted
    exit_code: int = 0  # 143 (SIGTERM) or 130 (SIGINT) when preempted


def _rng_state(batcher: Batcher, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "batcher": batcher.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, batcher: Batcher, device: torch.device, path: Optional[Path] = None) -> None:
    try:
        torch.set_rng_state(state["torch"])
        batcher.generator.set_state(state["batcher"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
    except (RuntimeError, KeyError, TypeError) as e:
        was = "cuda" if "cuda" in state else "cpu"
        raise CheckpointError(f"{path}: its random-number state was saved on {was} and cannot be restored on "
                              f"{device} ({str(e).splitlines()[0][:80]}); resume on the same kind of device, "
                              f"or start a new run from its weights") from None


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Optional[Path], cfg: Config) -> None:
    """Load the saved moments and step counts, but keep this run's settings (fused, capturable, betas, weight
    decay, ...: torch's load_state_dict would bring back the saved ones), and put step counters where fused or
    capturable kernels want them (on the parameters' device)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit optim.name={cfg.optim.name} ({e})") from None
    for group, keep in zip(optimizer.param_groups, settings):
        group.update(keep)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):  # once, at resume: not in any step
                st["step"] = st["step"].to(p.device, torch.float32) if on_device else st["step"].cpu()


def _no_op(step: int) -> None:
    pass


def _no_log(line: str) -> None:
    pass


def _check_distributed(cfg: Config, world: int) -> None:
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is the global batch and must divide among "
                          f"the {world} ranks (each takes batch_size / {world})")
    if cfg.train.engine == "manual":
        raise ConfigError("train.engine: manual computes gradients without DDP's all-reduce; use autograd with torchrun")
    if cfg.train.compile not in ("auto", "none"):
        raise ConfigError(f"train.compile: {cfg.train.compile} is not supported under torchrun yet; use auto or none")


class Monitor:
    """Tracks the metric that picks best.ckpt, and early stopping's patience (in epochs)."""

    def __init__(self, cfg: Config, has_val: bool, state: Optional[dict] = None):
        self.metric = cfg.train.early_stop.metric or ("val_accuracy" if has_val else "train_loss")
        self.sign = 1.0 if self.metric.endswith("accuracy") else -1.0  # +1: higher is better
        self.patience, self.min_delta = cfg.train.early_stop.patience, cfg.train.early_stop.min_delta
        self.value, self.epoch, self.bad_epochs = -math.inf * self.sign, 0, 0
        if state is not None:
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

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch, "bad_epochs": self.bad_epochs}

    def describe(self) -> str:
        shown = f"{100 * self.value:.2f}%" if self.metric.endswith("accuracy") else f"{self.value:.4f}"
        return f"best {self.metric} {shown} at epoch {self.epoch}"


def train(cfg: Config, resume: Optional[Path] = None, resume_payload: Optional[dict] = None,
          log: Callable[[str], None] = print, folder: Optional[Path] = None,
          dataset: Optional[Dataset] = None) -> RunResult:
    """Train cfg from scratch, or continue the run that resume_payload (loaded from `resume`) came from.

    folder: use this run folder (a sweep's trial) instead of <checkpoint.dir>/<name>[-N]; dataset: data already
    on the device (a sweep loads it once for all its trials)."""
    group, device_spec = distributed.setup(cfg.device)  # torchrun: one process per device, PyTorch's own DDP
    device = resolve_device(device_spec)
    run_plan = plan(cfg.train, device, cfg.model.encoding.name, cfg.optim.name)
    if group.enabled:
        _check_distributed(cfg, group.world)
        run_plan = dataclasses.replace(run_plan, compile="none")  # DDP steps run eagerly
        log = log if group.main else _no_log  # rank 0 speaks and writes; the others train
    set_matmul_precision(run_plan, device)
    seed_everything(cfg.seed)
    data: Dataset = dataset or load_dataset(cfg.data, cfg.seed, device, run_plan.data_dtype)  # first: no empty folder
    if group.main:
        folder = Path(folder) if folder is not None else resume.parent if resume is not None else new_run_dir(cfg)
        check_writable(folder)  # before any training time is spent
    folder = Path(group.broadcast(str(folder) if group.main else None))  # every rank agrees on one run folder

    model = build_model(cfg, data.input_shape, device)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device, graph=run_plan.compile == "graph")
    batcher = Batcher(len(data.train), cfg.train.batch_size, device, cfg.seed)
    steps_per_epoch = len(batcher)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)  # the last one may be partial when max_steps decides
    schedule = build_schedule(cfg.schedule, cfg.optim.lr, steps_per_epoch, total_steps)
    loss_fn = build_loss(cfg.train.loss, cfg.model.output, cfg.train.label_smoothing)
    eval_loss = build_eval_loss(cfg.train.loss, cfg.model.output)
    monitor = Monitor(cfg, data.val is not None)
    start_epoch, step = 0, 0
    metrics_path = folder / "metrics.csv"
    rows: list[dict] = []

    if resume_payload is not None:
        if tuple(resume_payload["input_shape"]) != data.input_shape:
            raise CheckpointError(f"{resume}: trained on {tuple(resume_payload['input_shape'])} images, "
                                  f"the data now is {data.input_shape}")
        _load_model_state(model, resume_payload["model"], resume)
        _load_optimizer_state(optimizer, resume_payload["optimizer"], resume, cfg)
        in_epoch_saved = resume_payload.get("in_epoch")
        if in_epoch_saved and int(resume_payload.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            raise CheckpointError(f"{resume}: saved mid-epoch with {resume_payload['steps_per_epoch']} steps per "
                                  f"epoch; the config now makes {steps_per_epoch} (train.batch_size or the data "
                                  f"changed); resume with the run's own settings")
        _restore_rng(resume_payload["rng"], batcher, device, resume)  # mid-epoch: the state at epoch start
        start_epoch, step = int(resume_payload["epoch"]), int(resume_payload["step"])
        monitor = Monitor(cfg, data.val is not None, resume_payload["best"])
        rows = _read_metrics(metrics_path, start_epoch)
        log(f"resuming {folder} from epoch {start_epoch} (step {step})")
    if step >= total_steps or monitor.should_stop:
        why = "stopped early" if monitor.should_stop else f"finished {step} of {total_steps} steps"
        log(f"nothing to do: the run in {folder} {why}; raise train.epochs or train.max_steps "
            f"(--set train.epochs=N) to train on")
        group.close()
        return RunResult(folder, start_epoch, monitor.metric, monitor.value, monitor.epoch, rows[-1] if rows else {})
    if group.main:
        _write_atomic(folder / "config.yaml", lambda fh: fh.write(to_yaml(cfg)))
    log(f"run folder: {folder}  (config.yaml, metrics.csv, last.ckpt, best.ckpt, curves.png, gradnorms.png)")
    log(f"data: {data.folder}  train {len(data.train)}, val {len(data.val) if data.val else 0}, "
        f"test {len(data.test)} on {device}  ({run_plan.describe()})")

    forward = None
    if group.enabled:  # gradients are averaged across ranks inside backward()
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    engine = Engine(model, optimizer, loss_fn, data.train, cfg.train, schedule, device, run_plan, cfg.model,
                    forward=forward, shard=(group.rank, group.world))
    if engine.prewarm():
        log(f"start-up: CUDA kernels loaded on a throwaway copy in {engine.prewarm_seconds:.2f}s")
    in_epoch = (resume_payload or {}).get("in_epoch")  # a mid-epoch checkpoint: where in its epoch we were
    if in_epoch:
        engine.set_loss_sum(float(in_epoch["loss_sum"]) if group.main else 0.0)  # the saved sum is all ranks' 

    def payload(epoch: int, metrics: dict, epoch_rng: Optional[torch.Tensor] = None, batch: int = 0) -> dict:
        """A checkpoint: plain values and tensors only. epoch: completed epochs. A mid-epoch one also holds
        the data order's generator state at its epoch's start and the batch to go on from."""
        out = {
            "format_version": checkpoint.FORMAT_VERSION,
            "config": to_dict(cfg),
            "input_shape": list(data.input_shape),
            # note: device-to-host copies (a sync), only at a checkpoint
            "model": checkpoint.strip_prefixes({k: v.detach().cpu() for k, v in model.state_dict().items()}),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "metrics": metrics,
            "best": monitor.state(),
            "rng": _rng_state(batcher, device),
            "steps_per_epoch": steps_per_epoch,
        }
        if epoch_rng is not None:
            out["rng"]["batcher"] = epoch_rng
            total = group.sum(engine.loss_sum.clone())  # all ranks' partial sums (every rank builds the payload)
            out["in_epoch"] = {"batch": batch, "loss_sum": total.item()}  # note: sync, at a checkpoint
        return out

    def check_finite(epoch: int) -> None:
        """The NaN guard, at every check (checkpoints, epoch ends): stop before anything non-finite is saved."""
        if not math.isfinite(group.sum(engine.loss_sum.clone()).item()):  # note: sync, at a boundary; all agree
            kept = (f"{folder / 'last.ckpt'} and best.ckpt keep the last finite weights"
                    if (folder / "last.ckpt").exists() else "no checkpoint had been written yet")
            raise TrainingDiverged(
                f"training loss became non-finite in epoch {epoch} (detected at step {step}, lr "
                f"{schedule(max(0, step - 1)):.3g}); stopped without saving: {kept}; lower optim.lr or set "
                f"train.grad_clip")

    show_bar = sys.stderr.isatty() and group.main  # a live bar only on a terminal; logs get the epoch lines alone
    stop_agreed = [False]  # a stop request every rank has agreed on (one process: the local flag)
    calls = [0]

    def agree_stop() -> bool:
        stop_agreed[0] = group.any(preempt.requested, device) if group.enabled else preempt.requested
        return stop_agreed[0]

    def should_stop() -> bool:  # asked before each step; ranks agree every STOP_CHECK_EVERY steps
        if not group.enabled:
            return agree_stop()
        calls[0] += 1
        return agree_stop() if calls[0] % distributed.STOP_CHECK_EVERY == 0 else stop_agreed[0]

    def save(name: str, ckpt: dict) -> None:
        if group.main:
            checkpoint.save(folder / name, ckpt)

    every = cfg.checkpoint.every_steps
    epoch = start_epoch  # the loop counts epochs up from here
    train_seconds = 0.0
    status = "finished"
    warned_vanishing = False
    with Preemption() as preempt:
        k0 = int(in_epoch["batch"]) if in_epoch else 0  # batches of the resumed epoch already done
        epochs = start_epoch + max(1, -(-(total_steps - step + k0) // steps_per_epoch))  # for the epoch lines
        while step < total_steps:
            epoch += 1
            t0 = time.perf_counter()
            model.train()
            k, k0 = k0, 0  # batches of this epoch already done (a mid-epoch resume), else 0
            n_steps = min(steps_per_epoch, k + total_steps - step)  # this epoch's last batch (max_steps may cut it)
            epoch_rng = batcher.generator.get_state()  # the data order's state before this epoch's draw
            perm = batcher.perm()  # (N,) on the device; drawn every epoch, even a partial last one
            seen = min(len(data.train), n_steps * cfg.train.batch_size)
            bar = tqdm(total=n_steps, initial=k, desc=f"epoch {epoch}/{epochs}", leave=False,
                       disable=not show_bar, unit="step")

            def on_step(s: int) -> None:  # host-only bookkeeping; a sync only on a terminal, per log interval
                bar.update(1)
                if (s + 1) % cfg.train.log_every == 0 and engine.last_loss is not None:
                    bar.set_postfix(loss=f"{engine.last_loss.item():.4f}", lr=f"{schedule(s):.3g}")  # note: sync

            while k < n_steps:
                # run to the next mid-epoch checkpoint (a multiple of every_steps), the epoch's end, or a signal
                stop = n_steps if every is None else min(n_steps, k + every - (step % every))
                done = engine.epoch(perm, step, k, stop, on_step if show_bar else _no_op,
                                    should_stop)
                k += done
                step += done
                if k < n_steps:  # a mid-epoch boundary: every_steps reached, or asked to stop
                    check_finite(epoch)
                    save("last.ckpt", payload(epoch - 1, {}, epoch_rng, k))
                    in_epoch = {"batch": k}
                    if stop_agreed[0]:
                        break
            bar.close()
            if stop_agreed[0] and k < n_steps:
                status = "preempted"
                break
            lr = schedule(step - 1)

            # ---- epoch boundary: the host syncs below are where they belong
            check_finite(epoch)
            train_loss = group.sum(engine.take_loss_sum()).item() / max(1, seen)  # note: sync, once per epoch
            in_epoch = None
            epoch_train_seconds = time.perf_counter() - t0
            train_seconds += epoch_train_seconds
            val = evaluate(model, data.val, eval_loss) if data.val is not None else None
            metrics = {"train_loss": train_loss, **({"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
                                                    if val else {})}
            norms = layer_norms(model)
            rows.append({"epoch": epoch, "step": step, "train_loss": f"{train_loss:.6f}",
                         "val_loss": f"{val['loss']:.6f}" if val else "",
                         "val_accuracy": f"{val['accuracy']:.6f}" if val else "",
                         "lr": f"{lr:.6g}", "seconds": "", "train_seconds": f"{epoch_train_seconds:.4f}",
                         **{k: f"{v:.6g}" for k, v in norms.items()}})
            n_layers = len(norms) // 2
            first_g, last_g = norms["grad_norm_1"], norms[f"grad_norm_{n_layers}"]
            if n_layers > 1 and first_g < VANISHING_RATIO * last_g and not warned_vanishing:
                warned_vanishing = True
                log(f"warning: vanishing gradients: layer 1's gradient norm ({first_g:.2e}) is "
                    f"{first_g / max(last_g, 1e-300):.1e} of layer {n_layers}'s ({last_g:.2e}); the first layers "
                    f"barely learn (try relu, or a better init)")
            improved = monitor.update(metrics, epoch)
            ckpt = payload(epoch, metrics)
            seconds = time.perf_counter() - t0
            rows[-1]["seconds"] = f"{seconds:.3f}"
            # best, then metrics, then last: a kill between them leaves last.ckpt at the previous epoch, and
            # resuming from it redoes this epoch, rewriting all three
            if improved:
                save("best.ckpt", ckpt)
            if group.main:
                _write_metrics(metrics_path, rows)
            save("last.ckpt", ckpt)
            val_text = (f"  val_loss {val['loss']:.4f} (gap {val['loss'] - train_loss:+.4f})  val_acc "
                        f"{100 * val['accuracy']:.2f}%") if val else ""
            log(f"epoch {epoch}/{epochs}  train_loss {train_loss:.4f}{val_text}  lr {lr:.3g}  {seconds:.1f}s"
                f"{'  *best' if improved else ''}")
            if monitor.should_stop:
                log(f"early stop: no {monitor.metric} improvement for {monitor.bad_epochs} epochs "
                    f"(train.early_stop.patience={monitor.patience})")
                status = "early_stopped"
                break
            if agree_stop():  # the signal came with the epoch's last step: its checkpoint is the stop
                status = "preempted"
                break

    if status == "preempted":
        log(f"stopped by {signal.Signals(preempt.signum).name} at step {step} (epoch {epoch}); everything up "
            f"to it is in {folder / 'last.ckpt'}. To go on:")
        log(f"  dlbase train --resume {folder / 'last.ckpt'}")
        group.close()
        return RunResult(folder, epoch, monitor.metric, monitor.value, monitor.epoch, rows[-1] if rows else {},
                         train_seconds, status, preempt.exit_code)
    if rows and group.main:
        try:
            from dlbase.report import plot_run
            plot_run(folder)  # curves.png, gradnorms.png
        except ImportError:  # pragma: no cover - matplotlib is a dependency
            log("note: matplotlib is not installed; no plots")
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    log(f"done: {monitor.describe()} -> {folder / 'best.ckpt'}  (training steps {train_seconds:.2f}s{peak})")
    log(f"test it: dlbase eval {folder / 'best.ckpt'}")
    group.close()
    return RunResult(folder, epoch, monitor.metric, monitor.value, monitor.epoch, rows[-1] if rows else {},
                     train_seconds, status)


def _load_model_state(model: torch.nn.Module, state: dict, path: Optional[Path]) -> None:
    try:
        model.load_state_dict(checkpoint.strip_prefixes(state))
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({detail})") from None


def config_of(payload: dict, path: Path) -> Config:
    """The resolved config stored in a checkpoint, validated again (it may predate a rule)."""
    return config_from_dict(payload["config"], f"{path} (its stored config)")


def load_for_eval(path: Path, device: torch.device) -> tuple[Config, MLP, dict]:
    """Rebuild the model a checkpoint describes, from the checkpoint alone."""
    payload = checkpoint.load(path)
    cfg = config_of(payload, path)
    shape = payload["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise CheckpointError(f"{path}: input_shape {shape!r} is not [height, width]")
    model = build_model(cfg, tuple(shape), device)
    _load_model_state(model, payload["model"], path)
    return cfg, model, payload
