"""Backpropagation by hand for a CNN's feature stack: convolution (through im2col), max and average pooling, batch
norm, activations and dropout, each a forward returning (out, cache) and a backward taking delta = dL/dout; and
cnn_forward / cnn_backward, which run them over the steps that steps_of reads from an nn.Sequential.

The delta rule of a convolution, from the MLP's (backprop.py: delta_j = f'(z_j) * sum_k delta_k w_jk and
dL/dw_ij = delta_j * o_i). A convolution is one Linear layer used at every place of the image, with the same
weights everywhere:
  1. im2col (F.unfold) cuts the input x (B, C_in, H, W) into one column per output place: cols (B, C_in*kh*kw, L),
     L = H_out * W_out. Column p holds the o_i that the units at place p see: their patch of x.
  2. At each place the C_out units are a Linear layer on that column: z (B, C_out, L) = W (C_out, C_in*kh*kw) @ cols
     + b, then reshaped to (B, C_out, H_out, W_out).
So the MLP's rule holds place by place, with delta_cols = delta (B, C_out, H_out, W_out) seen as (B, C_out, L):
  dL/dW    = sum over the batch of delta_cols @ cols^T   (C_out, C_in*kh*kw): delta_j * o_i, summed over the B*L
             places where the one weight w_ij is used
  dL/db    = delta summed over the batch and the places  (C_out,)
  dL/dcols = W^T @ delta_cols                            (B, C_in*kh*kw, L): sum_k delta_k w_jk, per patch entry
  dL/dx    = col2im(dL/dcols) (F.fold)                   (B, C_in, H, W): a pixel sits in several patches, so its
             delta is the sum of the deltas of all its copies (fold adds up what unfold copied)
and the layer below multiplies by its own f'(z) (and dropout mask) as in the MLP. As one operation, dL/dx is the
*full* correlation of delta with the kernel flipped in both directions, in and out channels swapped (for stride s,
with s - 1 zeros put between delta's entries first): F.conv_transpose2d(delta, W); tests/test_convprop.py checks it.

Pooling has no weights: max pooling routes each window's delta to the input that was its max (the others get 0);
average pooling shares it out equally (delta / k^2 to each of the k*k inputs). Batch norm: batchnorm2d_backward.
The layer functions are pure (tensors in, tensors out); steps_of, cnn_forward and cnn_backward read the modules'
weights, and update_running_stats writes batch norm's running statistics as nn.BatchNorm2d's training forward does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.core.activations import ACTIVATIONS
from dlbase.core.model import ACTIVATIONS as ACTIVATION_MODULES

Pair = Union[int, tuple[int, int]]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _c(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) shaped to broadcast over (B, C, H, W)."""
    return v[:, None, None]


# ---- convolution -----------------------------------------------------------------------------------------------

@dataclass
class ConvCache:
    """What conv2d_backward needs: the input's patches and the geometry to fold deltas back into an image."""
    cols: torch.Tensor  # (B, C_in*kh*kw, L): column p is the patch that output place p sees
    in_size: tuple[int, int]  # (H, W) of the input
    kernel: tuple[int, int]  # (kh, kw)
    stride: tuple[int, int]
    padding: tuple[int, int]


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: Pair = 1,
                   padding: Pair = 0) -> tuple[torch.Tensor, ConvCache]:
    """F.conv2d(x, weight, bias, stride, padding) written as im2col and one matmul: (out, cache).

    x (B, C_in, H, W), weight (C_out, C_in, kh, kw), bias (C_out,) or None -> out (B, C_out, H_out, W_out) with
    H_out = (H + 2 * padding - kh) // stride + 1 (and likewise W_out)."""
    B, _, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    stride, padding = _pair(stride), _pair(padding)
    H_out = (H + 2 * padding[0] - kh) // stride[0] + 1
    W_out = (W + 2 * padding[1] - kw) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (B, C_in*kh*kw, L), L = H_out * W_out
    z = weight.reshape(C_out, -1) @ cols  # (B, C_out, L): the same Linear layer at each of the L places
    if bias is not None:
        z = z + bias[:, None]  # (B, C_out, L)
    return z.reshape(B, C_out, H_out, W_out), ConvCache(cols, (H, W), (kh, kw), stride, padding)


