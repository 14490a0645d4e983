"""`dlbase optimizers`: the paths of dlbase's optimisers (the eight of D2L chapter 11, OPTIM_INFO) on 2-D test
functions, drawn over the function's contours. Each path is a 2-vector parameter moved by the torch optimiser that
core/optim.py's build_optimizer makes from an OptimConfig: the update rule `dlbase train` runs, not a copy of it.

D2L's chapter 11 (gd, sgd, minibatch sgd, momentum, adagrad, rmsprop, adadelta, adam, and yogi beside adam) maps to
OPTIM_INFO as: gd, sgd and minibatch sgd -> sgd (the same update; on a function with exact gradients they are one
path), momentum -> momentum, adagrad, rmsprop, adadelta, adam as named; dlbase adds nesterov and adamw, and has no
yogi (torch has none)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dlbase.core.errors import ConfigError
from dlbase.core.schema import OPTIM_INFO, OptimConfig


@dataclass(frozen=True)
class Function2D:
    """A 2-D function with what its picture needs: D2L's start and lr where D2L has them."""
    formula: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    start: tuple  # (x1, x2)
    lr: float
    steps: int
    box: tuple  # (x1 lo, x1 hi, x2 lo, x2 hi) of the contour plot
    minima: tuple = ()  # (x1, x2) points marked on the plot


FUNCTIONS: dict[str, Function2D] = {
    # D2L 11.6 (momentum): ill-conditioned, gd's x2 oscillates once lr passes 0.5
    "ill_conditioned": Function2D("0.1 x1^2 + 2 x2^2", lambda a, b: 0.1 * a ** 2 + 2 * b ** 2, (-5.0, -2.0), 0.4,
                                    20, (-5.5, 1.5, -3.0, 3.0), ((0.0, 0.0),)),
    # D2L 11.3 (gradient descent in two dimensions)
    "quadratic": Function2D("x1^2 + 2 x2^2", lambda a, b: a ** 2 + 2 * b ** 2, (-5.0, -2.0), 0.1, 20,
                              (-5.5, 1.5, -3.0, 3.0), ((0.0, 0.0),)),
    # D2L 11.1's saddle point, unbounded below along x2: a start just off the ridge shows who escapes it
    "saddle": Function2D("x1^2 - x2^2", lambda a, b: a ** 2 - b ** 2, (-2.0, 0.01), 0.1, 30,
                           (-2.5, 2.5, -2.5, 2.5), ((0.0, 0.0),)),
    "rosenbrock": Function2D("(1 - x1)^2 + 100 (x2 - x1^2)^2", lambda a, b: (1 - a) ** 2 + 100 * (b - a ** 2) ** 2,
                               (-1.5, 2.0), 0.001, 1000, (-2.0, 2.0, -1.0, 3.0), ((1.0, 1.0),)),
    # several local minima: Himmelblau's four, all of value 0; which one a path ends in depends on the optimiser
    "himmelblau": Function2D("(x1^2 + x2 - 11)^2 + (x1 + x2^2 - 7)^2",
                               lambda a, b: (a ** 2 + b - 11) ** 2 + (a + b ** 2 - 7) ** 2, (-0.5, -0.5), 0.01, 100,
                               (-5.0, 5.0, -5.0, 5.0),
                               ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126))),
}


def _pick(kind: str, text: str, table: Sequence[str]) -> str:
    if text in table:
        return text
    import difflib
    close = difflib.get_close_matches(text, list(table), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"--{kind} {text!r}: unknown {kind}; use one of {', '.join(table)}{hint}")


def function(name: str) -> Function2D:
    return FUNCTIONS[_pick("function", name, tuple(FUNCTIONS))]


def optimizers(names: Sequence[str]) -> list[str]:
    """--optimizer: names, comma-separated or repeated, or all; in the order given, each once."""
    wanted = [n.strip() for text in names for n in text.split(",") if n.strip()] or ["all"]
    out: list[str] = []
    for n in (list(OPTIM_INFO) if "all" in wanted else wanted):
        n = _pick("optimizer", n, (*OPTIM_INFO, "all"))
        if n not in out:
            out.append(n)
    return out


