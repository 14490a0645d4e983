"""The Hessian's spectrum (dlbase/core/curvature.py, dlbase/tools/hessian.py, train.hessian_every) against its
oracles: the exact Hessian of a small network (torch.autograd.functional.hessian) and its eigenvalues
(torch.linalg.eigvalsh), the exact trace, Gauss quadrature's exactness on polynomials, and a run that does not
measure its curvature."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.curvature import (HessianOperator, epoch_curvature, extreme_eigenvalues, hutchinson_trace,
                                   lanczos, slq_density, smoothed_density)
from dlbase.training import checkpoint
from dlbase.training.train import train

from conftest import make_dataset


def ce(logits, y):
    return F.cross_entropy(logits, y)


def small(norm: str = "none", dropout: float = 0.0, seed: int = 0):
    """A 6-5-3 network (tanh, so its Hessian is indefinite) with 40 samples, and its exact Hessian in float64."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 5)] + ([torch.nn.BatchNorm1d(5)] if norm == "batch" else []) + [
        torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(5, 3)]
    model = torch.nn.Sequential(*layers)
    if norm == "batch":  # running statistics that are not the batch's: eval mode must use these
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    op = HessianOperator(model, x, y, ce, torch.float64)
    model.eval()
    exact = torch.autograd.functional.hessian(lambda f: op.loss(f, op.x, y), op.theta)
    model.train()
    return model, op, exact


@pytest.mark.parametrize("norm,dropout", [("none", 0.0), ("batch", 0.5)])
def test_hessian_vector_products_equal_the_exact_hessian(norm, dropout):
    """In eval mode: dropout off, batch norm on its running statistics, whatever mode the model was left in."""
    _, op, exact = small(norm, dropout)
    v = torch.randn(op.n, dtype=torch.float64)
    assert torch.allclose(op.hvp(v), exact @ v, atol=1e-12, rtol=1e-10)
    assert torch.allclose(op.hvp(v), exact @ v, atol=1e-12, rtol=1e-10)  # the kept graph gives the same again


def test_top_and_most_negative_eigenvalues_equal_the_exact_hessians():
    _, op, exact = small()
    ev = torch.linalg.eigvalsh(exact).tolist()  # ascending
    top, ok = extreme_eigenvalues(op, 4, "LA", tol=1e-12)
    low, ok2 = extreme_eigenvalues(op, 1, "SA", tol=1e-12)
    assert ok and ok2
    assert top == pytest.approx(ev[::-1][:4], abs=1e-6)
    assert low[0] == pytest.approx(ev[0], abs=1e-6) and ev[0] < 0  # tanh's network here: a saddle


def test_hutchinson_trace_is_within_its_stated_error():
    _, op, exact = small()
    exact_trace = float(exact.trace())
    for seed in range(3):
        t = hutchinson_trace(op, probes=400, seed=seed)
        assert t.probes == 400 and 0 < t.stderr < 0.1 * abs(exact_trace)
        assert abs(t.mean - exact_trace) < 4 * t.stderr  # 4 standard errors: fails ~1 in 16,000 for a right one
    few = hutchinson_trace(op, probes=25, seed=0)
    assert few.stderr > hutchinson_trace(op, probes=400, seed=0).stderr  # the error shrinks with the probes


def test_lanczos_quadrature_is_exact_on_low_degree_polynomials():
    """m Lanczos steps give the Gauss rule with m nodes: sum_i w_i t_i^p = v^T H^p v / v^T v for p < 2m."""
    _, op, exact = small()
    v = torch.randn(op.n, dtype=torch.float64)
    nodes, weights = lanczos(op, 6, v)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    u = v / v.norm()
    for p in range(12):
        assert float(np.sum(weights * nodes ** p)) == pytest.approx(float(u @ torch.linalg.matrix_power(exact, p) @ u),
                                                                   rel=1e-8, abs=1e-12)
    grid = np.linspace(min(nodes) - 1, max(nodes) + 1, 4001)
    d = smoothed_density(slq_density(op, runs=2, steps=8), grid, sigma=0.05)
    assert float(np.sum(d) * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-3)  # a density


def test_epoch_curvature_leaves_torchs_generator_alone():
    model, op, exact = small()
    before = torch.get_rng_state()
    got = epoch_curvature(model, op.x.float(), op.y, ce)
    assert torch.equal(torch.get_rng_state(), before)
    ev = torch.linalg.eigvalsh(exact)
    assert got["hessian_top"] == pytest.approx(float(ev[-1]), rel=1e-3)
    assert got["hessian_min"] == pytest.approx(float(ev[0]), rel=1e-3, abs=1e-4)


@pytest.fixture
def small_run(tmp_path):
    """A run on 8x8 images with 6 hidden units (460 weights: its exact Hessian is cheap), curvature every epoch."""
    data = make_dataset(tmp_path / "small", n_train=300, n_test=60, size=8)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"""
name: small
device: cpu
data: {{root: {data}, download: false, val_size: 60, verify: false}}
model: {{hidden: [6], activation: tanh}}
optim: {{lr: 0.01}}
train: {{epochs: 2, batch_size: 60, tensorboard: false, hessian_every: 2, hessian_samples: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return cfg


def exact_spectrum(ckpt, n):
    """The exact Hessian's eigenvalues of the mean eval loss over the first n training images (float64)."""
    from dlbase.tools import lab
    run = lab.load(ckpt, torch.device("cpu"))
    part = lab.first(run.data.train, n)
    op = HessianOperator(run.model, part.x.float(), part.y, ce, torch.float64)
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda f: op.loss(f, op.x, op.y), op.theta))


