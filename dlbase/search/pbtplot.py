"""pbt.png: a PBT sweep's hyperparameter schedules over the epochs, one panel per swept key, every member thin
and grey, the winner's schedule bold with its lineage (whose weights it trained, epoch by epoch) written on it."""
from __future__ import annotations

from pathlib import Path


def _steps(points: list, epochs: int, key: str) -> tuple[list, list]:
    """A member's value of key as a step function over epochs 0..epochs (x, y)."""
    xs, ys = [], []
    for i, (e, vals) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else epochs
        xs += [e, end]
        ys += [vals[key], vals[key]]
    return xs, ys


def plot_schedules(path: Path, history: dict, keys: list[str], epochs: int, winner: str, lineage: list,
                   params: dict) -> None:
    import matplotlib  # lazy: only a PBT sweep draws this
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        for name, points in history.items():
            if name != winner:
                ax.plot(*_steps(points, epochs, key), color="0.75", lw=1)
        if winner in history:
            ax.plot(*_steps(history[winner], epochs, key), color="C3", lw=2.5, label=f"winner {winner}")
            for i, (a, b, who) in enumerate(lineage):  # whose weights the winner's were over [a, b)
                ax.axvspan(a, b, color="C0", alpha=0.06 if i % 2 else 0.14)
                ax.text((a + b) / 2, 1.0, who, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                        fontsize=7)
        space = params[key]
        if isinstance(space, dict) and space.get("distribution") == "log_uniform":
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel("epoch (grey: every member; bold: the winner; top: whose weights it trained)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
