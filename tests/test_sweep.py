"""dlbase sweep: the search space, k-fold splits, resuming, choosing on validation data only."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.config import load_config
from dlbase.data import fold_indices
from dlbase.errors import ConfigError
from dlbase.sweep import parse_spec, sample

runner = CliRunner()


def spec(**kw):
    return parse_spec({"params": {"optim.lr": [0.1, 0.01]}, **kw}, "s.yaml", "x")


def test_grid_is_the_full_product():
    s = parse_spec({"params": {"optim.lr": [0.1, 0.01, 0.001], "model.hidden": [[8], [8, 8]],
                               "model.activation": ["relu", "tanh"]}}, "s.yaml", "x")
    trials = sample(s)
    assert len(trials) == 12
    assert {(t["optim.lr"], tuple(t["model.hidden"]), t["model.activation"]) for t in trials} == {
        (a, tuple(b), c) for a in (0.1, 0.01, 0.001) for b in ([8], [8, 8]) for c in ("relu", "tanh")}


def test_random_is_reproducible_and_respects_bounds():
    raw = {"method": "random", "trials": 400, "seed": 7, "params": {
        "optim.lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-1},
        "model.dropout": {"distribution": "uniform", "low": 0.0, "high": 0.5},
        "train.batch_size": {"distribution": "int_uniform", "low": 16, "high": 64},
        "model.activation": {"distribution": "choice", "values": ["relu", "gelu"]}}}
    a, b = sample(parse_spec(raw, "s", "x")), sample(parse_spec(raw, "s", "x"))
    assert a == b and len(a) == 400
    assert a != sample(parse_spec({**raw, "seed": 8}, "s", "x"))
    lrs = [t["optim.lr"] for t in a]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    logs = [math.log10(v) for v in lrs]  # uniform on the log scale: each decade gets about a third
    for lo in (-4, -3, -2):
        share = sum(lo <= x < lo + 1 for x in logs) / len(logs)
        assert 0.25 < share < 0.42, (lo, share)
    assert all(0 <= t["model.dropout"] <= 0.5 for t in a)
    assert all(isinstance(t["train.batch_size"], int) and 16 <= t["train.batch_size"] <= 64 for t in a)
    assert {t["model.activation"] for t in a} == {"relu", "gelu"}


@pytest.mark.parametrize("raw,words", [
    ({"params": {"optim.lr": []}}, "empty list"),
    ({"params": {}}, "at least one"),
    ({"method": "random", "params": {"optim.lr": {"distribution": "log_uniform", "low": 0, "high": 1}}}, "low > 0"),
    ({"method": "random", "params": {"optim.lr": {"distribution": "uniform", "low": 1, "high": 1}}}, "below high"),
    ({"method": "random", "params": {"optim.lr": {"distribution": "gauss", "low": 1, "high": 2}}}, "gauss"),
    ({"params": {"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 1}}}, "method: random"),
    ({"method": "bayes", "params": {"optim.lr": [1]}}, "grid, random"),
    ({"metric": "test_accuracy", "params": {"optim.lr": [1]}}, "never looks at the test set"),
    ({"cv_folds": 1, "params": {"optim.lr": [1]}}, "sweep.cv_folds"),
])
def test_bad_spaces_fail_at_once(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse_spec(raw, "s.yaml", "x")


def test_folds_partition_the_training_set():
    n, k = 103, 4
    vals = [fold_indices(n, 0, f, k)[1] for f in range(k)]
    assert torch.equal(torch.cat(vals).sort().values, torch.arange(n))  # every sample validates exactly once
    for f in range(k):
        tr, va = fold_indices(n, 0, f, k)
        assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == n


def base_config(tmp_path, tiny_data):
    p = tmp_path / "base.yaml"
    p.write_text(f"""