def test_hessian_every_writes_its_columns_and_changes_nothing_else(small_run, monkeypatch):
    monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])
    measured = train(load_config(small_run), log=lambda s: None)
    plain = train(load_config(small_run, ["train.hessian_every=0", "name=plain"]), log=lambda s: None)
    rows = list(csv.DictReader(open(measured.folder / "metrics.csv")))
    assert [r["hessian_top"] for r in rows][0] == "" and rows[1]["hessian_top"] != ""  # every 2nd epoch only
    ev = exact_spectrum(measured.folder / "last.ckpt", 50)
    assert float(rows[1]["hessian_top"]) == pytest.approx(float(ev[-1]), rel=2e-3)
    assert float(rows[1]["hessian_min"]) == pytest.approx(float(ev[0]), rel=2e-3, abs=1e-5)
    a, b = (checkpoint.load(f / "last.ckpt")["model"] for f in (measured.folder, plain.folder))
    assert all(torch.equal(a[k], b[k]) for k in a)  # measuring draws nothing: the same training
    assert "hessian_top" not in open(plain.folder / "metrics.csv").readline()


def test_hessian_every_goes_to_tensorboard(small_run, monkeypatch):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])
    done = train(load_config(small_run, ["train.tensorboard=true", "train.hessian_every=1"]), log=lambda s: None)
    ea = accumulator.EventAccumulator(str(done.folder), size_guidance={"scalars": 0})
    ea.Reload()
    rows = list(csv.DictReader(open(done.folder / "metrics.csv")))
    for key in ("hessian_top", "hessian_min"):
        assert [e.value for e in ea.Scalars(f"curvature/{key}")] == pytest.approx([float(r[key]) for r in rows],
                                                                                  rel=1e-5)


def test_a_population_member_measures_what_its_lone_run_does(small_run, monkeypatch):
    from dlbase.population.train import train_seeds
    monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])
    cfg = load_config(small_run)
    members = train_seeds(cfg, [0, 1], log=lambda s: None).results
    lone = train(cfg, log=lambda s: None)
    row = lambda f: list(csv.DictReader(open(f / "metrics.csv")))[-1]  # noqa: E731
    assert float(row(members[0].folder)["hessian_top"]) == pytest.approx(float(row(lone.folder)["hessian_top"]),
                                                                         rel=1e-3)
    assert (members[1].folder / "init.ckpt").is_file()


def test_dlbase_hessian_equals_the_exact_spectrum(small_run, monkeypatch):
    monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])
    folder = train(load_config(small_run, ["train.hessian_every=0"]), log=lambda s: None).folder
    r = CliRunner().invoke(app, ["hessian", str(folder), "--dtype", "float64", "--samples", "50", "-k", "3",
                                 "--probes", "200", "--density", "--json"])
    assert r.exit_code == 0, r.output
    found = [json.loads(line) for line in r.stdout.splitlines()]
    assert [f["checkpoint"] for f in found] == [str(folder / "init.ckpt"), str(folder / "best.ckpt")]
    for f in found:
        ev = exact_spectrum(f["checkpoint"], 50)
        assert f["top"] == pytest.approx(ev.flip(0)[:3].tolist(), abs=1e-6)
        assert f["min"] == pytest.approx(float(ev[0]), abs=1e-6)
        assert abs(f["trace"]["mean"] - float(ev.sum())) < 4 * f["trace"]["stderr"]
        assert f["converged"] and f["parameters"] == 8 * 8 * 6 + 6 + 6 * 10 + 10
    assert (folder / "hessian.png").stat().st_size > 1000


@pytest.mark.parametrize("args,words", [
    (["hessian", "{bad}"], "not a readable checkpoint"),
    (["hessian", "{tmp}/nowhere"], "no such run folder or checkpoint"),
    (["hessian", "{bad}", "--top-k", "0"], "--top-k: 0 is out of range"),
    (["hessian", "{bad}", "--split", "holdout"], "--split: 'holdout' is not one of train, val, test"),
    (["hessian", "{bad}", "--dtype", "float16"], "--dtype: 'float16' is not one of float32, float64"),
])
def test_hessian_mistakes_exit_2_with_one_line(tmp_path, args, words):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage" * 50)
    r = CliRunner().invoke(app, [a.format(bad=bad, tmp=tmp_path) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and words in lines[0] and lines[0].startswith("error: "), r.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_spectrum_on_cuda_equals_the_cpus():
    _, op, exact = small()
    model, _, _ = small()
    gpu = HessianOperator(model.cuda(), op.x.cuda(), op.y.cuda(), ce, torch.float64)
    assert extreme_eigenvalues(gpu, 2, "LA", tol=1e-12)[0] == pytest.approx(
        torch.linalg.eigvalsh(exact).flip(0)[:2].tolist(), abs=1e-6)
    assert math.isfinite(hutchinson_trace(gpu, 10).mean)


def test_without_scipy_hessian_every_and_dlbase_hessian_say_so_in_one_line(monkeypatch):
    """Where scipy is missing (the device machines have none), train.hessian_every is refused before anything runs
    and the Lanczos says what to install, instead of an ImportError's traceback."""
    import importlib.util

    from dlbase.core import curvature
    from dlbase.core.config import load_config
    from dlbase.core.errors import ConfigError, DlbaseError
    from dlbase.training.engine import plan_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.hessian_every: 2 needs scipy .* pip install scipy, or use 0"):
        plan_run(load_config(None, ["train.hessian_every=2"]), torch.device("cpu"))
    plan_run(load_config(None), torch.device("cpu"))  # off: nothing asked of scipy
    with pytest.raises(DlbaseError, match="need scipy"):
        curvature.require_scipy()
