"""dlbase sweep on Optuna: workers in parallel processes on one real database (SQLite, PostgreSQL), a killed
worker's trial retried, pruning after the first report, journal files, bad storages."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlbase.cli import app

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def base(tmp_path, tiny_data, epochs=2, hidden="[16]", extra=""):
    p = tmp_path / "base.yaml"
    p.write_text(f"""
name: base
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: {hidden}}}
optim: {{lr: 0.05}}
train: {{epochs: {epochs}, batch_size: 50, tensorboard: false}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
{extra}""")
    return p


def spec_file(tmp_path, **kw):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({"name": "st", **kw}))
    return p


def dlbase(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "dlbase", *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def load(url, name="st"):
    return optuna.load_study(study_name=name, storage=url)


def assert_exactly_once(study, n):
    """Every slot 0..n-1 has exactly one finished trial (COMPLETE or PRUNED), and nothing else is unfinished."""
    done = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    slots = sorted(t.user_attrs["dlbase.slot"] for t in done)
    assert slots == list(range(n)), slots  # no duplicate, no gap
    assert not [t for t in study.get_trials() if t.state in (TrialState.WAITING, TrialState.RUNNING)]


def test_two_worker_processes_take_every_trial_exactly_once(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data)
    spec = spec_file(tmp_path, method="random", trials=6, seed=3, pruner="none",
                     params={"optim.lr": {"distribution": "log_uniform", "low": 1e-3, "high": 0.1}})
    p = dlbase("sweep", "--config", cfg, "--sweep", spec, "--workers", 2)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    root = tmp_path / "ckpt" / "st"
    study = load(f"sqlite:///{root / 'study.db'}")
    assert_exactly_once(study, 6)
    assert "2 workers on the CPU" in out
    assert out.count("[worker 0] trial-") + out.count("[worker 1] trial-") == 6
    assert "[worker 0] trial-" in out and "[worker 1] trial-" in out  # both took trials
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert sorted(r["trial"] for r in rows) == [f"trial-{i:03d}" for i in range(6)]
    assert out.count("test accuracy, measured once") == 1  # the parent tests the winner; workers never do
    # the same draws as one worker would make: the random search is fixed when the study is created
    one = tmp_path / "one"
    one.mkdir()
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--set",
                            f"checkpoint.dir={one}"])
    assert r.exit_code == 0, r.output
    lrs = lambda folder: sorted(float(r["optim.lr"]) for r in csv.DictReader(open(folder / "results.csv")))
    assert lrs(root) == lrs(one / "st")


def test_a_killed_worker_s_trial_is_retried_and_the_study_completes(tmp_path, tiny_data):
    """kill -9 of a worker mid-trial: its trial stops beating, the other worker fails it after the grace period
    (3 beats), and retries it in the same run folder."""
    cfg = base(tmp_path, tiny_data, epochs=40, hidden="[256, 256]")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 0.02, 0.01]}, heartbeat=1, pruner="none")
    root = tmp_path / "ckpt" / "st"
    a = dlbase("sweep", "--config", cfg, "--sweep", spec, "--storage", url, "--set", "train.epochs=40")
    deadline = time.time() + 120
    while not (root / "trial-000" / "last.ckpt").exists():  # a took slot 0 and is mid-trial
        assert time.time() < deadline and a.poll() is None, a.communicate()
        time.sleep(0.05)
    b = dlbase("sweep", "--config", cfg, "--sweep", spec, "--storage", url, "--set", "train.epochs=40")
    time.sleep(1.0)
    a.send_signal(signal.SIGKILL)
    a.wait()
    out, err = b.communicate(timeout=600)
    assert b.returncode == 0, out + err
    study = load(url)
    assert_exactly_once(study, 3)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert [t.user_attrs["dlbase.slot"] for t in failed] == [0]  # a's trial, failed by b once stale
    retry = next(t for t in study.get_trials() if t.state == TrialState.COMPLETE and t.user_attrs["dlbase.slot"] == 0)
    assert retry.system_attrs["failed_trial"] == failed[0].number and retry.params == failed[0].params
    rows = list(csv.DictReader(open(root / "trial-000" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))  # resumed in its folder: every epoch once
    assert "test accuracy, measured once" in out


def test_a_hopeless_trial_is_pruned_after_its_first_report(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=4)
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 1e-7]}, pruner="median", prune_after=1)
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "st"
    rows = {r["trial"]: r for r in csv.DictReader(open(root / "results.csv"))}
    assert rows["trial-000"]["status"] == "finished" and rows["trial-000"]["epochs"] == "4"
    assert rows["trial-001"]["status"] == "pruned" and rows["trial-001"]["epochs"] == "1"
    assert rows["trial-001"]["rank"] == "2"
    kept = root / "trial-001"  # the pruned trial keeps its run folder: one epoch, its checkpoints, pruned
    assert len(list(csv.DictReader(open(kept / "metrics.csv")))) == 1 and (kept / "best.ckpt").exists()
    assert json.loads((kept / "status.json").read_text())["status"] == "pruned"
    t = load(f"sqlite:///{root / 'study.db'}").trials[1]
    assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [1]
    r = runner.invoke(app, ["runs", str(root)])
    assert r.exit_code == 0 and "pruned" in r.stdout


def test_with_cross_validation_a_bad_trial_stops_after_one_fold(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=2)
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 1e-7]}, cv_folds=3, pruner="median", prune_after=1)
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "st"
    assert sorted(p.name for p in (root / "trial-001").glob("fold-*")) == ["fold-1"]
    assert sorted(p.name for p in (root / "trial-000").glob("fold-*")) == ["fold-1", "fold-2", "fold-3"]
    rows = {r["trial"]: r for r in csv.DictReader(open(root / "results.csv"))}
    assert rows["trial-001"]["status"] == "pruned" and rows["trial-000"]["status"] == "finished"
    assert json.loads((root / "winner.json").read_text())["winner"]["trial"] == "trial-000"


def test_tpe_chooses_within_the_space_and_a_journal_file_holds_the_study(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=1)
    journal = tmp_path / "j" / "study.log"
    spec = spec_file(tmp_path, trials=5, seed=1, storage=str(journal), params={
        "optim.lr": {"distribution": "log_uniform", "low": 1e-3, "high": 0.1},
        "model.hidden": [[8], [16, 16]]})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    assert "sweep st: tpe, 5 trials, pruner median" in r.stdout
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    study = optuna.load_study(study_name="st", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert_exactly_once(study, 5)
    for t in study.trials:
        assert 1e-3 <= t.params["optim.lr"] <= 0.1 and t.params["model.hidden"] in ("[8]", "[16, 16]")
    cfg_of = lambda i: yaml.safe_load((tmp_path / "ckpt" / "st" / f"trial-{i:03d}" / "config.yaml").read_text())
    assert cfg_of(4)["model"]["hidden"] == json.loads(study.trials[4].params["model.hidden"])
    assert not (tmp_path / "ckpt" / "st" / "study.db").exists()


@pytest.mark.parametrize("storage,words", [
    ("nosuchdb://x/y", "cannot open the study's storage"),
    ("study.txt", "neither a database URL"),
    ("postgresql://nobody:secret@127.0.0.1:1/none", "cannot open the study's storage"),
    ("/proc/no/such/study.log", "cannot write the journal file"),
])
def test_a_bad_storage_is_one_line_and_trains_nothing(tmp_path, tiny_data, storage, words):
    cfg = base(tmp_path, tiny_data, epochs=1)
    spec = spec_file(tmp_path, params={"optim.lr": [0.05]})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage", storage])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert words in r.stderr and "secret" not in r.stderr
    assert not (tmp_path / "ckpt" / "st" / "trial-000").exists()


@pytest.mark.parametrize("made", ["empty", "by a sweep"])
def test_a_read_only_study_database_says_so(tmp_path, tiny_data, made):
    """Item 16: a study.db that cannot be written (here opened read-only by SQLite itself, which refuses as it
    refuses a file without write permission; the tests run as root, for whom chmod changes nothing) is reported
    in SQLite's words with what to check, not as Optuna's "invalid data in the commit"."""
    import sqlite3
    db = tmp_path / "made.db"
    cfg = base(tmp_path, tiny_data, epochs=1)
    spec = spec_file(tmp_path, params={"optim.lr": [0.05]})
    if made == "empty":
        sqlite3.connect(db).close()  # Optuna must write its tables into it
    else:  # a finished sweep's study: a rerun must still write (its heartbeat, the base record)
        done = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage", f"sqlite:///{db}"])
        assert done.exit_code == 0, done.output
        shutil.rmtree(tmp_path / "ckpt")
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage",
                            f"sqlite:///file:{db}?mode=ro&uri=true"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "readonly database" in r.stderr and "permissions" in r.stderr, r.stderr
    assert "invalid data" not in r.stderr
    assert not (tmp_path / "ckpt" / "st" / "trial-000").exists()


# ---------------------------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(cand)
    return None


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster in tmp_path (Debian's postgresql package), stopped afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # initdb refuses root: the cluster belongs to the postgres user, in a folder it can reach (pytest's tmp_path
    # sits under a folder only root may enter)
    data = Path(tempfile.mkdtemp(prefix="dlbase-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    made = subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_in_postgresql(tmp_path, tiny_data, postgres):
    cfg = base(tmp_path, tiny_data, epochs=1)
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 0.02, 0.01, 0.005]}, pruner="none")
    p = dlbase("sweep", "--config", cfg, "--sweep", spec, "--storage", postgres, "--workers", 2)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    study = load(postgres.replace("postgresql://", "postgresql+psycopg://"))
    assert_exactly_once(study, 4)
    assert study.user_attrs["dlbase.winner"]["test_accuracy"] == json.loads(
        (tmp_path / "ckpt" / "st" / "winner.json").read_text())["test_accuracy"]
    assert not (tmp_path / "ckpt" / "st" / "study.db").exists()


def test_sigterm_to_a_sweep_with_workers_saves_both_trials_and_a_rerun_finishes_them(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=30, hidden="[256, 256]")
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 0.02, 0.01]}, pruner="none")
    root = tmp_path / "ckpt" / "st"
    p = dlbase("sweep", "--config", cfg, "--sweep", spec, "--workers", 2)
    deadline = time.time() + 120
    while len(list(root.glob("trial-*/last.ckpt"))) < 2:  # both workers are mid-trial
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, out + err
    lines = err.strip().splitlines()  # a line from each worker, then the sweep's own
    assert sum("[worker" in line for line in lines) == 2 and "rerun the same command" in lines[-1], err
    study = load(f"sqlite:///{root / 'study.db'}")
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]  # nothing left for a heartbeat
    stopped = [t.user_attrs["dlbase.slot"] for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(stopped) == 2
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    assert_exactly_once(load(f"sqlite:///{root / 'study.db'}"), 3)
    for slot in stopped:  # each went on from its checkpoint: every epoch once
        rows = list(csv.DictReader(open(root / f"trial-{slot:03d}" / "metrics.csv")))
        assert [int(r["epoch"]) for r in rows] == list(range(1, 31))


def test_hyperband_runs_a_sweep_through(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=3)
    spec = spec_file(tmp_path, method="random", trials=4, pruner="hyperband",
                     params={"optim.lr": {"distribution": "log_uniform", "low": 1e-6, "high": 0.1}})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "ckpt" / "st" / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"finished", "pruned"}
    assert rows[0]["status"] == "finished"


def test_another_sweep_under_the_same_study_name_is_refused_and_a_second_machine_reads_the_result(tmp_path,
                                                                                                   tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=1)
    db = tmp_path / "shared.db"  # a path ending in .db is an SQLite file
    spec = spec_file(tmp_path, params={"optim.lr": [0.05, 0.02]})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage", str(db)])
    assert r.exit_code == 0, r.output
    winner = json.loads((tmp_path / "ckpt" / "st" / "winner.json").read_text())
    # another machine: its own checkpoint.dir, the same study; it trains nothing and reads the one test result
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage", str(db),
                            "--set", f"checkpoint.dir={tmp_path / 'other'}"])
    assert r.exit_code == 0 and "2 done" in r.output and "trial-000:" not in r.output, r.output
    assert json.loads((tmp_path / "other" / "st" / "winner.json").read_text()) == winner
    assert not (tmp_path / "other" / "st" / "trial-000").exists()
    # another space under the same name: refused, naming what differs
    spec_file(tmp_path, params={"optim.lr": [0.05, 0.01]})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--storage", str(db),
                            "--set", f"checkpoint.dir={tmp_path / 'third'}"])
    assert r.exit_code == 2 and "made by another sweep" in r.stderr and "0.02" in r.stderr, r.output


# ---------------------------------------------------------------------------------------------- populations
def losses_of(root, trial):
    return [float(r["train_loss"]) for r in csv.DictReader(open(root / trial / "metrics.csv"))]


@pytest.mark.parametrize("cv", [None, 2])
def test_trials_trained_as_populations_equal_trials_trained_alone(tmp_path, tiny_data, cv):
    """The same grid with population: 1 and population: 4 (grouped by shape: two populations of two): every
    trial's score and per-epoch training losses agree to 1e-5 (fp32, CPU, no dropout), folds as members too."""
    cfg = base(tmp_path, tiny_data, epochs=2)
    extra = {"cv_folds": cv} if cv else {}
    for population in (1, 4):
        spec = spec_file(tmp_path, name=f"pop{population}", population=population, pruner="none",
                         params={"optim.lr": [0.05, 0.01], "model.hidden": [[16], [8]]}, **extra)
        r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec), "--set", "data.subset=400"])
        assert r.exit_code == 0, r.output
    one, four = tmp_path / "ckpt" / "pop1", tmp_path / "ckpt" / "pop4"
    rows = lambda root: {r["trial"]: r for r in csv.DictReader(open(root / "results.csv"))}
    a, b = rows(one), rows(four)
    assert sorted(a) == sorted(b) == [f"trial-{i:03d}" for i in range(4)]
    for t in a:
        assert float(a[t]["score"]) == pytest.approx(float(b[t]["score"]), abs=1e-5)
        runs = [f"{t}/fold-{f}" for f in range(1, cv + 1)] if cv else [t]
        for run in runs:
            assert losses_of(one, run) == pytest.approx(losses_of(four, run), abs=1e-5)
    assert json.loads((one / "winner.json").read_text())["test_accuracy"] == pytest.approx(
        json.loads((four / "winner.json").read_text())["test_accuracy"], abs=1e-6)


