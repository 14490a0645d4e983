"""The config's schema: one frozen dataclass per section, each field with its default, one-line help (units)
and the checks the reader applies; the tables of choices; what each optimiser supports; the rules that tie keys
together. Pure data: no YAML, no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


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
NORMALIZATIONS = ("standard", "unit")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
NORMS = ("none", "batch", "layer")
CONV_NORMS = ("none", "batch")  # of a convolutional layer's feature maps (BatchNorm2d)
POOLS = ("max", "avg")
OUTPUTS = ("softmax", "sigmoid")
ENCODINGS = ("none", "fourier", "gaussian", "learned")
OPTIM_IMPLS = ("auto", "fused", "foreach", "for_loop")
SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "onecycle")
LOSSES = ("cross_entropy", "mse")
METRICS = ("val_accuracy", "val_loss", "train_loss")
PRECISIONS = ("auto", "fp32", "bf16", "tf32")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILES = ("auto", "none", "graph", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class OptimInfo:
    """What one optimiser is and supports in torch: the config checks, optim.build_optimizer and the engine all
    read this table (timm's OptimInfo, smaller)."""
    torch_class: str  # the torch.optim class
    reads: tuple  # the OptimConfig fields it uses (the README's table)
    fused: bool  # torch has a fused CUDA kernel (optim.impl: fused)
    capturable: bool  # torch has a capturable step (the lr and step counters on the device)
    graph_kwargs: Optional[dict]  # constructor flags that let a CUDA graph capture its step; None: it cannot be
    extra: dict = field(default_factory=dict)  # fixed constructor arguments that define it (momentum, nesterov)
    default_lr: float = 0.001  # optim.lr when the config leaves it null: the literature's (or torch's) value
    state_keys: tuple = ()  # the state tensors torch keeps per parameter (its state_dict keys): the population's too
    counts_steps: bool = True  # torch keeps a `step` count in its per-parameter state
    stacked_rule: str = ""  # PopOptimizer's update rule (dlbase/population/optim.py: _<rule>); "": the optimiser's name


_GRAPH_FUSED = {"fused": True}  # the fused SGD takes the lr as a device tensor and keeps no host-side state
_GRAPH_FUSED_CAPTURABLE = {"fused": True, "capturable": True}
_GRAPH_FOREACH_CAPTURABLE = {"foreach": True, "capturable": True}
# D2L chapter 11's optimisers. Adagrad has a fused kernel but no capturable step, so graph mode cannot take it.
OPTIM_INFO: dict[str, OptimInfo] = {
    "sgd": OptimInfo("SGD", ("lr", "weight_decay"), True, False, _GRAPH_FUSED, counts_steps=False),
    "momentum": OptimInfo("SGD", ("lr", "momentum", "weight_decay"), True, False, _GRAPH_FUSED,
                          state_keys=("momentum_buffer",), counts_steps=False, stacked_rule="sgd"),
    "nesterov": OptimInfo("SGD", ("lr", "momentum", "weight_decay"), True, False, _GRAPH_FUSED,
                          {"nesterov": True}, state_keys=("momentum_buffer",), counts_steps=False, stacked_rule="sgd"),
    "adagrad": OptimInfo("Adagrad", ("lr", "eps", "weight_decay"), True, False, None, default_lr=0.01,
                         state_keys=("sum",)),
    "rmsprop": OptimInfo("RMSprop", ("lr", "alpha", "eps", "weight_decay"), False, True, _GRAPH_FOREACH_CAPTURABLE,
                         state_keys=("square_avg",)),
    # Zeiler's Adadelta has no learning rate: torch's lr scales its update, and 1.0 is the published method
    "adadelta": OptimInfo("Adadelta", ("lr", "rho", "eps", "weight_decay"), False, True, _GRAPH_FOREACH_CAPTURABLE,
                          default_lr=1.0, state_keys=("square_avg", "acc_delta")),
    "adam": OptimInfo("Adam", ("lr", "betas", "eps", "weight_decay"), True, True, _GRAPH_FUSED_CAPTURABLE,
                      state_keys=("exp_avg", "exp_avg_sq")),
    "adamw": OptimInfo("AdamW", ("lr", "betas", "eps", "weight_decay"), True, True, _GRAPH_FUSED_CAPTURABLE,
                       state_keys=("exp_avg", "exp_avg_sq"), stacked_rule="adam"),
}
OPTIMIZERS = tuple(OPTIM_INFO)
FUSED_OPTIMIZERS = tuple(n for n, i in OPTIM_INFO.items() if i.fused)  # optim.impl: fused is allowed for these
GRAPH_OPTIMIZERS = tuple(n for n, i in OPTIM_INFO.items() if i.graph_kwargs is not None)  # train.compile: graph


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
    normalize: str = _f("standard", "standard: inputs (p - mean) / std, one mean and std over all pixels of the "
                                    "training split, kept in the model (eval, export and predict apply it); unit: "
                                    "p in [0, 1]. Encodings always take p in [0, 1]", choices=NORMALIZATIONS,
                        aliases=("normalization", "normalisation", "standardize", "scaling"))


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
class ConvLayerConfig:
    """One convolutional layer of model.conv: Conv2d -> batch norm? -> activation -> pooling? -> dropout?"""
    channels: int = _f(32, "output channels (feature maps) of the convolution", ge=1, le=1 << 14,
                       aliases=("filters", "out_channels", "features", "maps", "width"))
    kernel: int = _f(3, "kernel height and width (px)", ge=1, le=256, aliases=("kernel_size", "size", "k"))
    stride: int = _f(1, "step of the kernel (px)", ge=1, le=256, aliases=("strides", "step"))
    padding: int = _f(0, "zeros added on each side of the map before the convolution (px)", ge=0, le=256,
                      aliases=("pad", "pads"))
    pool: int = _f(1, "pooling window and stride after the activation (px); 1 = no pooling", ge=1, le=256,
                   aliases=("pool_size", "pooling", "subsample"))
    pool_type: str = _f("max", "max | avg: how the pooling window is summarised", choices=POOLS,
                        aliases=("pool_kind", "pool_mode", "pooling_type"))
    norm: str = _f("none", "none | batch (BatchNorm2d before the activation; the convolution then has no bias)",
                   choices=CONV_NORMS, aliases=("batch_norm", "batchnorm", "normalization", "normalisation"))
    activation: Optional[str] = _f(None, "nonlinearity after the convolution; null: model.activation",
                                   choices=ACTIVATIONS, aliases=("act", "nonlinearity"))
    dropout: float = _f(0.0, "dropout probability of each unit of the (pooled) feature maps, while training",
                        ge=0.0, le=0.99)


@dataclass(frozen=True)
class ModelConfig:
    """The network: encoded inputs, convolutional layers (model.conv, optional), the hidden layers, 10 outputs."""
    conv: tuple = _f((), "convolutional layers before the hidden ones, input to output, each a mapping "
                         "{channels, kernel, stride, padding, pool, pool_type, norm, activation, dropout}; "
                         "[] = an MLP", item_type=ConvLayerConfig, max_len=64,
                     allowed="a list of layer mappings, e.g. [{channels: 32, kernel: 5, pool: 2}]",
                     aliases=("convs", "convolutions", "conv_layers", "cnn"))
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

    @property
    def uses_batch_norm(self) -> bool:
        """Does any layer normalise over the batch (model.norm, or a model.conv layer's norm)?"""
        return self.norm == "batch" or any(layer.norm == "batch" for layer in self.conv)


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its parameters (each optimiser reads only its own; see README)."""
    name: str = _f("adam", "optimiser", choices=OPTIMIZERS, aliases=("optimizer", "type"))
    lr: Optional[float] = _f(None, "learning rate (the peak with warm-up and onecycle); null: the optimiser's own "
                                   "default (adadelta 1.0, adagrad 0.01, the others 0.001)", gt=0.0, le=1e6,
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

    def __post_init__(self) -> None:  # lr: null means this optimiser's default; a resolved config holds the number
        if self.lr is None and self.name in OPTIM_INFO:
            object.__setattr__(self, "lr", OPTIM_INFO[self.name].default_lr)


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
    table_epochs: tuple = _f((), "a table of (epoch, factor) points on top of any schedule: from epoch "
                                 "table_epochs[i] (0-based, increasing) on, lr times table_factors[i] (what a PBT "
                                 "sweep's best.yaml replays)", item_ge=0, item_le=10**6, max_len=1000)
    table_factors: tuple = _f((), "the table's lr factors, one per table_epochs entry", item_type=float,
                              item_ge=1e-12, item_le=1e12, max_len=1000)


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
class AugmentConfig:
    """Augmentation of each training batch on the device, inside the step (core/augment.py), drawn from the run's
    own seeded generator; never applied to validation or test data. Every stage is off by default."""
    translate: int = _f(0, "random integer shift of each image in x and in y, up to this many pixels (0: off)",
                        ge=0, le=14, aliases=("shift", "max_shift", "translation"))
    degrees: float = _f(0.0, "random rotation uniform in [-degrees, degrees] (0: off)", ge=0.0, lt=180.0,
                        aliases=("rotation", "rotate", "angle"))
    scale: tuple = _f((1.0, 1.0), "random zoom factor uniform in [lo, hi] ([1, 1]: off), e.g. [0.9, 1.1]",
                      item_type=float, length=2, item_ge=0.01, item_le=100.0, aliases=("zoom",))
    shear: float = _f(0.0, "random shear parallel to the x axis uniform in [-shear, shear] degrees (0: off)",
                      ge=0.0, lt=90.0)
    elastic_alpha: float = _f(0.0, "elastic distortion (Simard et al. 2003): the smoothed displacement field's "
                                   "scale in pixels (Simard: 34; 0: off)", ge=0.0, le=1000.0, aliases=("alpha",))
    elastic_sigma: float = _f(4.0, "elastic distortion: std of the Gaussian that smooths the field, pixels "
                                   "(Simard: 4)", gt=0.0, le=100.0, aliases=("sigma",))

    def __post_init__(self) -> None:  # built directly (core/augment.py's functions, tests): the schema's ranges
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        bad = []
        if isinstance(self.translate, bool) or not isinstance(self.translate, int) or self.translate < 0:
            bad.append(f"translate={self.translate!r} is not an integer >= 0")
        bad += [f"{k}={v!r} is not in [0, {hi})" for k, v, hi in (("degrees", self.degrees, 180),
                ("shear", self.shear, 90), ("elastic_alpha", self.elastic_alpha, math.inf),
                ("elastic_sigma", self.elastic_sigma, math.inf)) if not 0 <= v < hi]
        if len(self.scale) != 2 or not 0 < min(self.scale):  # lo > hi: cross_checks says so in the config's words
            bad.append(f"scale={self.scale!r} is not (lo, hi) with 0 < lo")
        if bad:
            raise ValueError("AugmentConfig: " + "; ".join(bad))

    @property
    def affine(self) -> bool:
        return self.degrees > 0 or self.scale != (1.0, 1.0) or self.shear > 0

    @property
    def elastic(self) -> bool:
        return self.elastic_alpha > 0

    @property
    def enabled(self) -> bool:
        return self.translate > 0 or self.affine or self.elastic


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
    augment: AugmentConfig = _section(AugmentConfig)
    engine: str = _f("autograd", "autograd | manual (gradients by the hand-written delta rule, dlbase/core/backprop.py)",
                     choices=("autograd", "manual"), aliases=("backprop", "gradients"))
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast, fp32 master weights) "
                                "| tf32 (CUDA matmuls in TF32)", choices=PRECISIONS,
                        aliases=("dtype", "amp", "mixed_precision"))
    compile: str = _f("auto", "auto (graph on CUDA, none on CPU) | none (eager) | graph (each step one CUDA "
                              "graph) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs "
                              "(torch.compile modes)", choices=COMPILES, aliases=("mode", "torch_compile", "graph"))
    memory_format: str = _f("auto", "a CNN's convolution weights and maps: auto (channels_last on CUDA, contiguous on "
                            "the CPU) | contiguous (NCHW) | channels_last (NHWC, what cuDNN's fast kernels take); an "
                            "MLP has no maps and ignores it", choices=MEMORY_FORMATS, aliases=("channels_last", "layout"))
    tensorboard: bool = _f(True, "write TensorBoard event files into the run folder (when the tensorboard package is "
                                 "installed): per-epoch metrics, the training loss every log_every steps, hparams",
                           aliases=("tb", "events", "tensorboard_logging"))
    log_every: int = _f(50, "steps between training-loss points in TensorBoard and progress-bar updates (a bar "
                            "update is a host sync; the TensorBoard points are read once per epoch)",
                        ge=1, le=10**9)
    hessian_every: int = _f(0, "epochs between measurements of the loss's curvature (the Hessian's largest and most "
                               "negative eigenvalue, by Lanczos on Hessian-vector products) into metrics.csv and "
                               "TensorBoard, at the epoch's end; 0 = never", ge=0, le=10**6,
                            aliases=("curvature_every", "hessian"))
    hessian_samples: int = _f(1000, "the first N training samples, a fixed batch, that train.hessian_every "
                                    "measures the curvature on", ge=1, le=10**6)


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


def cross_checks(cfg: Config) -> list[tuple[str, str]]:
    """Rules that tie keys together: (dotted key, message) for each one broken."""
    bad = []
    if list(cfg.schedule.milestones) != sorted(set(cfg.schedule.milestones)):
        bad.append(("schedule.milestones", f"{list(cfg.schedule.milestones)} must be strictly increasing"))
    sc = cfg.schedule
    if list(sc.table_epochs) != sorted(set(sc.table_epochs)) or len(sc.table_epochs) != len(sc.table_factors):
        bad.append(("schedule.table_epochs", f"{list(sc.table_epochs)} must be strictly increasing epochs, one per "
                                             f"schedule.table_factors entry ({len(sc.table_factors)} given)"))
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
    lo, hi = cfg.train.augment.scale
    if lo > hi:
        bad.append(("train.augment.scale", f"[{lo}, {hi}] is not [lo, hi] with lo <= hi; e.g. [0.9, 1.1] (or [1, 1]: "
                                           f"no zoom)"))
    if cfg.model.conv and cfg.model.encoding.name != "none":
        bad.append(("model.encoding.name", f"{cfg.model.encoding.name} encodes each pixel into features of its own, "
                                           f"which model.conv's convolutions over the image do not take; use none "
                                           f"with model.conv"))
    if cfg.train.engine == "manual":
        if cfg.model.norm != "none":  # model.conv's layers are all covered (core/convprop.py), batch norm too
            bad.append(("model.norm", f"{cfg.model.norm} is not covered by train.engine: manual (the hand-written "
                                      f"rule does Linear, activation and dropout in the hidden layers; "
                                      f"model.conv[i].norm: batch is covered); use none or engine autograd"))
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


# keys a sweep may not sweep: every trial sets them itself (its name and folder, or the sweep's metric), so
# sweeping them would run identical trials (search/spec.py refuses them; the editors' JSON Schema leaves them out)
UNSWEPT_KEYS = ("name", "checkpoint.dir", "train.early_stop.metric")
