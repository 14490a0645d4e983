"""torchrun data parallelism: 2 CPU processes (gloo) against one process with the same global batch."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlbase.training import checkpoint
from dlbase.core.config import load_config
from dlbase.training.train import train

REPO = Path(__file__).resolve().parents[1]


def losses(folder: Path) -> list[float]:
    with open(folder / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_follow_one_with_the_same_global_batch(tiny_config, tmp_path):
    sets = ["train.epochs=3", "model.hidden=[32]", "schedule.name=cosine"]
    single = train(load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'one'}"]), log=lambda s: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dlbase", "train", "--config", str(tiny_config), *[x for s in sets for x in ("--set", s)],
           "--set", f"checkpoint.dir={tmp_path / 'two'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = [p for p in (tmp_path / "two").iterdir()]
    assert [p.name for p in runs] == ["tiny"]  # one run folder, agreed by both ranks
    def files(folder):  # TensorBoard names its event files by time, host and pid: compare that there is one
        return sorted("events" if p.name.startswith("events.out.tfevents.") else p.name for p in folder.iterdir())
    assert files(runs[0]) == files(single.folder)
    assert r.stdout.count("run folder:") == 1  # only rank 0 speaks
    assert losses(runs[0]) == pytest.approx(losses(single.folder), rel=1e-4)
    a, b = checkpoint.load(single.folder / "last.ckpt")["model"], checkpoint.load(runs[0] / "last.ckpt")["model"]
    assert a.keys() == b.keys()  # no DDP "module." prefixes: it loads in one process
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_global_batch_must_divide_among_ranks(tiny_config, monkeypatch):
    from dlbase.core.errors import ConfigError
    from dlbase.training.engine import plan_run
    with pytest.raises(ConfigError, match="train.batch_size: 50 is the global batch"):
        plan_run(load_config(tiny_config), torch.device("cpu"), 3)


def torchrun(*args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dlbase", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def test_resume_across_world_sizes(tiny_config, tmp_path):
    sets = ["model.hidden=[32]", f"checkpoint.dir={tmp_path / 'ck'}"]  # a constant lr: the same at any length
    ref = train(load_config(tiny_config, sets + ["train.epochs=3", f"checkpoint.dir={tmp_path / 'ref'}"]),
                log=lambda s: None)
    first = train(load_config(tiny_config, sets + ["train.epochs=1"]), log=lambda s: None)
    last = first.folder / "last.ckpt"
    # one process -> two: the run goes on under torchrun from the single-process checkpoint
    r = torchrun("train", "--resume", last, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert checkpoint.load(last)["epoch"] == 2
    # two -> one: and back in a single process to the end
    r = subprocess.run([sys.executable, "-m", "dlbase", "train", "--resume", str(last), "--set", "train.epochs=3"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert losses(first.folder) == pytest.approx(losses(ref.folder), rel=1e-4)


def test_nan_guard_under_torchrun(tiny_config):
    r = torchrun("train", "--config", tiny_config, "--set", "optim.name=momentum", "--set", "optim.lr=1e6",
                 "--set", "model.hidden=[64,64]")
    assert r.returncode != 0 and "non-finite" in r.stderr


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint(tiny_config, tmp_path):
    import signal
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "dlbase", "train", "--config", str(tiny_config), "--set", "train.epochs=400",
                             "--set", "train.batch_size=10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = tmp_path / "ckpt" / "tiny" / "last.ckpt"
    for _ in range(600):
        if last.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "dlbase train --resume" in out, out + err
    stopped = checkpoint.load(last)
    assert 0 < stopped["step"] < 400 * 50
    target = stopped["epoch"] + 2  # one process goes on from the two ranks' checkpoint
    r = subprocess.run([sys.executable, "-m", "dlbase", "train", "--resume", str(last), "--set",
                        f"train.epochs={target}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(last)["epoch"] == target


@pytest.mark.parametrize("subset", [599, 551])  # last batch 49 (25 + 24 across 2 ranks), and 1 (one rank gets none)
def test_uneven_last_batches_equal_the_single_process_step(tiny_config, tmp_path, subset):
    """Issue 16 item 6: each rank's loss weighted by its share, so every step is the one-process step. Plain SGD,
    so the weights show the gradient itself (without the fix: off by 3e-4 and 4e-2; with it, 3e-8)."""
    sets = ["train.epochs=2", "model.hidden=[32]", f"data.subset={subset}", "optim.name=sgd", "optim.lr=0.1"]
    single = train(load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'one'}"]), log=lambda s: None)
    r = torchrun("train", "--config", tiny_config, *[x for s in sets for x in ("--set", s)],
                 "--set", f"checkpoint.dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stdout + r.stderr
    two = tmp_path / "two" / "tiny"
    assert losses(two) == pytest.approx(losses(single.folder), rel=1e-5)
    a, b = checkpoint.load(single.folder / "last.ckpt")["model"], checkpoint.load(two / "last.ckpt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert checkpoint.load(two / "last.ckpt")["step"] == checkpoint.load(single.folder / "last.ckpt")["step"]


def test_batch_norm_under_torchrun_on_the_cpu_is_refused_in_one_line(tiny_config):
    """Issue 16 item 7: without SyncBatchNorm each rank would normalise its own half; torch has it on CUDA only."""
    r = torchrun("train", "--config", tiny_config, "--set", "model.norm=batch")
    assert r.returncode != 0 and "error: model.norm: batch under torchrun" in r.stderr
    assert "dlbase/" not in r.stderr  # no frame of ours: the only traceback is torchrun's report of the exit


RANK_DRAW = """
import sys, torch
from dlbase.core.config import load_config
from dlbase.training.train import Trainer
t = Trainer(load_config(sys.argv[1], sys.argv[2:]), log=lambda s: None)
# one file per rank: two ranks printing to one pipe can interleave their lines under load
open(f"{sys.argv[1]}.draw{t.group.rank}", "w").write(repr(torch.rand(4).tolist()))
t.group.close()
"""


def test_each_rank_draws_its_own_dropout_masks(tiny_config, tmp_path):
    """Issue 16 item 7: the ranks' random streams (dropout) differ after set-up; the weights do not (DDP)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = tmp_path / "draw.py"
    script.write_text(RANK_DRAW)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tiny_config), "model.dropout=0.5", f"checkpoint.dir={tmp_path / 'ck'}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    draws = {rank: Path(f"{tiny_config}.draw{rank}").read_text() for rank in (0, 1)}
    assert draws[0] != draws[1] and all(draws.values())


def test_early_stop_under_torchrun_is_one_decision(tiny_config, tmp_path):
    """Issue 16 item 7: rank 0 decides and every rank stops with it (no rank left in a collective)."""
    r = torchrun("train", "--config", tiny_config, "--set", "train.epochs=6", "--set",
                 "train.early_stop.patience=1", "--set", "train.early_stop.min_delta=10",
                 "--set", f"checkpoint.dir={tmp_path / 'ck'}", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("early stop:") == 1
    assert checkpoint.load(tmp_path / "ck" / "tiny" / "last.ckpt")["epoch"] == 2