def test_a_population_prunes_its_hopeless_member_and_the_others_go_on(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=3)
    spec = spec_file(tmp_path, population=2, pruner="median", prune_after=2,
                     params={"optim.lr": [0.05, 0.02, 1e-7, 0.03]})
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    rows = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "ckpt" / "st" / "results.csv"))}
    assert (rows["trial-002"]["status"], rows["trial-002"]["epochs"]) == ("pruned", "1")
    assert (rows["trial-003"]["status"], rows["trial-003"]["epochs"]) == ("finished", "3")
    assert len(losses_of(tmp_path / "ckpt" / "st", "trial-003")) == 3


def test_a_signal_during_a_population_saves_every_trial_and_a_rerun_goes_on(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, epochs=30, hidden="[256, 256]")
    spec = spec_file(tmp_path, population=3, pruner="none", params={"optim.lr": [0.05, 0.02, 0.01]})
    root = tmp_path / "ckpt" / "st"
    p = dlbase("sweep", "--config", cfg, "--sweep", spec)
    deadline = time.time() + 120
    while len(list(root.glob("trial-*/last.ckpt"))) < 3:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "every member is saved" in err, out + err
    r = runner.invoke(app, ["sweep", "--config", str(cfg), "--sweep", str(spec)])
    assert r.exit_code == 0, r.output
    assert_exactly_once(load(f"sqlite:///{root / 'study.db'}"), 3)
    for t in range(3):  # each went on from its member's checkpoint: every epoch once
        assert len(losses_of(root, f"trial-{t:03d}")) == 30
