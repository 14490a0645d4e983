"""The pictures of README.md and docs/INSIDE.md, from real MNIST runs: docs/curves.png, docs/gradnorms_deep_sigmoid.png,
docs/gradnorms_deep_relu.png, docs/confusion.png, docs/mistakes.png, docs/filters.png (the MLP's first-layer rows),
and from the default recipe's run docs/landscape.png, docs/landscape_line.png (dlbase landscape) and
docs/hessian.png (dlbase hessian --density, at init.ckpt and best.ckpt).

    python scripts/pictures.py            # about eight minutes on a 2-core CPU
    python scripts/pictures.py --out /tmp/pics --set data.subset=300 --set train.epochs=1 --lab-samples 50 --lab-probes 2  # quick
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core.config import load_config  # noqa: E402
from dlbase.core.data import load_dataset  # noqa: E402
from dlbase.tools.hessian import describe, hessian  # noqa: E402
from dlbase.tools.landscape import landscape, summary  # noqa: E402
from dlbase.training.report import eval_report  # noqa: E402
from dlbase.training.state import load_for_eval  # noqa: E402
from dlbase.training.train import train  # noqa: E402

DOCS = REPO / "docs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DOCS), help="folder to write the PNG files into")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="override for every run (after the script's own, so it wins)")
    ap.add_argument("--lab-samples", type=int, default=None, help="images for dlbase landscape (default 10000) and "
                    "dlbase hessian (default 1000)")
    ap.add_argument("--lab-probes", type=int, default=50, help="dlbase hessian's random vectors for the trace and "
                    "the density (a quick check: a few)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "mnist_mlp.yaml", [f"checkpoint.dir={tmp}", *args.sets])
        run = train(cfg, log=print)
        shutil.copy(run.folder / "curves.png", out / "curves.png")
        _, model, payload = load_for_eval(run.folder / "best.ckpt", torch.device("cpu"))
        test = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test
        eval_report(model, test.x, test.y, (28, 28), out, f"mnist_mlp, test split, epoch {payload['epoch']}")
        lab_pictures(run.folder, out, Path(tmp) / "lab", args.lab_samples, args.lab_probes)
        for act in ("sigmoid", "relu"):
            cfg = load_config(REPO / "configs" / "mnist_deep_sigmoid.yaml",
                              [f"checkpoint.dir={tmp}", f"model.activation={act}", f"name=deep_{act}",
                               "train.epochs=5", *args.sets])
            run = train(cfg, log=print)
            shutil.copy(run.folder / "gradnorms.png", out / f"gradnorms_deep_{act}.png")
    print("wrote", ", ".join(sorted(p.name for p in out.glob("*.png"))))


def lab_pictures(folder: Path, out: Path, tmp: Path, samples, probes: int) -> None:
    """The default run's loss landscape (the slice as landscape.png, the line) and Hessian density."""
    r = landscape(folder, samples=samples or 10000, out=tmp, device="cpu")
    print("\n".join(summary(r)))
    shutil.copy(tmp / "landscape_2d.png", out / "landscape.png")
    shutil.copy(tmp / "landscape_line.png", out / "landscape_line.png")
    for h in hessian(folder, samples=samples or 1000, probes=probes, density=True, out=tmp, device="cpu"):
        print(describe(h))
    shutil.copy(tmp / "hessian.png", out / "hessian.png")


if __name__ == "__main__":
    main()