def learning_rates(given: Sequence[str], names: Sequence[str], default: float) -> dict[str, float]:
    """--lr: one number for every optimiser, and/or NAME=NUMBER for one; otherwise the function's default, but
    adadelta's published 1.0 (Zeiler's method has no learning rate; torch's lr only scales it)."""
    lrs = {n: OPTIM_INFO[n].default_lr if n == "adadelta" else default for n in names}
    for text in given:
        name, _, value = text.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and 0 < lr <= 1e6):
            raise ConfigError(f"--lr {text!r}: a learning rate in (0, 1e6], for all (--lr 0.1) or one optimiser "
                              f"(--lr adam=0.1)")
        for n in ([_pick("optimizer", name, tuple(OPTIM_INFO))] if name else names):
            lrs[n] = lr
    return lrs


def parse_start(text: Optional[str], default: tuple) -> tuple[float, float]:
    if text is None:
        return default
    try:
        x1, x2 = (float(t) for t in text.strip().strip("()[]").split(","))
    except ValueError:
        x1 = x2 = math.nan
    if not (math.isfinite(x1) and math.isfinite(x2)):
        raise ConfigError(f"--start {text!r}: give the starting point as two numbers x1,x2, e.g. -5,-2")
    return x1, x2


def optim_settings(sets: Sequence[str]) -> OptimConfig:
    """--set optim.KEY=VALUE (momentum, betas, eps, alpha, rho, weight_decay), checked as a config file's."""
    from dlbase.core.config import load_config
    bad = [t for t in sets if not t.startswith("optim.") or t.split("=")[0] in ("optim.name", "optim.lr")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: dlbase optimizers takes optim.* keys other than optim.name and optim.lr "
                          f"(those are --optimizer and --lr), e.g. --set optim.momentum=0.5")
    return load_config(None, list(sets)).optim


def path(fn: Function2D, name: str, lr: float, start: tuple[float, float], steps: int,
         device: torch.device = torch.device("cpu"), noise: float = 0.0, seed: int = 0,
         settings: OptimConfig = OptimConfig()) -> torch.Tensor:
    """The (steps + 1, 2) float64 points x_0..x_steps of optimiser `name` (settings' other fields, this lr) on
    fn from start. noise > 0: the gradient plus N(0, noise^2) per coordinate and step, as D2L 11.4 draws its
    stochastic gradient. The points stay on the device until the one read at the end."""
    from dlbase.core.optim import build_optimizer
    x = torch.tensor(start, dtype=torch.float64, device=device, requires_grad=True)  # (2,)
    optimizer = build_optimizer([x], dataclasses.replace(settings, name=name, lr=lr), device)
    gen = torch.Generator(device=device).manual_seed(seed) if noise > 0 else None
    points = torch.empty(steps + 1, 2, dtype=torch.float64, device=device)
    points[0] = x.detach()
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        fn.f(x[0], x[1]).backward()
        if gen is not None:
            x.grad.add_(torch.randn(2, generator=gen, dtype=torch.float64, device=device), alpha=noise)
        optimizer.step()
        points[t + 1] = x.detach()
    return points.cpu()  # note: the one device-to-host copy


@dataclass
class Paths:
    function: str
    lrs: dict  # optimiser -> lr
    points: dict  # optimiser -> (steps + 1, 2) tensor

    def csv_text(self) -> str:
        fn, buf = FUNCTIONS[self.function], io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["optimizer", "lr", "step", "x1", "x2", "f"])
        for name, pts in self.points.items():
            for t, (a, b) in enumerate(pts.tolist()):
                value = fn.f(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).item()
                w.writerow([name, f"{self.lrs[name]:g}", t, f"{a:.8g}", f"{b:.8g}", f"{value:.8g}"])
        return buf.getvalue()

    def summary(self) -> list[str]:
        fn = FUNCTIONS[self.function]
        out = []
        for name, pts in self.points.items():
            a, b = pts[-1].tolist()
            value = fn.f(pts[-1, 0], pts[-1, 1]).item()
            out.append(f"{name:9s} lr {self.lrs[name]:<8g} -> ({a:.4g}, {b:.4g})  f = {value:.4g}")
        return out