def conv2d_backward(delta: torch.Tensor, weight: torch.Tensor,
                    cache: ConvCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dW, dL/db) from delta = dL/dout (B, C_out, H_out, W_out), by the delta rule (module docstring)."""
    B, C_out = delta.shape[:2]
    d = delta.reshape(B, C_out, -1)  # delta_cols (B, C_out, L)
    # dL/dw_ij = delta_j * o_i summed over the batch and the places: sum_b d[b] @ cols[b]^T
    dW = torch.einsum("bol,bil->oi", d, cache.cols).reshape(weight.shape)  # (C_out, C_in, kh, kw)
    db = d.sum((0, 2))  # (C_out,)
    dcols = weight.reshape(C_out, -1).T @ d  # (B, C_in*kh*kw, L): sum_k delta_k w_jk for every patch entry
    dx = F.fold(dcols, cache.in_size, cache.kernel, padding=cache.padding, stride=cache.stride)  # (B, C_in, H, W)
    return dx, dW, db


# ---- pooling (kernel = stride = k, no padding, floor mode: nn.MaxPool2d(k) and nn.AvgPool2d(k)) ------------------

@dataclass
class PoolCache:
    """What a pooling backward needs: the input's shape, k, and for max pooling which window entry won."""
    in_shape: tuple[int, int, int, int]  # (B, C, H, W)
    k: int
    argmax: Optional[torch.Tensor] = None  # (B, C, H // k, W // k) int64 in [0, k*k), row-major in the window


def _windows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H // k, W // k, k*k): each k x k window's entries, row by row. The last H % k rows
    and W % k columns are in no window (floor mode)."""
    B, C, H, W = x.shape
    if k < 1 or H < k or W < k:
        raise ValueError(f"pooling with k = {k} over a {H}x{W} map leaves no window; k must be in 1..{min(H, W)}")
    Ho, Wo = H // k, W // k
    x = x[:, :, :Ho * k, :Wo * k].reshape(B, C, Ho, k, Wo, k)  # (B, C, Ho, k, Wo, k)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(B, C, Ho, Wo, k * k)


def _unwindows(w: torch.Tensor, k: int, in_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """_windows backwards: (B, C, Ho, Wo, k*k) -> (B, C, H, W), zeros on the rows and columns no window reached."""
    B, C, Ho, Wo, _ = w.shape
    x = w.reshape(B, C, Ho, Wo, k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, Ho * k, Wo * k)
    return F.pad(x, (0, in_shape[3] - Wo * k, 0, in_shape[2] - Ho * k))  # (B, C, H, W)


def maxpool2d_forward(x: torch.Tensor, k: int) -> tuple[torch.Tensor, PoolCache]:
    """F.max_pool2d(x, k): the max of each k x k window (B, C, H // k, W // k), and which entry it was.

    Ties: argmax takes the first maximal entry in row-major order within the window, which is the one torch's
    max_pool2d reports and its backward routes the whole delta to (tests/test_convprop.py checks this on ties)."""
    win = _windows(x, k)  # (B, C, Ho, Wo, k*k)
    argmax = win.argmax(-1)  # (B, C, Ho, Wo)
    return win.gather(-1, argmax[..., None]).squeeze(-1), PoolCache(tuple(x.shape), k, argmax)


def maxpool2d_backward(delta: torch.Tensor, cache: PoolCache) -> torch.Tensor:
    """dL/dx (B, C, H, W): each window's delta (B, C, Ho, Wo) to its max, 0 to the rest of the window."""
    win = delta.new_zeros(*delta.shape, cache.k * cache.k)  # (B, C, Ho, Wo, k*k)
    win.scatter_(-1, cache.argmax[..., None], delta[..., None])
    return _unwindows(win, cache.k, cache.in_shape)


def avgpool2d_forward(x: torch.Tensor, k: int) -> tuple[torch.Tensor, PoolCache]:
    """F.avg_pool2d(x, k): the mean of each k x k window, (B, C, H // k, W // k)."""
    return _windows(x, k).mean(-1), PoolCache(tuple(x.shape), k)


def avgpool2d_backward(delta: torch.Tensor, cache: PoolCache) -> torch.Tensor:
    """dL/dx (B, C, H, W): each window's delta shared out equally, delta / k^2 to each of its k*k inputs."""
    kk = cache.k * cache.k
    return _unwindows((delta / kk)[..., None].expand(*delta.shape, kk), cache.k, cache.in_shape)


# ---- batch norm (per channel, over the batch and the map) -----------------------------------------------------

@dataclass
class NormCache:
    """What batchnorm2d_backward and update_running_stats need."""
    xhat: torch.Tensor  # (B, C, H, W): the normalised input (x - mean) / sqrt(var + eps)
    inv_std: torch.Tensor  # (C,): 1 / sqrt(var + eps)
    batch_stats: bool  # True: mean and var are this batch's (training mode); False: the running ones (constants)
    mean: torch.Tensor  # (C,) the mean used
    var: torch.Tensor  # (C,) the variance used (the batch's: biased, over its B*H*W values per channel)


def batchnorm2d_forward(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                        eps: float = 1e-5, running_mean: Optional[torch.Tensor] = None,
                        running_var: Optional[torch.Tensor] = None,
                        train: bool = True) -> tuple[torch.Tensor, NormCache]:
    """F.batch_norm on (B, C, H, W): y = gamma * xhat + beta per channel, xhat = (x - mean) / sqrt(var + eps).

    train (or no running statistics, as track_running_stats=False): mean and var of this batch; else the running
    ones. weight / bias None: no affine part."""
    batch_stats = train or running_mean is None
    if batch_stats:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)  # (C,), each over B*H*W values
    else:
        mean, var = running_mean, running_var
    inv_std = (var + eps).rsqrt()  # (C,)
    xhat = (x - _c(mean)) * _c(inv_std)  # (B, C, H, W)
    out = xhat if weight is None else xhat * _c(weight) + _c(bias)
    return out, NormCache(xhat, inv_std, batch_stats, mean, var)


