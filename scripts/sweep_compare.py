"""Random search vs TPE with median pruning (and, with --ways, PBT and successive halving inside a population) on
the same budget of member-epochs, and what --workers buys.

    python scripts/sweep_compare.py                                  # configs/sweep_lr_hidden.yaml's base, 3 seeds
    python scripts/sweep_compare.py --trials 12 --seeds 3 --workers 2 --set device=cpu --json compare.json

The space is sweep_lr_hidden.yaml's, made continuous: optim.lr log-uniform in [lr_low, lr_high] and its two
hidden-layer shapes as a choice. For each sweep seed, each way runs `dlbase sweep` as a user would (its own
sweep folder and SQLite study) and the script reads the best validation score from results.csv, the winner's
test accuracy (measured once, by the sweep) from winner.json, the trials pruned, and the wall time of the whole
command. With --workers N, the random search of the first seed is run again with N workers, and with
--population K with its trials trained K at a time as populations: each speed-up is the ratio of the two wall
times (the same trials: a random search is drawn when its study is created).

    python scripts/sweep_compare.py --ways random,tpe+median,pbt,halving --trials 8 --epochs 3 --seeds 3

--ways with pbt or halving searches inside a population, which varies only what a member can change mid-run:
the space is optim.lr alone (model.hidden fixed at the first of --hidden) for every way, so all of them search
the same space. Each way gets the same budget of member-epochs, trials x train.epochs: random and TPE `trials`
trials (TPE's median pruning spends less), PBT `trials` members trained together, exploiting every epoch;
successive halving (reduction 3, first rung after 1 epoch) as many members as that budget pays for.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
WAYS = {"random": {"method": "random", "pruner": "none"}, "tpe+median": {"method": "tpe", "pruner": "median"},
        "pbt": {"method": "pbt", "pruner": "none"},
        "halving": {"method": "random", "pruner": "halving", "reduction": 3, "min_epochs": 1}}


def halving_members(budget: int, epochs: int, eta: int = 3, first: int = 1) -> int:
    """The most members successive halving can start within `budget` member-epochs over `epochs` epochs."""
    def cost(n: int) -> int:
        alive, spent, rung = n, 0, first
        for e in range(1, epochs + 1):
            spent += alive
            if e == rung and e < epochs:
                alive, rung = max(1, alive // eta), rung * eta
        return spent
    n = 1
    while cost(n + 1) <= budget:
        n += 1
    return n


def sweep(config: str, spec: dict, folder: Path, sets: list[str], workers: int = 1) -> dict:
    spec_file = folder / f"{spec['name']}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "dlbase", "sweep", "--config", config, "--sweep", str(spec_file),
            "--set", f"checkpoint.dir={folder}", *(x for s in sets for x in ("--set", s)), "--workers", str(workers)]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"sweep {spec['name']}: dlbase sweep failed (exit {r.returncode}): "
                 f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    root = folder / spec["name"]
    rows = list(csv.DictReader(open(root / "results.csv")))
    winner = json.loads((root / "winner.json").read_text())
    return {"seconds": round(seconds, 1), "best_val": float(rows[0]["score"]),
            "test_accuracy": winner["test_accuracy"], "trials": len(rows),
            "pruned": sum(r["status"] == "pruned" for r in rows),
            "epochs": sum(int(r["epochs"] or 0) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep_lr_hidden.yaml"))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr-low", type=float, default=1e-4)
    ap.add_argument("--lr-high", type=float, default=1e-1)
    ap.add_argument("--hidden", default="[[256], [512, 512]]", help="the hidden-layer shapes to choose from (YAML)")
    ap.add_argument("--workers", type=int, default=0, help="also time the first random search with N workers")
    ap.add_argument("--population", type=int, default=0,
                    help="also time the first random search with its trials trained K at a time as populations")
    ap.add_argument("--ways", default="random,tpe+median", help=f"comma-separated, of {', '.join(WAYS)}")
    ap.add_argument("--epochs", type=int, help="train.epochs of every trial (default: the config's, or --set's)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json")
    args = ap.parse_args()

    ways = [w.strip() for w in args.ways.split(",")]
    if any(w not in WAYS for w in ways):
        sys.exit(f"--ways {args.ways}: each way must be one of {', '.join(WAYS)}")
    params = {"optim.lr": {"distribution": "log_uniform", "low": args.lr_low, "high": args.lr_high},
              "model.hidden": {"distribution": "choice", "values": yaml.safe_load(args.hidden)}}
    sets = [*args.sets, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    epochs = args.epochs or next((int(s.split("=", 1)[1]) for s in reversed(args.sets) if s.startswith("train.epochs=")),
                                 None) or int(yaml.safe_load(open(args.config))["train"]["epochs"])
    if "pbt" in ways or "halving" in ways:  # the space a population can search: the lr, the shape fixed
        sets.append(f"model.hidden={json.dumps(params.pop('model.hidden')['values'][0])}")
    budget = args.trials * epochs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for way in ways:
                how = dict(WAYS[way])
                trials = halving_members(budget, epochs) if way == "halving" else args.trials
                how.update({"population": trials} if way == "halving" else {})
                spec = {"name": f"{way.replace('+', '_')}_{seed}", "trials": trials, "seed": seed,
                        "params": params, "metric": "val_accuracy", **how}
                row = {"way": way, "seed": seed, **sweep(args.config, spec, Path(tmp), sets)}
                rows.append(row)
                print(f"{way:>11} seed {seed}: best val {100 * row['best_val']:.2f}%, test {100 * row['test_accuracy']:.2f}%, "
                      f"{row['pruned']} of {row['trials']} pruned, {row['epochs']} epochs trained, {row['seconds']:.1f} s",
                      flush=True)
        summary = {}
        for way in ways:
            mine = [r for r in rows if r["way"] == way]
            summary[way] = {k: (statistics.mean(r[k] for r in mine),
                                statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0)
                            for k in ("best_val", "test_accuracy", "seconds", "epochs")}
        print(f"\nbudget: {budget} member-epochs ({args.trials} x {epochs}); {args.seeds} sweep seeds")
        print("| way | trials | best val acc (mean ± sd) | winner's test acc | member-epochs | wall time (s) |")
        print("|---|---|---|---|---|---|")
        for way, s in summary.items():
            n = next(r["trials"] for r in rows if r["way"] == way)
            print(f"| {way} | {n} | {100 * s['best_val'][0]:.2f}% ± {100 * s['best_val'][1]:.2f} | "
                  f"{100 * s['test_accuracy'][0]:.2f}% ± {100 * s['test_accuracy'][1]:.2f} | {s['epochs'][0]:.0f} | "
                  f"{s['seconds'][0]:.1f} ± {s['seconds'][1]:.1f} |")
        one = next((r for r in rows if r["way"] == "random" and r["seed"] == 0), None)

        def again(what: str, k: int, **how) -> dict:
            """The first random search again, run another way (k workers, or populations of k): the same trials."""
            spec = {"name": f"random_{what[0]}{k}", "trials": args.trials, "seed": 0, "params": params,
                    **WAYS["random"], **({"population": k} if what == "population" else {})}
            many = sweep(args.config, spec, Path(tmp), sets, **how)
            out = {what: k, "seconds": many["seconds"], "one_seconds": one["seconds"],
                   "speedup": round(one["seconds"] / many["seconds"], 2), "best_val": many["best_val"]}
            print(f"\nrandom search, seed 0, {args.trials} trials: as before {one['seconds']:.1f} s, with {what} {k} "
                  f"{many['seconds']:.1f} s: {out['speedup']:.2f}x (same trials: best val {100 * one['best_val']:.2f}% "
                  f"and {100 * many['best_val']:.2f}%)")
            return out

        workers = again("workers", args.workers, workers=args.workers) if args.workers > 1 and one else None
        population = again("population", args.population) if args.population > 1 and one else None
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "workers": workers,
                                               "population": population}, indent=2))


if __name__ == "__main__":
    main()
