"""Train every config in configs/ on the real MNIST and write the results table (docs/RESULTS.md).

    python scripts/results.py                       # all configs, this machine's default device
    python scripts/results.py --set device=cuda     # applied to every config
    python scripts/results.py --only mnist_mlp mnist_fourier --out /tmp/results.md
    python scripts/results.py --set device=cpu --stamp   # also each config's `# measured:` line

Each row: test accuracy of best.ckpt (picked on validation data), the epoch it came from, epochs run, wall time
of the training call (data loading included) and the device. Runs go to a temporary checkpoint dir. With --stamp,
each config's `# measured:` line (below its idea line: what `dlbase recipes` shows) is rewritten with its row's
accuracy, seed, device, torch and date: the recipes carry their own figure, in the wheel too.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core import recipes  # noqa: E402
from dlbase.core.config import load_config  # noqa: E402
from dlbase.core.data import load_dataset  # noqa: E402
from dlbase.training.evaluate import evaluate  # noqa: E402
from dlbase.core.loss import build_eval_loss  # noqa: E402
from dlbase.training.engine import resolve_device  # noqa: E402
from dlbase.training.state import load_for_eval  # noqa: E402
from dlbase.training.train import train  # noqa: E402


def run_one(path: Path, sets: list[str], ckpt_dir: str) -> dict:
    cfg = load_config(path, [*sets, f"checkpoint.dir={ckpt_dir}"])
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda line: print(f"  [{cfg.name}] {line}", flush=True))
    seconds = time.perf_counter() - t0
    cfg, model, payload = load_for_eval(result.folder / "best.ckpt", device)
    test = evaluate(model, load_dataset(cfg.data, cfg.seed, device).test,
                    build_eval_loss(cfg.train.loss, cfg.model.output))
    return {"config": path.name, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "best_epoch": int(payload["epoch"]), "epochs": result.epochs_done, "seconds": seconds,
            "device": str(device), "seed": cfg.seed}


def where(device: str) -> str:
    """The machine a row was measured on, as the table's header and the `# measured:` lines say it."""
    return (torch.cuda.get_device_name() if device.startswith("cuda") else
            f"{platform.machine()} CPU, {torch.get_num_threads()} threads")


def stamp(path: Path, row: dict) -> None:
    """Rewrite the config's `# measured:` line with this row's figure (every other byte as it was)."""
    line = recipes.measured_line(row["test_accuracy"], f"seed {row['seed']}; {where(row['device'])}; "
                                 f"torch {torch.__version__}; {date.today().isoformat()}")
    path.write_text(recipes.stamp_measured(path.read_text(encoding="utf-8"), line), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="config names (without .yaml) to run; default: all")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every config")
    ap.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"), help="markdown table to write")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--stamp", action="store_true", help="also write each row's figure into its config's "
                    "`# measured:` line (what dlbase recipes shows); only with the recipes as written")
    args = ap.parse_args()
    if args.stamp and any(not s.startswith("device=") for s in args.sets):
        # a recipe's figure must be the recipe's: only where it runs may differ
        ap.error("--stamp writes the figure into the recipe itself, so it measures the recipes as written: no "
                 "--set but device=...")

    paths = sorted((REPO / "configs").glob("mnist_*.yaml"))
    if args.only:
        unknown = sorted(set(args.only) - {p.stem for p in paths})
        if unknown:  # a misspelt name must not quietly leave its row out of the table
            ap.error(f"--only: no config {', '.join(unknown)} in configs/; the configs are "
                     f"{', '.join(p.stem for p in paths)}")
        paths = [p for p in paths if p.stem in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            print(f"== {p.name}", flush=True)
            rows.append(run_one(p, args.sets, tmp))
            r = rows[-1]
            print(f"== {p.name}: test {100 * r['test_accuracy']:.2f}% in {r['seconds']:.1f}s", flush=True)
            if args.stamp:
                stamp(p, r)

    machine = where(rows[0]["device"]) if rows else "?"
    lines = [
        "# Results on MNIST",
        "",
        f"Every config in `configs/`, trained once (seed 0) and evaluated on the 10,000 test images with the",
        f"checkpoint that scored best on the 5,000 validation images. {machine}, torch {torch.__version__}, "
        f"{date.today().isoformat()}.",
        f"Produced by `python scripts/results.py{''.join(' --set ' + s for s in args.sets)}`.",
        "",
        "| config | test accuracy | best epoch / epochs | wall time (s) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| `{r['config']}` | {100 * r['test_accuracy']:.2f}% | {r['best_epoch']} / {r['epochs']} | "
                     f"{r['seconds']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