def batchnorm2d_backward(delta: torch.Tensor, weight: Optional[torch.Tensor],
                         cache: NormCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dgamma, dL/dbeta) from delta = dL/dy (B, C, H, W)."""
    dgamma = (delta * cache.xhat).sum((0, 2, 3))  # (C,): like dL/dw = delta * o, with o = xhat
    dbeta = delta.sum((0, 2, 3))  # (C,)
    dxhat = delta if weight is None else delta * _c(weight)  # (B, C, H, W)
    if not cache.batch_stats:  # running statistics are constants: a per-channel scale
        return dxhat * _c(cache.inv_std), dgamma, dbeta
    # with batch statistics every x of a channel moves its mean and variance too; per channel (means over its
    # N = B*H*W values): dL/dx_i = (dxhat_i - mean(dxhat) - xhat_i * mean(dxhat * xhat)) / sqrt(var + eps)
    mean_d = dxhat.mean((0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    mean_dx = (dxhat * cache.xhat).mean((0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    return (dxhat - mean_d - cache.xhat * mean_dx) * _c(cache.inv_std), dgamma, dbeta


# ---- a feature stack: steps read from an nn.Sequential, run forward and backward ---------------------------------

def _unsupported(m: nn.Module) -> Optional[str]:
    """Why the hand-written rule does not cover this module's settings (None when it does)."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "only groups=1, dilation=1, padding_mode='zeros' and numeric padding are covered"
    elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        extra = (getattr(m, "dilation", 1) not in (1, (1, 1)) or getattr(m, "return_indices", False)
                 or getattr(m, "divisor_override", None) is not None)
        if k[0] != k[1] or s != k or _pair(m.padding) != (0, 0) or m.ceil_mode or extra:
            return "only square pooling with kernel = stride, no padding, floor mode is covered, e.g. MaxPool2d(2)"
    elif isinstance(m, nn.LeakyReLU) and m.negative_slope != 0.01:
        return "only negative_slope=0.01 is covered (the model's leaky_relu)"
    elif isinstance(m, nn.GELU) and m.approximate != "none":
        return "only the exact GELU (approximate='none') is covered"
    elif isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
        return "only Flatten(start_dim=1, end_dim=-1) is covered"
    elif not isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Flatten, nn.Identity, *ACTIVATION_MODULES.values())):
        return ("not a module the hand-written rule knows: Conv2d, BatchNorm2d, an activation ("
                + ", ".join(c.__name__ for c in ACTIVATION_MODULES.values())
                + "), MaxPool2d, AvgPool2d, Dropout, Flatten")
    return None


def steps_of(features: nn.Sequential) -> list[tuple]:
    """The steps cnn_forward runs, read from a Sequential of Conv2d / BatchNorm2d / activation modules / MaxPool2d /
    AvgPool2d / Dropout / Flatten (Identity is skipped): ("conv", module), ("batchnorm2d", module), ("act", name),
    ("maxpool", k), ("avgpool", k), ("dropout", p), ("flatten",). ValueError names the first module not covered."""
    names = {cls: name for name, cls in ACTIVATION_MODULES.items()}
    steps: list[tuple] = []
    for i, m in enumerate(features):
        why = _unsupported(m)
        if why:
            raise ValueError(f"features[{i}] = {m}: {why}")
        if isinstance(m, nn.Conv2d):
            steps.append(("conv", m))
        elif isinstance(m, nn.BatchNorm2d):
            steps.append(("batchnorm2d", m))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            steps.append(("maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", _pair(m.kernel_size)[0]))
        elif isinstance(m, nn.Dropout):
            steps.append(("dropout", m.p))
        elif isinstance(m, nn.Flatten):
            steps.append(("flatten",))
        elif type(m) in names:
            steps.append(("act", names[type(m)]))
    return steps


@dataclass
class FeatureCache:
    """What cnn_forward keeps for cnn_backward: one cache per step (conv: ConvCache, batchnorm2d: NormCache, act:
    its input z, pooling: PoolCache, dropout: its mask or None, flatten: the input's shape), the dropout masks used
    (one per dropout step, in order; None where none applied) and the output (B, ...)."""
    caches: list
    masks: list[Optional[torch.Tensor]]
    out: torch.Tensor


