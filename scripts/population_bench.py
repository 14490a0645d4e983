#!/usr/bin/env python3
"""Population training vs the same trainings one after another, in one process, on one device.

The K configs are one recipe (default configs/mnist_mlp.yaml) with K seeds and K learning rates (lr * 2^-j/2,
a small sweep). "sequential" trains them with dlbase's train() one after another (what K `dlbase train` commands
do, without K interpreter start-ups); "population" trains them with train_population() as one population, through
each of the population's two steppers: the hand-stacked MLP (torch.baddbmm, dlbase/population/stacked.py) and
torch.func (stack_module_state + functional_call + vmap, dlbase/population/vmapped.py), which takes any model.
All are timed end to end (data, training, validation, checkpoints, plots), in one run. Also times one training
step (forward, cross-entropy, backward) of each stepper alone, and reports peak memory per member.

A CNN (a config with model.conv) has no hand-stacked stepper: end to end it is sequential vs the torch.func
population. Its one-step timing sets three ways of running K stacked CNNs side by side (issue 23): torch.func's
vmap over the members (dlbase's VmappedModel), a Python loop over the K member modules, and grouped convolutions
(grouped_cnn below: each conv layer of the K members as one F.conv2d with groups=K, the heads as torch.baddbmm),
once it has checked that the grouped way computes what the members compute (logits and gradients within
MAX_DIFF of the loop's, in IEEE float32).

  python scripts/population_bench.py --members 4 --epochs 2            # the CPU figure in BENCHMARKS.md
  python scripts/population_bench.py --config configs/mnist_cnn_cpu_speedrun.yaml --members 4 --epochs 1
  python scripts/population_bench.py --device cpu --members 2 --epochs 1 --subset 300 --hidden 16 \\
      --data-root tests/tiny --out /tmp/b                             # tiny (tests/test_population.py)
Exits non-zero when any training fails, or the grouped convolutions' check.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core.config import load_config  # noqa: E402
from dlbase.core.model import build_model, zero_grad_before_batch_norm  # noqa: E402
from dlbase.population.train import train_population  # noqa: E402
from dlbase.population.loop import peak_rss_bytes  # noqa: E402
from dlbase.population.steppers import stack_members  # noqa: E402
from dlbase.population.vmapped import VmappedModel  # noqa: E402
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


# ----------------------------------------------------------------------------- K stacked CNNs, three ways (issue 23)

MAX_DIFF = 1e-4  # the largest |difference| of logits or gradients allowed between two ways of one step (float32)
STACKED_SKIP = "it stacks only MLPs (dlbase/population/stacked.py); this model is a CNN"


def grouped_cnn(cnn: nn.Module, P: dict, Bf: dict, x: torch.Tensor) -> torch.Tensor:
    """x (K, B, H*W) -> logits (K, B, classes): K members shaped as `cnn` (a dlbase CNN, read for its layers and
    their hyperparameters only) as one computation: each Conv2d as one F.conv2d over K*C_in channels with
    groups=K, each batch norm over K*C channels, activations, pooling and dropout as they are (per channel), the
    head's Linear layers as torch.baddbmm. P, Bf: the members' parameters and buffers stacked (K, ...) under the
    CNN's names (torch.func.stack_module_state). Training mode: batch norms use and update batch statistics."""
    K, B = x.shape[:2]
    if getattr(cnn.encoding, "standardize", False):
        x = (x - Bf["encoding.mean"].view(K, 1, 1)) / Bf["encoding.std"].view(K, 1, 1)
    h = x.view(K, B, *cnn.input_shape).transpose(0, 1)  # (B, K, H, W): member k's image is channel k
    for name, m in cnn.features.named_children():
        h = _grouped_feature(m, f"features.{name}", P, Bf, h, K)  # (B, K*C, H', W'): member k's maps k*C..
    h = h.reshape(B, K, -1).transpose(0, 1)  # (K, B, C*h*w): each member's maps flattened as CNN.forward does
    for name, m in cnn.net.named_children():
        h = _stacked_head(m, f"net.{name}", P, Bf, h)  # (K, B, D)
    return h


def _batch_norm(m: nn.Module, key: str, P: dict, Bf: dict, h: torch.Tensor) -> torch.Tensor:
    """One batch norm over the K members' channels side by side (h (B, K*C, ...)); the (K, C) running statistics
    are updated in place through their flat views, as each member's own."""
    return F.batch_norm(h, Bf[key + ".running_mean"].view(-1), Bf[key + ".running_var"].view(-1),
                        P[key + ".weight"].flatten(), P[key + ".bias"].flatten(), True, m.momentum, m.eps)


