"""dlbase sweep: the search space, k-fold splits, resuming, choosing on validation data only."""
import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dlbase.training import checkpoint
from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.data import fold_indices
from dlbase.core.errors import ConfigError
from dlbase.search.sweep import parse_spec, sample

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
    ({"method": "grid", "params": {"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 1}}},
     "method: tpe or random"),
    ({"pruner": "asha", "params": {"optim.lr": [1]}}, "none, median, hyperband"),
    ({"storage": "", "params": {"optim.lr": [1]}}, "sweep.storage"),
    ({"params": {"model.hidden": [[8], "[8]"]}}, "repeats a value"),
    ({"method": "bayes", "params": {"optim.lr": [1]}}, "grid, random, tpe"),
    ({"metric": "test_accuracy", "params": {"optim.lr": [1]}}, "never looks at the test set"),
    ({"cv_folds": 1, "params": {"optim.lr": [1]}}, "sweep.cv_folds"),
])
def test_bad_spaces_fail_at_once(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse_spec(raw, "s.yaml", "x")


def test_null_integer_keys_mean_their_defaults():
    """trials: null (and the other integer keys) is the default, as the JSON Schema accepts it; it crashed with a
    TypeError in the trial-count check."""
    spec = parse_spec({"method": "random", "trials": None, "retries": None, "seed": None,
                       "params": {"optim.lr": [1, 2]}}, "s.yaml", "x")
    assert (spec.trials, spec.retries, spec.seed, spec.cv_folds) == (10, 3, 0, None)


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
    # rerunning a finished sweep trains nothing and does not test again: the study holds every result and the test
    stamp = {t: (root / t / "result.json").stat().st_mtime_ns for t in (f"trial-{i:03d}" for i in range(4))}
    ckpts = {t: (root / t / "last.ckpt").stat().st_mtime_ns for t in stamp}
    r = runner.invoke(app, ["sweep", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "4 done" in r.stdout and not any(f"trial-{i:03d}:" in r.stdout for i in range(4))
    assert stamp == {t: (root / t / "result.json").stat().st_mtime_ns for t in stamp}
    assert ckpts == {t: (root / t / "last.ckpt").stat().st_mtime_ns for t in stamp}
    assert json.loads((root / "winner.json").read_text()) == winner


def test_cross_validation_scores_mean_and_std_then_retrains_on_every_image(tmp_path, tiny_data):
    cfg = base_config(tmp_path, tiny_data)
    spec_file = tmp_path / "cv.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "cv", "cv_folds": 3, "params": {"optim.lr": [0.03]}}))
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec_file), "--set", "train.epochs=3",
                            "--set", "train.early_stop.patience=2"])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "cv"
    accs = [max(float(m["val_accuracy"]) for m in csv.DictReader(open(root / "trial-000" / f"fold-{f}" / "metrics.csv")))
            for f in (1, 2, 3)]
    row = next(csv.DictReader(open(root / "results.csv")))
    assert float(row["score"]) == pytest.approx(sum(accs) / 3, abs=1e-6) and float(row["std"]) >= 0
    # the winner retrained on every training image for CV's epoch count, its last checkpoint tested once.
    # oracle: the mean over folds of each fold's best epoch, rounded half up, at least 1
    chosen = [checkpoint.load(root / "trial-000" / f"fold-{f}" / "best.ckpt")["epoch"] for f in (1, 2, 3)]
    epochs = max(1, math.floor(sum(chosen) / 3 + 0.5))
    final = checkpoint.load(root / "winner" / "last.ckpt")
    assert final["config"]["data"]["val_size"] == 0 and final["epoch"] == epochs
    assert final["config"]["train"]["early_stop"] == {"patience": None, "metric": None, "min_delta": 0.0}
    assert final["best"]["metric"] == "train_loss"  # no validation data to choose with: the last epoch is kept
    rows = list(csv.DictReader(open(root / "winner" / "metrics.csv")))
    assert len(rows) == epochs and not any(m["val_accuracy"] for m in rows)
    winner = json.loads((root / "winner.json").read_text())
    assert winner["checkpoint"] == str(root / "winner" / "last.ckpt")
    said = f"all 600 training images, {epochs} epoch{'s' if epochs > 1 else ''} (mean best epoch over 3 folds: "
    assert winner["trained_on"].startswith(said) and f"retrained on {said}" in r.stdout
    assert load_config(root / "best.yaml").train.epochs == epochs  # best.yaml trains the model that was tested
    r = runner.invoke(app, ["eval", str(root / "winner" / "last.ckpt"), "--json"])  # oracle for the test number
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == pytest.approx(winner["test_accuracy"])


