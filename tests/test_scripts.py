"""Every script in scripts/ runs here on a tiny setting (600 synthetic training images, one epoch, the CPU) as a
user runs it, a subprocess from the repo root, and its test fails when it fails (STYLE habit 13).

Each test points DLBASE_DATA at conftest's tiny IDX files, sends every output into tmp_path and checks that the
repo's docs/ and checkpoints/ are left as they were.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# one epoch on 300 of the 600 tiny training images, 100 for validation, no network
TINY_SETS = ["--set", "device=cpu", "--set", "data.subset=300", "--set", "data.val_size=100",
             "--set", "train.epochs=1", "--set", "data.download=false"]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("mnist_*.yaml"))  # what results.py runs by default


def run(args: list[str], data: Path, tmp_path: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a script from the repo root on the tiny data; temporary folders land in tmp_path too."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "DLBASE_DATA": str(data), "TMPDIR": str(tmp_path),
                "PYTHONUNBUFFERED": "1",
                # device_check.sh calls `python3`: make that this interpreter
                "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""), **env}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def script(name: str, *args: object) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name), *map(str, args)]


def said(r: subprocess.CompletedProcess) -> str:
    """What the script printed, for assertion messages."""
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _snapshot() -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in ("docs", "checkpoints") if (REPO / d).is_dir()
            for p in (REPO / d).rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def repo_outputs_untouched():
    """No script under test writes into the repo's docs/ or checkpoints/ (their defaults do)."""
    before = _snapshot()
    yield
    assert _snapshot() == before, "a script wrote into the repo's docs/ or checkpoints/"


# ----------------------------------------------------------------------------- bench.py


