"""Issue 17, second pass of "nothing lost": each way a user could lose work or see a traceback, tried for real.
The oracle is the file on disk before and after, an uninterrupted run, or the one-line error contract."""
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dlbase.training import checkpoint
from dlbase.core import rundir
from dlbase.core.config import load_config
from dlbase.core.errors import CheckpointError, DlbaseError
from dlbase.training.state import load_for_eval
from dlbase.training.state import configure
from dlbase.training.train import train

REPO = Path(__file__).resolve().parents[1]


def quiet(line):
    pass


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "dlbase", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def one_line_error(r, code=2):
    lines = r.stderr.strip().splitlines()
    return r.returncode == code and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ---------------------------------------------------------------------------------------------- work destroyed


def test_resuming_an_older_checkpoint_branches_and_keeps_the_later_history(tiny_config, tmp_path):
    """Item 2: best.ckpt (epoch 1) is older than last.ckpt (epoch 2): resuming from it goes to a new folder."""
    # min_delta so large that only the first epoch counts as an improvement: best = epoch 1, last = epoch 2
    cfg = load_config(tiny_config, ["train.epochs=2", "train.early_stop.min_delta=1000"])
    first = train(cfg, log=quiet)
    folder = first.folder
    best, last = checkpoint.load(folder / "best.ckpt"), checkpoint.load(folder / "last.ckpt")
    assert (best["epoch"], last["epoch"]) == (1, 2)
    before = snapshot(folder)
    logs = []
    run = configure(None, ["train.epochs=2"], folder / "best.ckpt", log=logs.append)
    result = train(run.cfg, resume=run.resume, resume_payload=run.payload, log=logs.append)
    assert result.folder != folder and result.folder.name.startswith(folder.name + "-")
    assert any("branching" in line for line in logs)
    after = snapshot(folder)
    assert after == before  # last.ckpt, metrics.csv, config.yaml of the original run: byte for byte
    assert (result.folder / "last.ckpt").exists()


