"""dlbase runs: real runs that finished, stopped early, were preempted, diverged or are corrupt, listed with the
right status and only the hyperparameters that differ."""
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from conftest import StopAt
from dlbase.training import train as train_module
from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.errors import TrainingDiverged
from dlbase.training.evaluate import evaluate_checkpoint
from dlbase.tools.runs import STATUS_FILE, differing_keys
from dlbase.training.train import train

runner = CliRunner()


def quiet(line: str) -> None:
    pass


def listed(*args) -> dict:
    r = runner.invoke(app, ["runs", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return {d["name"]: d for d in map(json.loads, r.stdout.splitlines())}


def test_every_status_and_only_the_differing_hyperparameters(tiny_config, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    done = train(load_config(tiny_config, ["train.epochs=2"]), log=quiet)  # tiny
    evaluate_checkpoint(done.folder / "best.ckpt")
    early = train(load_config(tiny_config, ["name=early", "train.epochs=6", "train.early_stop.patience=1",
                                            "train.early_stop.min_delta=0.5"]), log=quiet)
    assert early.status == "early_stopped"
    monkeypatch.setattr(train_module, "Preemption", StopAt(13))
    stopped = train(load_config(tiny_config, ["name=stopped", "checkpoint.every_steps=4"]), log=quiet)
    monkeypatch.undo()
    assert stopped.status == "preempted"
    with pytest.raises(TrainingDiverged):
        train(load_config(tiny_config, ["name=nan", "optim.name=momentum", "optim.lr=1e6", "model.hidden=[64,64]"]),
              log=quiet)
    corrupt = root / "corrupt"
    shutil.copytree(done.folder, corrupt)
    for name in ("last.ckpt", "best.ckpt"):
        blob = (corrupt / name).read_bytes()
        (corrupt / name).write_bytes(blob[:len(blob) // 2])  # truncated
    half = root / "half"  # one checkpoint corrupt, the other whole: listed from the whole one, with a note
    shutil.copytree(done.folder, half)
    (half / "best.ckpt").write_bytes(b"not a checkpoint")

    runs = listed(root)
    assert set(runs) == {"tiny", "early", "stopped", "nan", "corrupt", "half"}
    assert runs["tiny"]["status"] == "finished" and runs["tiny"]["epochs"] == 2
    assert runs["tiny"]["test_accuracy"] == json.loads((done.folder / "eval.json").read_text())["best.ckpt"]["test"]["accuracy"]
    rows = (done.folder / "metrics.csv").read_text().splitlines()[1:]
    assert runs["tiny"]["best_val_accuracy"] == pytest.approx(max(float(r.split(",")[4]) for r in rows))
    assert runs["tiny"]["train_seconds"] == pytest.approx(sum(float(r.split(",")[7]) for r in rows), abs=1e-3)
    assert runs["early"]["status"] == "early-stopped" and runs["early"]["epochs"] == early.epochs_done < 6
    # train.py's status.json tells a preemption and a divergence from a kill -9 (unfinished)
    assert runs["stopped"]["status"] == "preempted"
    assert runs["nan"]["status"] == "diverged" and runs["nan"]["epochs"] is None
    assert runs["corrupt"]["status"] == "broken" and "not a readable checkpoint" in runs["corrupt"]["reason"]
    assert runs["half"]["status"] == "finished" and "best.ckpt" in runs["half"]["reason"]
    (stopped.folder / STATUS_FILE).unlink()  # without the marker: the same files as a kill -9 leaves
    assert listed(root)["stopped"]["status"] == "unfinished"
    # a marker of an earlier position is stale: the run went on after it
    (done.folder / STATUS_FILE).write_text(json.dumps({"status": "preempted", "step": 3}))
    assert listed(root)["tiny"]["status"] == "finished"
    # only what differs: these runs differ in the epochs, early stopping, optimiser and model
    keys = set(runs["tiny"]["hparams"])
    assert {"train.epochs", "train.early_stop.patience", "optim.name", "optim.lr", "model.hidden",
            "checkpoint.every_steps"} <= keys
    assert not keys & {"name", "checkpoint.dir", "data.root", "seed", "train.batch_size"}
    assert runs["stopped"]["hparams"]["checkpoint.every_steps"] == 4 and runs["tiny"]["hparams"]["optim.lr"] == 0.01
    assert runs["corrupt"]["hparams"] == {k: None for k in keys}

    r = runner.invoke(app, ["runs", str(root), "--sort", "epochs"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "status"] and "optim.lr" in lines[0] and "seed" not in lines[0]
    assert len(lines) == 7 and "broken" in next(line for line in lines if line.startswith("corrupt"))
    r = runner.invoke(app, ["runs", str(root), "--sort", "nope"])
    assert r.exit_code == 2 and "--sort" in r.stderr and "optim.lr" in r.stderr


def test_a_sweep_s_trials_are_runs_with_diverged_and_the_winner_s_test_accuracy(tmp_path, tiny_data):
    cfg = tmp_path / "plain.yaml"
    cfg.write_text(f"""
name: sw
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [16]}}
optim: {{lr: 0.05, name: sgd}}
train: {{epochs: 1, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--grid", "optim.weight_decay=[0.0,1e6]"])
    assert r.exit_code == 0, r.output
    sweep = tmp_path / "ckpt" / "sw_sweep"
    winner = json.loads((sweep / "winner.json").read_text())
    runs = listed(sweep)
    assert set(runs) == {"trial-000", "trial-001"}
    assert runs["trial-000"]["status"] == "finished" and runs["trial-001"]["status"] == "diverged"
    assert runs["trial-000"]["test_accuracy"] == winner["test_accuracy"] and runs["trial-001"]["test_accuracy"] is None
    assert runs["trial-000"]["hparams"] == {"optim.weight_decay": 0.0}
    assert set(listed(tmp_path / "ckpt")) == {"sw_sweep/trial-000", "sw_sweep/trial-001"}  # found from above too


def test_nothing_found_missing_folder_and_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["runs", str(tmp_path / "empty")])
    assert r.exit_code == 0 and r.stdout.strip() == f"no runs under {tmp_path / 'empty'}"
    for bad in (tmp_path / "missing", tmp_path / "file.txt"):
        if bad.name == "file.txt":
            bad.write_text("x")
        r = runner.invoke(app, ["runs", str(bad)])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_differing_keys_counts_an_absent_key_as_a_value():
    assert differing_keys([{"a": 1, "b": [1]}, {"a": 1, "b": [2], "c": None}, {"a": 1, "b": [1]}]) == ["b", "c"]
    assert differing_keys([{"name": "x", "checkpoint.dir": "p"}, {"name": "y", "checkpoint.dir": "q"}]) == []


def test_a_config_nested_5000_deep_is_one_broken_row_and_the_listing_goes_on(tmp_path):
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.yaml").write_text("name: ok\n")
    runs = listed(tmp_path)
    assert runs["deep"]["status"] == "broken" and "nested too deep" in runs["deep"]["reason"]
    assert runs["ok"]["status"] == "unfinished"


def test_a_finished_run_whose_checkpoints_were_deleted_is_broken(tiny_config, tmp_path):
    run = train(load_config(tiny_config), log=quiet)
    for name in ("last.ckpt", "best.ckpt"):
        (run.folder / name).unlink()
    row = listed(str(tmp_path / "ckpt"))["tiny"]
    assert row["status"] == "broken" and "neither last.ckpt nor best.ckpt" in row["reason"]


def test_json_is_json_with_a_hand_edited_nan_and_a_deep_folder_widens_no_row(tiny_config, tmp_path):
    run = train(load_config(tiny_config), log=quiet)
    (run.folder / "config.yaml").write_text((run.folder / "config.yaml").read_text())
    deep = tmp_path / "ckpt" / "/".join(f"d{i}" for i in range(200)) / "run"
    shutil.copytree(run.folder, deep)
    # a hand-edited .nan in the stored config's hyperparameters (a run killed before its first checkpoint reads it)
    for n in ("last.ckpt", "best.ckpt", STATUS_FILE):
        (deep / n).unlink()
    (deep / "config.yaml").write_text((deep / "config.yaml").read_text().replace("lr: 0.01", "lr: .nan"))
    r = CliRunner().invoke(app, ["runs", str(tmp_path / "ckpt"), "--json"])
    assert r.exit_code == 0, r.output

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    rows = [json.loads(line, parse_constant=refuse) for line in r.stdout.splitlines()]
    assert any(row["hparams"].get("optim.lr", "absent") is None for row in rows), rows
    r = CliRunner().invoke(app, ["runs", str(tmp_path / "ckpt")])
    assert r.exit_code == 0 and max(len(line) for line in r.stdout.splitlines()) < 200, r.stdout


def test_a_tree_2100_folders_deep_is_walked_and_the_runs_beside_it_are_listed(tmp_path):
    # Python 3.11's os.walk recursed: 1,000 levels raised RecursionError and the whole listing was lost. Past
    # PATH_MAX (4,096 bytes: about 2,000 levels of "d/") a folder's files cannot be named: passed over
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "config.yaml").write_text("name: beside\n")
    (tmp_path / "deep").mkdir()
    fd, depth = os.open(tmp_path / "deep", os.O_RDONLY), 0  # depth: the folder fd is open on
    try:
        while depth < 2100:  # by file descriptor: os.makedirs recurses too, and paths pass PATH_MAX
            os.mkdir("d", dir_fd=fd)
            fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            depth += 1
            if depth in (1500, 2100):
                os.close(os.open("config.yaml", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        runs = listed(tmp_path)
        assert set(runs) == {"beside", "deep/" + "/".join(["d"] * 1500)}
        assert {r["status"] for r in runs.values()} == {"unfinished"}
    finally:  # bottom up through "..": shutil.rmtree (pytest's clean-up of old tmp_paths) recurses as well
        for depth in range(depth, 0, -1):
            if depth in (1500, 2100):
                os.unlink("config.yaml", dir_fd=fd)
            fd, old = os.open("..", os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            os.rmdir("d", dir_fd=fd)
        os.close(fd)
