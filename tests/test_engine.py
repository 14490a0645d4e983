"""Execution modes against eager fp32: the same loss trajectory, within each mode's tolerance.

CPU: eager fp32 (the oracle), bf16 autocast, torch.compile. CUDA (skipped without a GPU, run through the
device tool): whole-step CUDA graphs with every optimiser, schedules, encodings, dropout, norms, clipping.
"""
import csv

import pytest
import torch

from dlbase.training import checkpoint
from dlbase.core.config import GRAPH_OPTIMIZERS, load_config
from dlbase.core.errors import ConfigError
from dlbase.training.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def losses(folder):
    with open(folder / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


def run(tiny_config, tmp_path, tag, sets):
    cfg = load_config(tiny_config, [*sets, f"checkpoint.dir={tmp_path / tag}"])
    result = train(cfg, log=lambda s: None)
    return result, losses(result.folder)


def test_cpu_auto_is_eager_fp32(tiny_config, tmp_path):
    from dlbase.training.engine import plan
    cfg = load_config(tiny_config)
    p = plan(cfg.train, torch.device("cpu"), "none")
    assert (p.precision, p.compile, p.data_dtype) == ("fp32", "none", torch.float32)


def test_graph_and_tf32_refused_on_cpu(tiny_config):
    with pytest.raises(ConfigError, match="train.compile: graph captures CUDA graphs; the device is cpu"):
        train(load_config(tiny_config, ["train.compile=graph"]), log=lambda s: None)
    with pytest.raises(ConfigError, match="train.precision: tf32"):
        train(load_config(tiny_config, ["train.precision=tf32"]), log=lambda s: None)


def test_cpu_bf16_tracks_fp32(tiny_config, tmp_path):
    _, ref = run(tiny_config, tmp_path, "fp32", ["train.precision=fp32"])
    _, got = run(tiny_config, tmp_path, "bf16", ["train.precision=bf16"])
    assert got == pytest.approx(ref, rel=0.1, abs=0.02)


def test_cpu_torch_compile_tracks_eager(tiny_config, tmp_path):
    pytest.importorskip("torch._inductor")
    _, ref = run(tiny_config, tmp_path, "eager", ["train.compile=none", "train.epochs=2"])
    try:
        result, got = run(tiny_config, tmp_path, "compiled", ["train.compile=default", "train.epochs=2"])
    except Exception as e:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-5)
    assert "net.0.weight" in checkpoint.load(result.folder / "last.ckpt")["model"]  # no _orig_mod. prefix


# ----------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("optim", GRAPH_OPTIMIZERS)
def test_graph_equals_eager_for_every_optimiser(tiny_config, tmp_path, optim):
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adadelta": 1.0}.get(optim, 0.003)
    sets = ["device=cuda", "train.precision=fp32", f"optim.name={optim}", f"optim.lr={lr}",
            "schedule.name=cosine", "schedule.warmup_steps=5"]
    _, ref = run(tiny_config, tmp_path, "eager", sets + ["train.compile=none"])
    result, got = run(tiny_config, tmp_path, "graph", sets + ["train.compile=graph"])
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), optim


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("sets", [
    ["model.dropout=0.2"],
    ["model.norm=batch", "train.grad_clip=0.5"],
    ["model.encoding.name=fourier", "model.encoding.num_freqs=3", "optim.lr=0.001"],
    ["model.encoding.name=learned", "model.encoding.num_freqs=3", "optim.lr=0.001"],
    ["model.encoding.name=gaussian", "model.encoding.num_freqs=3", "optim.lr=0.001"],
    ["schedule.name=onecycle", "optim.name=adamw", "train.loss=mse"],
    ["train.max_steps=23", "schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.5"],
])
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 0.02)])
def test_graph_tracks_eager_at_the_same_precision(tiny_config, tmp_path, sets, precision, tol):
    base = ["device=cuda", "train.epochs=3", f"train.precision={precision}"] + sets
    _, ref = run(tiny_config, tmp_path, "eager", base + ["train.compile=none"])
    result, got = run(tiny_config, tmp_path, "graph", base + ["train.compile=graph"])
    assert got == pytest.approx(ref, rel=tol, abs=tol / 10), sets
    assert result.best_value >= 0.5  # it learns (the tiny set, 3 epochs)


@cuda
@pytest.mark.cuda
def test_graph_resume_matches_uninterrupted_and_loads_on_cpu(tiny_config, tmp_path):
    from test_train import Interrupt, stop_after_epoch
    from dlbase.training.state import load_for_eval
    sets = ["device=cuda", "train.compile=graph", "train.precision=fp32", "train.epochs=4", "schedule.name=cosine",
            "model.dropout=0.1"]
    full, _ = run(tiny_config, tmp_path, "a", sets)
    cfg = load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'b'}"])
    with pytest.raises(Interrupt):
        train(cfg, log=stop_after_epoch(2))
    last = tmp_path / "b" / "tiny" / "last.ckpt"
    train(cfg, resume=last, resume_payload=checkpoint.load(last), log=lambda s: None)
    a, b = checkpoint.load(full.folder / "last.ckpt")["model"], checkpoint.load(last)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)  # CUDA: up to kernel nondeterminism
    _, model, _ = load_for_eval(full.folder / "best.ckpt", torch.device("cpu"))  # a GPU checkpoint on the CPU
    assert model(torch.rand(2, 784)).shape == (2, 10)


@cuda
@pytest.mark.cuda
def test_default_config_memory_under_1gib(mnist_root, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "dlbase", "train", "--config", str(repo / "configs" / "mnist_mlp.yaml"),
                        "--set", f"data.root={mnist_root}", "--set", "train.epochs=2", "--set",
                        f"checkpoint.dir={tmp_path}"], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stderr
    peak = int(re.search(r"peak GPU memory (\d+) MiB", r.stdout).group(1))  # a fresh process: this run alone
    print(f"peak GPU memory, default config: {peak} MiB")
    assert peak < 1024
