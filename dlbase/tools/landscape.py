"""`dlbase landscape`: the loss along the straight line from a run's initial weights to its final ones
(Goodfellow et al. 2015) and on a 2-D slice through the final weights along two random directions normalised
filter by filter (Li et al. 2018), on the training split (the empirical risk) and on the validation split (an
estimate of the risk), side by side. Every point is a weight vector of the model's one shape: a chunk of them is
evaluated at once by population/vmapped.py's evaluate_stacked (torch.func over stacked weights)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from dlbase.core.data import DeviceSplit
from dlbase.core.errors import DlbaseError
from dlbase.core.loss import build_eval_loss
from dlbase.population.vmapped import evaluate_stacked
from dlbase.tools import lab

POINTS_PER_CHUNK = 16  # weight vectors evaluated together: their stacked copies and activations bound the memory
ACTIVATION_BYTES = 256 << 20  # the activations of one chunk of points on one batch of images, at most (about)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILES = ("landscape.json", "landscape.csv", "landscape_line.png", "landscape_2d.png")


def line_alphas(resolution: int) -> list[float]:
    """resolution points from 0 (the initial weights) to 1 (the final ones), both exactly, and a quarter of the
    way again beyond each end."""
    steps = resolution - 1
    extra = math.ceil(steps / 4)
    return [i / steps for i in range(-extra, steps + extra + 1)]


def plane_axis(resolution: int, span: float) -> list[float]:
    """resolution coordinates from -span to span (0 exactly when resolution is odd)."""
    return [span * (2 * i / (resolution - 1) - 1) for i in range(resolution)]


def filter_normalised(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian direction in weight space with each filter (a weight's slice along its first axis: one output
    unit, one convolution filter) scaled to the norm of the model's own filter; biases and batch norm's scales
    (1-D) get 0, as in Li et al.'s plots."""
    out = {}
    for name, p in model.named_parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        if p.dim() <= 1:
            d.zero_()
        else:
            d = d * (p.detach().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)).view(
                -1, *[1] * (p.dim() - 1))
        out[name] = d
    return out


def batch_size_for(model: nn.Module, x: torch.Tensor, points: int) -> int:
    """Images per batch so that `points` weight vectors' activations stay near ACTIVATION_BYTES: one image
    through the model, every module's output counted."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()) if torch.is_tensor(o) else None)
             for m in model.modules()]
    with torch.no_grad():
        model(x[:1].float())
    for h in hooks:
        h.remove()
    per_image = 4 * max(1, sum(sizes))  # float32 bytes
    return max(1, min(4096, ACTIVATION_BYTES // (points * per_image)))


def cast(tensors: dict, dtype: torch.dtype) -> dict:
    """The floating tensors in dtype (--precision), the others (batch norm's counters) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def evaluate_points(model: nn.Module, make: Callable[[torch.Tensor], dict], coeffs: torch.Tensor, shared: dict,
                    parts: dict, loss_fn, dtype: torch.dtype) -> dict[str, dict[str, list[float]]]:
    """Each split's loss and accuracy at every point: make(coeffs[chunk]) gives the chunk's stacked tensors
    (built in float32, then cast to dtype; the losses are taken on float32 logits)."""
    out = {s: {"loss": [], "accuracy": []} for s in parts}
    P = min(POINTS_PER_CHUNK, coeffs.shape[0])
    batch = batch_size_for(model, next(iter(parts.values())).x, P)
    shared = cast(shared, dtype)
    for start in range(0, coeffs.shape[0], P):
        stacked = cast(make(coeffs[start:start + P]), dtype)
        for s, part in parts.items():
            loss, acc = evaluate_stacked(model, stacked, shared, part.x, part.y, loss_fn, batch)
            out[s]["loss"] += loss.tolist()  # note: a sync per chunk
            out[s]["accuracy"] += acc.tolist()
    return out