def _grouped_feature(m: nn.Module, key: str, P: dict, Bf: dict, h: torch.Tensor, K: int) -> torch.Tensor:
    """One layer of the CNN's feature stack for the K members at once: h (B, K*C, H, W)."""
    if isinstance(m, nn.Conv2d):  # (K, C_out, C_in, kh, kw) -> (K*C_out, C_in, kh, kw): member k is group k
        bias = P.get(key + ".bias")
        return F.conv2d(h, P[key + ".weight"].flatten(0, 1), None if bias is None else bias.flatten(),
                        m.stride, m.padding, m.dilation, groups=K)
    if isinstance(m, nn.BatchNorm2d):
        return _batch_norm(m, key, P, Bf, h)
    assert not list(m.parameters()), f"grouped_cnn: no grouped form for {key} ({type(m).__name__})"
    return m(h)  # activation, pooling, dropout: per channel or per element


def _stacked_head(m: nn.Module, key: str, P: dict, Bf: dict, h: torch.Tensor) -> torch.Tensor:
    """One layer of the CNN's head (the MLP's layers) for the K members at once: h (K, B, D)."""
    if isinstance(m, nn.Linear):  # (K, B, D_out) = b + h W^T
        return torch.baddbmm(P[key + ".bias"].unsqueeze(1), h, P[key + ".weight"].transpose(1, 2))
    if isinstance(m, nn.BatchNorm1d):  # per member over its own batch: the K*D features as one batch norm
        K, B, D = h.shape
        return _batch_norm(m, key, P, Bf, h.transpose(0, 1).reshape(B, K * D)).view(B, K, D).transpose(0, 1)
    if isinstance(m, nn.LayerNorm):
        h = F.layer_norm(h, m.normalized_shape, eps=m.eps)
        return h * P[key + ".weight"].unsqueeze(1) + P[key + ".bias"].unsqueeze(1)
    assert not list(m.parameters()), f"grouped_cnn: no stacked form for {key} ({type(m).__name__})"
    return m(h)  # activation, dropout


def member_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over members of each member's mean cross-entropy (what the population's step backpropagates):
    logits (K, B, C), y (K, B) -> a scalar."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1).sum()


def copies(models: list) -> list:
    """Deep copies of the members, with the hooks that copy.deepcopy drops put back: the exact zero gradient of
    each bias just before a batch norm (model.py's zero_grad_before_batch_norm, named in exact_zero_grad)."""
    out = copy.deepcopy(models)
    for m in out:
        params = dict(m.named_parameters())
        for name in m.exact_zero_grad:
            zero_grad_before_batch_norm(params[name])
    return out


def vmap_way(models: list, cfgs: list):
    """torch.func's vmap over the members (dlbase's VmappedModel): step(x, y) -> logits, and the gradients."""
    net = VmappedModel(models, cfgs)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for p in net.params:
            p.grad = None
        logits = net.forward(x)  # (K, B, C)
        member_ce(logits, y).backward()
        return logits
    return step, lambda: [p.grad for p in net.params]


def loop_way(models: list):
    """A Python loop over the K member modules, each its own forward and backward (K lone runs' steps)."""
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = []
        for k, m in enumerate(models):
            m.zero_grad(set_to_none=True)
            logits = m(x[k])  # (B, C)
            F.cross_entropy(logits, y[k]).backward()
            out.append(logits)
        return torch.stack(out)
    return step, lambda: [torch.stack(g) for g in zip(*([p.grad for p in m.parameters()] for m in models))]


def grouped_way(models: list):
    """The K members as grouped convolutions and baddbmm heads (grouped_cnn) over their stacked tensors."""
    P, Bf = torch.func.stack_module_state(models)  # (K, ...) leaves, in named_parameters() order
    for name in models[0].exact_zero_grad:  # as VmappedModel does for its stacked leaves
        zero_grad_before_batch_norm(P[name])

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for p in P.values():
            p.grad = None
        logits = grouped_cnn(models[0], P, Bf, x)  # (K, B, C)
        member_ce(logits, y).backward()
        return logits
    return step, lambda: [p.grad for p in P.values()]


