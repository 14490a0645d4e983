"""`dlbase lr-find --population K`: K learning rates, log-spaced over a decade either side of the range test's
suggestion (or over --lr-range), trained side by side as one population (population/train.py's train_population:
stacked members, one batched step) for --epochs epochs of the config's own recipe (its schedule, augmentation and
the rest), each member a real run in <out>/population/<name>-lr<k>/; their validation curves in one CSV
(lr_population.csv) and on one plot (lr_population.png)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Callable, Optional

from dlbase.core.config import Config
from dlbase.core.errors import ConfigError

MAX_MEMBERS = 64
SPAN = 10.0  # around a suggestion: from suggestion / SPAN to suggestion * SPAN
FIELDS = ("member", "lr", "epoch", "step", "train_loss", "val_loss", "val_accuracy", "status")


def parse_lr_range(text: str) -> tuple[float, float]:
    """--lr-range LO,HI: two positive finite numbers, LO < HI."""
    try:
        lo, hi = (float(t) for t in text.strip().strip("[]").split(","))
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi <= 1e6):
        raise ConfigError(f"--lr-range {text!r}: give LO,HI with 0 < LO < HI <= 1e6, e.g. 1e-4,1e-1")
    return lo, hi


def log_spaced(lo: float, hi: float, k: int) -> list[float]:
    """k learning rates from lo to hi, evenly spaced in log lr (lo and hi included)."""
    return [lo * (hi / lo) ** (i / (k - 1)) for i in range(k)]


def member_configs(cfg: Config, lrs: list[float], epochs: int, out: Path) -> list[Config]:
    """cfg once per lr, named <name>-lr<k>, trained for `epochs` epochs (max_steps dropped) into out/population."""
    parent = str(out / "population")
    train = dataclasses.replace(cfg.train, epochs=epochs, max_steps=None)
    return [dataclasses.replace(cfg, name=f"{cfg.name[:120]}-lr{k}", optim=dataclasses.replace(cfg.optim, lr=lr),
                                train=train, checkpoint=dataclasses.replace(cfg.checkpoint, dir=parent))
            for k, lr in enumerate(lrs)]


def check_population_args(cfg: Config, k: int, lr_range: Optional[str], epochs: int,
                          out: Path) -> Optional[tuple[float, float]]:
    """Every refusal of --population before the range test spends any time; the --lr-range given, or None."""
    from dlbase.population.train import check_population
    if not 2 <= k <= MAX_MEMBERS:
        raise ConfigError(f"--population {k}: give 2 to {MAX_MEMBERS} learning rates to train side by side")
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: the population trains for at least 1 epoch")
    if cfg.data.val_size == 0:
        raise ConfigError("data.val_size: 0 leaves no validation split, and --population compares the members' "
                          "validation curves; set data.val_size (e.g. 5000)")
    check_population(member_configs(cfg, log_spaced(1e-3, 1e-2, k), epochs, out))
    return parse_lr_range(lr_range) if lr_range is not None else None


def curves(results, lrs: list[float]) -> list[dict]:
    """One row per member and epoch from each member's metrics.csv (its own record of the run); lr: the member's
    optim.lr (metrics.csv's lr column is the schedule's at the epoch's end)."""
    from dlbase.core.rundir import number, read_metrics
    rows = []
    for k, (r, lr) in enumerate(zip(results, lrs)):
        for m in read_metrics(Path(r.folder) / "metrics.csv"):
            rows.append({"member": k, "lr": lr, "epoch": int(m["epoch"]),
                         "step": int(m["step"]), "train_loss": number(m.get("train_loss")),
                         "val_loss": number(m.get("val_loss")), "val_accuracy": number(m.get("val_accuracy")),
                         "status": r.status})
    return rows


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def plot(rows: list[dict], lrs: list[float], suggestion: Optional[float], path: Path, title: str) -> None:
    """Left: each member's validation loss per epoch, coloured by its lr; right: the validation accuracy after
    each epoch against the lr (log axis), the range test's suggestion marked."""
    from dlbase.training.report import pyplot, save_png
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for k, lr in enumerate(lrs):
        mine = [r for r in rows if r["member"] == k and r["val_loss"] is not None]
        left.plot([r["epoch"] for r in mine], [r["val_loss"] for r in mine], "o-", ms=4,
                  color=cmap(k / max(1, len(lrs) - 1)), label=f"lr {lr:.2g}")
    epochs = sorted({r["epoch"] for r in rows})
    for e in epochs:
        at = sorted((r["lr"], r["val_accuracy"]) for r in rows if r["epoch"] == e and r["val_accuracy"] is not None)
        right.plot([a for a, _ in at], [100 * b for _, b in at], "o-", ms=4, lw=2 if e == epochs[-1] else 1,
                   alpha=1.0 if e == epochs[-1] else 0.5, label=f"after epoch {e}")
    if suggestion is not None:
        right.axvline(suggestion, color="tab:red", ls="--", lw=1, label=f"range test's suggestion {suggestion:.2g}")
    left.set_xticks(epochs)  # whole epochs
    left.set_xlabel("epoch")
    left.set_ylabel("validation loss")
    left.set_yscale("log")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel("learning rate")
    right.set_ylabel("validation accuracy (%)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(plt, fig, path)


def best_line(rows: list[dict], suggestion: Optional[float]) -> str:
    last = max((r["epoch"] for r in rows), default=0)
    done = [r for r in rows if r["epoch"] == last and r["val_accuracy"] is not None]
    if not done:
        return "population: no member finished an epoch (every one diverged)"
    best = max(done, key=lambda r: (r["val_accuracy"], -(r["val_loss"] or 0.0)))  # ties: the lower loss
    said = f"; the range test suggested {suggestion:.3g}" if suggestion is not None else ""
    return (f"population: best lr {best['lr']:.3g} (validation accuracy {100 * best['val_accuracy']:.2f}% after "
            f"{last} epoch{'s' if last > 1 else ''}){said}")


def lr_population(cfg: Config, out: Path, k: int, lr_range: Optional[tuple[float, float]],
                  suggestion: Optional[float], epochs: int, log: Callable[[str], None] = print) -> list[dict]:
    """Train the K learning rates as one population; write lr_population.csv and .png into out; the rows."""
    from dlbase.core.rundir import write_atomic
    from dlbase.population.train import train_population
    if lr_range is None:
        if suggestion is None:
            raise ConfigError("--population: the range test made no suggestion to centre the learning rates on; "
                              "give them with --lr-range LO,HI")
        lr_range = (suggestion / SPAN, suggestion * SPAN)
    lrs = log_spaced(*lr_range, k)
    log(f"population: {k} learning rates from {lrs[0]:.3g} to {lrs[-1]:.3g}, {epochs} epoch(s) each, "
        f"in {out / 'population'}")
    results = train_population(member_configs(cfg, lrs, epochs, out), log=log)
    rows = curves(results, lrs)
    write_atomic(out / "lr_population.csv", csv_text(rows), "lr_population.csv")
    plot(rows, lrs, suggestion, out / "lr_population.png",
         f"{k} learning rates trained side by side: {cfg.name}, {epochs} epoch(s)")
    log(best_line(rows, suggestion))
    log(f"wrote {out / 'lr_population.csv'}, {out / 'lr_population.png'}")
    return rows
