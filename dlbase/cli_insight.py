"""The insight commands' faces (`dlbase landscape`, `dlbase hessian`): their options, parsed here and passed to
the one function in dlbase/tools/ that does the work. cli.py registers them on its app (it stays the one app;
this module never imports it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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
