"""Time to 98% MNIST test accuracy: run `dlbase train` on a recipe for several seeds, as a user would.

    python scripts/speedrun.py                                # configs/mnist_speedrun.yaml, seeds 0-4
    python scripts/speedrun.py --seeds 3 --set device=cpu --json speedrun.json

For each seed: the whole `python -m dlbase train` command's wall time (interpreter start, imports, data
loading, graph capture, validation, checkpoints: everything), the training time (the `train_seconds` column
of metrics.csv summed: the training steps of every epoch, first-epoch warm-up and graph capture included,
with a device sync before each clock reading), and the test accuracy of best.ckpt from `dlbase eval --json`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.training.phases import parse as parse_phases  # noqa: E402


def dlbase(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "dlbase", *args], capture_output=True, text=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "mnist_speedrun.yaml"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            sets = [x for s in args.sets for x in ("--set", s)]
            t0 = time.perf_counter()
            r = dlbase("train", "--config", args.config, "--set", f"seed={seed}", "--set", f"checkpoint.dir={tmp}",
                       "--set", f"name=speedrun-{seed}", *sets)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                sys.exit(f"seed {seed}: dlbase train failed:\n{r.stdout}\n{r.stderr}")
            folder = Path(tmp) / f"speedrun-{seed}"
            with open(folder / "metrics.csv") as fh:
                metrics = list(csv.DictReader(fh))
            train_s = sum(float(m["train_seconds"]) for m in metrics)
            e = dlbase("eval", str(folder / "best.ckpt"), "--json")
            if e.returncode != 0:
                sys.exit(f"seed {seed}: dlbase eval failed: {e.stderr}")
            ev = json.loads(e.stdout)
            # where the command's time went, from its own `time (s):` line; "exit" is what the wall clock saw
            # after the process's last reading (interpreter teardown, the shell getting the prompt back)
            phases = next((parse_phases(line) for line in r.stdout.splitlines() if line.startswith("time (s):")), {})
            if phases:
                phases["exit"] = max(0.0, wall - phases["total"])
            rows.append({"seed": seed, "test_accuracy": ev["accuracy"], "best_epoch": ev["epoch"],
                         "epochs": len(metrics), "train_seconds": train_s, "command_seconds": wall,
                         "phases": phases,
                         "plan": next((line.split("(")[-1].rstrip(")") for line in r.stdout.splitlines()
                                       if line.startswith("data:")), "")})
            x = rows[-1]
            print(f"seed {seed}: test {100 * x['test_accuracy']:.2f}%  training {x['train_seconds']:.3f}s  "
                  f"command {wall:.1f}s  (best epoch {x['best_epoch']} of {x['epochs']}; {x['plan']})", flush=True)
            print("  " + "  ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)

    def mean_sd(key):
        vals = [r[key] for r in rows]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), min(vals), max(vals)

    acc, train_s, wall = mean_sd("test_accuracy"), mean_sd("train_seconds"), mean_sd("command_seconds")
    summary = {
        "config": args.config, "seeds": args.seeds, "sets": args.sets,
        "test_accuracy_mean": acc[0], "test_accuracy_sd": acc[1], "test_accuracy_min": acc[2],
        "train_seconds_mean": train_s[0], "train_seconds_sd": train_s[1], "train_seconds_max": train_s[3],
        "command_seconds_mean": wall[0], "command_seconds_max": wall[3], "rows": rows,
        "meets_target": acc[0] >= args.target,
    }
    names = list(dict.fromkeys(k for r in rows for k in r["phases"]))
    summary["phases_mean"] = {k: statistics.mean(r["phases"].get(k, 0.0) for r in rows) for k in names}
    print("phases (mean s): " + "  ".join(f"{k} {v:.2f}" for k, v in summary["phases_mean"].items()))
    print(f"test accuracy {100 * acc[0]:.2f}% +- {100 * acc[1]:.2f} (min {100 * acc[2]:.2f}%), training "
          f"{train_s[0]:.3f}s +- {train_s[1]:.3f} (max {train_s[3]:.3f}s), whole command {wall[0]:.1f}s "
          f"(max {wall[3]:.1f}s) over {args.seeds} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