@contextlib.contextmanager
def ieee_fp32():
    """float32 as IEEE float32 on a GPU for the check: no TF32 in matmuls, nor in cuDNN's convolutions (which
    torch allows by default). Restored after; a no-op on the CPU."""
    knobs = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision",
                                                                       "ieee")]
    before = [getattr(obj, name) for obj, name, _ in knobs]
    try:
        for obj, name, value in knobs:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(knobs, before):
            setattr(obj, name, value)


@torch.no_grad()
def distinct(models: list, g: torch.Generator) -> list:
    """Copies of the members whose batch norms' scales and shifts and input standardisation differ from member to
    member (as built they are all 1 and 0), so that the check sees one member's taken for another's."""
    out = copies(models)
    for m in out:
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if name.endswith((".weight", ".bias")) and t.dim() == 1 or name in ("encoding.mean", "encoding.std"):
                t.copy_(torch.rand(t.shape, generator=g).to(t.device) + (0.5 if name.endswith(("weight", "std"))
                                                                          else -0.5))
    return out


def check_cnn_ways(models: list, cfgs: list, device: torch.device, B: int) -> dict:
    """One step of each way from the same weights on one random (K, B) batch: the largest |difference| of the
    logits and of the gradients of vmap and of the grouped convolutions from the loop's, and whether all are
    within MAX_DIFF."""
    g = torch.Generator().manual_seed(0)
    models = distinct(models, g)
    x = torch.rand(len(models), B, 784, generator=g).to(device)  # (K, B, H*W)
    y = torch.randint(0, 10, (len(models), B), generator=g).to(device)  # (K, B)
    out = {}
    with ieee_fp32():
        step, grads = loop_way(copies(models))
        ref, ref_grads = step(x, y).detach(), grads()
        for name, (step, grads) in (("vmap", vmap_way(copies(models), cfgs)),
                                    ("grouped", grouped_way(copies(models)))):
            out[f"{name}_logits"] = (step(x, y).detach() - ref).abs().max().item()
            out[f"{name}_grads"] = max((a - b).abs().max().item() for a, b in zip(grads(), ref_grads))
    return {**out, "tolerance": MAX_DIFF, "passed": max(out.values()) <= MAX_DIFF}


def no_dropout(m):
    """The model config without dropout (the head's and each conv layer's): the three ways draw their masks
    differently, so only a model without dropout can be checked across them."""
    return dataclasses.replace(m, dropout=0.0, conv=tuple(dataclasses.replace(c, dropout=0.0) for c in m.conv))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cnn_step_times(cfg, K: int, device: torch.device, steps: int = 20) -> tuple[dict, dict]:
    """ms per training step (forward, cross-entropy, backward; float32) of K stacked CNNs on a (K, B) batch, three
    ways side by side: timed in up to 5 interleaved rounds, after 3 warm-up steps each; and check_cnn_ways."""
    model = no_dropout(cfg.model)
    models = [build_model(dataclasses.replace(cfg, seed=j, model=model), (28, 28), device) for j in range(K)]
    B = cfg.train.batch_size
    check = check_cnn_ways(models, [model] * K, device, B)
    x, y = torch.rand(K, B, 784, device=device), torch.randint(0, 10, (K, B), device=device)
    ways = {"vmap": vmap_way(copies(models), [model] * K)[0], "loop": loop_way(copies(models))[0],
            "grouped": grouped_way(copies(models))[0]}
    spent = dict.fromkeys(ways, 0.0)
    rounds = max(1, min(5, steps))
    for r in range(-1, rounds):  # round -1: the warm-up
        n = 3 if r < 0 else steps // rounds + (r < steps % rounds)
        for name, step in ways.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                step(x, y)
            _sync(device)
            spent[name] += (time.perf_counter() - t0) if r >= 0 else 0.0
    ms = {f"{name}_ms": spent[name] / steps * 1e3 for name in ways}
    return {**ms, "loop_over_vmap": ms["loop_ms"] / ms["vmap_ms"], "grouped_over_vmap": ms["grouped_ms"] /
            ms["vmap_ms"], "batch": B, "steps": steps, "dropout_off": model != cfg.model}, check


