"""Backpropagation by hand: the delta rule for the configured MLP, layer by layer, and gradcheck against autograd.

For a layer j with inputs o_i, pre-activation z_j = sum_i w_ij o_i + b_j and output o_j = f(z_j):
  output layer, squared error on sigmoid outputs:   delta_k = (o_k - t_k) * o_k * (1 - o_k)
  output layer, squared error on softmax outputs:   delta_k = o_k * ((o_k - t_k) - sum_m (o_m - t_m) o_m)
  output layer, cross-entropy on softmax outputs:   delta_k = o_k - t_k
  hidden layer:                                     delta_j = f'(z_j) * sum_k delta_k w_jk   (times the dropout mask)
  gradients:                                        dL/dw_ij = delta_j * o_i,   dL/db_j = delta_j
(each averaged over the batch, as the losses are means). Works for any depth and every activation in config.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.core.activations import ACTIVATIONS  # the shared table (f, f'); convprop.py reads it too
from dlbase.core.config import ModelConfig


def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why the hand-written rule does not cover this model (None when it does)."""
    if cfg.conv:
        return ("model.conv: convolutions are not covered by the hand-written rule yet (Linear, activation, "
                "dropout); use train.engine: autograd")
    if cfg.norm != "none":
        return f"model.norm: {cfg.norm} is not covered by the hand-written rule (Linear, activation, dropout); use none"
    if cfg.encoding.name == "learned":
        return ("model.encoding.name: learned has trainable parameters the hand-written rule does not cover; use "
                "none, fourier or gaussian")
    return None


@dataclass
class Cache:
    """What the forward pass keeps for the backward one: per Linear layer its input o (B, in), and per hidden
    layer its pre-activation z (B, h) and dropout mask (B, h) or None."""
    inputs: list[torch.Tensor]
    zs: list[torch.Tensor]
    masks: list[Optional[torch.Tensor]]
    logits: torch.Tensor


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.net if isinstance(m, nn.Linear)]


def forward(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, masks: Optional[list] = None,
            train: bool = False) -> Cache:
    """The MLP's forward pass written out. masks: reuse these dropout masks (gradcheck); train: draw new ones."""
    f, _ = ACTIVATIONS[cfg.activation]
    layers = linears(model)
    o = model.encoding(x)  # fixed encodings only (see unsupported())
    inputs, zs, used = [], [], []
    for i, lin in enumerate(layers[:-1]):
        inputs.append(o)
        z = o @ lin.weight.T + lin.bias  # (B, h)
        a = f(z)
        m = None
        if masks is not None:
            m = masks[i]
        elif train and cfg.dropout > 0:
            m = (torch.rand_like(a) >= cfg.dropout).to(a.dtype) / (1 - cfg.dropout)  # inverted dropout
        if m is not None:
            a = a * m
        zs.append(z)
        used.append(m)
        o = a
    inputs.append(o)
    last = layers[-1]
    return Cache(inputs, zs, used, o @ last.weight.T + last.bias)


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


