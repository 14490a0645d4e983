#!/usr/bin/env python3
"""Population training vs the same trainings one after another, in one process, on one device.

The K configs are one recipe (default configs/mnist_mlp.yaml) with K seeds and K learning rates (lr * 2^-j/2,
a small sweep). "sequential" trains them with dlbase's train() one after another (what K `dlbase train` commands
do, without K interpreter start-ups); "population" trains them with train_population() as one population, through
each of the population's two steppers: the hand-stacked MLP (torch.baddbmm, dlbase/population/stacked.py) and
torch.func (stack_module_state + functional_call + vmap, dlbase/population/vmapped.py), which takes any model.
All are timed end to end (data, training, validation, checkpoints, plots), in one run. Also times one training
step (forward, cross-entropy, backward) of each stepper alone, and reports peak memory per member.

  python scripts/population_bench.py --members 4 --epochs 2            # the CPU figure in BENCHMARKS.md
  python scripts/population_bench.py --device cpu --members 2 --epochs 1 --subset 300 --hidden 16 \\
      --data-root tests/tiny --out /tmp/b                             # tiny (tests/test_population.py)
Exits non-zero when any training fails.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core.config import load_config  # noqa: E402
from dlbase.population.train import train_population  # noqa: E402
from dlbase.population.loop import peak_rss_bytes  # noqa: E402
from dlbase.training.train import train  # noqa: E402


def configs(args) -> list:
    sets = [f"device={args.device}", f"train.epochs={args.epochs}", f"checkpoint.dir={args.out}"]
    if args.subset:
        sets.append(f"data.subset={args.subset}")
        sets.append(f"data.val_size={min(5000, args.subset // 5)}")
    if args.hidden is not None:
        sets.append(f"model.hidden=[{args.hidden}]")
    if args.data_root:
        sets += [f"data.root={args.data_root}", "data.download=false"]
    base = load_config(args.config, sets)
    return [dataclasses.replace(base, seed=j, name=f"{base.name}-m{j}",
                                optim=dataclasses.replace(base.optim, lr=base.optim.lr * 2 ** (-j / 2)))
            for j in range(args.members)]


def step_times(cfg, K: int, device: torch.device, steps: int = 20) -> dict:
    """ms per training step (forward, cross-entropy, backward) of K stacked models, through each stepper."""
    from dlbase.core.model import build_model
    from dlbase.population.steppers import stack_members
    B = cfg.train.batch_size
    models = [build_model(dataclasses.replace(cfg, seed=j), (28, 28), device) for j in range(K)]
    x, y = torch.rand(K, B, 784, device=device), torch.randint(0, 10, (K, B), device=device)
    out = {}
    for name, how in (("baddbmm_ms", "stacked"), ("vmap_ms", "vmap")):
        fwd = stack_members(copy.deepcopy(models), [cfg.model] * K, how).forward
        for i in range(steps + 3):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(fwd(x).reshape(K * B, -1), y.reshape(-1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = (time.perf_counter() - t0) / steps * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "mnist_mlp.yaml"))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--members", type=int, default=4, help="K: trainings (population members)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=None, help="first N training samples (tiny runs)")
    ap.add_argument("--hidden", default=None, help="hidden widths, comma-separated (default: the config's)")
    ap.add_argument("--data-root", default=None, help="folder of the IDX files (default: the config's search)")
    ap.add_argument("--out", default=None, help="checkpoint.dir for both ways' run folders (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="population_bench-")
    cfgs = configs(args)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"torch {torch.__version__}, {device} ({where}), {torch.get_num_threads()} threads; {args.members} "
          f"members of {cfgs[0].model.hidden}, {cfgs[0].optim.name}, batch {cfgs[0].train.batch_size}, "
          f"{args.epochs} epochs; run folders in {args.out}")
    fw = step_times(cfgs[0], args.members, device)
    print(f"one step of {args.members} stacked MLPs (forward, cross-entropy, backward): hand-stacked baddbmm "
          f"{fw['baddbmm_ms']:.2f} ms, torch.func vmap {fw['vmap_ms']:.2f} ms")

    # warm both ways up first (imports of matplotlib and tensorboard, the IDX cache, the math libraries' first
    # calls): whichever way ran first would otherwise pay for both
    tiny = [dataclasses.replace(c, name=c.name + "-warm", data=dataclasses.replace(c.data, subset=512, val_size=128),
                                train=dataclasses.replace(c.train, epochs=1)) for c in cfgs[:2]]
    train(tiny[0], log=lambda s: None)
    for how in ("stacked", "vmap"):
        train_population([dataclasses.replace(c, name=c.name + f"-{how}") for c in tiny], log=lambda s: None,
                         stepper=how)

    failed = []
    t0 = time.perf_counter()
    seq = []
    for cfg in cfgs:
        seq.append(train(dataclasses.replace(cfg, name=cfg.name + "-seq"), log=lambda s: None))
    t_seq = time.perf_counter() - t0
    failed += [r.folder for r in seq if r.status != "finished"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pop = train_population([dataclasses.replace(c, name=c.name + "-pop") for c in cfgs], log=lambda s: None,
                           stepper="stacked")
    t_pop = time.perf_counter() - t0
    t0 = time.perf_counter()
    vpop = train_population([dataclasses.replace(c, name=c.name + "-vmap") for c in cfgs], log=lambda s: None,
                            stepper="vmap")
    t_vmap = time.perf_counter() - t0
    failed += [r.folder for r in pop + vpop if r.status != "finished"]
    out = {"members": args.members, "epochs": args.epochs, "device": str(device), "where": where,
           "torch": torch.__version__, "sequential_s": t_seq, "population_s": t_pop, "ratio": t_seq / t_pop,
           "train_seconds_sequential": sum(r.train_seconds for r in seq), "train_seconds_population":
           sum(r.train_seconds for r in pop), "population_vmap_s": t_vmap,
           "train_seconds_population_vmap": sum(r.train_seconds for r in vpop), "peak_bytes_per_member": pop[0].peak_bytes, "peak_rss_bytes": peak_rss_bytes(),
           "forward": fw, "val_accuracy_sequential": [r.best_value for r in seq],
           "val_accuracy_population": [r.best_value for r in pop]}
    print(f"sequential: {t_seq:.2f} s end to end ({out['train_seconds_sequential']:.2f} s of training steps)")
    print(f"population: {t_pop:.2f} s end to end ({out['train_seconds_population']:.2f} s of training steps)"
          f"  [hand-stacked MLP, torch.baddbmm]")
    print(f"population: {t_vmap:.2f} s end to end ({out['train_seconds_population_vmap']:.2f} s of training "
          f"steps)  [torch.func vmap]")
    print(f"ratio (sequential / population): {out['ratio']:.2f}x end to end, "
          f"{out['train_seconds_sequential'] / max(1e-9, out['train_seconds_population']):.2f}x training steps")
    print(f"peak memory per member: {pop[0].peak_bytes / 2**20:.1f} MiB "
          f"({'CUDA allocator peak / K' if device.type == 'cuda' else 'stacked state + one step of activations'}); "
          f"process peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB")
    print("best val_accuracy, sequential: " + ", ".join(f"{v:.4f}" for v in out["val_accuracy_sequential"]))
    print("best val_accuracy, population: " + ", ".join(f"{v:.4f}" for v in out["val_accuracy_population"]))
    print("best val_accuracy, population (vmap): " + ", ".join(f"{r.best_value:.4f}" for r in vpop))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if failed:
        print(f"population_bench: FAILED runs: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
