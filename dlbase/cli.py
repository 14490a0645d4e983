"""The dlbase command line (Typer): parse, load the config, call one function per command. No logic."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dlbase.core.errors import DlbaseError

app = typer.Typer(
    help="Train MLPs on MNIST from a YAML file of hyperparameters, on the GPU when there is one.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check a config without training.", no_args_is_help=True)
app.add_typer(config_app, name="config")
recipes_app = typer.Typer(help="List the recipes bundled with dlbase: name, measured test accuracy (or unmeasured) "
                          "and the idea in one line. Any of them runs from any folder as --config NAME; `dlbase "
                          "recipes copy NAME` writes one out to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")

CONFIG_HELP = ("YAML config file, e.g. configs/mnist_mlp.yaml, or the name of a bundled recipe (mnist_mlp; "
               "dlbase recipes lists them); a file that exists wins.")
SET_HELP = ("Override one key: --set optim.lr=0.01 --set model.hidden=[256,256] --set model.conv[0].kernel=5. "
            "Dotted key, value parsed as YAML; repeat for more. Checked like the file.")


def user_errors(fn):
    """Turn a mistake of the user's (DlbaseError) into one line on stderr and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DlbaseError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
    return wrapper


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Optional with --resume "
                                          "(then the checkpoint's own config is used).", show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP, show_default=False),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its folder (the newest readable "
                                          "checkpoint in it) or a .ckpt file. From an older checkpoint than the "
                                          "run's newest, the run branches into a new folder. The folder of a "
                                          "--seeds member goes on with every member of its population.",
                                          show_default=False),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Train the config once per seed, together as one "
                                        "population, each in <name>-seed<S>/: a count (5: seeds 0-4) or a list "
                                        "(0,7,42); prints the mean ± sd of the best validation metric.",
                                        show_default=False),
    test: bool = typer.Option(False, "--test", help="With --seeds: also the mean ± sd of each best.ckpt's test "
                              "accuracy (measured as dlbase eval does)."),
) -> None:
    """Train a model; writes config.yaml, metrics.csv, last.ckpt, best.ckpt and plots into <checkpoint.dir>/<name>/."""
    from dlbase.training.state import configure
    from dlbase.training.train import train as run_training

    if seeds is not None or test:
        return _train_seeds(config, set_, resume, seeds, test)
    if resume is not None and resume.is_dir():
        from dlbase.core.rundir import quote
        from dlbase.population.resume import population_of, resume_population
        if population_of(resume) is not None:  # a --seeds member: the whole population goes on, in one step
            if config is not None:
                raise DlbaseError(f"--resume {resume}: a population goes on with its members' own configs; "
                                  f"change keys with --set (or resume one member alone: --resume "
                                  f"{quote(resume / 'last.ckpt')})")
            summary = resume_population(resume, set_, log=typer.echo)
            if summary.exit_code:
                raise typer.Exit(summary.exit_code)
            return
    run = configure(config, set_, resume)
    try:
        result = run_training(run.cfg, resume=run.resume, resume_payload=run.payload, folder=run.folder)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during start-up: every file on disk is whole
        typer.echo("interrupted: stopped at once; the files on disk are whole (atomic writes)", err=True)
        raise typer.Exit(130) from None
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _train_seeds(config: Optional[Path], sets: List[str], resume: Optional[Path], seeds: Optional[str],
                 test: bool) -> None:
    from dlbase.core.config import load_config
    from dlbase.population.train import parse_seeds, train_seeds

    if seeds is None:
        raise DlbaseError("--test goes with --seeds (the test accuracy over seeds); for one run use dlbase eval "
                          "<run>/best.ckpt")
    if resume is not None:
        raise DlbaseError("--seeds starts new runs; to go on with a --seeds population, resume any member's folder "
                          "without --seeds: dlbase train --resume <checkpoint.dir>/<name>-seed<S>")
    if config is None:
        raise DlbaseError("--seeds needs --config")
    summary = train_seeds(load_config(config, sets), parse_seeds(seeds), test, log=typer.echo)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


