"""Nothing lost: exact resume from any checkpoint, kill -9, SIGTERM/SIGINT, the NaN guard, a full disk.
Real files and real processes; the oracle is always an uninterrupted run."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlbase.training import checkpoint
from dlbase.core.config import load_config
from dlbase.core.errors import CheckpointError, TrainingDiverged
from dlbase.training.train import train

REPO = Path(__file__).resolve().parents[1]
SETS = ["model.dropout=0.2", "schedule.name=cosine", "schedule.warmup_steps=4", "optim.name=adamw",
        "train.early_stop.patience=50", "checkpoint.every_steps=3"]


def weights_equal(a: Path, b: Path) -> bool:
    wa, wb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics_without_timing(folder: Path) -> list[str]:
    return [",".join(line.split(",")[:6]) for line in (folder / "metrics.csv").read_text().splitlines()]


def test_resume_from_every_checkpoint_is_bit_identical(tiny_config, tmp_path, monkeypatch):
    ref = train(load_config(tiny_config, SETS + [f"checkpoint.dir={tmp_path / 'ref'}"]), log=lambda s: None)

    snapshots = []  # every last.ckpt the run writes, as it writes it
    real_save = checkpoint.save

    def keep(path, payload):
        real_save(path, payload)
        if Path(path).name == "last.ckpt":
            snapshots.append(Path(path).read_bytes())
    monkeypatch.setattr(checkpoint, "save", keep)
    run = train(load_config(tiny_config, SETS + [f"checkpoint.dir={tmp_path / 'run'}"]), log=lambda s: None)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert weights_equal(ref.folder / "last.ckpt", run.folder / "last.ckpt")  # checkpointing changes nothing
    assert len(snapshots) == 3 + 9  # 3 epoch ends + mid-epoch saves at steps 3, 6, 9, 12, ...

    mid = 0
    for i, blob in enumerate(snapshots[:-1]):
        folder = tmp_path / f"resume{i}" / "tiny"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(blob)
        shutil.copy(run.folder / "metrics.csv", folder / "metrics.csv")
        payload = checkpoint.load(folder / "last.ckpt")
        mid += "in_epoch" in payload
        cfg = load_config(tiny_config, SETS + [f"checkpoint.dir={tmp_path / f'resume{i}'}"])
        train(cfg, resume=folder / "last.ckpt", resume_payload=payload, log=lambda s: None)
        assert weights_equal(ref.folder / "last.ckpt", folder / "last.ckpt"), f"checkpoint {i} (step {payload['step']})"
        assert metrics_without_timing(folder) == metrics_without_timing(ref.folder), i
    assert mid >= 8


def dlbase(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dlbase", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, **kw)


def wait_for_training(proc):
    """Read stdout until the run has started training (the 'data:' line comes right before the first step)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("data:"):
            return lines
    return lines


def long_config(tmp_path, tiny_data, epochs=40):
    p = tmp_path / "long.yaml"
    p.write_text(f"""
name: long
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [64], dropout: 0.1}}
optim: {{lr: 0.003}}
schedule: {{name: cosine}}
train: {{epochs: {epochs}, batch_size: 25}}
checkpoint: {{dir: {tmp_path / 'ckpt'}, every_steps: 7}}
""")
    return p


def all_checkpoints_load(folder: Path) -> int:
    found = list(folder.glob("*.ckpt"))
    for p in found:
        checkpoint.load(p)  # raises on a partial or corrupt file
    return len(found)