def backward(model: nn.Module, cfg: ModelConfig, cache: Cache, delta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dL/dW, dL/db) per Linear layer, input to output, by the delta rule."""
    _, fprime = ACTIVATIONS[cfg.activation]
    layers = linears(model)
    grads: list[tuple[torch.Tensor, torch.Tensor]] = []
    for j in range(len(layers) - 1, -1, -1):
        grads.append((delta.T @ cache.inputs[j], delta.sum(0)))  # dL/dw_ij = delta_j o_i ; dL/db_j = delta_j
        if j > 0:
            delta = (delta @ layers[j].weight) * fprime(cache.zs[j - 1])  # delta_j = f'(z_j) sum_k delta_k w_jk
            if cache.masks[j - 1] is not None:
                delta = delta * cache.masks[j - 1]
    return grads[::-1]


def manual_gradients(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, loss: str,
                     label_smoothing: float = 0.0, train: bool = True) -> tuple[torch.Tensor, list]:
    """(logits, per-layer (dW, db)) for one batch, without autograd."""
    with torch.no_grad():
        cache = forward(model, cfg, x, train=train)
        return cache.logits, backward(model, cfg, cache, output_delta(cache.logits, y, loss, cfg.output,
                                                                       label_smoothing))


def gradcheck(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, loss: str,
              label_smoothing: float = 0.0) -> list[dict]:
    """Every weight and bias gradient by autograd and by hand, on the same forward pass (same dropout masks).

    Returns one row per Linear layer: its shape and the largest relative difference of its weight and bias
    gradients (|manual - autograd| / max |autograd|). Also checks the written-out forward equals model(x).
    """
    from dlbase.core.loss import build_loss
    layers = linears(model)
    masks = None
    if cfg.dropout > 0:
        g = torch.Generator(device=x.device).manual_seed(0)
        masks = [(torch.rand(x.shape[0], lin.out_features, generator=g, device=x.device, dtype=x.dtype)
                  >= cfg.dropout).to(x.dtype) / (1 - cfg.dropout) for lin in layers[:-1]]
    else:
        model.eval()
        with torch.no_grad():
            ref = model(x)
            written = forward(model, cfg, x).logits
        scale = ref.abs().max().clamp_min(1e-30)
        assert ((ref - written).abs().max() / scale) < 1e-6, "the written-out forward pass is not the model's"
    params = [p for lin in layers for p in (lin.weight, lin.bias)]
    cache = forward(model, cfg, x, masks=masks)
    loss_value = build_loss(loss, cfg.output, label_smoothing)(cache.logits, y)
    auto = torch.autograd.grad(loss_value, params)
    with torch.no_grad():
        manual = backward(model, cfg, forward(model, cfg, x, masks=masks), output_delta(
            cache.logits.detach(), y, loss, cfg.output, label_smoothing))
    rows = []
    for i, (lin, (dw, db)) in enumerate(zip(layers, manual)):
        aw, ab = auto[2 * i], auto[2 * i + 1]
        rel = lambda m, a: ((m - a).abs().max() / a.abs().max().clamp_min(1e-300)).item()  # noqa: E731
        rows.append({"layer": i + 1, "shape": f"{lin.in_features}->{lin.out_features}",
                     "grad_max": aw.abs().max().item(), "weight_rel_diff": rel(dw, aw), "bias_rel_diff": rel(db, ab)})
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
    """`dlbase gradcheck`: the configured MLP in float64 on a batch of synthetic inputs in [0, 1] with random
    labels; (the report's lines, whether every layer is within tol)."""
    from dlbase.core.errors import DlbaseError
    from dlbase.core.model import MLP
    why = unsupported(cfg.model)
    if why:
        raise DlbaseError(f"{source}: {why}")
    torch.manual_seed(cfg.seed)
    model = MLP(cfg.model, in_features=784).double()
    x = torch.rand(batch, 784, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    rows = gradcheck(model, cfg.model, x, y, cfg.train.loss, cfg.train.label_smoothing)
    lines = [f"{cfg.model.activation} units, {cfg.model.output} outputs, {cfg.train.loss} loss, {len(rows)} layers, "
             f"batch {batch}, float64",
             f"{'layer':>5}  {'shape':>12}  {'max |dL/dW|':>12}  {'rel diff W':>11}  {'rel diff b':>11}"]
    worst = 0.0
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['shape']:>12}  {r['grad_max']:>12.4e}  {r['weight_rel_diff']:>11.2e}  "
                     f"{r['bias_rel_diff']:>11.2e}")
        worst = max(worst, r["weight_rel_diff"], r["bias_rel_diff"])
    ok = worst <= tol
    lines.append(f"{'OK' if ok else 'FAIL'}: largest relative difference {worst:.2e} (tolerance {tol:.0e})")
    return lines, ok
