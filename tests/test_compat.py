"""Nothing a user relies on changes (issue 22): a single run's CPU trajectory is the stored one, bit for bit, and a
run folder written by the code of 2026-12-03 still loads, evaluates and resumes. The fixtures were written by
tests/fixtures/make_fixtures.py (which says how); they are the oracle, so they are never re-made to pass a test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dataset
from dlbase.training import checkpoint
from dlbase.cli import app
from dlbase.core.config import config_from_dict
from dlbase.training.train import train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
import sys  # noqa: E402
sys.path.insert(0, str(FIXTURES))
import make_fixtures as made  # noqa: E402

runner = CliRunner()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", n_train=made.N_TRAIN, n_test=made.N_TEST)


@pytest.mark.parametrize("case", list(made.CASES))
def test_a_single_run_s_cpu_trajectory_is_the_stored_one(tmp_path, data, case):
    """Same final weights and per-epoch losses as stored. Bit for bit where this CPU computes a float32 matmul and
    its backward to the same bits as the machine that stored them (the fingerprint); elsewhere to float noise."""
    stored = torch.load(FIXTURES / "trajectory" / f"{case}.pt", weights_only=True)
    now = made.trajectory(case, data, tmp_path / "out")
    exact = made.fingerprint() == stored["fingerprint"]
    assert now["weights"].keys() == stored["weights"].keys()
    for key, value in stored["weights"].items():
        if exact:
            assert torch.equal(now["weights"][key], value), (case, key, (now["weights"][key] - value).abs().max())
        else:  # another CPU's kernels round differently: the same run within float noise
            torch.testing.assert_close(now["weights"][key], value, atol=1e-4, rtol=1e-4)
    if exact:
        assert now["metrics"] == stored["metrics"]


def _old_run(tmp_path: Path) -> Path:
    run = tmp_path / "ckpt" / "run_v1"
    shutil.copytree(FIXTURES / "run_v1", run)
    return run


def test_an_old_checkpoint_still_evaluates_to_what_it_did(tmp_path, data):
    run = _old_run(tmp_path)
    expected = json.loads((run / "expected_eval.json").read_text())
    for split, want in expected.items():
        r = runner.invoke(app, ["eval", str(run / "best.ckpt"), "--split", split, "--data-root", str(data), "--json"])
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        assert got["n"] == want["n"] and got["accuracy"] == want["accuracy"], (split, got, want)
        assert abs(got["loss"] - want["loss"]) < 1e-6, (split, got["loss"], want["loss"])


def test_an_old_run_resumes_as_the_uninterrupted_run(tmp_path, data):
    """--resume the stored 2-epoch run to 3 epochs; oracle: the same config trained for 3 epochs in one go."""
    run = _old_run(tmp_path)
    r = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=3", "--set", f"data.root={data}",
                            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    assert r.exit_code == 0, r.output
    raw = made.case_config("whole", data, tmp_path / "whole")
    raw["model"]["hidden"], raw["train"]["epochs"] = [4], 3
    whole = train(config_from_dict(raw, "whole"), log=lambda line: None)
    resumed, uninterrupted = (checkpoint.load(f / "last.ckpt")["model"] for f in (run, whole.folder))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3"]