def test_val_size_zero_is_refused_without_blaming_a_set_never_typed(tmp_path, tiny_data):
    cfg = base_config(tmp_path, tiny_data)
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--set", "data.val_size=0"])
    assert r.exit_code == 2 and "--set data.val_size=0: data.val_size" in r.stderr, r.output
    assert "early_stop" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


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
    return checkpoint.load(path)["epoch"]


def plain_base(tmp_path, tiny_data):
    """A base config without a sweep: section (the trials come from --grid), one short epoch per trial."""
    p = tmp_path / "plain.yaml"
    p.write_text(f"""
name: sw
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [16]}}
optim: {{lr: 0.05}}
train: {{epochs: 1, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return p


def stamps(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("trial-*/result.json")}


def test_a_diverging_trial_is_a_failed_result_and_the_sweep_goes_on(tmp_path, tiny_data):
    cfg = plain_base(tmp_path, tiny_data)
    args = ["sweep", "--config", str(cfg), "--set", "optim.name=sgd", "--grid", "optim.weight_decay=[0.0,1e6,0.001]"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "sw_sweep"
    assert "diverged" in next(line for line in r.stdout.splitlines() if line.startswith("trial-001:"))
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert [(m["trial"], m["status"]) for m in rows][-1] == ("trial-001", "diverged")
    assert [m["status"] for m in rows[:2]] == ["finished", "finished"] and rows[-1]["rank"] == "3"
    assert rows[-1]["score"] == "" and float(rows[0]["score"]) >= float(rows[1]["score"])
    assert json.loads((root / "winner.json").read_text())["winner"]["trial"] != "trial-001"
    assert json.loads((root / "trial-001" / "result.json").read_text())["status"] == "diverged"
    before = stamps(root)
    r = runner.invoke(app, args)  # a rerun reuses the failed result: it does not hit the same trial forever
    assert r.exit_code == 0, r.output
    assert "trial-001:" not in r.stdout and stamps(root) == before
    # every trial diverging: one line, exit 2, no winner, the test set never used
    r = runner.invoke(app, [*args[:-1], "optim.weight_decay=[1e6]", "--set", "name=bad"])
    assert r.exit_code == 2 and "every trial diverged" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "ckpt" / "bad_sweep" / "results.csv").exists()
    assert not (tmp_path / "ckpt" / "bad_sweep" / "winner.json").exists()


def test_a_rerun_after_the_base_config_changed_refuses_stale_trials(tmp_path, tiny_data):
    cfg = plain_base(tmp_path, tiny_data)
    args = ["sweep", "--config", str(cfg), "--grid", "optim.lr=[0.03,0.01]"]
    assert runner.invoke(app, args).exit_code == 0
    root, original = tmp_path / "ckpt" / "sw_sweep", cfg.read_text()
    before, best = stamps(root), (root / "best.yaml").read_text()
    cfg.write_text(original.replace("hidden: [16]", "hidden: [24]"))
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "model.hidden: [16] -> [24]" in r.stderr and "another name" in r.stderr and str(root) in r.stderr
    assert stamps(root) == before and (root / "best.yaml").read_text() == best  # nothing reused, nothing rerun
    (root / "trial-000" / "result.json").unlink()  # an interrupted trial would go on from its last.ckpt: not so
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "last.ckpt" in r.stderr and "model.hidden" in r.stderr
    cfg.write_text(original.replace("lr: 0.05", "lr: 0.07"))  # a key every trial overrides: nothing is stale
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "2 done" in r.stdout and "trial-001:" not in r.stdout, r.output


@pytest.mark.parametrize("name", ["../../escaped", "my sweep", ".hidden", "a/b", "x" * 129])
def test_a_sweep_name_is_one_safe_path_component(name):
    with pytest.raises(ConfigError) as e:
        parse_spec({"name": name, "params": {"optim.lr": [0.1]}}, "s.yaml", "x")
    assert all(w in str(e.value) for w in ("s.yaml", "sweep.name", repr(name), "letters, digits"))


def test_an_escaping_sweep_name_writes_nothing(tmp_path, tiny_data):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "../../escaped", "params": {"optim.lr": [0.1]}}))
    r = runner.invoke(app, ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--sweep", str(spec_file)])
    assert r.exit_code == 2 and "sweep.name" in r.stderr and str(spec_file) in r.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path.parent / "escaped").exists()


def test_an_unwritable_checkpoint_dir_is_one_line_before_any_trial(tmp_path, tiny_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = runner.invoke(app, ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--grid", "optim.lr=[0.1]",
                            "--set", f"checkpoint.dir={blocker}"])
    assert r.exit_code == 2 and "checkpoint.dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_dir_is_one_line_before_any_trial(tmp_path, tiny_data):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt").chmod(0o555)
    try:
        r = runner.invoke(app, ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--grid", "optim.lr=[0.1]"])
    finally:
        (tmp_path / "ckpt").chmod(0o755)
    assert r.exit_code == 2 and "checkpoint.dir: cannot write" in r.stderr, r.output


def test_every_sweep_file_goes_through_the_atomic_write(tmp_path, tiny_data, monkeypatch):
    from dlbase.core import rundir
    written, real = [], rundir.write_atomic

    def spy(path, data, what="file"):
        written.append(Path(path).name)
        real(path, data, what)
    monkeypatch.setattr(rundir, "write_atomic", spy)
    args = ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--grid", "optim.lr=[0.03]"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert {"sweep.yaml", "result.json", "results.csv", "best.yaml", "winner.json"} <= set(written)
    root = tmp_path / "ckpt" / "sw_sweep"
    assert not list(root.rglob("*.tmp"))
    (root / "winner.json").unlink()
    (root / "winner.json").mkdir()  # a write that fails: one line, exit 2, the files already there untouched
    results = (root / "results.csv").read_text()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "winner.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert (root / "results.csv").read_text() == results


def _stop_during_trial(args, last, timeout=120):
    """Start `dlbase sweep args` in a process, SIGTERM it once last.ckpt is (re)written, return its exit status."""
    import signal
    import subprocess
    import sys
    import time
    before = last.stat().st_mtime_ns if last.exists() else None
    proc = subprocess.Popen([sys.executable, "-m", "dlbase", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while not (last.exists() and last.stat().st_mtime_ns != before):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_a_signal_uses_up_no_retry(tmp_path, tiny_data):
    cfg = plain_base(tmp_path, tiny_data)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "sig", "retries": 1, "params": {"optim.lr": [0.01]}}))
    args = ["sweep", "--config", str(cfg), "--sweep", str(spec_file), "--set", "train.epochs=200"]
    root = tmp_path / "ckpt" / "sig"
    for _ in range(2):  # more stops than retries: a stop the user asked for is not a failure
        code, out = _stop_during_trial(args, root / "trial-000" / "last.ckpt")
        assert code == 143, out
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(root / "trial-000" / "metrics.csv")))
    assert [int(m["epoch"]) for m in rows] == list(range(1, 201))  # resumed, every epoch once
    assert next(csv.DictReader(open(root / "results.csv")))["status"] == "finished"


def test_a_failed_trial_keeps_its_parameters_in_results_csv(tmp_path):
    from dlbase.search.study import Study
    s = parse_spec({"name": "f", "retries": 0, "params": {"optim.lr": [0.01, 0.003]}}, "s.yaml", "x")
    study = Study(s, tmp_path, None, {}, log=lambda line: None)
    trial = study.take()
    trial.suggest_categorical("optim.lr", [0.01, 0.003])
    study.give_back([trial])  # an error: counts against retries (0 here): failed for good
    rows, open_ = study.rows()
    assert open_ == 1 and rows[0]["status"] == "failed" and rows[0]["optim.lr"] == 0.01


def test_a_rerun_with_another_base_is_refused_naming_the_key_even_without_trial_folders(tmp_path, tiny_data):
    import shutil
    args = ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--grid", "optim.lr=[0.03]"]
    assert runner.invoke(app, args).exit_code == 0
    root = tmp_path / "ckpt" / "sw_sweep"
    record = (root / "sweep.yaml").read_bytes()
    r = runner.invoke(app, [*args, "--set", "train.epochs=2"])  # the trial's own result names the key
    assert r.exit_code == 2 and "train.epochs: 1 -> 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    shutil.rmtree(root / "trial-000")  # no trial folder left: the study's record of its base refuses it
    r = runner.invoke(app, [*args, "--set", "train.batch_size=25"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "train.batch_size: 50 -> 25" in r.stderr and "study.db" in r.stderr
    assert "trial-000:" not in r.stdout and (root / "sweep.yaml").read_bytes() == record  # a refusal writes nothing
    assert optuna_study(root)["dlbase.base"]["train.batch_size"] == 50  # oracle: Optuna's own view of the study


def optuna_study(root):
    import optuna
    return optuna.load_study(study_name=root.name, storage=f"sqlite:///{root / 'study.db'}").user_attrs


def test_two_machines_with_different_base_configs_do_not_join_one_study(tmp_path, tiny_data):
    cfg = plain_base(tmp_path, tiny_data)
    log = tmp_path / "shared" / "study.log"
    args = ["--grid", "optim.lr=[0.03]", "--storage", str(log)]
    assert runner.invoke(app, ["sweep", "--config", str(cfg), *args]).exit_code == 0
    other = tmp_path / "other.yaml"  # the second machine: its own folder, and another base
    other.write_text(cfg.read_text().replace("hidden: [16]", "hidden: [24]"))
    r = runner.invoke(app, ["sweep", "--config", str(other), *args, "--set", f"checkpoint.dir={tmp_path / 'm2'}"])
    assert r.exit_code == 2 and "model.hidden: [16] -> [24]" in r.stderr and str(log) in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m2" / "sw_sweep" / "trial-000").exists()
    r = runner.invoke(app, ["sweep", "--config", str(cfg), *args, "--set", f"checkpoint.dir={tmp_path / 'm2'}"])
    assert r.exit_code == 0 and "1 done" in r.stdout, r.output  # the same base elsewhere joins, as before


@pytest.mark.parametrize("storage", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_storage_is_refused(tmp_path, tiny_data, storage):
    r = runner.invoke(app, ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), "--grid", "optim.lr=[0.03]",
                            "--storage", storage])
    assert r.exit_code == 2 and "in-memory" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "ckpt" / "sw_sweep" / "trial-000").exists()


@pytest.mark.parametrize("extra", [["--grid", f"optim.lr=[{', '.join(str(i + 1) for i in range(1000))}]",
                                    "--grid", f"optim.weight_decay=[{', '.join(str(i) for i in range(1000))}]"]])
def test_an_absurd_grid_is_refused_up_front(tmp_path, tiny_data, extra):
    r = runner.invoke(app, ["sweep", "--config", str(plain_base(tmp_path, tiny_data)), *extra])
    assert r.exit_code == 2 and "1,000,000 points" in r.stderr and "10,000" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_absurdly_many_random_trials_are_refused():
    with pytest.raises(ConfigError, match="sweep.trials: 1,000,000 trials: at most 10,000"):
        parse_spec({"method": "random", "trials": 10**6,
                    "params": {"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 1}}}, "s.yaml", "x")


@pytest.mark.parametrize("params,words", [
    ({"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 1, "step": 0.5, "foo": "bar"}}, "unknown key 'step'"),
    ({"name": ["a", "b"]}, "identical trials"),
    ({"checkpoint.dir": ["/tmp/a", "/tmp/b"]}, "identical trials"),
    ({"optim.lr": [0.1, "0.1"]}, "repeats a value"),
])
def test_spec_entries_that_would_do_nothing_are_refused(params, words):
    with pytest.raises(ConfigError, match=words):
        parse_spec({"method": "random", "params": params}, "s.yaml", "x")


def test_a_storage_failing_mid_sweep_is_one_line_naming_it_without_its_password():
    import optuna

    from dlbase.search.study import StudyError, storage_errors
    url = "postgresql://me:secret@db.example/sweeps"
    with pytest.raises(StudyError) as e:
        with storage_errors(url):
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.\nmore lines")
    text = str(e.value)
    assert "postgresql://me:***@db.example/sweeps" in text and "secret" not in text and "rerun" in text
    assert "\n" not in text and e.value.exit_code == 2


def test_a_key_added_since_a_sweep_started_is_no_change_at_its_default():
    """A sweep folder written before model.conv and train.augment existed still resumes: its stored base config
    lacks them, and at their defaults they are what its trials did; set to something else, they are a change."""
    from dlbase.core.config import to_dict
    from dlbase.core.schema import Config
    from dlbase.search.spec import changed_keys
    now = to_dict(Config())
    old = {**now, "model": {k: v for k, v in now["model"].items() if k != "conv"},
           "train": {k: v for k, v in now["train"].items() if k != "augment"}}
    assert changed_keys(old, now) == []
    moved = {**now, "train": {**now["train"], "augment": {**now["train"]["augment"], "translate": 2}}}
    assert changed_keys(old, moved) == ["train.augment.translate: (absent) -> 2"]
    assert changed_keys(now, {**now, "seed": 3}) == ["seed: 0 -> 3"]
