"""The insight commands' pictures: the loss along the line from the initial to the final weights, the loss on
a 2-D slice (one contour panel per split, side by side), and the Hessian's eigenvalue density."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dlbase.training.report import pyplot, save_png


def draw_line(r: dict, title: str, path: Path) -> None:
    """landscape_line.png: loss (log scale) and accuracy against alpha, each split a line; 0 and 1 marked."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    alphas = r["line"]["alpha"]
    for s in r["samples"]:
        ax.plot(alphas, r["line"][s]["loss"], label=f"{s} ({r['samples'][s]} images)")
        bx.plot(alphas, [100 * a for a in r["line"][s]["accuracy"]], label=s)
    for a in (ax, bx):
        for x, name in ((0.0, "init"), (1.0, "final")):
            a.axvline(x, color="grey", lw=0.8, ls=":")
            a.text(x, 1.0, name, transform=a.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
        a.set_xlabel("alpha: (1 - alpha) * init + alpha * final")
    ax.set_yscale("log")
    ax.set_ylabel("mean loss")
    bx.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}: the straight line from the initial weights (Goodfellow et al. 2015)", fontsize=10)
    fig.tight_layout()
    save_png(plt, fig, path)


def draw_plane(r: dict, title: str, path: Path) -> None:
    """landscape_2d.png: log10 of the loss over the slice, one panel per split on one colour scale."""
    plt = pyplot()
    p, splits = r["plane"], list(r["samples"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4.4), squeeze=False, constrained_layout=True)
    logs = {s: np.log10(np.maximum(np.asarray(p[s]["loss"]), 1e-12)) for s in splits}
    lo, hi = min(v.min() for v in logs.values()), max(v.max() for v in logs.values())
    levels = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
    for ax, s in zip(axes[0], splits):
        c = ax.contourf(p["a"], p["b"], logs[s], levels=levels, cmap="viridis")
        ax.contour(p["a"], p["b"], logs[s], levels=levels[::3], colors="white", linewidths=0.4)
        ax.plot([0], [0], "r*", ms=9)
        ax.set_title(f"{s}: {'empirical risk' if s == 'train' else 'risk (estimate)'}, {r['samples'][s]} images",
                     fontsize=9)
        ax.set_xlabel("direction 1 (filter-normalised)")
        ax.set_ylabel("direction 2")
    fig.colorbar(c, ax=axes[0].tolist(), label="log10 mean loss")
    fig.suptitle(f"{title}: the loss around the final weights (Li et al. 2018)", fontsize=10)
    save_png(plt, fig, path)


def draw_density(results: list[dict], path: Path) -> None:
    """hessian.png: each checkpoint's eigenvalue density (stochastic Lanczos quadrature, Gaussian-smoothed), log
    scale, its top and most negative eigenvalues marked."""
    from dlbase.core.curvature import smoothed_density

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    lo = min(min(n for nodes, _ in r["density"]["runs"] for n in nodes) for r in results)
    hi = max(max(n for nodes, _ in r["density"]["runs"] for n in nodes) for r in results)
    pad = 0.05 * (hi - lo + 1e-12)
    grid = np.linspace(lo - pad, hi + pad, 2000)
    for r in results:
        sigma = r["density"]["sigma"]
        d = smoothed_density(r["density"]["runs"], grid, sigma)
        line, = ax.semilogy(grid, np.maximum(d, 1e-12), lw=1.2,
                            label=f"{Path(r['checkpoint']).name} (epoch {r['epoch']}): top {r['top'][0]:.3g}, "
                                  f"min {r['min']:.3g}")
        for x in (r["top"][0], r["min"]):
            ax.axvline(x, color=line.get_color(), lw=0.7, ls=":")
    ax.set_ylim(1e-8, None)
    ax.set_xlabel("eigenvalue of the Hessian of the training loss")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(f"Hessian eigenvalue density, {results[0]['samples']} {results[0]['split']} images "
                 f"(stochastic Lanczos quadrature)", fontsize=10)
    fig.tight_layout()
    save_png(plt, fig, path)
