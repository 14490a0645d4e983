"""Typed, frozen run configuration and load_config(): the only place YAML is read."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dlbase.errors import ConfigError

# Largest config file we read at all: a run config is a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


def _f(default: Any, help: str, *, choices: tuple = (), ge: float | None = None,
       gt: float | None = None, le: float | None = None, aliases: tuple = (),
       pattern: str | None = None, item_ge: float | None = None,
       item_le: float | None = None, max_len: int | None = None, allowed: str = "",
       item_type: type = int, length: int | None = None, item_lt: float | None = None,
       lt: float | None = None) -> Any:
    """A config field: default, one-line help (with units) and the checks load_config applies."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, aliases=aliases, allowed=allowed,
                pattern=pattern, item_ge=item_ge, item_le=item_le, max_len=max_len, item_type=item_type,
                length=length, item_lt=item_lt)
    return field(default=default, metadata=meta)


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata=dict(help=(cls.__doc__ or "").strip()))


DATASETS = ("mnist", "fashion_mnist")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
NORMS = ("none", "batch", "layer")
OUTPUTS = ("softmax", "sigmoid")
ENCODINGS = ("none", "fourier", "gaussian", "learned")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
OPTIM_IMPLS = ("auto", "fused", "foreach", "for_loop")
FUSED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam", "adamw")  # torch has fused kernels for these
SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "onecycle")
LOSSES = ("cross_entropy", "mse")
METRICS = ("val_accuracy", "val_loss", "train_loss")
PRECISIONS = ("auto", "fp32", "bf16", "tf32")
COMPILES = ("auto", "none", "graph", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# optimisers whose CUDA step can be captured in a graph with the lr as a device tensor (fused or capturable);
# torch's Adagrad has no capturable step, so it runs eagerly (train.compile: auto) or is refused (graph)
GRAPH_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adadelta", "adam", "adamw")


@dataclass(frozen=True)
class DataConfig:
    """Where the IDX files are and how the training set is split."""
    dataset: str = _f("mnist", "which dataset: files in the MNIST IDX format", choices=DATASETS)
    root: Optional[str] = _f(None, "dir with the IDX files; null: $DLBASE_DATA, then ./data, then the user cache dir",
                             aliases=("path", "dir", "data_dir"))
    download: bool = _f(True, "not found locally: fetch through torchvision's mirrors; false: never use the network")
    verify: bool = _f(True, "files named and sized as the originals must match the published md5s",
                      aliases=("check", "md5", "verify_md5"))
    val_size: int = _f(5000, "samples held out of the training set (seeded) for validation; 0 = none",
                       ge=0, le=10**9, aliases=("val", "validation_size", "val_split"))
    subset: Optional[int] = _f(None, "use only the first N training samples (quick experiments); null = all",
                               ge=1, le=10**9, aliases=("limit", "n_train"))


@dataclass(frozen=True)
class EncodingConfig:
    """How each input value p (the pixel, scaled to [0, 1]) is encoded before the first layer."""
    name: str = _f("none", "none | fourier (NeRF's gamma(p)) | gaussian (random Fourier features) | learned "
                           "(trainable frequencies and phases)", choices=ENCODINGS, aliases=("type", "kind"))
    num_freqs: int = _f(6, "L: frequencies per input value (fourier, learned: 2^0..2^(L-1) pi; gaussian: L random)",
                        ge=1, le=16, aliases=("L", "frequencies", "n_freqs", "num_frequencies", "levels"))
    include_input: bool = _f(True, "keep p itself beside its encoding", aliases=("include", "keep_input"))
    sigma: float = _f(1.0, "gaussian: standard deviation of the random frequencies (cycles per unit of p)",
                      gt=0.0, le=1e4, aliases=("scale", "std"))
    seed: int = _f(0, "gaussian: seed of the fixed frequency matrix", ge=0, le=2**63 - 1)


@dataclass(frozen=True)
class ModelConfig:
    """The MLP: encoded inputs, the hidden layers, 10 outputs."""
    hidden: tuple = _f((512, 512), "hidden layer widths (units), input to output; [] = linear model",
                       item_ge=1, item_le=1 << 16, max_len=64,
                       aliases=("hidden_size", "hidden_sizes", "layers", "width", "units"))
    activation: str = _f("relu", "nonlinearity after each hidden layer", choices=ACTIVATIONS,
                         aliases=("act", "nonlinearity"))
    dropout: float = _f(0.0, "dropout probability after each hidden activation", ge=0.0, le=0.99)
    init: str = _f("default", "weight initialisation of every linear layer (biases start at 0 unless default)",
                   choices=INITS, aliases=("initialization", "initialisation", "weight_init"))
    norm: str = _f("none", "normalisation of each hidden layer before its activation", choices=NORMS,
                   aliases=("batch_norm", "layer_norm", "normalization", "normalisation", "batchnorm"))
    output: str = _f("softmax", "output units: softmax (with cross_entropy or mse) or sigmoid (mse only)",
                     choices=OUTPUTS, aliases=("output_activation", "out"))
    encoding: EncodingConfig = _section(EncodingConfig)


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its parameters (each optimiser reads only its own; see README)."""
    name: str = _f("adam", "optimiser", choices=OPTIMIZERS, aliases=("optimizer", "type"))
    lr: float = _f(0.001, "learning rate (the peak with warm-up and onecycle)", gt=0.0, le=1e6,
                   aliases=("learning_rate", "lr_rate", "eta"))
    weight_decay: float = _f(0.0, "L2 regularisation coefficient (decoupled for adamw)", ge=0.0, le=1e6,
                             aliases=("wd", "l2", "decay"))
    momentum: float = _f(0.9, "momentum, nesterov: the momentum coefficient", ge=0.0, lt=1.0,
                         aliases=("beta", "mom"))
    betas: tuple = _f((0.9, 0.999), "adam, adamw: decay rates of the first and second moment estimates",
                      item_type=float, length=2, item_ge=0.0, item_lt=1.0, aliases=("beta1", "beta2"))
    eps: float = _f(1e-8, "adagrad, rmsprop, adadelta, adam, adamw: added to the denominator", gt=0.0, le=1.0,
                    aliases=("epsilon",))
    alpha: float = _f(0.99, "rmsprop: decay rate of the squared-gradient average", ge=0.0, lt=1.0)
    rho: float = _f(0.9, "adadelta: decay rate of the squared-gradient and update averages", ge=0.0, lt=1.0)
    impl: str = _f("auto", "auto (fused on CUDA where torch has it) | fused | foreach | for_loop",
                   choices=OPTIM_IMPLS, aliases=("implementation", "fused", "foreach"))


@dataclass(frozen=True)
class ScheduleConfig:
    """How the learning rate moves during training; set per optimiser step."""
    name: str = _f("constant", "constant | step | multistep | exponential | cosine | onecycle",
                   choices=SCHEDULES, aliases=("type", "scheduler", "kind"))
    warmup_steps: int = _f(0, "steps of linear warm-up from lr/warmup_steps to lr, in front of the schedule",
                           ge=0, le=10**9, aliases=("warmup", "warm_up", "warmup_iters"))
    gamma: float = _f(0.1, "step, multistep: lr factor at each drop; exponential: lr factor per epoch",
                      gt=0.0, le=1.0, aliases=("factor", "decay"))
    step_size: int = _f(10, "step: epochs between drops", ge=1, le=10**6, aliases=("step", "every"))
    milestones: tuple = _f((), "multistep: epochs (increasing) after which lr is multiplied by gamma",
                           item_ge=1, item_le=10**6, max_len=1000, aliases=("steps", "drops", "epochs"))
    min_lr: float = _f(0.0, "cosine: lr at the last step", ge=0.0, le=1e6, aliases=("eta_min", "lr_min"))
    pct_start: float = _f(0.3, "onecycle: fraction of the steps spent rising to lr", gt=0.0, lt=1.0)
    div_factor: float = _f(25.0, "onecycle: lr starts at lr / div_factor", ge=1.0, le=1e6)
    final_div_factor: float = _f(1e4, "onecycle: lr ends at lr / div_factor / final_div_factor", ge=1.0, le=1e9)


@dataclass(frozen=True)
class EarlyStopConfig:
    """Stop when the monitored metric has not improved for `patience` epochs; it also picks best.ckpt."""
    patience: Optional[int] = _f(None, "epochs without improvement before stopping; null = never stop early",
                                 ge=1, le=10**6)
    metric: Optional[str] = _f(None, "the metric that picks best.ckpt and drives early stopping (accuracy is "
                                     "maximised, losses minimised); null: val_accuracy, or train_loss when "
                                     "data.val_size is 0", choices=METRICS, aliases=("monitor",))
    min_delta: float = _f(0.0, "smallest change that counts as an improvement", ge=0.0, le=1e6)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""
    epochs: int = _f(10, "passes over the training set", ge=1, le=10**6,
                     aliases=("num_epochs", "n_epochs", "max_epochs", "epoch"))
    max_steps: Optional[int] = _f(None, "optimiser steps (iterations) to train for instead of train.epochs; "
                                        "null = epochs decide", ge=1, le=10**9,
                                  aliases=("steps", "iterations", "iters", "num_steps", "max_iters"))
    batch_size: int = _f(128, "samples per optimiser step", ge=1, le=1 << 24,
                         aliases=("batch", "bs", "batchsize"))
    loss: str = _f("cross_entropy", "cross_entropy, or mse: 1/2 sum_k (o_k - t_k)^2 against one-hot t",
                   choices=LOSSES, aliases=("criterion", "loss_fn", "objective"))
    label_smoothing: float = _f(0.0, "cross_entropy: weight moved from the true class to all classes",
                                ge=0.0, lt=1.0, aliases=("smoothing",))
    grad_clip: Optional[float] = _f(None, "clip the global gradient norm to this; null = no clipping",
                                    gt=0.0, le=1e9, aliases=("clip", "max_grad_norm", "clip_grad_norm"))
    early_stop: EarlyStopConfig = _section(EarlyStopConfig)
    engine: str = _f("autograd", "autograd | manual (gradients by the hand-written delta rule, dlbase/backprop.py)",
                     choices=("autograd", "manual"), aliases=("backprop", "gradients"))
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast, fp32 master weights) "
                                "| tf32 (CUDA matmuls in TF32)", choices=PRECISIONS,
                        aliases=("dtype", "amp", "mixed_precision"))
    compile: str = _f("auto", "auto (graph on CUDA, none on CPU) | none (eager) | graph (each step one CUDA "
                              "graph) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs "
                              "(torch.compile modes)", choices=COMPILES, aliases=("mode", "torch_compile", "graph"))
    log_every: int = _f(50, "steps between progress-bar loss updates (each one is a host sync)",
                        ge=1, le=10**9)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where run folders and .ckpt files go."""
    dir: str = _f("checkpoints", "parent folder of run folders: files go to <dir>/<name>/",
                  aliases=("path", "root", "directory"))
    every_steps: Optional[int] = _f(None, "also write last.ckpt every N optimiser steps, mid-epoch; null = at "
                                          "epoch ends only", ge=1, le=10**9,
                                    aliases=("every", "save_every", "interval", "every_n_steps"))


@dataclass(frozen=True)
class Config:
    """A whole run."""
    name: str = _f("mnist_mlp", "run name: files go to <checkpoint.dir>/<name>/",
                   pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", aliases=("run", "run_name", "experiment"),
                   allowed="up to 128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                           "(it names a folder)")
    seed: int = _f(0, "seed for initialisation, the validation split and the data order",
                   ge=0, le=2**63 - 1)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda|cuda:\d{1,3}",
                     allowed="auto, cpu, cuda or cuda:N")
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    optim: OptimConfig = _section(OptimConfig)
    schedule: ScheduleConfig = _section(ScheduleConfig)
    train: TrainConfig = _section(TrainConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)


def _cross_checks(cfg: Config) -> list[tuple[str, str]]:
    """Rules that tie keys together: (dotted key, message) for each one broken."""
    bad = []
    if list(cfg.schedule.milestones) != sorted(set(cfg.schedule.milestones)):
        bad.append(("schedule.milestones", f"{list(cfg.schedule.milestones)} must be strictly increasing"))
    if cfg.schedule.name == "multistep" and not cfg.schedule.milestones:
        bad.append(("schedule.milestones", "multistep needs at least one milestone (an epoch), e.g. [5, 8]"))
    if cfg.model.output == "sigmoid" and cfg.train.loss == "cross_entropy":
        bad.append(("model.output", "sigmoid outputs go with train.loss: mse; cross_entropy uses softmax"))
    if cfg.train.label_smoothing and cfg.train.loss != "cross_entropy":
        bad.append(("train.label_smoothing", "applies to train.loss: cross_entropy only"))
    if (cfg.train.early_stop.metric or "").startswith("val_") and cfg.data.val_size == 0:
        bad.append(("train.early_stop.metric", f"{cfg.train.early_stop.metric} needs a validation split; "
                                               f"data.val_size is 0 (use train_loss, or set data.val_size)"))
    if cfg.optim.name == "nesterov" and cfg.optim.momentum == 0:
        bad.append(("optim.momentum", "nesterov needs momentum > 0"))
    if cfg.optim.impl == "fused" and cfg.optim.name not in FUSED_OPTIMIZERS:
        bad.append(("optim.impl", f"torch has no fused {cfg.optim.name}; fused exists for "
                                  f"{', '.join(FUSED_OPTIMIZERS)} (use auto or foreach)"))
    if cfg.train.engine == "manual":
        if cfg.model.norm != "none":
            bad.append(("model.norm", f"{cfg.model.norm} is not covered by train.engine: manual (the hand-written "
                                      f"rule does Linear, activation and dropout); use none or engine autograd"))
        if cfg.model.encoding.name == "learned":
            bad.append(("model.encoding.name", "learned has trainable parameters that train.engine: manual does not "
                                               "differentiate; use none, fourier or gaussian, or engine autograd"))
        if cfg.train.compile not in ("auto", "none"):
            bad.append(("train.compile", f"{cfg.train.compile} needs train.engine: autograd; the manual engine "
                                         f"runs eagerly (use auto or none)"))
        if cfg.train.precision in ("bf16",):
            bad.append(("train.precision", "the manual engine computes in fp32 (or tf32); use auto, fp32 or tf32"))
    if cfg.train.compile == "graph" and cfg.optim.name not in GRAPH_OPTIMIZERS:
        bad.append(("train.compile", f"graph mode cannot capture {cfg.optim.name} (no fused or capturable CUDA "
                                     f"step in torch); use compile: none or auto, or one of "
                                     f"{', '.join(GRAPH_OPTIMIZERS)}"))
    if cfg.train.compile == "graph" and cfg.optim.impl in ("foreach", "for_loop"):
        bad.append(("optim.impl", f"{cfg.optim.impl} cannot be captured in a CUDA graph with a moving lr; graph "
                                  f"mode picks fused or capturable kernels itself (use auto)"))
    return bad


# ----------------------------------------------------------------------------- reading

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxdict = 4
_short.maxlevel = 2


def _show(value: Any) -> str:
    return _short.repr(value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses YAML aliases: a config never needs them, and they make billion-laughs bombs."""

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed in a config",
                                       event.start_mark)
        return super().compose_node(parent, index)


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            raise yaml.MarkedYAMLError(None, None, "a mapping key must be a plain value", key_node.start_mark)
        if key in seen:
            raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; errors name the source and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(str(p) for p in (e.context, e.problem) if p) or "malformed YAML"
        raise ConfigError(f"{where}: malformed YAML: {what}") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:
        raise ConfigError(f"{source}: malformed YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_config_file(path: str | os.PathLike) -> Any:
    """Read a YAML file into plain Python values; every failure is a ConfigError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, expected a YAML config file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file is over {MAX_CONFIG_BYTES} bytes; a run config is a few hundred")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return parse_yaml(text, str(p))


# ----------------------------------------------------------------------------- checking


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _all_paths(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of a config class -> its field (sections included)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_all_paths(hints[f.name], prefix + f.name + "."))
    return out


def _suggest(key: str, prefix: str, cls: type) -> str:
    """A close match for an unknown key: a sibling (or alias of one), else the same name in another section."""
    candidates: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for alias in (f.name, *f.metadata.get("aliases", ())):
            candidates[alias] = prefix + f.name
    lowered = str(key).lower()
    if lowered in candidates:
        return candidates[lowered]
    match = difflib.get_close_matches(lowered, list(candidates), n=1, cutoff=0.6)
    if match:
        return candidates[match[0]]
    elsewhere = [p for p, f in _all_paths(Config).items()
                 if p.rsplit(".", 1)[-1] == lowered or lowered in f.metadata.get("aliases", ())]
    return elsewhere[0] if elsewhere else ""


class _Checker:
    def __init__(self, source: str, overridden: dict[str, str]):
        self.source = source
        self.overridden = overridden  # dotted key -> the --set text that gave its value

    def fail(self, key: str, msg: str) -> ConfigError:
        origin = f"--set {self.overridden[key]}" if key in self.overridden else self.source
        return ConfigError(f"{origin}: {key}: {msg}")

    def section(self, cls: type, raw: Any, prefix: str) -> Any:
        key = prefix.rstrip(".") or "(top level)"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"expected a mapping of keys, got {_show(raw)}")
        names = {f.name for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names:
                if prefix == "" and k == "sweep":
                    raise self.fail("sweep", "a sweep: section is read by dlbase sweep, not here; run dlbase sweep "
                                             "--config with this file")
                hint = _suggest(k, prefix, cls)
                msg = "unknown key" + (f"; did you mean {hint}?" if hint else
                                       f"; allowed keys: {', '.join(sorted(names))}")
                raise self.fail(prefix + str(k), msg)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                values[f.name] = self.section(tp, raw[f.name], prefix + f.name + ".")
            else:
                values[f.name] = self.value(prefix + f.name, f, tp, raw[f.name])
        return cls(**values)

    def value(self, key: str, f: dataclasses.Field, tp: Any, v: Any) -> Any:
        m = f.metadata
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if v is None:
                return None
            tp = args[0]
        elif v is None:
            raise self.fail(key, f"must not be null; expected {_type_name(tp)}{self._allowed(m)}")
        if tp is tuple:
            return self.tuple_of(key, m, v)
        out = self.scalar(key, tp, v, m)
        self.check_range(key, out, m)
        if m["choices"] and out not in m["choices"]:
            close = difflib.get_close_matches(str(out), m["choices"], n=1)
            raise self.fail(key, f"{_show(v)} is not one of {', '.join(m['choices'])}"
                            + (f"; did you mean {close[0]}?" if close else ""))
        if m["pattern"] and not re.fullmatch(m["pattern"], out):
            raise self.fail(key, f"{_show(v)} is not allowed; expected {m['allowed']}")
        return out

    def scalar(self, key: str, tp: type, v: Any, m: dict) -> Any:
        if tp is bool:
            if isinstance(v, bool):
                return v
        elif tp is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 2**63:
                return int(v)
        elif tp is float:
            if isinstance(v, str):  # YAML 1.1 reads `1e-3` as a string; accept what Python reads as a number
                try:
                    v = float(v.strip())
                except ValueError:
                    pass
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    out = float(v)
                except OverflowError:
                    raise self.fail(key, f"{_show(v)} is too large{self._allowed(m)}") from None
                if not math.isfinite(out):
                    raise self.fail(key, f"{_show(v)} is not a finite number{self._allowed(m)}")
                return out
        elif tp is str:
            if isinstance(v, str):
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not m["choices"] and not m["pattern"]:
                return str(v)
        raise self.fail(key, f"{_show(v)} is not {_type_name(tp)}{self._allowed(m)}")

    @staticmethod
    def _allowed(m: dict) -> str:
        if m.get("choices"):
            return f" (one of {', '.join(m['choices'])})"
        parts = []
        if m.get("gt") is not None:
            parts.append(f"> {m['gt']}")
        if m.get("ge") is not None:
            parts.append(f">= {m['ge']}")
        if m.get("le") is not None:
            parts.append(f"<= {m['le']:g}" if isinstance(m["le"], float) else f"<= {m['le']}")
        if m.get("lt") is not None:
            parts.append(f"< {m['lt']}")
        return f" ({' and '.join(parts)})" if parts else ""

    def check_range(self, key: str, v: Any, m: dict) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if ((m["gt"] is not None and not v > m["gt"]) or (m["ge"] is not None and not v >= m["ge"])
                or (m["le"] is not None and not v <= m["le"]) or (m["lt"] is not None and not v < m["lt"])):
            raise self.fail(key, f"{_show(v)} is out of range; expected a value{self._allowed(m)}")

    def tuple_of(self, key: str, m: dict, v: Any) -> tuple:
        item_type, example = m["item_type"], "[512, 512]" if m["item_type"] is int else "[0.9, 0.999]"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and m["length"] is None:
            v = [v]  # `hidden: 256` means one layer of 256
        if not isinstance(v, (list, tuple)):
            raise self.fail(key, f"{_show(v)} is not a list of {_type_name(item_type)[3:]}s, e.g. {example}")
        if m["length"] is not None and len(v) != m["length"]:
            raise self.fail(key, f"{_show(v)} has {len(v)} entries; expected exactly {m['length']}, e.g. {example}")
        if m["max_len"] is not None and len(v) > m["max_len"]:
            raise self.fail(key, f"{len(v)} entries; at most {m['max_len']} allowed")
        out = []
        for i, item in enumerate(v):
            if item_type is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if isinstance(item, bool) or not isinstance(item, item_type) or (
                    item_type is float and not math.isfinite(item)):
                raise self.fail(key, f"entry {i} ({_show(item)}) is not {_type_name(item_type)}; "
                                     f"expected a list like {example}")
            lo, hi, lt = m["item_ge"], m["item_le"], m["item_lt"]
            if (lo is not None and item < lo) or (hi is not None and item > hi) or (lt is not None and item >= lt):
                bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                                  f"<= {hi}" if hi is not None else "",
                                                  f"< {lt}" if lt is not None else "") if b)
                raise self.fail(key, f"entry {i} ({item}) is out of range; each must be {bounds}")
            out.append(item)
        return tuple(out)