def _step_forward(step: tuple, x: torch.Tensor, train: bool, mask: Optional[torch.Tensor]):
    kind = step[0]
    if kind == "conv":
        m = step[1]
        return conv2d_forward(x, m.weight, m.bias, m.stride, m.padding)
    if kind == "batchnorm2d":
        m = step[1]
        return batchnorm2d_forward(x, m.weight, m.bias, m.eps, m.running_mean, m.running_var, train)
    if kind == "act":
        return ACTIVATIONS[step[1]][0](x), x  # cache z for f'(z)
    if kind == "maxpool":
        return maxpool2d_forward(x, step[1])
    if kind == "avgpool":
        return avgpool2d_forward(x, step[1])
    if kind == "dropout":
        return (x if mask is None else x * mask), mask
    if kind == "flatten":
        return x.flatten(1), x.shape  # (B, C*H*W)
    raise ValueError(f"unknown step {step!r}; steps_of lists the kinds")


def cnn_forward(steps: list[tuple], x: torch.Tensor, train: bool = True, masks: Optional[list] = None,
                generator: Optional[torch.Generator] = None) -> FeatureCache:
    """The feature stack's forward pass written out, x (B, C, H, W) -> FeatureCache (its .out: the features).

    train: batch norm on batch statistics and dropout on (as module.train()); else running statistics and no
    dropout (module.eval()). masks: one per dropout step (None entries allowed), reused as given (gradcheck);
    without them, training draws inverted-dropout masks (x.shape, {0, 1/(1-p)}) from generator."""
    caches: list = []
    used: list[Optional[torch.Tensor]] = []
    given = iter(masks) if masks is not None else None
    for step in steps:
        mask = None
        if step[0] == "dropout":
            if given is not None:
                mask = next(given)
            elif train and step[1] > 0:
                keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= step[1]
                mask = keep.to(x.dtype) / (1 - step[1])  # inverted dropout, as backprop.py's
            used.append(mask)
        x, cache = _step_forward(step, x, train, mask)
        caches.append(cache)
    return FeatureCache(caches, used, x)


def _step_backward(step: tuple, cache, delta: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(delta at the step's input, [(parameter, its gradient), ...]) for one step."""
    kind = step[0]
    if kind == "conv":
        m = step[1]
        dx, dW, db = conv2d_backward(delta, m.weight, cache)
        return dx, [(m.weight, dW)] + ([(m.bias, db)] if m.bias is not None else [])
    if kind == "batchnorm2d":
        m = step[1]
        dx, dgamma, dbeta = batchnorm2d_backward(delta, m.weight, cache)
        return dx, ([(m.weight, dgamma), (m.bias, dbeta)] if m.weight is not None else [])
    if kind == "act":
        return delta * ACTIVATIONS[step[1]][1](cache), []  # delta_j = f'(z_j) * (what came from above)
    if kind == "maxpool":
        return maxpool2d_backward(delta, cache), []
    if kind == "avgpool":
        return avgpool2d_backward(delta, cache), []
    if kind == "dropout":
        return (delta if cache is None else delta * cache), []  # the units dropped pass back nothing
    if kind == "flatten":
        return delta.reshape(cache), []
    raise ValueError(f"unknown step {step!r}; steps_of lists the kinds")


def cnn_backward(steps: list[tuple], cache: FeatureCache,
                 delta: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Parameter, torch.Tensor]]]:
    """(dL/dx at the stack's input, [(parameter, dL/dparameter), ...]) from delta = dL/d(cache.out).

    The pairs come in the order of the Sequential's parameters() (each module's weight, then bias), so that
    `for p, g in grads: p.grad = g` fills them, and autograd.grad(loss, [p for p, _ in grads]) checks them."""
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    for step, c in zip(reversed(steps), reversed(cache.caches)):
        delta, g = _step_backward(step, c, delta)
        grads[:0] = g
    return delta, grads


@torch.no_grad()
def update_running_stats(steps: list[tuple], cache: FeatureCache) -> None:
    """Move each batch norm's running mean and variance as nn.BatchNorm2d's training forward does: by momentum
    (or the cumulative average when momentum is None), the variance unbiased (N / (N - 1)), one more batch
    tracked. No host sync."""
    for step, c in zip(steps, cache.caches):
        if step[0] != "batchnorm2d" or not c.batch_stats or not step[1].track_running_stats:
            continue
        bn = step[1]
        n = c.xhat.numel() // c.xhat.shape[1]  # values per channel, B*H*W
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
        bn.running_mean.add_(m * (c.mean.detach() - bn.running_mean))
        bn.running_var.add_(m * (c.var.detach() * n / (n - 1) - bn.running_var))