@app.command("eval")
@user_errors
def eval_(
    ckpt: Path = typer.Argument(..., help="A .ckpt file written by dlbase train.", show_default=False),
    split: str = typer.Option("test", "--split", help="Which split to evaluate: test, val or train (val and "
                              "train are rebuilt from the run's seed and data settings)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with the IDX files, instead of "
                                             "the checkpoint's data.root.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text (with per_class "
                                 "accuracy and the confusion matrix)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write confusion.png, mistakes.png (the "
                                          "most confident misclassifications) and filters.png (the first layer's "
                                          "filters) into this folder, and for a CNN featuremaps.png (the split's "
                                          "first image through each convolution layer).",
                                          show_default=False),
) -> None:
    """Report accuracy and mean loss of a checkpoint on a split; needs nothing but the checkpoint and the data."""
    from dlbase.training.evaluate import evaluate_checkpoint, format_result

    result = evaluate_checkpoint(ckpt, split, data_root, report)
    typer.echo(json.dumps(result) if as_json else format_result(result, report))


@app.command()
@user_errors
def gradcheck(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP, show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP, show_default=False),
    batch: int = typer.Option(16, "--batch", min=1, max=4096, help="Samples in the batch the gradients are "
                              "taken on (synthetic inputs in [0, 1] and random labels)."),
    tol: float = typer.Option(1e-10, "--tol", min=0.0, max=1.0, help="Largest relative difference allowed "
                              "(float64), between 0 and 1."),
) -> None:
    """Check the hand-written delta rule against autograd, layer by layer, in float64.

    Every weight and bias gradient of the configured MLP or CNN (28x28 images; batch norm on the batch's
    statistics), on a batch of synthetic inputs in [0, 1] with random labels; one row per layer (conv, batch
    norm, linear); exit 1 when any layer differs by more than --tol.
    """
    from dlbase.core.backprop import gradcheck_config
    from dlbase.core.config import load_config

    lines, ok = gradcheck_config(load_config(config, set_), batch, tol, str(config))
    typer.echo("\n".join(lines))
    if not ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def plot(run_dir: Path = typer.Argument(..., help="A run folder (<checkpoint.dir>/<name>) with metrics.csv.",
                                        show_default=False)) -> None:
    """Draw curves.png (loss, accuracy, lr per epoch) and gradnorms.png (per-layer norms) into the run folder."""
    from dlbase.training.report import plot_run

    for path in plot_run(run_dir):
        typer.echo(str(path))


