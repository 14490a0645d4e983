"""Backpropagation by hand: the delta rule for the configured MLP or CNN, layer by layer; gradcheck against autograd.

For a layer j with inputs o_i, pre-activation z_j = sum_i w_ij o_i + b_j and output o_j = f(z_j):
  output layer, squared error on sigmoid outputs:   delta_k = (o_k - t_k) * o_k * (1 - o_k)
  output layer, squared error on softmax outputs:   delta_k = o_k * ((o_k - t_k) - sum_m (o_m - t_m) o_m)
  output layer, cross-entropy on softmax outputs:   delta_k = o_k - t_k
  hidden layer:                                     delta_j = f'(z_j) * sum_k delta_k w_jk   (times the dropout mask)
  gradients:                                        dL/dw_ij = delta_j * o_i,   dL/db_j = delta_j
(each averaged over the batch, as the losses are means). Works for any depth and every activation in config.py.

A CNN (model.conv) is its feature stack, then this MLP head on the flattened maps. The head's rule gives delta at
its first Linear layer; the delta at the head's input (the features) is delta @ W_1, as for any hidden layer but
without an f'; convprop.cnn_backward carries it down the convolutions, batch norms and poolings (the delta rule of a
convolution through im2col: convprop.py's docstring).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.core import convprop
from dlbase.core.activations import ACTIVATIONS  # the shared table (f, f'); convprop.py reads it too
from dlbase.core.config import ModelConfig
from dlbase.core.model import CNN, MLP

Grads = list[tuple[nn.Parameter, torch.Tensor]]  # (parameter, dL/dparameter), in model.parameters() order


def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why the hand-written rule does not cover this model (None when it does). model.conv's layers are all covered
    (convolution, batch norm, activation, max or average pooling, dropout: convprop.py)."""
    if cfg.norm != "none":
        return (f"model.norm: {cfg.norm} is not covered by the hand-written rule (hidden layers: Linear, activation, "
                f"dropout; model.conv[i].norm: batch is); use none")
    if cfg.encoding.name == "learned":
        return ("model.encoding.name: learned has trainable parameters the hand-written rule does not cover; use "
                "none, fourier or gaussian")
    return None


@dataclass
class Cache:
    """What the forward pass keeps for the backward one: per Linear layer its input o (B, in), and per hidden
    layer its pre-activation z (B, h) and dropout mask (B, h) or None; for a CNN also its feature steps
    (feature_steps) and their FeatureCache (convprop.py)."""
    inputs: list[torch.Tensor]
    zs: list[torch.Tensor]
    masks: list[Optional[torch.Tensor]]
    logits: torch.Tensor
    steps: list[tuple] = field(default_factory=list)
    features: Optional[convprop.FeatureCache] = None


def linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of the MLP, or of the CNN's head, input to output."""
    return [m for m in model.net if isinstance(m, nn.Linear)]


def feature_steps(model: CNN) -> list[tuple]:
    """The CNN's feature stack as convprop's steps, then the flattening that CNN.forward does before its head."""
    return convprop.steps_of(model.features) + [("flatten",)]


def forward(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, masks: Optional[list] = None,
            train: bool = False, conv_masks: Optional[list] = None,
            generator: Optional[torch.Generator] = None) -> Cache:
    """The model's forward pass written out, x (B, D) pixels. masks (the head's) and conv_masks (one per dropout of
    model.conv): reuse these dropout masks (gradcheck); else train draws new ones, from generator (None: torch's
    global one). train also puts a CNN's batch norms on the batch's statistics (else the running ones)."""
    f, _ = ACTIVATIONS[cfg.activation]
    layers = linears(model)
    o = model.encoding(x)  # fixed encodings only (see unsupported())
    steps, features = [], None
    if isinstance(model, CNN):
        steps = feature_steps(model)
        features = convprop.cnn_forward(steps, o.view(-1, 1, *model.input_shape), train, conv_masks, generator)
        o = features.out  # (B, C*h*w)
    inputs, zs, used = [], [], []
    for i, lin in enumerate(layers[:-1]):
        inputs.append(o)
        z = o @ lin.weight.T + lin.bias  # (B, h)
        a = f(z)
        m = None
        if masks is not None:
            m = masks[i]
        elif train and cfg.dropout > 0:
            keep = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype) >= cfg.dropout
            m = keep.to(a.dtype) / (1 - cfg.dropout)  # inverted dropout
        if m is not None:
            a = a * m
        zs.append(z)
        used.append(m)
        o = a
    inputs.append(o)
    last = layers[-1]
    return Cache(inputs, zs, used, o @ last.weight.T + last.bias, steps, features)


