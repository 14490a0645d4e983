"""End-to-end: the dlbase command as a user runs it, in a real subprocess."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dlbase.cli import app


def dlbase(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dlbase", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_train_then_eval_end_to_end(tiny_config, tmp_path):
    r = dlbase("train", "--config", tiny_config, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "ckpt" / "tiny"
    assert f"run folder: {folder}" in r.stdout and "epoch 2/2" in r.stdout
    r = dlbase("eval", folder / "best.ckpt", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split"] == "test" and out["n"] == 200 and out["checkpoint"] == str(folder / "best.ckpt")
    assert 0.9 <= out["accuracy"] <= 1.0 and out["loss"] >= 0
    r = dlbase("eval", folder / "best.ckpt", "--split", "val")
    assert r.returncode == 0 and "val accuracy" in r.stdout and "n=100" in r.stdout


def test_resume_from_cli_continues(tiny_config, tmp_path):
    assert dlbase("train", "-c", tiny_config, "--set", "train.epochs=1").returncode == 0
    last = tmp_path / "ckpt" / "tiny" / "last.ckpt"
    r = dlbase("train", "--resume", last, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout


runner = CliRunner()


def test_eval_with_other_data_root(tiny_config, tmp_path):
    from conftest import make_dataset
    runner.invoke(app, ["train", "-c", str(tiny_config), "--set", "train.epochs=1"])
    moved = make_dataset(tmp_path / "elsewhere")
    r = runner.invoke(app, ["eval", str(tmp_path / "ckpt/tiny/best.ckpt"), "--data-root", str(moved), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 200


@pytest.mark.parametrize("args,words", [
    (["eval", "nope.ckpt"], "nope.ckpt: checkpoint not found"),
    (["eval", "{bad}"], "not a readable checkpoint"),
    (["train"], "--config PATH is required"),
    (["train", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "--config", "{cfg}", "--set", "data.root={tmp}/none"], "not found"),
    (["train", "--config", "{cfg}", "--set", "device=cuda:7"], "device"),
])
def test_user_mistakes_exit_2_with_one_line(tiny_config, tmp_path, args, words):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage" * 50)
    args = [a.format(bad=bad, cfg=tiny_config, tmp=tmp_path) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error: "), r.stderr


def test_eval_refuses_a_checkpoint_whose_config_no_longer_validates(tiny_config, tmp_path):
    import torch
    runner.invoke(app, ["train", "-c", str(tiny_config), "--set", "train.epochs=1"])
    p = tmp_path / "ckpt/tiny/best.ckpt"
    payload = torch.load(p, weights_only=True)
    payload["config"]["optim"]["lr"] = -1.0
    torch.save(payload, p)
    r = runner.invoke(app, ["eval", str(p)])
    assert r.exit_code == 2 and "optim.lr" in r.stderr and "best.ckpt" in r.stderr


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["config"], ["config", "show"], ["config", "validate"]])
def test_help_everywhere(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.stdout
    if cmd == ["train"]:
        assert all(o in r.stdout for o in ("--config", "--set", "--resume"))
    if cmd == ["eval"]:
        assert all(o in r.stdout for o in ("--split", "--data-root", "--json"))


def test_console_script_installed():
    import shutil
    exe = shutil.which("dlbase") or os.path.join(os.path.dirname(sys.executable), "dlbase")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout


def test_eval_data_root_never_downloads_or_creates_folders(tiny_config, tmp_path):
    runner.invoke(app, ["train", "-c", str(tiny_config), "--set", "train.epochs=1", "--set", "data.download=true"])
    missing = tmp_path / "no-such-dir"
    r = runner.invoke(app, ["eval", str(tmp_path / "ckpt/tiny/best.ckpt"), "--data-root", str(missing)])
    assert r.exit_code == 2 and "not found" in r.stderr and not missing.exists()


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path(__file__).parent.parent.glob("configs/*.yaml")))
def test_config_validate_every_shipped_config(path):
    r = CliRunner().invoke(app, ["config", "validate", "--config", path])
    assert r.exit_code == 0, r.output
    assert "valid" in r.output


def test_config_validate_sweep_section(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("name: s\nsweep:\n  method: grid\n  params:\n    optim.lr: [0.1, 0.01]\n")
    r = CliRunner().invoke(app, ["config", "validate", "--config", str(good)])
    assert r.exit_code == 0, r.output
    assert "valid config with a sweep of 1 params" in r.output
    bad = tmp_path / "b.yaml"
    bad.write_text("name: b\nsweep:\n  method: grid\n  params: {}\n")
    r = CliRunner().invoke(app, ["config", "validate", "--config", str(bad)])
    assert r.exit_code == 2 and "sweep" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


TINY_CNN = "model.conv=[{channels: 4, kernel: 5, pool: 2, norm: batch}, {channels: 8, kernel: 3, pool: 2, dropout: 0.1}]"


def test_a_cnn_trains_and_evaluates_end_to_end(tiny_config, tmp_path):
    """model.conv from the command line: dlbase train writes best.ckpt (gradnorms for every layer, convolutions
    first) and dlbase eval reads it back with nothing else."""
    r = dlbase("train", "--config", tiny_config, "--set", TINY_CNN, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "ckpt" / "tiny"
    assert (folder / "best.ckpt").exists() and "epoch 2/2" in r.stdout
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "grad_norm_4" in header and "grad_norm_5" not in header  # 2 convolutions, 2 Linear layers
    r = dlbase("eval", folder / "best.ckpt", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 200 and 0.9 <= out["accuracy"] <= 1.0


def test_a_conv_the_images_are_too_small_for_is_refused_before_any_file(tiny_config, tmp_path):
    r = runner.invoke(app, ["train", "--config", str(tiny_config), "--set",
                            "model.conv=[{kernel: 5, pool: 2}, {kernel: 5, pool: 2}, {kernel: 5}]"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == ("error: model.conv[2].kernel: 5 is larger than the 4x4 map it gets "
                                            "(layer 3 of model.conv); allowed: at most 4"), r.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