def test_kill_minus_9_never_leaves_a_broken_checkpoint(tmp_path, tiny_data):
    cfg = long_config(tmp_path, tiny_data, epochs=300)  # long enough that 10 kills land before the end anywhere
    folder = tmp_path / "ckpt" / "long"
    rng = random.Random(1234)
    kills = 0
    while kills < 10:
        # the run's folder, once it exists: its newest checkpoint, or (killed before one) a start over in place
        proc = dlbase("train", "--resume", folder, "--config", cfg) if folder.exists() else dlbase("train", "--config", cfg)
        wait_for_training(proc)
        time.sleep(rng.uniform(0.02, 0.35))  # kills land in steps, evaluations and checkpoint writes
        if proc.poll() is not None:
            break  # it finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if folder.exists():
            all_checkpoints_load(folder)
    assert kills == 10
    n = all_checkpoints_load(folder)
    assert n >= 1
    proc = dlbase("train", "--resume", folder / "last.ckpt")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert checkpoint.load(folder / "last.ckpt")["epoch"] == 300
    # and the run that was killed ten times ends where an uninterrupted one does
    ref = train(load_config(cfg, [f"checkpoint.dir={tmp_path / 'ref'}"]), log=lambda s: None)
    assert weights_equal(ref.folder / "last.ckpt", folder / "last.ckpt")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_prints_the_resume_command(tmp_path, tiny_data, sig, code):
    cfg = long_config(tmp_path, tiny_data, epochs=150)  # still running when the signal comes, on fast machines too
    proc = dlbase("train", "--config", cfg)
    wait_for_training(proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    folder = tmp_path / "ckpt" / "long"
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("dlbase train --resume"))
    assert command == f"dlbase train --resume {folder / 'last.ckpt'}"
    stopped = checkpoint.load(folder / "last.ckpt")
    assert 0 < stopped["step"] < 150 * 20
    proc = subprocess.run([sys.executable, "-m", *command.split()], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    ref = train(load_config(cfg, [f"checkpoint.dir={tmp_path / 'ref'}"]), log=lambda s: None)
    assert weights_equal(ref.folder / "last.ckpt", folder / "last.ckpt")


def test_second_ctrl_c_stops_at_once_and_leaves_files_whole(tmp_path, tiny_data):
    cfg = long_config(tmp_path, tiny_data, epochs=200)
    proc = dlbase("train", "--config", cfg)
    wait_for_training(proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    all_checkpoints_load(tmp_path / "ckpt" / "long")


def test_nan_guard_stops_and_keeps_finite_weights(tiny_config, tmp_path):
    sets = ["optim.name=momentum", "optim.lr=0.01", "model.hidden=[64,64]"]
    first = train(load_config(tiny_config, sets + ["train.epochs=2"]), log=lambda s: None)
    before = {n: (first.folder / n).read_bytes() for n in ("last.ckpt", "best.ckpt")}
    cfg = load_config(tiny_config, sets + ["train.epochs=5", "optim.lr=1e6"])
    last = first.folder / "last.ckpt"
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, resume=last, resume_payload=checkpoint.load(last), log=lambda s: None)
    msg = str(e.value)
    assert "epoch 3" in msg and "step" in msg and "lr 1e+06" in msg, msg
    for n, blob in before.items():
        assert (first.folder / n).read_bytes() == blob  # untouched
        w = checkpoint.load(first.folder / n)["model"]
        assert all(torch.isfinite(t).all() for t in w.values())


def test_nan_guard_through_the_cli(tiny_config):
    r = subprocess.run([sys.executable, "-m", "dlbase", "train", "--config", str(tiny_config), "--set",
                        "optim.name=momentum", "--set", "optim.lr=1e6", "--set", "model.hidden=[64,64]"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 3 and "non-finite" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_disk_full_stops_with_a_clear_message_and_keeps_old_checkpoints(tiny_config, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    first = train(load_config(tiny_config, ["train.epochs=1"]), log=lambda s: None)
    before = (first.folder / "last.ckpt").read_bytes()
    # the next save's temp file is a link to /dev/full: the kernel answers ENOSPC to the write
    (first.folder / f".last.ckpt.{os.getpid()}.tmp").symlink_to("/dev/full")
    cfg = load_config(tiny_config, ["train.epochs=2"])
    last = first.folder / "last.ckpt"
    with pytest.raises(CheckpointError, match="cannot write checkpoint: No space left on device"):
        train(cfg, resume=last, resume_payload=checkpoint.load(last), log=lambda s: None)
    assert last.read_bytes() == before and checkpoint.load(last)["epoch"] == 1
    assert not list(first.folder.glob(".*.tmp"))


def test_tiny_tmpfs_fills_up(tiny_config, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = subprocess.run([sys.executable, "-m", "dlbase", "train", "--config", str(tiny_config), "--set",
                            f"checkpoint.dir={mnt}", "--set", "model.hidden=[128]"],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2, r.stderr
        assert "No space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        all_checkpoints_load(mnt / "tiny")
    finally:
        subprocess.run(["umount", str(mnt)])


KILLER = """
import os, sys
from dlbase.training import checkpoint, report
from dlbase.core import rundir
limit, count, real = int(sys.argv[1]), [0], rundir.write_atomic

def write_then_maybe_die(*args, **kwargs):
    real(*args, **kwargs)
    count[0] += 1
    if count[0] == limit:
        os._exit(137)  # as kill -9: no cleanup, no finally

for module in (rundir, checkpoint, report):  # each holds the one atomic write by name
    module.write_atomic = write_then_maybe_die
if limit == 0:  # die right after claiming the run folder, before any file is written
    claim = rundir.new_run_dir
    rundir.new_run_dir = lambda *a: (claim(*a), os._exit(137))
from dlbase.cli import main
sys.argv = ["dlbase", "train", *sys.argv[2:]]
main()
"""


def test_killed_between_any_two_file_writes_resumes_from_the_folder(tiny_config, tmp_path):
    """Stop the process after each of its file writes in turn (and before the first), then
    `dlbase train --resume <folder>`: it always goes on from the newest readable checkpoint, says which, and
    ends bit-identical to the uninterrupted run."""
    from dlbase.training.state import configure
    sets = ["train.epochs=2", "checkpoint.every_steps=5", "model.dropout=0.2"]
    ref = train(load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'ref'}"]), log=lambda s: None)
    writes = 0
    for limit in range(0, 20):
        ckpt_dir = tmp_path / f"kill{limit}"
        args = ["--config", str(tiny_config), *[x for s in sets + [f"checkpoint.dir={ckpt_dir}"] for x in ("--set", s)]]
        r = subprocess.run([sys.executable, "-c", KILLER, str(limit), *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        folder = ckpt_dir / "tiny"
        if r.returncode == 0:  # the run made fewer writes than limit: every instant has been tried
            assert weights_equal(ref.folder / "last.ckpt", folder / "last.ckpt")
            break
        assert r.returncode == 137, r.stderr
        writes = limit
        for leftover in folder.glob(".*.tmp"):
            raise AssertionError(f"temp file left: {leftover}")
        logs = []
        if limit:  # the run's own config.yaml or checkpoint says everything
            run = configure(None, [], folder, log=logs.append)
        else:  # killed before config.yaml: the user gives the config again
            run = configure(tiny_config, sets + [f"checkpoint.dir={ckpt_dir}"], folder, log=logs.append)
        result = train(run.cfg, resume=run.resume, resume_payload=run.payload, folder=run.folder, log=logs.append)
        assert result.folder == folder, limit
        said = next((line for line in logs if line.startswith(("resuming", str(folder)))), "")
        assert said and (run.resume is None or str(run.resume) in said), (limit, logs)
        assert weights_equal(ref.folder / "last.ckpt", folder / "last.ckpt"), f"killed after write {limit}"
        assert metrics_without_timing(folder) == metrics_without_timing(ref.folder), limit
        assert {"curves.png", "gradnorms.png"} <= {p.name for p in folder.iterdir()}
    assert writes >= 10  # config.yaml, mid-epoch and epoch checkpoints, metrics.csv, plots