def output_delta(logits: torch.Tensor, y: torch.Tensor, loss: str, output: str,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """dL/dz at the output layer (B, C), for the batch-mean loss."""
    B, C = logits.shape
    t = F.one_hot(y, C).to(logits.dtype)
    if loss == "cross_entropy":
        t = t * (1 - label_smoothing) + label_smoothing / C
        return (logits.softmax(-1) - t) / B
    o = logits.sigmoid() if output == "sigmoid" else logits.softmax(-1)
    if output == "sigmoid":
        return (o - t) * o * (1 - o) / B
    e = o - t
    return o * (e - (e * o).sum(-1, keepdim=True)) / B


def backward(model: nn.Module, cfg: ModelConfig, cache: Cache, delta: torch.Tensor) -> Grads:
    """(parameter, dL/dparameter) for every parameter, by the delta rule: the head's Linear layers (dL/dW, dL/db
    each), and below them a CNN's feature stack, from the delta at the head's input."""
    _, fprime = ACTIVATIONS[cfg.activation]
    layers = linears(model)
    grads: Grads = []
    for j in range(len(layers) - 1, -1, -1):
        # dL/dw_ij = delta_j o_i ; dL/db_j = delta_j
        grads[:0] = [(layers[j].weight, delta.T @ cache.inputs[j]), (layers[j].bias, delta.sum(0))]
        if j > 0:
            delta = (delta @ layers[j].weight) * fprime(cache.zs[j - 1])  # delta_j = f'(z_j) sum_k delta_k w_jk
            if cache.masks[j - 1] is not None:
                delta = delta * cache.masks[j - 1]
    if cache.features is not None:  # the features' delta: sum_k delta_k w_jk, no f' (the stack ends in its own)
        _, below = convprop.cnn_backward(cache.steps, cache.features, delta @ layers[0].weight)
        grads[:0] = below
    return grads


def exact_zeros(model: nn.Module, grads: Grads) -> Grads:
    """grads with the parameters in model.exact_zero_grad (a bias just before a batch norm, whose gradient is zero
    in exact arithmetic: model.zero_grad_before_batch_norm) given that exact zero, as autograd's hook gives it."""
    zero = _exact_zero_ids(model)
    return [(p, torch.zeros_like(g) if id(p) in zero else g) for p, g in grads]


def _exact_zero_ids(model: nn.Module) -> set[int]:
    return {id(model.get_parameter(name)) for name in getattr(model, "exact_zero_grad", ())}


def manual_gradients(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, loss: str,
                     label_smoothing: float = 0.0, train: bool = True) -> tuple[torch.Tensor, Grads]:
    """(logits, [(parameter, gradient), ...] for every parameter) for one batch, without autograd. train: dropout
    on, batch norm on the batch's statistics, and the batch norms' running statistics moved as nn.BatchNorm2d's
    training forward moves them (so that eval mode sees them)."""
    with torch.no_grad():
        cache = forward(model, cfg, x, train=train)
        grads = backward(model, cfg, cache, output_delta(cache.logits, y, loss, cfg.output, label_smoothing))
        if train and cache.features is not None:
            convprop.update_running_stats(cache.steps, cache.features)
    return cache.logits, exact_zeros(model, grads)


def grad_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose parameters the rule differentiates, input to output: Conv2d, BatchNorm2d (affine), Linear."""
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.weight is not None]


def _check_forward(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, n_masks: int, n_conv: int) -> None:
    """The written-out forward (training mode, no dropout) equals the model's own, run on a copy in training mode
    with its dropout off (the copy's batch norms move their running statistics, not the model's)."""
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        want = ref(x)
        got = forward(model, cfg, x, [None] * n_masks, True, [None] * n_conv).logits
    scale = want.abs().max().clamp_min(1e-30)
    assert ((want - got).abs().max() / scale) < 1e-6, "the written-out forward pass is not the model's"


def _shape(m: nn.Module) -> tuple[str, str]:
    """(kind, shape) of a grad_layers module, for gradcheck's table."""
    if isinstance(m, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        extra = (f"/{sh}" if sh == sw else f"/{sh}x{sw}") if (sh, sw) != (1, 1) else ""
        extra += (f" p{ph}" if ph == pw else f" p{ph}x{pw}") if (ph, pw) != (0, 0) else ""
        return "conv", f"{m.in_channels}->{m.out_channels} {kh}x{kw}{extra}"
    if isinstance(m, nn.BatchNorm2d):
        return "batchnorm", f"{m.num_features} maps"
    return "linear", f"{m.in_features}->{m.out_features}"


def gradcheck(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, loss: str,
              label_smoothing: float = 0.0) -> list[dict]:
    """Every parameter's gradient by autograd and by hand, on the same forward pass (training mode: batch norm on
    the batch's statistics; the same dropout masks, drawn once).

    Returns one row per grad_layers module (conv, batchnorm, linear): its kind, shape, and the largest relative
    difference of its weight and bias gradients (|manual - autograd| / max |autograd|; None where it has no bias;
    absolute where the gradient is exactly zero, model.exact_zero_grad). Also checks the written-out forward
    equals the model's."""
    from dlbase.core.loss import build_loss
    with torch.no_grad():  # every dropout mask drawn once, from a generator of its own; reused by both passes
        drawn = forward(model, cfg, x, train=True, generator=torch.Generator(device=x.device).manual_seed(0))
    masks, conv_masks = drawn.masks, drawn.features.masks if drawn.features is not None else []
    _check_forward(model, cfg, x, len(masks), len(conv_masks))
    cache = forward(model, cfg, x, masks, True, conv_masks)
    loss_value = build_loss(loss, cfg.output, label_smoothing)(cache.logits, y)
    with torch.no_grad():
        manual = exact_zeros(model, backward(model, cfg, forward(model, cfg, x, masks, True, conv_masks),
                                             output_delta(cache.logits.detach(), y, loss, cfg.output,
                                                          label_smoothing)))
    params = [p for p, _ in manual]
    assert len({id(p) for p in params}) == len(list(model.parameters())), "a parameter the rule does not cover"
    by_id = {id(p): (g, a) for (p, g), a in zip(manual, torch.autograd.grad(loss_value, params))}
    zero = _exact_zero_ids(model)

    def diff(p: Optional[torch.Tensor]) -> Optional[float]:
        if p is None:
            return None
        g, a = by_id[id(p)]
        scale = 1.0 if id(p) in zero else a.abs().max().clamp_min(1e-300)  # an exact zero: absolute
        return ((g - a).abs().max() / scale).item()

    rows = []
    for i, m in enumerate(grad_layers(model)):
        kind, shape = _shape(m)
        rows.append({"layer": i + 1, "kind": kind, "shape": shape, "weight_rel_diff": diff(m.weight),
                     "bias_rel_diff": diff(m.bias), "grad_max": by_id[id(m.weight)][1].abs().max().item()})
    return rows


VANISHING_RATIO = 1e-3  # first layer's gradient norm below this fraction of the last layer's: warn


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The Conv2d and Linear layers, input to output (a CNN's convolutions first; an MLP's: linears(model))."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_norms(model: torch.nn.Module) -> dict[str, float]:
    """Per Conv2d or Linear layer (1 = the first): the L2 norm of its weight gradient from the last step, and of
    its weights. One host sync for all of them."""
    layers = weight_layers(model)
    zero = torch.zeros((), device=layers[0].weight.device)
    values = torch.stack([lin.weight.grad.norm() if lin.weight.grad is not None else zero for lin in layers]
                         + [lin.weight.detach().norm() for lin in layers]).tolist()  # note: sync, per epoch
    n = len(layers)
    return {**{f"grad_norm_{i + 1}": values[i] for i in range(n)},
            **{f"weight_norm_{i + 1}": values[n + i] for i in range(n)}}


def gradcheck_config(cfg, batch: int, tol: float, source: str = "config") -> tuple[list[str], bool]:
    """`dlbase gradcheck`: the configured MLP or CNN (28x28 images) in float64 on a batch of synthetic inputs in
    [0, 1] with random labels, in training mode; (the report's lines, whether every layer is within tol)."""
    from dlbase.core.errors import DlbaseError
    why = unsupported(cfg.model)
    if why:
        raise DlbaseError(f"{source}: {why}")
    torch.manual_seed(cfg.seed)
    model = (CNN(cfg.model, (28, 28)) if cfg.model.conv else MLP(cfg.model, in_features=784)).double()
    x = torch.rand(batch, 784, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    rows = gradcheck(model, cfg.model, x, y, cfg.train.loss, cfg.train.label_smoothing)
    kinds = [r["kind"] for r in rows]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("conv", "batchnorm", "linear") if k in kinds)
    lines = [f"{cfg.model.activation} units, {cfg.model.output} outputs, {cfg.train.loss} loss, {len(rows)} layers "
             f"({counts}), batch {batch}, float64",
             f"{'layer':>5}  {'kind':>9}  {'shape':>16}  {'max |dL/dW|':>12}  {'rel diff W':>11}  {'rel diff b':>11}"]
    worst = 0.0
    for r in rows:
        b = r["bias_rel_diff"]
        lines.append(f"{r['layer']:>5}  {r['kind']:>9}  {r['shape']:>16}  {r['grad_max']:>12.4e}  "
                     f"{r['weight_rel_diff']:>11.2e}  {'-' if b is None else f'{b:.2e}':>11}")
        worst = max(worst, r["weight_rel_diff"], b or 0.0)
    if "batchnorm" in kinds:
        lines.append("batch norm: W is its scale (gamma), b its shift (beta), on the batch's statistics")
    ok = worst <= tol
    lines.append(f"{'OK' if ok else 'FAIL'}: largest relative difference {worst:.2e} (tolerance {tol:.0e})")
    return lines, ok