def plot(p: Paths, out: Path, steps: int) -> None:
    """One panel per optimiser (the function's contours, the path, start and minima), or one panel for one."""
    from dlbase.training.report import pyplot, save_png
    fn, plt = FUNCTIONS[p.function], pyplot()
    n = len(p.points)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows + 0.4), squeeze=False)
    lo1, hi1, lo2, hi2 = fn.box
    g1, g2 = torch.meshgrid(torch.linspace(lo1, hi1, 200, dtype=torch.float64),
                            torch.linspace(lo2, hi2, 200, dtype=torch.float64), indexing="xy")
    z = fn.f(g1, g2)
    levels = _levels(z)
    for ax, (name, pts) in zip(axes.flat, p.points.items()):
        ax.contour(g1.numpy(), g2.numpy(), z.numpy(), levels=levels, colors="0.6", linewidths=0.6)
        ax.plot(pts[:, 0].numpy(), pts[:, 1].numpy(), "-o", color="tab:orange", ms=2.5, lw=1)
        ax.plot(*pts[0].tolist(), "s", color="tab:blue", ms=5)
        for m in fn.minima:
            ax.plot(*m, "*", color="tab:red", ms=8)
        ax.set_xlim(lo1, hi1)
        ax.set_ylim(lo2, hi2)
        ax.set_title(f"{name}, lr {p.lrs[name]:g}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"f(x) = {fn.formula}: {steps} steps from {tuple(p.points[next(iter(p.points))][0].tolist())}",
                 fontsize=10)
    fig.tight_layout()
    save_png(plt, fig, out)


def _levels(z: torch.Tensor) -> list[float]:
    """Contour levels: evenly spaced quantiles of the function over the box (a steep valley and a wide plateau
    both get lines)."""
    q = torch.quantile(z.flatten()[::7], torch.linspace(0.02, 0.98, 18, dtype=torch.float64))
    return sorted(set(q.tolist()))


def optimizer_paths(function_name: str, names: Sequence[str] = ("all",), lr: Sequence[str] = (),
                    steps: Optional[int] = None, start: Optional[str] = None, out: Path = Path("optimizers"),
                    device: str = "auto", noise: float = 0.0, sets: Sequence[str] = (),
                    log: Callable[[str], None] = print) -> Paths:
    """The command: every asked-for optimiser's path on the function, paths.csv and optimizers.png in out."""
    from dlbase.core.rundir import check_writable, write_atomic
    from dlbase.training.engine import resolve_device
    fn = function(function_name)
    settings = optim_settings(sets)
    chosen = optimizers(names)
    lrs = learning_rates(lr, chosen, fn.lr)
    x0 = parse_start(start, fn.start)
    steps = fn.steps if steps is None else steps
    if not 1 <= steps <= 100_000:
        raise ConfigError(f"--steps {steps}: from 1 to 100000")
    if not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"--noise {noise}: the gradient noise's standard deviation, >= 0")
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise ConfigError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    dev = resolve_device(device)
    check_writable(out, "--out")
    p = Paths(function_name, lrs, {n: path(fn, n, lrs[n], x0, steps, dev, noise, settings=settings)
                                           for n in chosen})
    write_atomic(out / "paths.csv", p.csv_text(), "paths.csv")
    plot(p, out / "optimizers.png", steps)
    for line in p.summary():
        log(line)
    log(f"wrote {out / 'paths.csv'}, {out / 'optimizers.png'}")
    return p