def say_cnn_step(K: int, fw: dict, check: dict) -> None:
    print(f"one step of {K} stacked CNNs at batch {fw['batch']} (forward, cross-entropy, backward; float32, "
          f"{fw['steps']} steps{'; dropout off' if fw['dropout_off'] else ''}): torch.func vmap {fw['vmap_ms']:.2f} "
          f"ms, loop over the members {fw['loop_ms']:.2f} ms, grouped convolutions {fw['grouped_ms']:.2f} ms; "
          f"time / vmap's: loop {fw['loop_over_vmap']:.2f}x, grouped {fw['grouped_over_vmap']:.2f}x")
    print(f"grouped convolutions check (max |difference| from the loop, IEEE float32): logits "
          f"{check['grouped_logits']:.2e}, gradients {check['grouped_grads']:.2e}; vmap: logits "
          f"{check['vmap_logits']:.2e}, gradients {check['vmap_grads']:.2e}: "
          f"{'passed' if check['passed'] else 'FAILED'} (tolerance {check['tolerance']:.0e})")


# ----------------------------------------------------------------------------- end to end


def model_words(m) -> str:
    """The members' model, for the header: an MLP's hidden widths; a CNN's layers."""
    if not m.conv:
        return str(m.hidden)
    layers = ", ".join(f"{c.channels}@{c.kernel}x{c.kernel}" + (" bn" if c.norm == "batch" else "") +
                       (f" pool {c.pool}" if c.pool > 1 else "") for c in m.conv)
    return f"a CNN (conv {layers}; hidden {list(m.hidden)})"


def end_to_end(cfgs: list, ways: tuple, device: torch.device) -> dict:
    """Each way's results and seconds end to end: "sequential" (train() one after another), then each population
    stepper in ways; all warmed up first (imports of matplotlib and tensorboard, the IDX cache, the math
    libraries' first calls): whichever way ran first would otherwise pay for all."""
    tiny = [dataclasses.replace(c, name=c.name + "-warm", data=dataclasses.replace(c.data, subset=512, val_size=128),
                                train=dataclasses.replace(c.train, epochs=1)) for c in cfgs[:2]]
    train(tiny[0], log=lambda s: None)
    for how in ways:
        train_population([dataclasses.replace(c, name=c.name + f"-{how}") for c in tiny], log=lambda s: None,
                         stepper=how)
    runs = {}
    t0 = time.perf_counter()
    seq = [train(dataclasses.replace(cfg, name=cfg.name + "-seq"), log=lambda s: None) for cfg in cfgs]
    runs["sequential"] = (seq, time.perf_counter() - t0)
    for how in ways:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        suffix = {"stacked": "-pop", "vmap": "-vmap", "loop": "-loop"}[how]
        t0 = time.perf_counter()
        pop = train_population([dataclasses.replace(c, name=c.name + suffix) for c in cfgs], log=lambda s: None,
                               stepper=how)
        runs[how] = (pop, time.perf_counter() - t0)
    return runs


def figures(args, device: torch.device, where: str, runs: dict, fw: dict, check) -> dict:
    """What --json writes. A CNN has no "stacked" run: its population_s, ratio and the like are None, and it adds
    ratio_vmap, the grouped convolutions' check and the vmap population's accuracies."""
    (seq, t_seq), (vpop, t_vmap) = runs["sequential"], runs["vmap"]
    pop, t_pop = runs.get("stacked", (None, None))
    steps = (lambda rs: sum(r.train_seconds for r in rs) if rs is not None else None)
    out = {"members": args.members, "epochs": args.epochs, "device": str(device), "where": where,
           "torch": torch.__version__, "sequential_s": t_seq, "population_s": t_pop,
           "ratio": t_seq / t_pop if pop else None, "train_seconds_sequential": steps(seq),
           "train_seconds_population": steps(pop), "population_vmap_s": t_vmap,
           "train_seconds_population_vmap": steps(vpop), "peak_bytes_per_member": (pop or vpop)[0].peak_bytes,
           "peak_rss_bytes": peak_rss_bytes(), "forward": fw, "val_accuracy_sequential": [r.best_value for r in seq],
           "val_accuracy_population": [r.best_value for r in pop] if pop else None}
    if "loop" in runs:
        out.update(population_loop_s=runs["loop"][1],
                   train_seconds_population_loop=steps(runs["loop"][0]), ratio_loop=t_seq / runs["loop"][1])
    if check is not None:
        out.update(ratio_vmap=t_seq / t_vmap, stacked_skipped=STACKED_SKIP, grouped_check=check,
                   val_accuracy_population_vmap=[r.best_value for r in vpop])
    return out


