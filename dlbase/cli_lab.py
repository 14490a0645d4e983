"""The command line's insight commands (lr-find, optimizers): parse and call one function each, as cli.py's do;
cli.py mounts them on its app, with its one-line errors (kept apart so that cli.py stays one idea in 400 lines)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

CONFIG = ("YAML config file or a bundled recipe's name, as dlbase train takes (its model, data, optimiser and "
          "step are the ones tested).")
SET = "Override one key, as dlbase train --set: --set optim.name=sgd; repeat for more."


def lr_find(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG, show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET, show_default=False),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="The lr of the first step."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="The lr of the last step (reached unless it stops first)."),
    steps: int = typer.Option(100, "--steps", min=2, max=100_000, help="Optimiser steps from --start-lr to --end-lr."),
    out: Path = typer.Option(Path("lr_find"), "--out", "-o", help="Folder for lr_find.csv, lr_find.png (and "
                             "with --population: lr_population.csv/.png and the members' run folders)."),
    population: Optional[int] = typer.Option(None, "--population", "-k", help="Then train K learning rates, "
                                             "log-spaced from suggestion/10 to suggestion*10 (or --lr-range), side "
                                             "by side as one population, and plot their validation curves.",
                                             show_default=False),
    lr_range: Optional[str] = typer.Option(None, "--lr-range", help="With --population: LO,HI for the K "
                                           "learning rates instead of a decade either side of the suggestion.",
                                           show_default=False),
    epochs: int = typer.Option(1, "--epochs", min=1, max=1000, help="With --population: epochs each member "
                               "trains (the config's schedule over them)."),
) -> None:
    """The learning-rate range test (Smith 2017, as fastai and Lightning run it): from the config's initial
    model, the lr rises exponentially from --start-lr to --end-lr over --steps training steps of dlbase's own
    step; each step's loss is smoothed (EMA 0.98, bias-corrected) and the test stops once the smoothed loss
    passes 4x its best. Suggests the lr at the steepest descent of the smoothed loss (Lightning's rule, the
    first 10 and last point left out; fastai's minimum/10 beside it). Nothing is written to a run folder:
    lr_find.csv and lr_find.png go to --out."""
    from dlbase.core.config import load_config
    from dlbase.tools.lrfind import lr_find as run

    run(load_config(config, set_), out, start_lr, end_lr, steps, population, lr_range, epochs, log=typer.echo)


def optimizers(
    function: str = typer.Option("ill_conditioned", "--function", "-f", help="ill_conditioned (0.1 x1^2 + 2 x2^2, "
                                 "D2L 11.6), quadratic (x1^2 + 2 x2^2, D2L 11.3), saddle (x1^2 - x2^2), rosenbrock "
                                 "or himmelblau (four local minima)."),
    optimizer: List[str] = typer.Option([], "--optimizer", "-O", help="One or more of sgd, momentum, nesterov, "
                                        "adagrad, rmsprop, adadelta, adam, adamw (comma-separated or repeated); "
                                        "default: all eight.", show_default=False),
    lr: List[str] = typer.Option([], "--lr", help="Learning rate for all (--lr 0.1) or one (--lr adam=0.3); "
                                 "default: the function's (D2L's where it has one), adadelta's own 1.0.",
                                 show_default=False),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps per path (default: the function's).",
                                        show_default=False),
    start: Optional[str] = typer.Option(None, "--start", help="Starting point x1,x2 (default: the function's, e.g. "
                                        "-5,-2).", show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help="An optimiser setting, as in a config: --set "
                                   "optim.momentum=0.5, optim.betas=[0.9,0.99], optim.eps, alpha, rho.",
                                   show_default=False),
    noise: float = typer.Option(0.0, "--noise", help="Add N(0, noise^2) to each gradient coordinate (D2L 11.4's "
                                "stochastic gradient); 0: exact gradients."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("optimizers"), "--out", "-o", help="Folder for paths.csv and optimizers.png."),
) -> None:
    """Paths of dlbase's optimisers on a 2-D function over its contours, moved by the torch optimiser that
    dlbase train builds from the same optim settings (one panel per optimiser). Prints where each ends."""
    from dlbase.tools.optpaths import optimizer_paths

    optimizer_paths(function, optimizer, lr, steps, start, out, device, noise, set_, log=typer.echo)
