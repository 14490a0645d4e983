"""K MLPs of one shape as stacked tensors: every parameter and buffer of dlbase's MLP gains a leading member axis
(K, ...), and one forward runs all K members with batched matmuls (torch.baddbmm). Also the per-member loss and
gradient clipping. The MLP itself (dlbase/core/model.py) stays the reference: members are built as MLPs, stacked here,
and copied back into their own MLP at boundaries (validation, checkpoints).

baddbmm was measured against torch.func (stack_module_state + functional_call + vmap) on the default MLP; it was
as fast or faster (scripts/population_bench.py --forward prints both), so the layers use it; the encodings, which
hold few tensors, go through torch.func so that every encoding (learned included) is one code path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dlbase.core.encoding import NoEncoding
from dlbase.core.loss import outputs
from dlbase.core.model import ACTIVATIONS, MLP, conv_maps
from dlbase.core.schema import ModelConfig
from dlbase.population.base import MemberStack

BN_EPS, BN_MOMENTUM, LN_EPS = 1e-5, 0.1, 1e-5  # torch's BatchNorm1d / LayerNorm defaults, which MLP uses


class StackedMLP(MemberStack):
    """params[i]: (K, *shape) leaf tensors, in MLP.parameters() order (encoding's, then each hidden layer's
    Linear weight, bias, [norm weight, bias], then the output Linear's); buffers[j] likewise, MLP.buffers()."""

    def __init__(self, models: Sequence[MLP], cfgs: Sequence[ModelConfig]):
        first, cfg = models[0], cfgs[0]
        self.K, self.cfg = len(models), cfg
        self.params = [torch.stack([p.detach() for p in ps]).requires_grad_()
                       for ps in zip(*(list(m.parameters()) for m in models))]
        self.buffers = [torch.stack([b.detach() for b in bs]) for bs in zip(*(list(m.buffers()) for m in models))]
        self.encoding = first.encoding  # the template torch.func calls with each member's own tensors
        self.enc_params = [n for n, _ in first.encoding.named_parameters()]
        self.enc_buffers = [n for n, _ in first.encoding.named_buffers()]
        self.plain = isinstance(first.encoding, NoEncoding)
        self.act = ACTIVATIONS[cfg.activation]()
        self.dropout = any(c.dropout > 0 for c in cfgs)  # host-known: only then are masks drawn
        self.p_drop = torch.tensor([c.dropout for c in cfgs], device=self.params[0].device)  # (K,)
        names = [n for n, _ in first.named_parameters()]
        self.exact_zero_grad = [names.index(n) for n in first.exact_zero_grad]  # indices into params
        self._hook_exact_zeros()

    # ---- forward
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, D) pixels in [0, 1] -> (K, B, D') each member's encoding."""
        ne, nb = len(self.enc_params), len(self.enc_buffers)
        if self.plain:  # p, or (p - mean_k) / std_k: broadcast the (K,) statistics, no vmap needed
            if not nb:
                return x
            mean, std = self.buffers[0], self.buffers[1]
            return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        tensors = {**dict(zip(self.enc_params, self.params[:ne])), **dict(zip(self.enc_buffers, self.buffers[:nb]))}

        def one(t: dict, xk: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D'), member k's tensors
            return torch.func.functional_call(self.encoding, t, (xk,))
        return torch.func.vmap(one)(tensors, x)

    def forward(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """x (K, B, D) -> logits (K, B, C). Training: batch norm uses (and updates) batch statistics, dropout
        masks each member at its own rate."""
        h = self._encode(x)
        P, pi, bi = self.params, len(self.enc_params), len(self.enc_buffers)
        for _ in self.cfg.hidden:
            h = torch.baddbmm(P[pi + 1].unsqueeze(1), h, P[pi].transpose(1, 2))  # (K, B, H) = b + h W^T
            pi += 2
            if self.cfg.norm == "layer":
                h = F.layer_norm(h, h.shape[-1:], eps=LN_EPS) * P[pi].unsqueeze(1) + P[pi + 1].unsqueeze(1)
                pi += 2
            elif self.cfg.norm == "batch":
                h = self._batch_norm(h, P[pi], P[pi + 1], bi, training)
                pi, bi = pi + 2, bi + 3
            h = self.act(h)
            if training and self.dropout:
                keep = 1 - self.p_drop.view(-1, 1, 1).to(h.dtype)  # (K, 1, 1)
                h = h * (torch.rand_like(h) < keep) / keep
        return torch.baddbmm(P[pi + 1].unsqueeze(1), h, P[pi].transpose(1, 2))  # (K, B, C)

    def _batch_norm(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bi: int, training: bool) -> torch.Tensor:
        """BatchNorm1d per member over its own batch: h (K, B, H); running stats (K, H) updated as torch does
        (momentum 0.1, the unbiased batch variance)."""
        rm, rv, nbt = self.buffers[bi:bi + 3]
        if training:
            var, mean = torch.var_mean(h, dim=1, correction=0, keepdim=True)  # (K, 1, H)
            with torch.no_grad():
                n = h.shape[1]
                rm.mul_(1 - BN_MOMENTUM).add_(mean.squeeze(1).detach().float(), alpha=BN_MOMENTUM)
                rv.mul_(1 - BN_MOMENTUM).add_(var.squeeze(1).detach().float(), alpha=BN_MOMENTUM * n / max(1, n - 1))
                nbt.add_(1)
        else:
            mean, var = rm.unsqueeze(1), rv.unsqueeze(1)
        return (h - mean) * torch.rsqrt(var + BN_EPS) * w.unsqueeze(1) + b.unsqueeze(1)

    # ---- members in and out (to_member and nbytes: MemberStack's)
    def keep(self, idx: torch.Tensor) -> None:
        super().keep(idx)
        self.p_drop = self.p_drop.index_select(0, idx)


def member_losses(logits: torch.Tensor, y: torch.Tensor, loss: str, output: str,
                  smoothing: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's mean training loss over its batch, (K,), and its plain cross-entropy (K,) (the same tensor
    without label smoothing). logits (K, B, C), y (K, B); smoothing (K,) or None when no member smooths."""
    logits = logits.float()
    if loss == "mse":  # 1/2 sum_k (o_k - t_k)^2, as dlbase.core.loss.squared_error, per member
        o = outputs(logits, output)
        t = F.one_hot(y, o.shape[-1]).to(o.dtype)
        per = 0.5 * (o - t).square().sum(dim=-1).mean(dim=1)
        return per, per
    logp = logits.log_softmax(dim=-1)  # (K, B, C)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=1)  # (K,)
    if smoothing is None:
        return nll, nll
    # torch's label smoothing: (1 - eps) * nll + eps * mean over classes of -log p
    smooth = -logp.mean(dim=-1).mean(dim=1)  # (K,)
    return (1 - smoothing) * nll + smoothing * smooth, nll


@torch.no_grad()
def clip_grad_norms(params: list[torch.Tensor], max_norm: torch.Tensor) -> None:
    """clip_grad_norm_ per member: member k's gradients scaled so their global L2 norm is at most max_norm[k]
    ((K,), inf for a member that does not clip), with torch's 1e-6 in the denominator."""
    norms = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params], dim=1)  # (K, n_params)
    coef = (max_norm / (norms.norm(dim=1) + 1e-6)).clamp(max=1.0)  # (K,)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))


def state_bytes_per_member(model: MLP, n_state: int) -> int:
    """Parameters, their gradients and n_state optimiser tensors of one member, in bytes (float32)."""
    n = sum(p.numel() for p in model.parameters())
    return 4 * n * (2 + n_state)


def activation_bytes_per_member(model_cfg: ModelConfig, in_features: int, batch: int,
                                 input_shape: tuple[int, int] = (28, 28)) -> int:
    """A member's activations kept for backward in one step, in bytes (float32), roughly: the gathered batch,
    its encoding, ~4 tensors per hidden layer (pre-activation, norm, activation, dropout mask), and for a CNN
    ~5 per convolution's output map (the convolution's, norm, activation, pooling indices, pooled map)."""
    widths = sum(model_cfg.hidden) * 4 + 10 * 3
    for layer, (c, ph, pw) in zip(model_cfg.conv, conv_maps(model_cfg.conv, input_shape)):
        widths += c * ph * pw * (layer.pool * layer.pool * 4 + 1)  # 4 maps before the pooling, one after it
    return 4 * batch * (in_features * 2 + widths) + (1 << 16)

