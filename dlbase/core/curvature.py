"""The training loss's curvature from Hessian-vector products (torch.func.functional_call, reverse over reverse): the top
eigenvalues and the most negative one by Lanczos (scipy.sparse.linalg.eigsh), the trace by Hutchinson's
estimator, the eigenvalue density by stochastic Lanczos quadrature (as PyHessian does). One place for
`dlbase hessian` (tools/hessian.py) and train.hessian_every (the epoch's end, training/train.py and
population/loop.py). Never draws from torch's global generator: a run that measures its curvature resumes as
one that does not."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dlbase.core.errors import DlbaseError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> the batch's mean loss
CHUNK = 2048  # samples per forward inside one Hessian-vector product: bounds the activations' memory


class HessianOperator:
    """H v for the Hessian H of loss_fn's mean over (x, y) at the model's weights, as a function of one flat
    vector of every trainable parameter (model.named_parameters() order). The model in eval mode (dropout off,
    batch norm on its running statistics); dtype float64 for checks against the exact Hessian."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                 dtype: Optional[torch.dtype] = None):
        dtype = dtype or torch.float32
        self.template = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).to(dtype)  # (n,)
        self.buffers = {n: (b.to(dtype) if b.is_floating_point() else b) for n, b in model.named_buffers()}
        self.x, self.y, self.loss_fn = x.to(dtype), y, loss_fn
        self.n, self.calls = self.theta.numel(), 0

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = flat[at:at + size].view(shape)
            at += size
        return out

    def loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(self.template, (self.params(flat), self.buffers), (x,))
        return self.loss_fn(logits, y)

    def gradients(self) -> list[tuple[torch.Tensor, float]]:
        """Each chunk's gradient with its graph kept (create_graph), and the chunk's share of the samples: built
        once, so that every product after the first is one backward pass through it (reverse over reverse)."""
        if self._grads is None:
            was = self.template.training
            self.template.eval()
            self._leaf = self.theta.clone().requires_grad_()
            N, self._grads = self.x.shape[0], []
            with torch.enable_grad():
                for s in range(0, N, CHUNK):
                    x, y = self.x[s:s + CHUNK], self.y[s:s + CHUNK]
                    g, = torch.autograd.grad(self.loss(self._leaf, x, y), self._leaf, create_graph=True)
                    self._grads.append((g, x.shape[0] / N))
            self.template.train(was)
        return self._grads

    _grads: Optional[list] = None

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v, (n,) -> (n,): the chunks' products weighted by their share of the samples."""
        self.calls += 1
        grads = self.gradients()
        out = torch.zeros_like(self.theta)
        with torch.enable_grad():
            for g, share in grads:
                out += torch.autograd.grad(g, self._leaf, v.to(self.theta), retain_graph=True)[0] * share
        return out

    def numpy_operator(self):
        """H as scipy's LinearOperator on float64 numpy vectors."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(v: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(self.theta.device)
            return self.hvp(v).double().cpu().numpy()  # note: a host sync per product (Lanczos runs on the host)
        return LinearOperator((self.n, self.n), matvec=matvec, dtype=np.float64)


def require_scipy() -> None:
    """One line, not an ImportError's traceback, where scipy (the Lanczos of every eigenvalue here) is missing."""
    if importlib.util.find_spec("scipy") is None:
        raise DlbaseError("dlbase hessian and train.hessian_every need scipy (scipy.sparse.linalg.eigsh), which is "
                          "not installed here: pip install scipy")