def _along(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return c.to(t).view(-1, *[1] * t.dim())  # (P,) -> (P, 1, ...) against a (*shape) tensor


def line(model: nn.Module, start: dict, end: dict, alphas: list[float], parts: dict, loss_fn,
         dtype: torch.dtype = torch.float32) -> dict:
    """(1 - alpha) * start + alpha * end for every floating tensor of the state: the weights, and batch norm's
    running statistics too, so that each end is exactly its checkpoint as `dlbase eval` sees it (those only
    between the ends, alpha clamped to [0, 1]: extrapolated, a running variance could turn negative)."""
    moving = [k for k, v in end.items() if v.is_floating_point()]
    shared = {k: v for k, v in end.items() if k not in moving}
    weights = {k for k, _ in model.named_parameters()}

    def make(a: torch.Tensor) -> dict:
        out = {}
        for k in moving:
            c = _along(a if k in weights else a.clamp(0, 1), end[k])
            out[k] = (1 - c) * start[k] + c * end[k]
        return out
    return {"alpha": alphas, **evaluate_points(model, make, torch.tensor(alphas, dtype=torch.float64), shared,
                                               parts, loss_fn, dtype)}


def plane(model: nn.Module, state: dict, axis: list[float], seed: int, parts: dict, loss_fn,
          dtype: torch.dtype = torch.float32) -> dict:
    """state + a d1 + b d2 over the grid axis x axis (rows: b, columns: a), d1 and d2 filter-normalised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    d1, d2 = filter_normalised(model, g), filter_normalised(model, g)
    shared = {k: v for k, v in state.items() if k not in d1}
    grid = torch.tensor([(a, b) for b in axis for a in axis], dtype=torch.float64)  # (R*R, 2), row-major in b

    def make(ab: torch.Tensor) -> dict:
        return {k: state[k] + _along(ab[:, 0], d1[k]) * d1[k] + _along(ab[:, 1], d2[k]) * d2[k] for k in d1}
    flat = evaluate_points(model, make, grid, shared, parts, loss_fn, dtype)
    R = len(axis)
    return {"a": axis, "b": axis, "seed": seed, **{s: {m: [v[r * R:(r + 1) * R] for r in range(R)]
                                                         for m, v in d.items()} for s, d in flat.items()}}


def landscape(target: Path, splits: Optional[str] = None, samples: int = 10000, resolution: int = 21,
              span: float = 1.0, seed: int = 0, out: Optional[Path] = None, device: str = "auto",
              data_root: Optional[Path] = None, precision: str = "fp32",
              log: Callable[[str], None] = print) -> dict:
    """The line (when the run kept its init.ckpt) and the 2-D slice, on each split's first `samples` images;
    writes FILES into out (default: the checkpoint's folder) and returns what landscape.json holds. precision:
    fp32 (as `dlbase eval` computes), or bf16 (weights and activations; ~3x faster where the CPU has AMX, and on
    GPUs; losses within ~1-2%)."""
    if precision not in PRECISIONS:
        raise DlbaseError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    lab.check_range("--resolution", resolution, 2, 201)
    lab.check_range("--samples", samples, 1, 10**7)
    lab.check_range("--span", span, 1e-6, 1e3)
    final, init = lab.resolve_run(target)
    run = lab.load(final, lab.device_of(device), data_root)
    parts = {s: lab.first(run.data.split(s), samples) for s in lab.parse_splits(splits, run.data)}
    parts = {s: DeviceSplit(p.x.to(dtype), p.y) for s, p in parts.items()}
    loss_fn = build_eval_loss(run.cfg.train.loss, run.cfg.model.output)
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    t0 = time.perf_counter()
    result = {"checkpoint": str(final), "init": str(init) if init else None, "epoch": int(run.payload["epoch"]),
              "samples": {s: len(p) for s, p in parts.items()}, "resolution": resolution, "span": span,
              "precision": precision}
    if init is not None:
        result["line"] = line(run.model, lab.load_weights(run, init), state, line_alphas(resolution), parts, loss_fn,
                              dtype)
    else:
        log(f"{final.parent}: no init.ckpt (the run was made before dlbase kept its initial weights): no line from "
            f"the initial weights; the 2-D slice only")
    result["plane"] = plane(run.model, state, plane_axis(resolution, span), seed, parts, loss_fn, dtype)
    result["seconds"] = time.perf_counter() - t0
    folder = lab.default_out(final, out)
    result["files"] = write(folder, result, f"{run.cfg.name}, epoch {result['epoch']}")
    return result


def write(folder: Path, r: dict, title: str) -> list[str]:
    """landscape.json, landscape.csv (one row per point and split), and the two pictures."""
    from dlbase.core.rundir import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["kind,alpha,a,b,split,loss,accuracy"]
    for s in r["samples"]:
        if "line" in r:
            rows += [f"line,{a!r},,,{s},{lo!r},{ac!r}" for a, lo, ac in
                     zip(r["line"]["alpha"], r["line"][s]["loss"], r["line"][s]["accuracy"])]
        p = r["plane"]
        rows += [f"plane,,{a!r},{b!r},{s},{p[s]['loss'][j][i]!r},{p[s]['accuracy'][j][i]!r}"
                 for j, b in enumerate(p["b"]) for i, a in enumerate(p["a"])]
    files = [folder / n for n in FILES]
    write_atomic(files[0], json.dumps({k: v for k, v in r.items() if k != "files"}, indent=1), "landscape")
    write_atomic(files[1], "\n".join(rows) + "\n", "landscape")
    from dlbase.tools.labplots import draw_line, draw_plane
    if "line" in r:
        draw_line(r, title, files[2])
    else:
        files.pop(2)
    draw_plane(r, title, files[-1])
    return [str(f) for f in files]


def summary(r: dict) -> list[str]:
    """The lines `dlbase landscape` prints."""
    lines = []
    for s in r["samples"]:
        if "line" in r:
            alphas, loss = r["line"]["alpha"], r["line"][s]["loss"]
            i0, i1 = alphas.index(0.0), alphas.index(1.0)
            peak = max(range(i0, i1 + 1), key=lambda i: loss[i])
            lines.append(f"line, {s} ({r['samples'][s]} images): loss {loss[i0]:.4f} at init, {loss[i1]:.4f} at "
                         f"the end; highest between them {loss[peak]:.4f} at alpha {alphas[peak]:.2f}")
        p = r["plane"][s]["loss"]
        mid = len(p) // 2
        lines.append(f"2-D slice, {s}: loss {p[mid][mid]:.4f} at the weights, {min(min(v) for v in p):.4f} to "
                     f"{max(max(v) for v in p):.4f} over +-{r['span']} of the directions")
    lines.append(f"{len(r['plane']['a']) ** 2 + len(r.get('line', {}).get('alpha', ()))} points ({r['precision']}) "
                 f"in {r['seconds']:.1f}s: " + ", ".join(r["files"]))
    return lines