name: base
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [16]}}
train: {{epochs: 2, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
sweep:
  name: sw
  params:
    optim.lr: [0.03, 0.0001]
    model.hidden: [[16], [32]]
""")
    return p


def test_sweep_end_to_end_picks_the_best_and_resumes(tmp_path, tiny_data):
    cfg = base_config(tmp_path, tiny_data)
    r = runner.invoke(app, ["sweep", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "sw"
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert len(rows) == 4 and {r["trial"] for r in rows} == {f"trial-{i:03d}" for i in range(4)}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0]["rank"] == "1"
    for row in rows:  # the score is the trial's best validation accuracy, from its own run folder
        assert (root / row["trial"] / "metrics.csv").exists() and (root / row["trial"] / "config.yaml").exists()
        best = max(float(m["val_accuracy"]) for m in csv.DictReader(open(root / row["trial"] / "metrics.csv")))
        assert float(row["score"]) == pytest.approx(best, abs=1e-6)
    best_cfg = load_config(root / "best.yaml")  # ready for dlbase train
    assert best_cfg.optim.lr == float(rows[0]["optim.lr"])
    winner = json.loads((root / "winner.json").read_text())
    assert winner["winner"]["trial"] == rows[0]["trial"] and 0 <= winner["test_accuracy"] <= 1
    assert "test accuracy, measured once" in r.stdout
    # resume: drop one trial's result, rerun: only that trial runs again
    (root / "trial-002" / "result.json").unlink()
    stamp = {t: (root / t / "result.json").stat().st_mtime_ns for t in ("trial-000", "trial-001", "trial-003")}
    r = runner.invoke(app, ["sweep", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "trial-002:" in r.stdout and "trial-000:" not in r.stdout.split("rank")[0]
    assert stamp == {t: (root / t / "result.json").stat().st_mtime_ns for t in stamp}


def test_cross_validation_scores_mean_and_std(tmp_path, tiny_data):
    cfg = base_config(tmp_path, tiny_data)
    spec_file = tmp_path / "cv.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "cv", "cv_folds": 3, "params": {"optim.lr": [0.03]}}))
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec_file)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "cv"
    accs = [max(float(m["val_accuracy"]) for m in csv.DictReader(open(root / "trial-000" / f"fold-{f}" / "metrics.csv")))
            for f in (1, 2, 3)]
    row = next(csv.DictReader(open(root / "results.csv")))
    assert float(row["score"]) == pytest.approx(sum(accs) / 3, abs=1e-6) and float(row["std"]) >= 0
    assert (root / "winner" / "best.ckpt").exists()  # the winner retrained on all the training data, then tested


def test_invalid_sweep_values_fail_before_any_trial(tmp_path, tiny_data):
    cfg = base_config(tmp_path, tiny_data)
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--grid", "optim.lerning_rate=[0.1]"])
    assert r.exit_code == 2 and "did you mean optim.lr" in r.stderr
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--grid", "optim.lr=[0.1,-1]"])
    assert r.exit_code == 2 and "optim.lr" in r.stderr
    assert not (tmp_path / "ckpt" / "sw" / "trial-000").exists()  # nothing ran


def test_train_refuses_a_sweep_section_kindly(tmp_path, tiny_data):
    r = runner.invoke(app, ["train", "--config", str(base_config(tmp_path, tiny_data))])
    assert r.exit_code == 2 and "dlbase sweep" in r.stderr


def test_a_signal_stops_the_whole_sweep_and_a_rerun_resumes(tmp_path, tiny_data):
    import signal
    import subprocess
    import sys
    import time
    cfg = base_config(tmp_path, tiny_data)
    args = ["sweep", "--config", str(cfg), "--set", "train.epochs=200", "--grid", "optim.lr=[0.01]",
            "--grid", "model.hidden=[[16]]"]
    proc = subprocess.Popen([sys.executable, "-m", "dlbase", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    root = tmp_path / "ckpt" / "sw"
    for _ in range(600):  # wait until the trial is training
        if (root / "trial-000" / "last.ckpt").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "rerun the same command" in err and not (root / "trial-000" / "result.json").exists()
    stopped = checkpoint_epoch(root / "trial-000" / "last.ckpt")
    assert 1 <= stopped < 200
    r = runner.invoke(app, args)  # the same command again: the interrupted trial goes on from its last.ckpt
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(root / "trial-000" / "metrics.csv")))
    assert [int(m["epoch"]) for m in rows] == list(range(1, 201))  # no epoch lost or repeated
    r = runner.invoke(app, args[:3] + ["--set", "train.epochs=5"])  # another sweep in the same folder
    assert r.exit_code == 2 and "holds another sweep" in r.stderr


def checkpoint_epoch(path):
    from dlbase import checkpoint
    return checkpoint.load(path)["epoch"]