def extreme_eigenvalues(op: HessianOperator, k: int, which: str, tol: float = 1e-6, maxiter: Optional[int] = None,
                        seed: int = 0) -> tuple[list[float], bool]:
    """The k algebraically largest (which="LA") or smallest ("SA") eigenvalues, largest first, by ARPACK's
    implicitly restarted Lanczos; converged False when maxiter ran out (the Ritz values reached are returned)."""
    require_scipy()
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    k = min(k, op.n - 1)
    v0 = np.random.default_rng(seed).standard_normal(op.n)
    try:
        vals, converged = eigsh(op.numpy_operator(), k=k, which=which, tol=tol, v0=v0, maxiter=maxiter,
                                return_eigenvectors=False), True
    except ArpackNoConvergence as e:
        vals, converged = e.eigenvalues, False
    return sorted((float(v) for v in vals), reverse=True), converged


@dataclass(frozen=True)
class Trace:
    """Hutchinson's estimate of tr(H): the mean of z^T H z over Rademacher probes z, its standard error."""
    mean: float
    stderr: float
    probes: int


def hutchinson_trace(op: HessianOperator, probes: int = 100, seed: int = 0) -> Trace:
    g = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (op.n,), generator=g) * 2 - 1).to(op.theta)  # (n,) of +-1
        samples.append(torch.dot(z, op.hvp(z)))
    s = torch.stack(samples).double().cpu()  # note: one sync, after every probe
    sd = float(s.std()) if probes > 1 else math.inf
    return Trace(float(s.mean()), sd / math.sqrt(probes), probes)


def lanczos(op: HessianOperator, steps: int, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`steps` Lanczos iterations from v with full reorthogonalisation: the tridiagonal matrix's eigenvalues
    (nodes) and the squared first components of its eigenvectors (weights, summing to 1)."""
    steps = min(steps, op.n)
    basis = [v / v.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = op.hvp(basis[j])
        alphas.append(torch.dot(w, basis[j]))
        V = torch.stack(basis)  # (j+1, n)
        w = w - V.T @ (V @ w)  # against every earlier vector: keeps the basis orthogonal in finite precision
        w = w - V.T @ (V @ w)
        beta = w.norm()
        if j == steps - 1 or float(beta) < 1e-10 * max(1.0, float(abs(alphas[-1]))):  # note: sync per step
            break
        betas.append(beta)
        basis.append(w / beta)
    T = np.diag([float(a) for a in alphas]) + np.diag([float(b) for b in betas], 1) + np.diag(
        [float(b) for b in betas], -1)
    nodes, vecs = np.linalg.eigh(T)
    return nodes, vecs[0] ** 2


def slq_density(op: HessianOperator, runs: int = 4, steps: int = 64, seed: int = 0) -> list[tuple[list, list]]:
    """Stochastic Lanczos quadrature: per run from a random Gaussian vector, the nodes and weights whose
    average over runs estimates the spectral measure (1/n) sum_i delta(t - lambda_i)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(runs):
        v = torch.randn(op.n, generator=g, dtype=torch.float64).to(op.theta)
        nodes, weights = lanczos(op, steps, v)
        out.append((nodes.tolist(), weights.tolist()))
    return out


def smoothed_density(runs: list[tuple[list, list]], grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ measure convolved with a Gaussian of width sigma, on grid: a density that integrates to ~1."""
    total = np.zeros_like(grid, dtype=np.float64)
    for nodes, weights in runs:
        d = grid[:, None] - np.asarray(nodes)[None, :]
        total += (np.exp(-0.5 * (d / sigma) ** 2) * np.asarray(weights)[None, :]).sum(1)
    return total / (len(runs) * sigma * math.sqrt(2 * math.pi))


def epoch_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, float]:
    """train.hessian_every's columns at an epoch's end: the largest and the most negative eigenvalue of the
    Hessian on the fixed batch (x, y) (ARPACK to 1e-3 relative; a saddle has hessian_min < 0)."""
    op = HessianOperator(model, x, y, loss_fn)
    top, _ = extreme_eigenvalues(op, 1, "LA", tol=1e-3, maxiter=200)
    low, _ = extreme_eigenvalues(op, 1, "SA", tol=1e-3, maxiter=200)
    return {"hessian_top": top[0], "hessian_min": low[-1]}
