"""Pictures and evaluation reports: training curves, gradient norms, confusion matrix, worst mistakes (PNG); the
report's pictures of the model's inside are filters.py's."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dlbase.core.errors import DlbaseError
from dlbase.core.rundir import read_metrics as read_rows, write_atomic

PLOTS = ("curves.png", "gradnorms.png")  # what plot_run draws into a run folder


LEGEND_ROWS = 16  # entries in one legend column that fit beside a 4.2-inch-high plot at font size 8


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # headless: files only, never a window
    import matplotlib.pyplot as plt
    return plt


def save_png(plt, fig, path: Path) -> None:
    """Render to memory, then the one atomic write: a full disk or a read-only folder is one line (exit 2), and
    never a half-written PNG over a good one."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), "plot")



def _epoch_ticks(ax, epochs: list[int]) -> None:
    """Whole epochs on the x axis: every epoch up to 15 of them, else matplotlib's integer ticks."""
    if len(epochs) <= 15:
        ax.set_xticks(epochs)
    else:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _floats(rows: list[dict], key: str) -> list[Optional[float]]:
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (KeyError, TypeError, ValueError):
            out.append(None)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The epochs of a run's metrics.csv (rows with a whole-number epoch), or one line saying why there are none."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise DlbaseError(f"{run_dir}: no metrics.csv; expected a run folder written by dlbase train")
    rows = read_rows(path)
    if not rows:
        raise DlbaseError(f"{path}: holds no epochs (no rows with a whole-number epoch column)")
    return rows


def plot_run(run_dir: Path) -> list[Path]:
    """curves.png (loss, accuracy, lr per epoch) and gradnorms.png (per-layer norms, log scale) in run_dir."""
    plt = pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    epochs = [int(r["epoch"]) for r in rows]
    curves, gradnorms = (run_dir / name for name in PLOTS)
    save_png(plt, _curves(plt, rows, epochs, run_dir.name), curves)
    save_png(plt, _norms(plt, rows, epochs, run_dir.name), gradnorms)
    return [curves, gradnorms]