# ----------------------------------------------------------------------------- overrides


def _apply_override(raw: dict, text: str, overridden: dict[str, str]) -> None:
    """Apply one `--set a.b=value` (value parsed as a YAML scalar or list) to the raw mapping."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.01")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text}: {key!r} is not a dotted key like optim.lr")
    value = parse_yaml(value_text, f"--set {text}") if value_text.strip() else None
    cls: Any = Config
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        here = ".".join(parts[:depth + 1])
        if part not in names:
            hint = _suggest(part, ".".join(parts[:depth]) + "." if depth else "", cls)
            raise ConfigError(f"--set {text}: {here}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
        tp = typing.get_type_hints(cls)[part]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {text}: {here} is not a section; it has no key {parts[depth + 1]!r}")
        cls = tp
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {part}: the file gives it as {_show(child)}, not a section")
        node = child
    node[parts[-1]] = value
    overridden[key] = text


# ----------------------------------------------------------------------------- entry points


def config_from_dict(raw: Any, source: str = "<config>", overrides: typing.Sequence[str] = ()) -> Config:
    """Validate plain values (from YAML, --set or a checkpoint) into a Config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (name:, data:, model:, ...), "
                          f"got {_show(raw)}")
    raw = _deep_copy(raw)
    overridden: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, overridden)
    checker = _Checker(source, overridden)
    cfg = checker.section(Config, raw, "")
    for key, msg in _cross_checks(cfg):
        raise checker.fail(key, msg)
    return cfg


def _deep_copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read, override and validate a config file. path None: the defaults."""
    raw = read_config_file(path) if path is not None else {}
    return config_from_dict(raw, str(path) if path is not None else "<defaults>", overrides)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, not tuples) of a config: what goes in YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `hidden: [512, 512]` reads like the shipped configs."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
