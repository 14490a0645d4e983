"""`dlbase hessian`: the spectrum of the training loss's Hessian at a checkpoint's weights, from Hessian-vector
products (core/curvature.py): the top k eigenvalues, the most negative one (a saddle has one; a minimum none),
the trace (Hutchinson's estimator, with its standard error) and, asked for, the eigenvalue density (stochastic
Lanczos quadrature) drawn as hessian.png. A run folder means its init.ckpt (when kept) and its best.ckpt."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dlbase.core.curvature import HessianOperator, extreme_eigenvalues, hutchinson_trace, slq_density
from dlbase.core.errors import DlbaseError
from dlbase.core.loss import build_eval_loss
from dlbase.tools import lab

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {"float32": 1e-4, "float64": 1e-10}  # ARPACK's relative tolerance on the eigenvalues, per precision
DENSITY_RUNS, DENSITY_STEPS = 4, 80  # stochastic Lanczos quadrature: random starts, Lanczos steps each


def checkpoints_of(target: Path) -> list[Path]:
    """A run folder -> its init.ckpt (when kept) and final checkpoint; a .ckpt file -> itself."""
    final, init = lab.resolve_run(target)
    return [init, final] if Path(target).is_dir() and init is not None else [final]


def spectrum(ckpt: Path, top_k: int, samples: int, split: str, dtype: str, probes: int, density: bool,
             seed: int, device: torch.device, data_root: Optional[Path]) -> dict:
    """One checkpoint's spectrum on the first `samples` images of split, in eval mode (dropout off, batch norm on
    its running statistics)."""
    run = lab.load(ckpt, device, data_root)
    part = lab.first(run.data.split(split), samples)
    op = HessianOperator(run.model, part.x.float(), part.y, build_eval_loss(run.cfg.train.loss,
                                                                            run.cfg.model.output), DTYPES[dtype])
    t0 = time.perf_counter()
    top, top_ok = extreme_eigenvalues(op, top_k, "LA", TOL[dtype], seed=seed)
    low, low_ok = extreme_eigenvalues(op, 1, "SA", TOL[dtype], seed=seed)
    trace = hutchinson_trace(op, probes, seed)
    out = {"checkpoint": str(ckpt), "epoch": int(run.payload["epoch"]), "split": split, "samples": len(part),
           "parameters": op.n, "dtype": dtype, "top": top, "min": low[-1], "converged": top_ok and low_ok,
           "trace": {"mean": trace.mean, "stderr": trace.stderr, "probes": trace.probes}}
    if density:
        runs = slq_density(op, DENSITY_RUNS, DENSITY_STEPS, seed)
        nodes = [n for ns, _ in runs for n in ns]
        out["density"] = {"runs": runs, "sigma": max(max(nodes) - min(nodes), 1e-12) / 100,
                          "steps": DENSITY_STEPS}
    out["hessian_vector_products"] = op.calls
    out["seconds"] = time.perf_counter() - t0
    return out


def hessian(target: Path, top_k: int = 5, samples: int = 1000, split: str = "train", dtype: str = "float32",
            probes: int = 50, density: bool = False, seed: int = 0, out: Optional[Path] = None,
            device: str = "auto", data_root: Optional[Path] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Each checkpoint's spectrum (checkpoints_of); with density, hessian.png in out (default: the run folder)."""
    lab.check_range("--top-k", top_k, 1, 100)
    lab.check_range("--samples", samples, 1, 10**6)
    lab.check_range("--probes", probes, 1, 10**5)
    if split not in lab.SPLITS:
        raise DlbaseError(f"--split: {split!r} is not one of {', '.join(lab.SPLITS)}")
    if dtype not in DTYPES:
        raise DlbaseError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    paths = checkpoints_of(target)
    if Path(target).is_dir() and len(paths) == 1:
        log(f"{target}: no init.ckpt (the run was made before dlbase kept its initial weights): the final "
            f"checkpoint only")
    dev = lab.device_of(device)
    results = [spectrum(p, top_k, samples, split, dtype, probes, density, seed, dev, data_root) for p in paths]
    if density:
        from dlbase.tools.labplots import draw_density
        picture = lab.default_out(paths[-1], out) / "hessian.png"
        picture.parent.mkdir(parents=True, exist_ok=True)
        draw_density(results, picture)
        for r in results:
            r["picture"] = str(picture)
    return results


def describe(r: dict) -> str:
    """One checkpoint's spectrum as the lines `dlbase hessian` prints."""
    top = ", ".join(f"{v:.4g}" for v in r["top"])
    low = (f"most negative {r['min']:.4g} (negative curvature: not a minimum)" if r["min"] < 0
           else f"smallest {r['min']:.4g} (none negative: a minimum on these samples)")
    t = r["trace"]
    lines = [f"{r['checkpoint']} (epoch {r['epoch']}, {r['samples']} {r['split']} images, {r['parameters']} weights, "
             f"{r['dtype']})",
             f"  top {len(r['top'])} eigenvalues {top}; {low}" + ("" if r["converged"] else
                                                                  " (Lanczos did not converge: Ritz values)"),
             f"  trace {t['mean']:.4g} ± {t['stderr']:.2g} (Hutchinson, {t['probes']} probes; ± one standard error)",
             f"  {r['hessian_vector_products']} Hessian-vector products in {r['seconds']:.1f}s"
             + (f"; density: {r['picture']}" if "picture" in r else "")]
    return "\n".join(lines)