def say_end_to_end(out: dict, runs: dict, device: torch.device) -> None:
    pop, vpop = runs.get("stacked", (None,))[0], runs["vmap"][0]
    print(f"sequential: {out['sequential_s']:.2f} s end to end ({out['train_seconds_sequential']:.2f} s of training "
          f"steps)")
    if pop:
        print(f"population: {out['population_s']:.2f} s end to end ({out['train_seconds_population']:.2f} s of "
              f"training steps)  [hand-stacked MLP, torch.baddbmm]")
    else:
        print(f"population: skipped  [hand-stacked MLP, torch.baddbmm]: {STACKED_SKIP}")
    print(f"population: {out['population_vmap_s']:.2f} s end to end ({out['train_seconds_population_vmap']:.2f} s of "
          f"training steps)  [torch.func vmap]")
    which, way = ("population", "") if pop else ("population vmap", "_vmap")
    print(f"ratio (sequential / {which}): {out['sequential_s'] / out[f'population{way}_s']:.2f}x end to end, "
          f"{out['train_seconds_sequential'] / max(1e-9, out[f'train_seconds_population{way}']):.2f}x training steps")
    print(f"peak memory per member: {out['peak_bytes_per_member'] / 2**20:.1f} MiB "
          f"({'CUDA allocator peak / K' if device.type == 'cuda' else 'stacked state + one step of activations'}); "
          f"process peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB")
    print("best val_accuracy, sequential: " + ", ".join(f"{v:.4f}" for v in out["val_accuracy_sequential"]))
    if pop:
        print("best val_accuracy, population: " + ", ".join(f"{v:.4f}" for v in out["val_accuracy_population"]))
    print("best val_accuracy, population (vmap): " + ", ".join(f"{r.best_value:.4f}" for r in vpop))
    if "loop" in runs:  # a CNN: the population's loop over its members (auto on the CPU)
        lpop, t_loop = runs["loop"]
        print(f"population: {t_loop:.2f} s end to end ({sum(r.train_seconds for r in lpop):.2f} s of training steps)"
              f"  [torch.func, a loop over the members]; ratio (sequential / population loop): "
              f"{out['sequential_s'] / t_loop:.2f}x end to end")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "mnist_mlp.yaml"))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--members", type=int, default=4, help="K: trainings (population members)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=None, help="first N training samples (tiny runs)")
    ap.add_argument("--hidden", default=None, help="hidden widths, comma-separated (default: the config's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the one-step timings (default 20)")
    ap.add_argument("--data-root", default=None, help="folder of the IDX files (default: the config's search)")
    ap.add_argument("--out", default=None, help="checkpoint.dir for both ways' run folders (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="population_bench-")
    return args


def main() -> int:
    args = parse_args()
    cfgs = configs(args)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    cnn = bool(cfgs[0].model.conv)  # build_model makes a CNN; the hand-stacked stepper takes only MLPs
    print(f"torch {torch.__version__}, {device} ({where}), {torch.get_num_threads()} threads; {args.members} "
          f"members of {model_words(cfgs[0].model)}, {cfgs[0].optim.name}, batch {cfgs[0].train.batch_size}, "
          f"{args.epochs} epochs; run folders in {args.out}")
    if cnn:
        fw, check = cnn_step_times(cfgs[0], args.members, device, args.steps)
        say_cnn_step(args.members, fw, check)
    else:
        fw, check = step_times(cfgs[0], args.members, device, args.steps), None
        print(f"one step of {args.members} stacked MLPs (forward, cross-entropy, backward): hand-stacked baddbmm "
              f"{fw['baddbmm_ms']:.2f} ms, torch.func vmap {fw['vmap_ms']:.2f} ms")
    runs = end_to_end(cfgs, ("vmap", "loop") if cnn else ("stacked", "vmap"), device)
    failed = [str(r.folder) for rs, _ in runs.values() for r in rs if r.status != "finished"]
    out = figures(args, device, where, runs, fw, check)
    say_end_to_end(out, runs, device)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if failed:
        print(f"population_bench: FAILED runs: {', '.join(failed)}", file=sys.stderr)
    if check is not None and not check["passed"]:
        print(f"population_bench: FAILED: the grouped convolutions differ from the members' own computation by "
              f"more than {MAX_DIFF:.0e} (above)", file=sys.stderr)
    return 1 if failed or (check is not None and not check["passed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