def _curves(plt, rows: list[dict], epochs: list[int], name: str):
    """curves.png's figure: loss, validation accuracy and learning rate per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    _loss_panel(axes[0], rows, epochs)
    _accuracy_panel(axes[1], rows, epochs)
    ax = axes[2]
    ax.plot(epochs, _floats(rows, "lr"), "o-", color="C2")
    ax.set(title="Learning rate (at each epoch's last step)", xlabel="epoch", ylabel="learning rate")
    ax.grid(alpha=0.3)
    for ax in axes:
        _epoch_ticks(ax, epochs)
    fig.suptitle(f"{name}: training curves", fontsize=14)
    return fig


def _loss_panel(ax, rows: list[dict], epochs: list[int]) -> None:
    ce = _floats(rows, "train_ce")
    if any(v is not None for v in ce):  # label smoothing: compare cross-entropy with cross-entropy
        ax.plot(epochs, ce, "o-", label="training cross-entropy (empirical risk)")
        ax.plot(epochs, _floats(rows, "train_loss"), "o--", color="C0", alpha=0.5,
                label="training objective (label-smoothed)")
    else:
        ax.plot(epochs, _floats(rows, "train_loss"), "o-", label="training loss (empirical risk)")
    if any(v is not None for v in _floats(rows, "val_loss")):
        ax.plot(epochs, _floats(rows, "val_loss"), "s-", label="validation loss (estimate of risk)")
    ax.set(title="Loss: the generalisation gap", xlabel="epoch", ylabel="mean loss per sample")
    ax.legend()
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, rows: list[dict], epochs: list[int]) -> None:
    acc = _floats(rows, "val_accuracy")
    if any(v is not None for v in acc):
        ax.plot(epochs, [100 * v if v is not None else None for v in acc], "s-", color="C1",
                label="validation accuracy")
        best = max((v, e) for v, e in zip(acc, epochs) if v is not None)
        ax.annotate(f"best {100 * best[0]:.2f}% (epoch {best[1]})", (best[1], 100 * best[0]),
                    textcoords="offset points", xytext=(-10, -25), ha="right", arrowprops={"arrowstyle": "->"})
        ax.legend(loc="lower right")
    ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)


def _norms(plt, rows: list[dict], epochs: list[int], name: str):
    """gradnorms.png's figure: each linear layer's gradient and weight norms per epoch."""
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in rows[0] if k.startswith("grad_norm_")})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for ax, key, title, norm in ((axes[0], "grad_norm", "Gradient norm per layer (last step of each epoch)",
                                  "||dL/dW||"), (axes[1], "weight_norm", "Weight norm per layer", "||W||")):
        values = {i: _floats(rows, f"{key}_{i}") for i in layers}
        for i in layers:
            ax.plot(epochs, values[i], "o-", label=f"layer {i}")
        # a log axis needs a positive value to place its decades (matplotlib warns without one): a dead net's
        # norms are all 0, drawn on a linear axis
        log = any(v is not None and v > 0 for vs in values.values() for v in vs)
        ax.set_yscale("log" if log else "linear")
        ax.set(title=title, xlabel="epoch", ylabel=f"{norm}  ({'log' if log else 'linear'} scale)")
        ax.grid(alpha=0.3, which="both")
        _epoch_ticks(ax, epochs)
    if layers:  # in columns of at most LEGEND_ROWS: one column of 65 layers is taller than the figure
        axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), title="Conv2d or Linear layer",
                       ncols=-(-len(layers) // LEGEND_ROWS))
    fig.suptitle(f"{name}: layer 1 is next to the input; a gap of decades between layers means vanishing "
                 f"gradients", fontsize=11)
    return fig


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Class probabilities (N, C) of the softmax over the logits, in fp32."""
    model.eval()
    out = [model(x[i:i + batch_size].float()).float().softmax(-1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def confusion(probs: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    pred = probs.argmax(-1)
    return torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def eval_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, input_shape: tuple[int, int],
                out_dir: Path, title: str, n_worst: int = 24) -> dict:
    """confusion.png and mistakes.png in out_dir, and what filters.py draws of the model's inside (filters.png:
    the first layer's filters; featuremaps.png for a CNN: the split's first image through its convolutions);
    returns per_class accuracy, the confusion matrix and the files written (report_files)."""
    from dlbase.training.filters import inside_figures

    plt = pyplot()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlbaseError(f"--report: cannot create {out_dir}: {e.strerror or e}") from None
    probs = predictions(model, x).cpu()
    y = y.cpu()
    cm = confusion(probs, y)
    per_class = (cm.diag().double() / cm.sum(1).clamp_min(1).double()).tolist()
    pred = probs.argmax(-1)
    figures = {"confusion.png": _confusion_figure(plt, cm, title),
               "mistakes.png": _mistakes_figure(plt, x, y, probs, input_shape, title, n_worst),
               **inside_figures(plt, model, x, y, pred, input_shape, title)}
    for name, fig in figures.items():
        save_png(plt, fig, out_dir / name)
    return {"per_class": per_class, "confusion": cm.tolist(), "report_files": [str(out_dir / n) for n in figures]}


def _confusion_figure(plt, cm: torch.Tensor, title: str):
    """confusion.png's figure: the (C, C) counts, coloured by the share of the true class."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5), constrained_layout=True)
    rates = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if float(rates[i, j]) > 0.5 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted class", ylabel="true class",
           title=f"{title}\nconfusion matrix (counts; colour = share of the true class)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    return fig


def _mistakes_figure(plt, x: torch.Tensor, y: torch.Tensor, probs: torch.Tensor, input_shape: tuple[int, int],
                     title: str, n_worst: int):
    """mistakes.png's figure: the n_worst most confident misclassifications, with what was said and how surely."""
    pred = probs.argmax(-1)
    wrong = (pred != y).nonzero().flatten()
    conf = probs[wrong, pred[wrong]]
    worst = wrong[conf.argsort(descending=True)][:n_worst]
    cols = 8
    rows_n = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(cols * 1.6, rows_n * 1.9), constrained_layout=True)
    axes = axes.flatten() if hasattr(axes, "flatten") else [axes]
    h, w = input_shape
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, worst.tolist()):
        ax.imshow(x[i].float().cpu().reshape(h, w).numpy(), cmap="gray_r")
        ax.set_title(f"true {int(y[i])}, said {int(pred[i])}\n({100 * float(probs[i, pred[i]]):.0f}% sure)",
                     fontsize=8)
    fig.suptitle(f"{title}: the {len(worst)} most confident mistakes of {len(wrong)}", fontsize=11)
    return fig
