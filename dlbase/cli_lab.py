"""The command line's insight commands (`dlbase landscape`, `dlbase hessian`, `dlbase lr-find`, `dlbase
optimizers`): their options, parsed here and passed to the one function in dlbase/tools/ that does the work. cli.py
mounts them on its one app with its one-line errors (kept apart so that cli.py stays one idea in 400 lines; this
module never imports it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

RUN_HELP = ("A run folder of dlbase train (its best.ckpt, and its init.ckpt when the run kept one) or a .ckpt "
            "file (and the init.ckpt beside it).")
DEVICE_HELP = "auto (cuda when there is one) | cpu | cuda | cuda:N."
DATA_ROOT_HELP = "Folder with the IDX files, instead of the checkpoint's data.root."


def landscape(
    run: Path = typer.Argument(..., help=RUN_HELP, show_default=False),
    split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits, side by side: train (the "
                                        "empirical risk), val (the risk's estimate), test. Default: train,val "
                                        "(train alone for a run without a validation split).", show_default=False),
    samples: int = typer.Option(10000, "--samples", help="The first N images of each split (fewer if it has fewer)."),
    resolution: int = typer.Option(21, "--resolution", help="Points along each axis of the 2-D slice (R x R) and "
                                   "from the initial to the final weights on the line (2 to 201)."),
    span: float = typer.Option(1.0, "--span", help="The slice covers -span..span of each filter-normalised "
                               "direction (1.0: as far again as the weights' own filter norms)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the two random directions."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for landscape.json, landscape.csv, "
                                       "landscape_line.png and landscape_2d.png (default: the checkpoint's folder).",
                                       show_default=False),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP, show_default=False),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (the losses dlbase eval reports), or bf16 "
                                  "(about 3x faster on CPUs with AMX and on GPUs; losses within 1-2%)."),
    as_json: bool = typer.Option(False, "--json", help="Print landscape.json's object instead of the summary."),
) -> None:
    """The loss along the straight line from a run's initial to its final weights (Goodfellow et al. 2015), and on
    a 2-D slice through the final weights along two filter-normalised random directions (Li et al. 2018), on the
    training and validation splits side by side; many weight vectors evaluated at once (torch.func over stacked
    weights). Runs made before dlbase kept init.ckpt get the slice only."""
    from dlbase.tools.landscape import landscape as draw, summary

    result = draw(run, split, samples, resolution, span, seed, out, device, data_root, precision, log=typer.echo)
    typer.echo(json.dumps(result) if as_json else "\n".join(summary(result)))


def hessian(
    run: Path = typer.Argument(..., help=RUN_HELP + " A run folder gives both its init.ckpt and its best.ckpt.",
                               show_default=False),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many of the largest eigenvalues (1 to 100)."),
    samples: int = typer.Option(1000, "--samples", help="The loss's mean over the split's first N images."),
    split: str = typer.Option("train", "--split", help="train, val or test."),
    probes: int = typer.Option(50, "--probes", help="Rademacher probes of Hutchinson's trace estimate."),
    density: bool = typer.Option(False, "--density", help="Also the eigenvalue density by stochastic Lanczos "
                                 "quadrature, drawn as hessian.png."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, or float64 (slower; for checks)."),
    seed: int = typer.Option(0, "--seed", help="Seed of Lanczos's start and the probes."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for hessian.png (default: the "
                                       "checkpoint's folder).", show_default=False),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per checkpoint, one per line."),
) -> None:
    """The Hessian of the training loss at a checkpoint's weights, from Hessian-vector products: its top k
    eigenvalues and its most negative one by Lanczos (a saddle has a negative one, a minimum none), its trace by
    Hutchinson's estimator with its standard error, and optionally its eigenvalue density. Dropout off, batch
    norm on its running statistics."""
    from dlbase.tools.hessian import describe, hessian as measure

    for r in measure(run, top_k, samples, split, dtype, probes, density, seed, out, device, data_root,
                     log=typer.echo):
        typer.echo(json.dumps(r) if as_json else describe(r))

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
