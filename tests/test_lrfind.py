"""dlbase lr-find (dlbase/tools/lrfind.py, lrpop.py; core/optim.py's RangeSchedule): the lr sequence against its
closed form and torch's ExponentialLR, the smoothing against its explicit sum, the 4x stop on synthetic losses,
the suggestion on a curve whose steepest point is known, the range test on tiny data through the Engine (against
a hand-driven torch loop), --population K on tiny data, and the command's errors."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.optim import RangeSchedule
from dlbase.tools.lrfind import Watch, range_test, steepest

runner = CliRunner()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(tiny_data, tmp_path, *sets):
    return load_config(None, ["name=tiny", "device=cpu", f"data.root={tiny_data}", "data.download=false",
                              "data.val_size=100", "model.hidden=[32]", "train.batch_size=50",
                              f"checkpoint.dir={tmp_path / 'ckpt'}", *sets])


@pytest.mark.parametrize("start,end,n", [(1e-7, 10.0, 100), (1e-3, 1.0, 7), (0.5, 2.0, 2)])
def test_range_schedule_is_the_closed_form_and_torch_exponential_lr(start, end, n):
    s = RangeSchedule(start, end, n)
    table = s.table()
    assert table == [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    assert table[0] == start and table[-1] == pytest.approx(end, rel=1e-12) and s(n + 5) == table[-1]
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=start)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(end / start) ** (1 / (n - 1)))
    theirs = []
    for _ in range(n):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert table == pytest.approx(theirs, rel=1e-12)
    assert not s.constant


def test_smoothing_is_the_bias_corrected_ema():
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(50, generator=g, dtype=torch.float64) + 1).tolist()
    w, beta = Watch(threshold=1e9), 0.98
    for loss in losses:
        assert not w.add(loss)
    for i, s in enumerate(w.smoothed):  # the explicit weighted sum, normalised by the weights' total
        num = sum((1 - beta) * beta ** (i - j) * losses[j] for j in range(i + 1))
        assert s == pytest.approx(num / (1 - beta ** (i + 1)), rel=1e-12)
    assert w.smoothed[0] == losses[0]


def _first_stop(losses, threshold=4.0, beta=0.98):
    """The 4x rule by brute force: smoothed from scratch at each step, best over the steps before it."""
    sm = []
    for i in range(len(losses)):
        num = sum((1 - beta) * beta ** (i - j) * losses[j] for j in range(i + 1))
        sm.append(num / (1 - beta ** (i + 1)))
        if i > 0 and sm[i] > threshold * min(sm[:i]):
            return i
    return None


def test_it_stops_at_the_first_step_past_4x_the_best():
    losses = [2.0] * 20 + [1.0] * 30 + [1.0 * 1.35 ** k for k in range(1, 40)]
    expect = _first_stop(losses)
    assert expect is not None and 50 < expect < len(losses) - 1
    w = Watch()
    stopped_at = next(i for i, loss in enumerate(losses) if w.add(loss))
    assert stopped_at == expect and len(w.smoothed) == expect + 1 and "4x" in w.stop
    assert w.smoothed[-1] > 4 * min(w.smoothed[:-1]) and w.smoothed[-2] <= 4 * min(w.smoothed[:-2])


def test_it_does_not_stop_below_4x_and_stops_on_a_non_finite_loss():
    w = Watch()
    assert not any(w.add(v) for v in [1.0] * 10 + [3.9] * 400)  # the smoothed loss tends to 3.9x, never past 4x
    w = Watch()
    assert not w.add(1.0) and w.add(math.nan) and "not finite" in w.stop


def test_the_suggestion_is_the_steepest_descent():
    ys = [-math.tanh((i - 40) / 5) for i in range(100)]  # steepest at i = 40
    assert steepest(ys) == 40
    ys = [-math.tanh((i - 5) / 2) for i in range(100)]  # steepest within the first 10 points: left out
    assert steepest(ys) == 10
    assert steepest([1.0] * 11) is None and steepest([3.0, 2.0] * 6 + [1.0]) is not None


def test_range_test_runs_the_engine_on_the_configs_own_step(tiny_data, tmp_path):
    """The oracle: the same model and data order moved by a hand-driven torch loop at the closed form's lrs."""
    from dlbase.core.data import Batcher, load_dataset
    from dlbase.core.model import build_model
    from dlbase.training.progress import seed_everything
    cfg = tiny(tiny_data, tmp_path, "optim.name=momentum", "data.normalize=unit")
    r = range_test(cfg, 1e-4, 1.0, 25, threshold=1e9)
    assert r.lrs == RangeSchedule(1e-4, 1.0, 25).table() and len(r.losses) == 25 and not r.stop
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed, torch.device("cpu"))
    model = build_model(cfg, data.input_shape, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batcher, losses = Batcher(len(data.train), 50, torch.device("cpu"), cfg.seed), []
    while len(losses) < 25:
        for idx in batcher.perm().split(50):
            if len(losses) == 25:
                break
            opt.param_groups[0]["lr"] = r.lrs[len(losses)]
            loss = torch.nn.functional.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert r.losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert not (tmp_path / "ckpt").exists()  # no run folder, no checkpoint


def test_range_test_stops_when_the_loss_blows_up(tiny_data, tmp_path):
    r = range_test(tiny(tiny_data, tmp_path, "optim.name=adam"), 1e-3, 1e4, 100)  # stops near step 47
    assert r.stop and len(r.losses) < 100 and r.lrs == RangeSchedule(1e-3, 1e4, 100).table()[:len(r.losses)]
    assert _first_stop(r.losses) == len(r.losses) - 1 or not math.isfinite(r.losses[-1])


def test_cli_writes_csv_png_and_one_suggestion_line(tiny_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: tiny\ndevice: cpu\ndata: {{root: {tiny_data}, download: false, val_size: 100}}\n"
                   f"model: {{hidden: [32]}}\ntrain: {{batch_size: 50}}\ncheckpoint: {{dir: {tmp_path / 'ckpt'}}}\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["lr-find", "-c", str(cfg), "--out", str(out), "--steps", "40", "--population", "3",
                            "--epochs", "2", "--lr-range", "1e-3,1e-1"])
    assert r.exit_code == 0, r.output
    assert sum(line.startswith("suggested lr ") for line in r.stdout.splitlines()) == 1
    rows = list(csv.DictReader(open(out / "lr_find.csv")))
    assert len(rows) <= 40 and sum(int(x["suggested"]) for x in rows) == 1
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG" and (out / "lr_population.png").stat().st_size
    pop = list(csv.DictReader(open(out / "lr_population.csv")))
    lrs = sorted({float(x["lr"]) for x in pop})
    assert lrs == pytest.approx([1e-3, 1e-2, 1e-1]) and len(pop) == 3 * 2  # K curves of 2 epochs
    assert all(x["val_accuracy"] for x in pop) and "population: best lr" in r.stdout
    assert sorted(p.name for p in (out / "population").iterdir()) == ["tiny-lr0", "tiny-lr1", "tiny-lr2"]
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("args,words", [
    (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
    (["--start-lr", "nan"], "--start-lr"),
    (["--steps", "1"], "--steps"),
    (["--population", "1"], "--population 1"),
    (["--population", "3", "--lr-range", "0.1"], "--lr-range"),
    (["--population", "3", "--set", "data.val_size=0"], "data.val_size"),
    (["--set", "optim.lerning_rate=1"], "optim.lr"),
])
def test_cli_errors_are_one_line_and_exit_2(tiny_config, tmp_path, args, words):
    r = runner.invoke(app, ["lr-find", "-c", str(tiny_config), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()  # refused before the folder is made


def test_help():
    r = runner.invoke(app, ["lr-find", "--help"])
    assert r.exit_code == 0 and all(o in r.stdout for o in ("--start-lr", "--population", "steepest"))


@cuda
@pytest.mark.cuda
def test_range_test_on_cuda_follows_the_cpu(tiny_data, tmp_path):
    """On CUDA the step is one replayed graph with the lr refilled each step: same lrs, a loss curve close to
    the CPU's in fp32."""
    cpu = range_test(tiny(tiny_data, tmp_path), 1e-5, 1.0, 30, threshold=1e9)
    gpu = range_test(tiny(tiny_data, tmp_path, "device=cuda", "train.precision=fp32"), 1e-5, 1.0, 30, threshold=1e9)
    assert gpu.lrs == cpu.lrs and gpu.losses == pytest.approx(cpu.losses, rel=1e-3, abs=1e-4)


def test_population_centres_on_the_suggestion_without_a_range(tiny_data, tmp_path):
    from dlbase.tools.lrfind import lr_find
    out = tmp_path / "out"
    r = lr_find(tiny(tiny_data, tmp_path, "model.hidden=[8]"), out, 1e-6, 1.0, 40, population=2, log=lambda s: None)
    assert r.suggested_lr is not None
    lrs = sorted({float(x["lr"]) for x in csv.DictReader(open(out / "lr_population.csv"))})
    assert lrs == pytest.approx([r.suggested_lr / 10, r.suggested_lr * 10], rel=1e-5)