@app.command()
@user_errors
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="The base config every trial starts from (may hold a "
                                "sweep: section).", show_default=False),
    sweep_file: Optional[Path] = typer.Option(None, "--sweep", help="Sweep spec YAML: method (grid|random|tpe), "
                                              "trials, seed, params, metric, mode, cv_folds, pruner, storage.",
                                              show_default=False),
    grid: List[str] = typer.Option([], "--grid", "-g", help="A quick grid axis: --grid optim.lr=[0.1,0.01]; "
                                   "repeat for more (the product is run).", show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP + " Applies to every trial.",
                                   show_default=False),
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=256, help="Worker processes on this machine, "
                                "each taking trials from the study."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The study's database: an Optuna storage URL "
                                          "(sqlite:///study.db, postgresql://user@host/db) or a journal file "
                                          "(study.log). The same command with the same URL on several machines "
                                          "joins one study. Default: study.db in the sweep folder.",
                                          show_default=False),
    worker: Optional[int] = typer.Option(None, "--worker", hidden=True, help="Internal: this process is worker "
                                         "N of a --workers sweep."),
) -> None:
    """Run a hyperparameter search on Optuna, choosing on validation data only; rerun the same command to resume
    it. Writes <checkpoint.dir>/<sweep name>/: study.db, trial-NNN/ run folders, results.csv, best.yaml,
    winner.json."""
    from dlbase.search.sweep import run_sweep
    from dlbase.search.spec import load_sweep

    if worker is not None and os.environ.get("DLBASE_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["DLBASE_THREADS"]))
    base_raw, spec, source = load_sweep(config, sweep_file, grid, set_)
    argv = ["--config", str(config), *(["--sweep", str(sweep_file)] if sweep_file else []),
            *(a for g in grid for a in ("--grid", g)), *(a for t in set_ for a in ("--set", t)),
            *(["--storage", storage] if storage else [])]
    try:
        run_sweep(base_raw, spec, source, set_, log=typer.echo, storage=storage, workers=workers,
                  worker_argv=argv, worker=worker)
    except KeyboardInterrupt:  # a second Ctrl-C: finished trials and checkpoints on disk are whole
        typer.echo("interrupted: stopped at once; rerun the same command to resume the sweep", err=True)
        raise typer.Exit(130) from None


@app.command("export")
@user_errors
def export_(
    ckpt: Path = typer.Argument(..., help="A .ckpt file written by dlbase train.", show_default=False),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx (dynamic batch axis, encoding inside), "
                            "safetensors (the resolved config in its metadata), export (torch.export, a .pt2 file "
                            "for torch.export.load) or torchscript (while torch has it).", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: next to the checkpoint, "
                                       "with the format's suffix). Never the checkpoint itself.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
) -> None:
    """Write a checkpoint's model in a format other tools load: ONNX, safetensors, torch.export or TorchScript."""
    from dlbase.tools.export import export

    typer.echo(str(export(ckpt, fmt, out, force)))


@app.command()
@user_errors
def predict(
    ckpt: Path = typer.Argument(..., help="A .ckpt file written by dlbase train.", show_default=False),
    images: List[Path] = typer.Argument(..., help="PNG or JPEG files of single digits, any size; 8 or 16 bits, "
                                        "transparency composited.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Classify image files: each is turned to grey, ink-on-black, scaled into a 20x20 box and centred by mass
    in 28x28, the way MNIST was prepared; prints the label and its probability."""
    from dlbase.tools.export import predict as run

    for r in run(ckpt, images):
        typer.echo(json.dumps(r) if as_json else f"{r['image']}: {r['label']}  ({100 * r['probability']:.1f}%)")


@app.command()
@user_errors
def runs(
    folder: Optional[Path] = typer.Argument(None, help="Folder to search for run folders, recursively (sweep "
                                            "trials and folds too). Default: checkpoint.dir of the default "
                                            "config (checkpoints).", show_default=False),
    sort: Optional[str] = typer.Option(None, "--sort", help="Sort by a column (name, status, epochs, "
                                       "best_val_accuracy, test_accuracy, train_seconds; accuracies best first) "
                                       "or by a hyperparameter that differs (e.g. optim.lr).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per run, one per line."),
) -> None:
    """List the runs under a folder: status (finished, early-stopped, preempted, diverged, unfinished, broken),
    epochs, best validation accuracy, test accuracy (once dlbase eval measured it), training seconds, and the
    hyperparameters that differ between them."""
    from dlbase.tools.runs import as_json as run_json, list_runs, table
    from dlbase.core.schema import CheckpointConfig

    root = folder if folder is not None else Path(CheckpointConfig().dir)
    found, keys = list_runs(root, sort)
    if not found:
        typer.echo(f"no runs under {root}")
    elif as_json:
        for r in found:
            typer.echo(json.dumps(run_json(r, keys)))
    else:
        typer.echo(table(found, keys))


from dlbase import cli_lab  # noqa: E402 - the insight commands, parsed there, mounted with this file's errors
app.command("landscape")(user_errors(cli_lab.landscape))
app.command("hessian")(user_errors(cli_lab.hessian))
app.command("lr-find")(user_errors(cli_lab.lr_find))
app.command("optimizers")(user_errors(cli_lab.optimizers))


@config_app.command("show")
@user_errors
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP, show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP, show_default=False),
) -> None:
    """Print the fully resolved config as YAML, every default filled in."""
    from dlbase.core.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(config, set_)), nl=False)


@config_app.command("validate")
@user_errors
def config_validate(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP, show_default=False),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP, show_default=False),
) -> None:
    """Check a config (and overrides) without running anything; exit 0 when valid, 2 with the reason when not."""
    from dlbase.core.config import load_config, read_config_file

    raw = read_config_file(config)
    if isinstance(raw, dict) and "sweep" in raw:  # a sweep config: the run config and its sweep: section
        from dlbase.search.spec import load_sweep

        _, spec, _ = load_sweep(config, None, [], set_)
        typer.echo(f"{config}: valid config with a sweep of {len(spec.params)} params")
        return
    load_config(config, set_)
    typer.echo(f"{config}: valid")


@config_app.command("schema")
@user_errors
def config_schema(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write it to this file (atomically) instead of "
                                       "printing it, e.g. configs/dlbase.schema.json.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Print the JSON Schema (draft-07) of a config file, for editors: every key with its type, range, choices,
    default and help. A YAML file whose first line is `# yaml-language-server: $schema=PATH` gets completion and
    checks in VS Code's YAML extension."""
    from dlbase.core.rundir import write_atomic
    from dlbase.core.editorschema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is not None and out.exists() and not force:
        raise DlbaseError(f"--out {out}: already exists; add --force to replace it")
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_atomic(out, text, "schema")
        typer.echo(str(out))


@recipes_app.callback()
@user_errors
def recipes(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per recipe, one per line (with where and "
                                 "when its accuracy was measured)."),
) -> None:
    """The table (or --json) of the bundled recipes, unless a subcommand (copy) was asked for."""
    if ctx.invoked_subcommand is not None:
        return
    from dlbase.tools.recipes import as_json as recipe_json, list_recipes, table

    found = list_recipes()
    typer.echo("\n".join(json.dumps(recipe_json(r)) for r in found) if as_json else table(found))


@recipes_app.command("copy")
@user_errors
def recipes_copy(
    name: str = typer.Argument(..., help="A bundled recipe's name (dlbase recipes lists them).", show_default=False),
    dest: Optional[Path] = typer.Argument(None, help="An existing folder, or a file path ending .yaml. Default: "
                                          "the current folder.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace the file if it exists."),
) -> None:
    """Write a bundled recipe out, byte for byte, to edit it; prints the file and the command that runs it."""
    from dlbase.tools.recipes import copy, next_steps

    target = copy(name, dest, force)
    typer.echo("\n".join([str(target), *next_steps(target)]))


def main(fast_exit: bool = True) -> None:
    """The console script: command-line mistakes (an unknown option or command, a missing argument, a value out
    of range) are one line on stderr and exit status 2, like every other mistake of the user's."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    from dlbase.core.errors import one_line

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:  # `dlbase` or `dlbase config` alone: the help, as before
        typer.echo(e.ctx.get_help() if e.ctx else "", err=True)
        code = 2
    except UsageError as e:
        where = e.ctx.command_path if e.ctx else "dlbase"
        typer.echo(f"error: {where}: {one_line(e.format_message())} (see {where} --help)", err=True)
        code = 2
    except ClickException as e:
        typer.echo(f"error: {one_line(e.format_message())}", err=True)
        code = e.exit_code
    except typer.Abort:
        code = 130
    code = code if isinstance(code, int) else 0
    watched = sys.gettrace() is not None or sys.getprofile() is not None or any(
        m in sys.modules for m in ("cProfile", "profile", "coverage", "pdb"))  # they write their results at exit
    if fast_exit and not watched:
        # every file is written, fsynced and closed by now: skip the interpreter's teardown of torch's modules
        # (0.5-0.8 s of a 2-core CPU's time, after the result is out). Not under a profiler or a debugger.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