def test_bench_tiny_every_way_asked_has_a_row(tiny_data, tmp_path):
    # every CPU default way but dlbase_compile (torch.compile: ~25 s here); lightning only when installed
    ways = ["dataloader_w0", "dataloader_w4", "lightning", "dlbase_eager"]
    out = tmp_path / "bench.json"
    r = run(script("bench.py", "--device", "cpu", "--samples", 300, "--warmup", 0, "--epochs", 1,
                   "--json", out, "--ways", *ways), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    result = json.loads(out.read_text())
    expected = [w for w in ways if w != "lightning" or importlib.util.find_spec("lightning")]
    assert [row["way"] for row in result["rows"]] == expected, said(r)
    assert result["failed"] == []
    assert "300 samples/epoch" in result["header"]
    for row in result["rows"]:
        assert row["s_per_epoch"] > 0 and row["samples_per_s"] > 0 and row["epochs_timed"] == 1
        assert row["peak_mib"] is None  # no GPU memory on the CPU
        assert f"| {row['way']} | " in r.stdout  # the markdown table has its line


def test_bench_exits_nonzero_when_a_way_fails(tiny_data, tmp_path):
    # CUDA graphs cannot run on the CPU: that way fails, the others' numbers still come out, the exit says so
    out = tmp_path / "bench.json"
    r = run(script("bench.py", "--device", "cpu", "--samples", 300, "--warmup", 0, "--epochs", 1,
                   "--json", out, "--ways", "dlbase_eager", "dlbase_graph_fp32"), tiny_data, tmp_path)
    assert r.returncode == 1, said(r)
    result = json.loads(out.read_text())
    assert [row["way"] for row in result["rows"]] == ["dlbase_eager"]
    assert result["failed"] == ["dlbase_graph_fp32"]
    assert "dlbase_graph_fp32: FAILED (RuntimeError: train.compile: graph captures CUDA graphs" in r.stdout
    assert "bench: 1 way(s) FAILED: dlbase_graph_fp32" in r.stderr


def test_bench_refuses_an_unknown_way_before_running_any(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    r = run(script("bench.py", "--device", "cpu", "--samples", 300, "--json", out,
                   "--ways", "dlbase_eager", "dlbase_eagre"), tiny_data, tmp_path)
    assert r.returncode == 2, said(r)
    assert "unknown way(s) dlbase_eagre" in r.stderr and "dlbase_eager" in r.stderr
    assert "s/epoch" not in r.stdout and not out.exists()


def test_bench_cnn_tiny_runs_the_examples_net_and_dlbase_s(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    r = run(script("bench.py", "--device", "cpu", "--model", "cnn", "--samples", 128, "--warmup", 0, "--epochs", 1,
                   "--json", out, "--ways", "dataloader_w0", "dlbase_eager"), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    result = json.loads(out.read_text())
    assert result["model"] == "cnn" and result["failed"] == []
    assert [row["way"] for row in result["rows"]] == ["dataloader_w0", "dlbase_eager"]
    assert "pytorch/examples' CNN" in result["header"] and "batch 64, 128 samples/epoch" in result["header"]
    for row in result["rows"]:
        assert row["s_per_epoch"] > 0 and row["epochs_timed"] == 1 and row["vs_dataloader_w0"] > 0
        assert f"| {row['way']} | " in r.stdout


def test_bench_s_cnn_config_is_pytorch_examples_net(monkeypatch):
    """The oracle of "the same net": configs/mnist_cnn.yaml built by dlbase, given the examples' Net's weights
    and their Normalize's mean and std, computes the Net's log-probabilities."""
    import torch
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    from dlbase.core.config import load_config
    from dlbase.core.model import build_model

    torch.manual_seed(0)
    theirs = bench.ExamplesNet().eval()
    ours = build_model(load_config(bench.MODELS["cnn"].config), (28, 28), torch.device("cpu")).eval()
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    with torch.no_grad():
        for mine, their in zip(ours.parameters(), theirs.parameters()):
            mine.copy_(their)
        ours.encoding.mean.fill_(0.1307)
        ours.encoding.std.fill_(0.3081)
        x = torch.rand(4, 784)
        expected = theirs((x.view(4, 1, 28, 28) - 0.1307) / 0.3081)
        assert torch.allclose(ours(x).log_softmax(-1), expected, atol=1e-5)


# ----------------------------------------------------------------------------- speedrun.py


def test_speedrun_tiny_one_row_per_seed(tiny_data, tmp_path):
    out = tmp_path / "speedrun.json"
    r = run(script("speedrun.py", "--seeds", 2, *TINY_SETS, "--json", out), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    result = json.loads(out.read_text())
    assert [row["seed"] for row in result["rows"]] == [0, 1] and result["seeds"] == 2
    for row in result["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["epochs"] == 1 and row["best_epoch"] == 1
        assert 0 < row["train_seconds"] < row["command_seconds"]
        assert row["phases"]["total"] > 0 and "compile none" in row["plan"]
    assert 0.0 <= result["test_accuracy_mean"] <= 1.0
    assert "over 2 seeds" in r.stdout


def test_speedrun_exits_nonzero_when_training_fails(tiny_data, tmp_path):
    r = run(script("speedrun.py", "--seeds", 1, *TINY_SETS, "--set", "train.epochs=0"), tiny_data, tmp_path)
    assert r.returncode != 0, said(r)
    assert "seed 0: dlbase train failed" in r.stderr and "train.epochs" in r.stderr


# ----------------------------------------------------------------------------- results.py


def test_results_tiny_one_row_per_config(tiny_data, tmp_path):
    out, rows_json = tmp_path / "RESULTS.md", tmp_path / "results.json"
    r = run(script("results.py", *TINY_SETS, "--out", out, "--json", rows_json), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    table = [line for line in out.read_text().splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == [f"{c}.yaml" for c in CONFIGS]
    rows = json.loads(rows_json.read_text())
    assert [row["config"] for row in rows] == [f"{c}.yaml" for c in CONFIGS]
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["epochs"] == 1 and row["device"] == "cpu"


def test_results_refuses_an_unknown_config_name(tiny_data, tmp_path):
    out = tmp_path / "RESULTS.md"
    r = run(script("results.py", "--only", "mnist_mlp", "mnist_mpl", "--out", out), tiny_data, tmp_path)
    assert r.returncode == 2, said(r)
    assert "no config mnist_mpl" in r.stderr and "mnist_mlp" in r.stderr
    assert not out.exists()


def test_results_stamps_only_the_recipes_as_written(tiny_data, tmp_path):
    # --stamp writes each figure into its recipe (`dlbase recipes` shows it): a run with other settings may not
    before = {p: p.read_bytes() for p in (REPO / "configs").glob("*.yaml")}
    r = run(script("results.py", "--stamp", *TINY_SETS, "--out", tmp_path / "RESULTS.md"), tiny_data, tmp_path)
    assert r.returncode == 2, said(r)
    assert "--stamp writes the figure into the recipe itself" in r.stderr and "device=" in r.stderr
    assert {p: p.read_bytes() for p in (REPO / "configs").glob("*.yaml")} == before


# ----------------------------------------------------------------------------- pictures.py


def test_pictures_tiny_writes_pngs_that_open(tiny_data, tmp_path):
    from PIL import Image
    out = tmp_path / "pics"
    r = run(script("pictures.py", "--out", out, "--lab-samples", "40", "--lab-probes", "2", *TINY_SETS), tiny_data,
            tmp_path)
    assert r.returncode == 0, said(r)
    names = {"curves.png", "confusion.png", "mistakes.png", "filters.png", "gradnorms_deep_sigmoid.png",
             "gradnorms_deep_relu.png", "landscape.png", "landscape_line.png", "hessian.png"}
    assert {p.name for p in out.glob("*.png")} == names, said(r)
    for name in names:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.verify()
    assert r.stdout.rstrip().endswith("wrote " + ", ".join(sorted(names)))


# ----------------------------------------------------------------------------- device_check.sh


def test_device_check_tiny_passes_every_step(tiny_data, tmp_path):
    out = tmp_path / "out"
    r = run(["bash", "scripts/device_check.sh"], tiny_data, tmp_path, DEVICE_CHECK_TINY="1", OUT=str(out))
    assert r.returncode == 0, said(r)
    assert r.stdout.rstrip().splitlines()[-1] == "device_check: all steps passed"
    assert "FAILED" not in r.stdout
    for step in ("CUDA tests", "speedrun", "bench 128", "bench cnn", "import profile", "command profile"):
        assert f"== {step}\n" in r.stdout
    assert len(json.loads((out / "speedrun.json").read_text())["rows"]) == 1
    for name in ("bench128.json", "bench_cnn.json"):
        assert [row["way"] for row in json.loads((out / name).read_text())["rows"]] == ["dataloader_w0", "dlbase_eager"]
    assert (out / "train.prof").stat().st_size > 0 and "cumulative" in (out / "train_profile.txt").read_text()
    assert (out / "log.txt").read_text().rstrip().endswith("device_check: all steps passed")


def test_device_check_stops_at_the_first_failing_step(tmp_path):
    # no MNIST anywhere it looks (an empty DLBASE_DATA, an empty user cache): the speedrun's training fails
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    r = run(["bash", "scripts/device_check.sh"], empty, tmp_path, DEVICE_CHECK_TINY="1", OUT=str(out),
            XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert r.returncode == 1, said(r)
    failures = [line for line in r.stdout.splitlines() if line.startswith("device_check: FAILED")]
    assert failures == ["device_check: FAILED at 'speedrun' (exit 1)"], said(r)
    assert r.stdout.rstrip().splitlines()[-1] == failures[0]  # nothing ran after it
    assert "== bench" not in r.stdout and "all steps passed" not in r.stdout
    assert (out / "log.txt").read_text().rstrip().endswith(failures[0])


# ----------------------------------------------------------------------------- sweep_compare.py


def test_sweep_compare_tiny_runs_both_ways_and_the_workers(tiny_data, tmp_path):
    out = tmp_path / "compare.json"
    r = run(script("sweep_compare.py", "--trials", 3, "--seeds", 1, "--hidden", "[[8], [16]]", "--workers", 2,
                   "--population", 3, *TINY_SETS, "--json", out), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    result = json.loads(out.read_text())
    assert [(row["way"], row["trials"]) for row in result["rows"]] == [("random", 3), ("tpe+median", 3)]
    for row in result["rows"]:
        assert 0.0 <= row["best_val"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0 and row["seconds"] > 0
    assert result["workers"]["workers"] == 2 and result["workers"]["speedup"] > 0
    # the same random trials with 1 or 2 workers (threads differ: float sums may, barely)
    assert abs(result["workers"]["best_val"] - result["rows"][0]["best_val"]) <= 0.02
    assert "| tpe+median |" in r.stdout
    assert result["population"]["population"] == 3  # the same trials trained as populations: the same scores
    assert abs(result["population"]["best_val"] - result["rows"][0]["best_val"]) <= 0.02  # equal to 1e-5 in fp32


def test_sweep_compare_tiny_runs_pbt_and_halving_at_the_same_budget(tiny_data, tmp_path):
    out = tmp_path / "compare.json"
    r = run(script("sweep_compare.py", "--ways", "random,pbt,halving", "--trials", 3, "--epochs", 2, "--seeds", 1,
                   "--hidden", "[[8], [16]]", *TINY_SETS, "--json", out), tiny_data, tmp_path)
    assert r.returncode == 0, said(r)
    result = json.loads(out.read_text())
    got = {row["way"]: row for row in result["rows"]}
    # 6 member-epochs each: random 3 x 2, pbt 3 members x 2, halving 5 members (5, then 1 after the first rung)
    assert {w: (row["trials"], row["epochs"]) for w, row in got.items()} == {
        "random": (3, 6), "pbt": (3, 6), "halving": (5, 6)}
    assert got["halving"]["pruned"] == 4 and "| pbt | 3 |" in r.stdout
    for row in result["rows"]:
        assert 0.0 <= row["best_val"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0


def test_sweep_compare_stops_when_a_sweep_fails(tiny_data, tmp_path):
    r = run(script("sweep_compare.py", "--trials", 2, "--seeds", 1, *TINY_SETS, "--set", "train.epochs=0"),
            tiny_data, tmp_path)
    assert r.returncode != 0 and "dlbase sweep failed" in r.stderr, said(r)