def test_run_folder_is_claimed_atomically_by_concurrent_runs(tmp_path):
    """Item 3: two runs started together never share a folder."""
    got, errors = [], []

    def claim():
        try:
            got.append(rundir.new_run_dir(tmp_path, "race"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 16 and len(set(got)) == 16


def test_two_processes_started_together_get_two_folders(tiny_config, tmp_path):
    ckpt = tmp_path / "ck"
    cmd = [sys.executable, "-m", "dlbase", "train", "--config", str(tiny_config), "--set", "name=race",
           "--set", f"checkpoint.dir={ckpt}", "--set", "train.epochs=1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(p.name for p in ckpt.iterdir()) == ["race", "race-2"]
    for folder in ckpt.iterdir():
        rows = (folder / "metrics.csv").read_text().splitlines()
        assert len(rows) == 2  # header + its own one epoch: nobody else's rows


def test_a_folder_with_any_run_file_is_taken(tiny_config, tmp_path):
    """Item 3: a folder whose checkpoints were deleted but whose metrics.csv and config.yaml remain is a run's."""
    first = train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    for p in first.folder.glob("*.ckpt"):
        p.unlink()
    (first.folder / rundir.CLAIM).unlink()
    before = snapshot(first.folder)
    second = train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    assert second.folder != first.folder and snapshot(first.folder) == before


# ---------------------------------------------------------------------------------------------- crashes


def test_batch_norm_with_a_last_batch_of_one_trains_and_saves(tiny_config, tmp_path):
    """Item 6: 500 training samples at batch 499 leave a last batch of 1, which batch norm cannot take."""
    logs = []
    result = train(load_config(tiny_config, ["model.norm=batch", "train.batch_size=499", "train.epochs=2"]),
                   log=logs.append)
    assert result.status == "finished" and (result.folder / "last.ckpt").exists()
    assert checkpoint.load(result.folder / "last.ckpt")["step"] == 2  # one whole batch an epoch
    assert any("batch norm" in line for line in logs)


def test_resume_with_another_optimiser_starts_it_fresh_and_writes_nothing_before(tiny_config, tmp_path):
    """Item 7: adam -> rmsprop/adagrad/adadelta on resume: the new optimiser starts from the saved weights."""
    first = train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    for name in ("rmsprop", "adagrad", "adadelta"):
        folder = tmp_path / name
        shutil.copytree(first.folder, folder)
        logs = []
        run = configure(None, [f"optim.name={name}", "train.epochs=2"], folder, log=logs.append)
        result = train(run.cfg, resume=run.resume, resume_payload=run.payload, log=logs.append)
        assert result.folder == folder and result.epochs_done == 2
        assert any("starts fresh" in line for line in logs), logs
        assert "name: " + name in (folder / "config.yaml").read_text()


def test_epoch_lines_after_a_batch_size_change_count_epochs(tiny_config, tmp_path):
    """Item 10: 3 epochs at batch 100, then epochs=5 at batch 50: epochs 4/5 and 5/5, all whole."""
    first = train(load_config(tiny_config, ["train.epochs=3", "train.batch_size=100"]), log=quiet)
    logs = []
    run = configure(None, ["train.epochs=5", "train.batch_size=50"], first.folder, log=logs.append)
    result = train(run.cfg, resume=run.resume, resume_payload=run.payload, log=logs.append)
    epoch_lines = [line.split()[1] for line in logs if line.startswith("epoch ")]
    assert epoch_lines == ["4/5", "5/5"]
    assert checkpoint.load(result.folder / "last.ckpt")["step"] == 5 * 10  # 500 samples at 50: 10 steps an epoch
    assert [int(r["epoch"]) for r in rundir.read_metrics(result.folder / "metrics.csv")] == [1, 2, 3, 4, 5]


def test_a_max_steps_run_is_told_how_to_go_on(tiny_config, tmp_path):
    """Item 11: the message names the key that actually stops the run."""
    first = train(load_config(tiny_config, ["train.max_steps=15"]), log=quiet)
    logs = []
    run = configure(None, ["train.epochs=50"], first.folder, log=logs.append)
    train(run.cfg, resume=run.resume, resume_payload=run.payload, log=logs.append)
    said = " ".join(logs)
    assert "nothing to do" in said and "train.max_steps" in said
    run = configure(None, ["train.max_steps=null", "train.epochs=3"], first.folder, log=quiet)
    result = train(run.cfg, resume=run.resume, resume_payload=run.payload, log=quiet)
    assert checkpoint.load(result.folder / "last.ckpt")["step"] == 30


def test_a_moved_checkpoint_does_not_point_at_a_best_ckpt_that_is_not_there(tiny_config, tmp_path):
    """Item 12."""
    first = train(load_config(tiny_config, ["train.epochs=2", "train.early_stop.metric=train_loss"]), log=quiet)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(first.folder / "last.ckpt", moved / "last.ckpt")
    logs = []
    run = configure(None, ["train.epochs=3", "train.early_stop.min_delta=1000"], moved / "last.ckpt",
                    log=logs.append)
    train(run.cfg, resume=run.resume, resume_payload=run.payload, log=logs.append)
    assert not (moved / "best.ckpt").exists()
    hint = next(line for line in logs if line.startswith("test it:"))
    assert str(moved / "last.ckpt") in hint and "best.ckpt" not in hint


def test_printed_commands_quote_paths_with_spaces(tiny_config, tmp_path):
    """Item 15: the eval command printed at the end works when pasted."""
    ckpt_dir = tmp_path / "my runs"
    r = cli("train", "--config", tiny_config, "--set", f"checkpoint.dir={ckpt_dir}", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    hint = next(line for line in r.stdout.splitlines() if line.startswith("test it:"))
    command = hint.split(":", 1)[1].strip()
    e = subprocess.run(command + " --json", shell=True, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert e.returncode == 0, (command, e.stderr)


def test_plot_and_report_write_failures_are_one_line(tiny_config, tmp_path):
    """Item 8: plotting into a folder that cannot take the file, and eval --report into a file."""
    result = train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    (result.folder / "curves.png").unlink()
    (result.folder / "curves.png").mkdir()  # the plot cannot replace a folder
    before = snapshot(result.folder)
    r = cli("plot", result.folder)
    assert one_line_error(r) and "curves.png" in r.stderr, r.stderr
    assert snapshot(result.folder) == before
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    r = cli("eval", result.folder / "best.ckpt", "--report", blocker)
    assert one_line_error(r), r.stderr
    assert blocker.read_text() == "keep me"


def test_plot_of_a_metrics_file_without_epochs_is_one_line(tmp_path):
    """Item 16."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\nfoo,bar,baz\n")
    r = cli("plot", tmp_path)
    assert one_line_error(r) and "no rows with a whole-number epoch" in r.stderr


@pytest.mark.parametrize("args", [["train", "--confg", "x.yaml"], ["eval"], ["nosuchcommand"],
                                  ["gradcheck", "--config", "configs/mnist_mlp.yaml", "--batch", "0"],
                                  ["gradcheck", "--config", "configs/mnist_mlp.yaml", "--tol", "-1"],
                                  ["gradcheck", "--config", "configs/mnist_mlp.yaml", "--tol", "nan"],
                                  ["lr-find", "--config", "configs/mnist_mlp.yaml", "--steps", "1"],
                                  ["lr-find", "--config", "configs/mnist_mlp.yaml", "--population", "1"],
                                  ["optimizers", "--function", "nope"], ["optimizers", "--steps", "abc"]])
def test_command_line_mistakes_are_one_line(args):
    """Item 16: Typer's box becomes the one line the README promises."""
    r = cli(*args)
    assert one_line_error(r), r.stderr


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def good_payload(tmp_path_factory):
    from conftest import make_dataset
    tmp = tmp_path_factory.mktemp("good")
    data = make_dataset(tmp / "data", 300, 100)
    cfg = load_config(None, ["device=cpu", f"data.root={data}", "data.download=false", "data.val_size=50",
                             "model.hidden=[16]", "train.epochs=1", "train.batch_size=50",
                             f"checkpoint.dir={tmp / 'ck'}", "checkpoint.every_steps=2"])
    result = train(cfg, log=quiet)
    return checkpoint.load(result.folder / "last.ckpt")


@pytest.mark.parametrize("edit, says", [
    (lambda p: p.pop("optimizer"), "missing optimizer"),
    (lambda p: p.pop("rng"), "missing rng"),
    (lambda p: p.pop("best"), "missing best"),
    (lambda p: p.update(step=2.5), "step 2.5 is not an integer"),
    (lambda p: p.update(steps_per_epoch="5"), "steps_per_epoch"),
    (lambda p: p.update(epoch=-1), "epoch -1"),
    (lambda p: p.update(in_epoch={"batch": 2}), "in_epoch"),
    (lambda p: p.update(input_shape=[100000, 100000]), "over"),
])
def test_incomplete_or_edited_checkpoints_are_one_line(good_payload, tmp_path, edit, says):
    """Item 9: checked once, on load, before anything allocates or trains."""
    payload = {k: v for k, v in good_payload.items()}
    edit(payload)
    p = tmp_path / "edited.ckpt"
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match=says):
        checkpoint.load(p)
    r = cli("eval", p)
    assert one_line_error(r), r.stderr


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
                       | st.builds(lambda n: torch.zeros(n), st.integers(0, 4)),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(checkpoint.Payload.__required_keys__ | {"in_epoch"})), value=_values)
def test_fuzzed_checkpoint_fields_load_or_refuse_in_one_line(good_payload, tmp_path, key, value):
    """Random structures and values in a valid torch file: a usable checkpoint or one CheckpointError/DlbaseError,
    never another exception (what the CLI would show as a traceback)."""
    payload = {k: v for k, v in good_payload.items()}
    payload[key] = value
    p = tmp_path / "fuzz.ckpt"
    torch.save(payload, p)
    try:
        load_for_eval(p, torch.device("cpu"))
    except DlbaseError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def precious(tmp_path_factory, good_payload):
    """A folder of files a user would hate to lose: a checkpoint, a config, a text file, an image."""
    folder = tmp_path_factory.mktemp("precious")
    torch.save(good_payload, folder / "run.ckpt")
    (folder / "cfg.yaml").write_text("name: x\ntrain: {epochs: 0}\n")
    (folder / "notes.txt").write_text("keep\n")
    (folder / "bad.yaml").write_text("model: {hidden: [}\n")
    return folder


def _argv(precious: Path):
    paths = st.sampled_from([str(precious / n) for n in ("run.ckpt", "cfg.yaml", "notes.txt", "bad.yaml", "nope",
                                                          "")] + [str(precious), "-", "--"])
    words = st.sampled_from(["--config", "-c", "--set", "--resume", "--json", "--split", "--format", "--out",
                             "--batch", "--tol", "--grid", "--sweep", "--report", "--data-root", "--force",
                             "train.epochs=abc", "optim.lr=-1", "model.hidden=[0]", "x=1", "test", "val", "onnx",
                             "torchscript", "0", "-1", "nan", "1e309", "\x00", "é", "--help"])
    commands = st.sampled_from([["train"], ["eval"], ["export"], ["predict"], ["plot"], ["sweep"], ["gradcheck"],
                                ["config", "show"], ["config", "validate"], ["config", "schema"], ["runs"], ["config"],
                                ["recipes"], ["recipes", "copy"],
                                ["nosuch"], []])
    return st.tuples(commands, st.lists(st.one_of(paths, words), max_size=6)).map(lambda t: [*t[0], *t[1]])


def test_fuzzed_command_lines_end_in_success_or_one_line(precious):
    """Random command lines over real files: exit 0 (or 1 for gradcheck's verdict), or one line on stderr and
    exit 2 — never a traceback, never a changed file that existed before."""
    import contextlib
    import io

    from dlbase.cli import main
    before = snapshot(precious)

    @settings(max_examples=150, deadline=None)
    @given(argv=_argv(precious))
    def check(argv):
        err, out = io.StringIO(), io.StringIO()
        old = sys.argv
        sys.argv = ["dlbase", *argv]
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    main(fast_exit=False)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            sys.argv = old
        text = err.getvalue()
        assert "Traceback" not in text, (argv, text)
        if code not in (0, 1) and not (argv in ([], ["config"]) or "--help" in argv):
            lines = text.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, code, text)
        assert {k: v for k, v in snapshot(precious).items() if k in before} == before, argv
    check()


def test_ctrl_c_during_start_up_leaves_no_empty_folder_and_claims_no_checkpoint(tiny_config, tmp_path, monkeypatch):
    """Item 15: interrupted while the engine is being built (after the folder was claimed)."""
    import dlbase.training.train as T

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "Engine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    monkeypatch.undo()
    r = cli("train", "--config", tiny_config, "--set", "train.epochs=1")  # and the next run takes the name
    assert r.returncode == 0 and (tmp_path / "ckpt" / "tiny" / "last.ckpt").exists()
