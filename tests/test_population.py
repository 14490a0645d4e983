"""Population training (dlbase/population/train.py, loop.py, stacked.py, optim.py) against its oracles: each
member against the same config trained alone by train(), the stacked optimisers against torch.optim, the run
folders against what eval, export, predict and --resume read."""
import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dlbase.training import checkpoint
from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.errors import ConfigError
from dlbase.core.optim import build_optimizer
from dlbase.population.optim import PopOptimizer
from dlbase.population.train import (bytes_per_member, choose_k, group_by_shape, same_shape, train_population,
                               train_seeds)
from dlbase.core.schema import OPTIM_INFO, OptimConfig
from dlbase.training.train import train

from conftest import REPO, StopAt

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 1e-5


def quiet(line):
    pass


PLOTTING = ("test_member_folders_work_with_eval_export_predict_and_resume",
            "test_a_large_population_summarises_its_folders_and_leaves_plots_on_demand")


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """curves.png and gradnorms.png cost matplotlib ~1.5 s per run folder, both ways (train() and a population
    call the same dlbase.training.report.plot_run): drawn only in the test that checks the folder's files."""
    if request.node.originalname not in PLOTTING:
        monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])


@pytest.fixture
def base(tmp_path, tiny_data):
    """Tiny and fast: 240 training samples (60 validate), hidden [16], 2 epochs of 5 steps, no TensorBoard."""
    cfg = tmp_path / "pop.yaml"
    cfg.write_text(f"""
name: p
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 60, subset: 300}}
model: {{hidden: [16]}}
train: {{epochs: 2, batch_size: 48, tensorboard: false}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return load_config(cfg)


def vary(cfg, name, **sections):
    """cfg renamed, with some sections' fields replaced: vary(c, "a", optim={"lr": 0.1})."""
    out = dataclasses.replace(cfg, name=name)
    for section, fields in sections.items():
        if section == "top":
            out = dataclasses.replace(out, **fields)
        elif section == "early_stop":
            out = dataclasses.replace(out, train=dataclasses.replace(
                out.train, early_stop=dataclasses.replace(out.train.early_stop, **fields)))
        else:
            out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **fields)})
    return out


def losses(folder):
    rows = (folder / "metrics.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[2]) for r in rows]


def assert_same_run(member_folder, alone_folder, tol=TOL):
    """Per-epoch training losses and final weights of two run folders agree to tol."""
    la, lb = losses(member_folder), losses(alone_folder)
    assert len(la) == len(lb) and all(abs(a - b) <= tol for a, b in zip(la, lb)), (la, lb)
    a, b = checkpoint.load(member_folder / "last.ckpt")["model"], checkpoint.load(alone_folder / "last.ckpt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


def alone(cfg):
    return train(dataclasses.replace(cfg, name=cfg.name + "_alone"), log=quiet).folder


# ----------------------------------------------------------------------------- members equal lone runs


@pytest.mark.parametrize("stepper", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("optim", list(OPTIM_INFO))
def test_member_equals_lone_run_for_every_optimiser(base, optim, stepper):
    """Two members with their own seed, lr, weight decay and optimiser constants; each equals train() alone,
    through the hand-stacked MLP and through torch.func's vmap alike."""
    lr = OPTIM_INFO[optim].default_lr
    cfgs = [vary(base, "a", top={"seed": 1}, optim={"name": optim, "lr": lr, "weight_decay": 0.0}),
            vary(base, "b", top={"seed": 2}, optim={"name": optim, "lr": lr * 3, "weight_decay": 0.01,
                                                    "momentum": 0.8, "betas": (0.8, 0.99), "eps": 1e-6,
                                                    "alpha": 0.9, "rho": 0.8})]
    results = train_population(cfgs, log=quiet, stepper=stepper)
    assert [r.status for r in results] == ["finished", "finished"]
    for cfg, r in zip(cfgs, results):
        assert_same_run(r.folder, alone(cfg))


def test_member_equals_lone_run_for_every_schedule(base):
    """One member per schedule kind (each with warm-up) in one population; each equals train() alone."""
    kinds = [("constant", {}), ("step", {"step_size": 1, "gamma": 0.5}), ("multistep", {"milestones": (1,)}),
             ("exponential", {"gamma": 0.7}), ("cosine", {"min_lr": 1e-4}), ("onecycle", {"pct_start": 0.4})]
    cfgs = [vary(base, name, top={"seed": i}, schedule={"name": name, "warmup_steps": 2 * (i % 2), **extra},
                 optim={"lr": 0.003})
            for i, (name, extra) in enumerate(kinds)]
    for cfg, r in zip(cfgs, train_population(cfgs, log=quiet)):
        assert_same_run(r.folder, alone(cfg))


@pytest.mark.parametrize("stepper", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("model", [{"norm": "batch"}, {"norm": "layer", "activation": "tanh"},
                                   {"encoding": {"name": "learned", "num_freqs": 2}},
                                   {"encoding": {"name": "fourier", "num_freqs": 2}}])
def test_member_equals_lone_run_across_models_clip_smoothing_init(base, model, stepper):
    """Norms, encodings (learned: trainable, through torch.func), and per member grad clip, label smoothing and
    init: still equal to train() alone."""
    from dlbase.core.schema import EncodingConfig
    model = dict(model)
    if "encoding" in model:
        model["encoding"] = EncodingConfig(**model["encoding"])
    # adam: it would amplify any float noise in the gradient of a bias before batch norm (zero in exact
    # arithmetic) to lr-sized steps; both MLP and the population make that gradient an exact zero
    shared = vary(base, "x", model=model, optim={"name": "adam", "lr": 0.003})
    cfgs = [vary(shared, "a", top={"seed": 3}, train={"grad_clip": 0.05}),
            vary(shared, "b", top={"seed": 4}, train={"label_smoothing": 0.1}, model={"init": "xavier_uniform"})]
    results = train_population(cfgs, log=quiet, stepper=stepper)
    for cfg, r in zip(cfgs, results):
        assert losses(r.folder)[-1] < losses(r.folder)[0]  # it learns (a diverging run would hide differences)
        assert_same_run(r.folder, alone(cfg))
    smoothed = (results[1].folder / "metrics.csv").read_text().splitlines()[0]
    assert "train_ce" in smoothed  # the plain cross-entropy column, as train() writes it with label smoothing


def test_dropout_members_match_in_statistics(base):
    """Dropout masks differ from a lone run's (one RNG stream for all members), so compare statistics: the
    final loss of a dropout member is close to the lone run's; a dropout-free member beside it is still exact."""
    cfgs = [vary(base, "drop", top={"seed": 5}, model={"dropout": 0.3}, optim={"lr": 0.01}, train={"epochs": 3}),
            vary(base, "nodrop", top={"seed": 6}, optim={"lr": 0.01}, train={"epochs": 3})]
    results = train_population(cfgs, log=quiet)
    lone = alone(cfgs[0])
    mine, theirs = losses(results[0].folder), losses(lone)
    assert mine[-1] < mine[0] and abs(mine[-1] - theirs[-1]) < 0.25 * theirs[-1], (mine, theirs)
    a, b = checkpoint.load(results[0].folder / "last.ckpt")["model"], checkpoint.load(lone / "last.ckpt")["model"]
    assert not all(torch.allclose(a[k], b[k], atol=TOL) for k in a)  # the masks did differ
    assert_same_run(results[1].folder, alone(cfgs[1]))


# ----------------------------------------------------------------------------- the optimisers against torch's


@pytest.mark.parametrize("optim", list(OPTIM_INFO))
def test_stacked_optimiser_equals_torch(optim):
    """Three members with their own hyperparameters and lr per step, eight steps of random gradients: each
    member's stacked slice moves as torch.optim moves its own copy (the oracle), and saves torch's state."""
    torch.manual_seed(0)
    K, T = 3, 8
    cfgs = [OptimConfig(name=optim, lr=OPTIM_INFO[optim].default_lr * (k + 1), weight_decay=0.01 * k,
                        momentum=0.5 + 0.2 * k, betas=(0.8 + 0.05 * k, 0.99 - 0.005 * k), eps=10.0 ** (-8 + k),
                        alpha=0.9 + 0.03 * k, rho=0.8 + 0.05 * k) for k in range(K)]
    lr = torch.tensor([[c.lr * (1 - s / T) for s in range(T)] for c in cfgs], dtype=torch.float64)  # (K, T)
    shapes = [(4, 5), (4,)]
    stacked = [torch.randn(K, *s, requires_grad=True) for s in shapes]
    singles = [[torch.nn.Parameter(p[k].detach().clone()) for p in stacked] for k in range(K)]
    opts = [build_optimizer(singles[k], cfgs[k]) for k in range(K)]
    pop = PopOptimizer(stacked, cfgs, lr)
    for s in range(T):
        grads = [torch.randn(K, *sh) for sh in shapes]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        pop.step()
        for k in range(K):
            for group in opts[k].param_groups:
                group["lr"] = lr[k, s].item()
            for q, g in zip(singles[k], grads):
                q.grad = g[k].clone()
            opts[k].step()
    for k in range(K):
        for p, q in zip(stacked, singles[k]):
            assert torch.allclose(p[k], q, atol=1e-6, rtol=1e-5), (optim, k, (p[k] - q).abs().max())
        mine, theirs = pop.torch_state_dict(k, build_optimizer(singles[k], cfgs[k])), opts[k].state_dict()
        assert mine["state"].keys() == theirs["state"].keys()
        for i, st in theirs["state"].items():
            assert st.keys() == mine["state"][i].keys()
            for key in st:
                assert torch.allclose(mine["state"][i][key], st[key], atol=1e-6, rtol=1e-5), (optim, key)


# ----------------------------------------------------------------------------- run folders downstream


def test_member_folders_work_with_eval_export_predict_and_resume(base, tmp_path):
    cfgs = [vary(base, "a", top={"seed": 7}, optim={"lr": 0.01}, train={"epochs": 1, "tensorboard": True}),
            vary(base, "b", top={"seed": 8}, optim={"lr": 0.02}, train={"epochs": 1, "tensorboard": True})]
    results = train_population(cfgs, log=quiet)
    folder = results[0].folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt", "status.json", "curves.png",
            "gradnorms.png"} <= names
    if __import__("importlib").util.find_spec("tensorboard") is not None:
        assert any(n.startswith("events.out.tfevents.") for n in names)
    assert load_config(folder / "config.yaml") == cfgs[0]
    assert (folder / "metrics.csv").read_text().splitlines()[0].split(",") == [
        "epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "train_seconds", "grad_norm_1",
        "grad_norm_2", "weight_norm_1", "weight_norm_2"]  # the columns train() writes
    assert json.loads((folder / "status.json").read_text()) == {"status": "finished", "step": 5}
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(folder / "best.ckpt"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["n"] == 200 and 0.0 <= out["accuracy"] <= 1.0
    r = runner.invoke(app, ["export", str(folder / "best.ckpt"), "--format", "safetensors"])
    assert r.exit_code == 0, r.output
    pil = pytest.importorskip("PIL.Image")
    png = tmp_path / "digit.png"
    pil.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy()).save(png)
    r = runner.invoke(app, ["predict", str(folder / "best.ckpt"), str(png), "--json"])
    assert r.exit_code == 0 and 0 <= json.loads(r.output.splitlines()[0])["label"] <= 9, r.output
    # resume the member with dlbase train: it continues, and equals the config trained alone for 2 epochs
    r = runner.invoke(app, ["train", "--resume", str(folder / "last.ckpt"), "--set", "train.epochs=2"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and len(losses(folder)) == 2
    assert_same_run(folder, alone(vary(cfgs[0], "a2", train={"epochs": 2})))


def test_nan_guard_stops_only_the_diverging_member(base):
    cfgs = [vary(base, "ok", top={"seed": 1}, optim={"name": "sgd", "lr": 0.05}),
            vary(base, "boom", top={"seed": 2}, optim={"name": "sgd", "lr": 1e6}),
            vary(base, "ok2", top={"seed": 3}, optim={"name": "sgd", "lr": 0.1})]
    lines = []
    results = train_population(cfgs, log=lines.append)
    assert [r.status for r in results] == ["finished", "diverged", "finished"]
    assert results[1].exit_code == 3
    assert json.loads((results[1].folder / "status.json").read_text())["status"] == "diverged"
    assert any("[boom] training loss became non-finite" in line for line in lines)
    for i in (0, 2):
        assert_same_run(results[i].folder, alone(cfgs[i]))


def test_a_member_that_leaves_early_records_its_own_step_and_share_of_the_time(base):
    """Issue 21 item 13. Oracle: the lone run of the early-stopped member (its step) and the population's own
    training time (the members' shares add up to it)."""
    cfgs = [vary(base, "stops", top={"seed": 1}, optim={"lr": 0.01}, train={"epochs": 4},
                 early_stop={"patience": 1, "min_delta": 2.0}),
            vary(base, "goes", top={"seed": 2}, optim={"lr": 0.01}, train={"epochs": 4})]
    results = train_population(cfgs, log=quiet)
    lone = alone(cfgs[0])
    assert json.loads((results[0].folder / "status.json").read_text()) == json.loads(
        (lone / "status.json").read_text()) == {"status": "early_stopped", "step": 2 * checkpoint.load(
            lone / "last.ckpt")["steps_per_epoch"]}
    rows = [list(csv.DictReader(open(r.folder / "metrics.csv"))) for r in results]
    for r, own in zip(results, rows):
        assert r.train_seconds == pytest.approx(sum(float(m["train_seconds"]) for m in own), rel=2e-3, abs=1e-3)  # csv rounds
    # epochs 1-2: two members share each epoch's time equally; epochs 3-4: the one left has it all
    assert float(rows[0][0]["train_seconds"]) == pytest.approx(float(rows[1][0]["train_seconds"]))


def test_early_stopping_is_per_member(base):
    """One member stops after its patience runs out (min_delta no epoch can beat); the other trains on, and both
    equal their lone runs (the stopped one leaves the stacked step)."""
    cfgs = [vary(base, "stops", top={"seed": 1}, optim={"lr": 0.01}, train={"epochs": 4},
                 early_stop={"patience": 1, "min_delta": 2.0}),
            vary(base, "goes", top={"seed": 2}, optim={"lr": 0.01}, train={"epochs": 4})]
    results = train_population(cfgs, log=quiet)
    assert [r.status for r in results] == ["early_stopped", "finished"]
    assert results[0].epochs_done == 2 and results[1].epochs_done == 4
    for cfg, r in zip(cfgs, results):
        assert_same_run(r.folder, alone(cfg))


def test_sigterm_saves_every_member_mid_epoch_and_each_resumes(base, monkeypatch):
    """A stop request mid-epoch (conftest's StopAt stands in for SIGTERM) saves every member's last.ckpt with
    its place in the epoch; `dlbase train --resume` of one then ends equal to its uninterrupted lone run."""
    cfgs = [vary(base, "a", top={"seed": 1}, optim={"lr": 0.01}, train={"epochs": 2}),
            vary(base, "b", top={"seed": 2}, optim={"lr": 0.02}, train={"epochs": 2})]
    with monkeypatch.context() as m:
        m.setattr("dlbase.population.loop.Preemption", StopAt(7))
        results = train_population(cfgs, log=quiet)
    assert [r.status for r in results] == ["preempted", "preempted"] and results[0].exit_code == 143
    for r in results:
        last = checkpoint.load(r.folder / "last.ckpt")
        # the stop is asked before each step and at the epoch's end (as train() asks): 5 + 1 steps, then stop
        assert last["step"] == 6 and last["epoch"] == 1 and last["in_epoch"]["batch"] == 1
    for cfg, r in zip(cfgs, results):
        payload = checkpoint.load(r.folder / "last.ckpt")
        train(cfg, resume=r.folder / "last.ckpt", resume_payload=payload, log=quiet)
        assert_same_run(r.folder, alone(cfg))


# ----------------------------------------------------------------------------- entry points and refusals


def test_train_seeds_reports_mean_and_sd(base):
    lines = []
    summary = train_seeds(vary(base, "s", optim={"lr": 0.01}), [0, 1], test=True, log=lines.append)
    names = [r.folder.name for r in summary.results]
    assert names == ["s-seed0", "s-seed1"]
    vals = [r.best_value for r in summary.results]
    assert summary.best_mean == pytest.approx(sum(vals) / 2)
    assert summary.best_sd == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    runner = CliRunner()
    tests = [json.loads(runner.invoke(app, ["eval", str(r.folder / "best.ckpt"), "--json"]).output)["accuracy"]
             for r in summary.results]
    assert summary.test == pytest.approx(tests)
    assert any(line.startswith("2 seeds: best val_accuracy") and "±" in line for line in lines)
    assert any(line.startswith("2 seeds: test accuracy") for line in lines)
    with pytest.raises(ConfigError, match="listed twice"):
        train_seeds(base, [1, 1], log=quiet)


def test_refuses_members_of_different_shapes(base):
    other = vary(base, "q", model={"hidden": (8,)})
    assert same_shape(base, other) == ["model.hidden ((16,) vs (8,))"] or same_shape(base, other)[0].startswith(
        "model.hidden")
    with pytest.raises(ConfigError, match=r"member 1 \(q\) differs from member 0 \(p\) in model.hidden") as e:
        train_population([base, other], log=quiet)
    assert "\n" not in str(e.value)
    assert group_by_shape([base, other, vary(base, "r", optim={"lr": 0.5})]) == [[0, 2], [1]]
    with pytest.raises(ConfigError, match="train.engine"):
        train_population([vary(base, "m", train={"engine": "manual"})], log=quiet)
    with pytest.raises(ConfigError, match="2 folds for 1 configs"):
        train_population([base], folds=[(0, 2), (1, 2)], log=quiet)
    with pytest.raises(ConfigError, match="names two members"):
        train_population([base, base], log=quiet)
    assert not Path(base.checkpoint.dir).exists()  # refused before any run folder was made


def test_k_is_bounded_by_memory_and_chunks_agree(base):
    per = bytes_per_member(base)
    assert per > 4 * 784 * 16  # at least the first layer's weights
    assert choose_k(base, torch.device("cpu"), free_bytes=per * 6) == 3  # half of the free memory
    assert choose_k(base, torch.device("cpu"), free_bytes=per * 6, max_members=2) == 2
    assert choose_k(base, torch.device("cpu"), free_bytes=1) == 1
    cfgs = [vary(base, f"k{i}", top={"seed": i}, optim={"lr": 0.01 * (i + 1)}) for i in range(3)]
    lines = []
    results = train_population(cfgs, log=lines.append, max_members=2)  # a population of 2, then one of 1
    assert [r.population for r in results] == [2, 2, 1] and all(r.peak_bytes > 0 for r in results)
    assert any("members 3-3 of 3" in line for line in lines)
    folds = train_population([vary(base, f"f{i}", top={"seed": 4}) for i in range(2)], folds=[(0, 2), (1, 2)],
                             log=quiet)
    assert all(r.status == "finished" for r in folds)
    from dlbase.core.data import load_dataset
    data = load_dataset(base.data, 4, torch.device("cpu"), fold=(1, 2))
    assert_same_run(folds[1].folder, train(vary(base, "f1_alone", top={"seed": 4}), dataset=data, log=quiet).folder)


def test_population_bench_runs_tiny(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "population_bench.py"), "--device", "cpu",
                        "--members", "2", "--epochs", "1", "--subset", "300", "--hidden", "16",
                        "--data-root", str(tiny_data), "--out", str(tmp_path / "bench"),
                        "--json", str(tmp_path / "bench.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "bench.json").read_text())
    assert out["members"] == 2 and out["sequential_s"] > 0 and out["population_s"] > 0
    assert out["ratio"] == pytest.approx(out["sequential_s"] / out["population_s"])
    assert out["forward"]["baddbmm_ms"] > 0 and out["forward"]["vmap_ms"] > 0 and out["population_vmap_s"] > 0
    assert "torch.func vmap" in r.stdout
    assert "ratio" in r.stdout


TINY_CNN = """
name: tinycnn
device: cpu
data: {{root: {root}, download: false, normalize: standard}}
model:
  conv:
    - {{channels: 3, kernel: 3, pool: 2}}
    - {{channels: 4, kernel: 3, norm: batch, pool: 2, pool_type: avg, dropout: 0.1}}
  hidden: [8]
  norm: batch
optim: {{lr: 0.01}}
train: {{epochs: 1, batch_size: 16}}
"""  # both conv layers' kinds (bias, batch norm), both poolings, a head with a hidden layer and its batch norm


def test_population_bench_runs_a_tiny_cnn(tiny_data, tmp_path):
    """A CNN: sequential vs the vmap population end to end (the hand-stacked MLP skipped, saying why), and the
    one-step timing of vmap, the loop and grouped convolutions, whose check against the loop passed."""
    (tmp_path / "cnn.yaml").write_text(TINY_CNN.format(root=tiny_data))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "population_bench.py"), "--device", "cpu",
                        "--config", str(tmp_path / "cnn.yaml"), "--members", "2", "--epochs", "1", "--subset", "300",
                        "--steps", "2", "--out", str(tmp_path / "bench"), "--json", str(tmp_path / "bench.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "bench.json").read_text())
    assert out["population_s"] is None and out["ratio"] is None and "only MLPs" in out["stacked_skipped"]
    assert out["ratio_vmap"] == pytest.approx(out["sequential_s"] / out["population_vmap_s"])
    assert len(out["val_accuracy_population_vmap"]) == 2
    fw, check = out["forward"], out["grouped_check"]
    assert all(fw[f"{way}_ms"] > 0 for way in ("vmap", "loop", "grouped")) and fw["batch"] == 16 and fw["dropout_off"]
    assert fw["grouped_over_vmap"] == pytest.approx(fw["grouped_ms"] / fw["vmap_ms"])
    assert check["passed"] and max(check[k] for k in ("grouped_logits", "grouped_grads", "vmap_logits",
                                                      "vmap_grads")) <= 1e-4
    assert "population: skipped" in r.stdout and "grouped convolutions check" in r.stdout and "passed" in r.stdout
    assert "ratio (sequential / population vmap)" in r.stdout


def test_the_grouped_convolutions_check_catches_one_member_taken_for_another(tiny_data, tmp_path, monkeypatch):
    """The oracle of the check itself: grouped_cnn with one layer's members in the wrong order fails it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("population_bench", REPO / "scripts" / "population_bench.py")
    pb = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "population_bench", pb)
    spec.loader.exec_module(pb)
    (tmp_path / "cnn.yaml").write_text(TINY_CNN.format(root=tiny_data))
    cfg = load_config(tmp_path / "cnn.yaml")
    model = pb.no_dropout(cfg.model)
    models = [pb.build_model(dataclasses.replace(cfg, seed=j, model=model), (28, 28), torch.device("cpu"))
              for j in range(2)]
    assert pb.check_cnn_ways(models, [model] * 2, torch.device("cpu"), 8)["passed"]
    right = pb.grouped_cnn
    for layer in ("encoding.", "features.0.", "features.3.", "features.4.", "net.0.", "net.1.", "net.3."):
        def swapped(cnn, P, Bf, x, layer=layer):  # this layer's stacked tensors with the members swapped
            def flip(d):
                return {k: v.flip(0) if k.startswith(layer) else v for k, v in d.items()}
            return right(cnn, flip(P), flip(Bf), x)
        monkeypatch.setattr(pb, "grouped_cnn", swapped)
        check = pb.check_cnn_ways(models, [model] * 2, torch.device("cpu"), 8)
        assert not check["passed"] and check["vmap_grads"] <= 1e-4, layer


@cuda
@pytest.mark.cuda
def test_member_equals_lone_run_on_cuda(base):
    """fp32 on the GPU: a member equals the lone run (looser: cuBLAS picks other kernels for bmm than mm)."""
    cfgs = [vary(base, "g1", top={"seed": 1, "device": "cuda"}, train={"precision": "fp32"}, optim={"lr": 0.01}),
            vary(base, "g2", top={"seed": 2, "device": "cuda"}, train={"precision": "fp32"}, optim={"lr": 0.02})]
    results = train_population(cfgs, log=quiet)
    for cfg, r in zip(cfgs, results):
        assert r.peak_bytes > 0
        assert_same_run(r.folder, alone(vary(cfg, cfg.name, train={"compile": "none"})), tol=1e-4)


def test_dlbase_train_seeds_from_the_command_line(tmp_path, base):
    cfg = tmp_path / "pop.yaml"  # the file the base fixture wrote: name p
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "0,5", "--test", "--set", "optim.lr=0.01",
                            "--set", "train.epochs=1"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["p-seed0", "p-seed5"]
    assert "2 seeds: best val_accuracy" in r.stdout and "2 seeds: test accuracy" in r.stdout
    for s in (0, 5):  # each folder is the run `dlbase train --set seed=S` would give, --set applied
        stored = load_config(tmp_path / "ckpt" / f"p-seed{s}" / "config.yaml")
        assert stored.seed == s and stored.optim.lr == 0.01
    r = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "2", "--set", "train.epochs=1"])
    assert r.exit_code == 0 and "2 seeds: best val_accuracy" in r.stdout and "test accuracy" not in r.stdout
    # a new run never overwrites an old one, and its folders read as a second set, not as a range
    assert {"p-2-seed0", "p-2-seed1"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}


@pytest.mark.parametrize("args,words", [
    (["--seeds", "x"], "give a count"), (["--seeds", "0"], "a count from 1"), (["--seeds", "1,1"], "listed twice"),
    (["--seeds", "-1,2"], "give a count"), (["--test"], "--test goes with --seeds"),
    (["--seeds", "2", "--resume", "somewhere"], "--seeds starts new runs"),
])
def test_bad_seeds_options_are_one_line(tmp_path, tiny_config, args, words):
    r = CliRunner().invoke(app, ["train", "--config", str(tiny_config), *args])
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "ckpt").exists()


def test_a_large_population_summarises_its_folders_and_leaves_plots_on_demand(base):
    """Issue 21 item 15: no 1000-folder line, no minutes of plots."""
    from dlbase.population.loop import PLOT_MEMBERS
    cfgs = [vary(base, f"m{i}", top={"seed": i}, optim={"lr": 0.01}, train={"epochs": 1})
            for i in range(PLOT_MEMBERS + 1)]
    lines = []
    results = train_population(cfgs, log=lines.append)
    assert all(r.status == "finished" for r in results)
    head = next(line for line in lines if line.startswith("population:"))
    assert f"({PLOT_MEMBERS + 1} folders in {results[0].folder.parent})" in head and "m5," not in head
    assert not any((r.folder / "curves.png").exists() for r in results)
    assert any(line.startswith("plots: not drawn") and "dlbase plot" in line for line in lines)
    r = CliRunner().invoke(app, ["plot", str(results[3].folder)])  # on demand
    assert r.exit_code == 0 and (results[3].folder / "curves.png").is_file()


def test_a_signal_during_the_plots_stops_them_at_once(base, monkeypatch):
    import os
    import signal
    from dlbase.training import report
    drawn = []

    def plot_and_signal(folder):
        drawn.append(folder)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, while the first member's plots are drawn
    monkeypatch.setattr(report, "plot_run", plot_and_signal)
    cfgs = [vary(base, f"m{i}", top={"seed": i}, optim={"lr": 0.01}, train={"epochs": 1}) for i in range(3)]
    lines = []
    results = train_population(cfgs, log=lines.append)
    assert [r.status for r in results] == ["finished"] * 3 and len(drawn) == 1
    assert any(line.startswith("plots: stopped by a signal after 1 of 3") for line in lines)


def _words(line):
    """An epoch line without its timing (the only part two runs of the same training may differ in) nor 4th
    decimals, which fp32 rounding in the batched step may move."""
    import re
    line = re.sub(r"  [0-9.]+s(  \*best)?$", r"\1", line)
    return re.sub(r"(\d+\.\d{3})\d", r"\1", line)


def test_a_member_says_what_a_lone_run_says_each_epoch(base):
    """One loop's boundary, once (dlbase/training/runrecord.py): a member's epoch lines are the lone run's (train loss,
    cross-entropy beside label smoothing, validation loss with the gap, accuracy, lr, *best), and the population
    ends with the phases line a single run prints."""
    cfg = vary(base, "said", train={"label_smoothing": 0.1})
    lines = []
    train_population([cfg], log=lines.append)
    lone = []
    train(dataclasses.replace(cfg, name="said_alone"), log=lone.append)
    mine = [_words(line.split("] ", 1)[1]) for line in lines if line.startswith("[said] epoch ")]
    theirs = [_words(line) for line in lone if line.startswith("epoch ")]
    assert len(mine) == 2 and mine == theirs, (mine, theirs)
    assert "(gap " in mine[0] and "(cross-entropy " in mine[0]
    phases = [line for line in lines if line.startswith("time (s): ")]
    assert len(phases) == 1 and {"training", "validation", "checkpoints"} <= set(phases[0].split())


def test_a_member_warns_of_vanishing_gradients_as_a_lone_run_does(base):
    """A deep sigmoid member warns (once, in its own name); a relu member does not. Oracle: the
    member's own gradient norms in metrics.csv, first layer below 1e-3 of the last."""
    deep = {"hidden": (16,) * 8, "activation": "sigmoid"}
    cfgs = [vary(base, "sig", model=deep, optim={"name": "sgd", "lr": 0.1}),
            vary(base, "relu", model={**deep, "activation": "relu"}, optim={"name": "sgd", "lr": 0.1})]
    lines = []
    results = [train_population([c], log=lines.append)[0] for c in cfgs]  # activation sets the step: one each
    warned = [line.split("]")[0][1:] for line in lines if "vanishing gradients" in line]
    assert warned == ["sig"], lines
    with open(results[0].folder / "metrics.csv") as fh:
        row = list(csv.DictReader(fh))[0]
    assert float(row["grad_norm_1"]) < 1e-3 * float(row["grad_norm_9"])


def _weights_and_rows(folder):
    rows = [",".join(r.split(",")[:5]) for r in (folder / "metrics.csv").read_text().splitlines()]  # no timing
    return checkpoint.load(folder / "last.ckpt")["model"], rows


def test_a_signalled_seeds_population_resumes_with_one_command_as_if_never_stopped(base, tmp_path, monkeypatch):
    """--seeds 3, SIGTERM in the middle of epoch 2 (every member saved mid-epoch, exit 143, one command to go
    on), then `dlbase train --resume <any member's folder>`: all three go on together and end with the weights
    and metrics of the same population trained without a stop (the oracle, in another folder)."""
    cfg = tmp_path / "pop.yaml"
    runner = CliRunner()
    with monkeypatch.context() as m:
        m.setattr("dlbase.population.loop.Preemption", StopAt(7))
        stopped = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "3"])
    assert stopped.exit_code == 143, stopped.output
    folders = [tmp_path / "ckpt" / f"p-seed{s}" for s in range(3)]
    hint = f"dlbase train --resume {folders[0]}"
    assert hint in stopped.output, stopped.output
    assert checkpoint.load(folders[2] / "last.ckpt")["in_epoch"]["batch"] >= 1  # mid-epoch: the hard case
    resumed = runner.invoke(app, ["train", "--resume", str(folders[1])])
    assert resumed.exit_code == 0, resumed.output
    assert "3 members" in resumed.output and "3 seeds: best val_accuracy" in resumed.output, resumed.output
    whole = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "3", "--set",
                                f"checkpoint.dir={tmp_path / 'whole'}"])
    assert whole.exit_code == 0, whole.output
    for s, folder in enumerate(folders):
        (w, rows), (w0, rows0) = _weights_and_rows(folder), _weights_and_rows(tmp_path / "whole" / f"p-seed{s}")
        assert rows == rows0, (rows, rows0)
        for k in w0:
            assert torch.equal(w[k], w0[k]), (s, k)
        assert json.loads((folder / "status.json").read_text())["status"] == "finished"
    again = runner.invoke(app, ["train", "--resume", str(folders[0])])  # all done: nothing trains
    assert again.exit_code == 0 and "0 to go on, 3 already done" in again.output, again.output
    shutil.rmtree(folders[2])  # a member deleted on purpose: the others still go on with one command
    on = runner.invoke(app, ["train", "--resume", str(folders[0]), "--set", "train.epochs=3"])
    assert on.exit_code == 0 and "not found, so not resumed" in on.output and "2 seeds:" in on.output, on.output
    folders[2].mkdir()  # a member left without a checkpoint: one line saying how to go on, exit 2
    stuck = runner.invoke(app, ["train", "--resume", str(folders[0]), "--set", "train.epochs=4"])
    assert stuck.exit_code == 2 and "resume the others one by one" in stuck.output, stuck.output


def test_the_vmap_stepper_takes_any_module_and_refuses_per_member_dropout(base):
    """torch.func's stepper stacks what build_model gives, so a population of another model family needs no
    code of its own; one dropout rate per population there (the hand-stacked MLP takes one per member)."""
    from dlbase.population.steppers import stack_members
    from dlbase.population.vmapped import VmappedModel

    class Tiny(torch.nn.Module):  # not an MLP: a model family the hand-stacked path knows nothing of
        def __init__(self):
            super().__init__()
            self.encoding = torch.nn.Identity()
            self.encoding.out_features = 12
            self.conv = torch.nn.Conv1d(1, 2, 3)
            self.out = torch.nn.Linear(2 * 10, 10)

        def forward(self, x):
            return self.out(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))

    torch.manual_seed(0)
    models = [Tiny() for _ in range(3)]
    net = stack_members(models, [base.model] * 3)
    assert isinstance(net, VmappedModel)
    x = torch.randn(3, 5, 12)
    out = net.forward(x)
    for k, m in enumerate(models):  # oracle: each module's own forward on its own batch
        torch.testing.assert_close(out[k], m(x[k]))
    out.sum().backward()
    alone = models[1]
    alone(x[1]).sum().backward()
    torch.testing.assert_close(net.params[0].grad[1], alone.conv.weight.grad)
    with pytest.raises(ConfigError, match="model.dropout"):
        VmappedModel(models[:2], [base.model, dataclasses.replace(base.model, dropout=0.5)])
    with pytest.raises(ConfigError, match="needs 'vmap' or 'loop'"):
        stack_members(models, [base.model] * 3, "stacked")


# ----------------------------------------------------------------------------- a population of CNNs (model.conv)


@pytest.mark.parametrize("stepper", ["vmap", "loop"])
def test_cnn_members_equal_lone_runs(base, stepper):
    """A model family the hand-stacked MLP knows nothing of: torch.func stacks CNN members (batch norm's running
    statistics per member, average pooling, per-member lr, weight decay and clipping), through one vmap or a loop
    over the members (auto on the CPU), and each equals train() alone."""
    from dlbase.core.schema import ConvLayerConfig as Conv
    conv = (Conv(channels=3, kernel=5, pool=2, norm="batch"), Conv(channels=4, kernel=3, pool=2, pool_type="avg"))
    shared = vary(base, "c", model={"conv": conv}, optim={"lr": 0.003})
    cfgs = [vary(shared, "a", top={"seed": 1}),
            vary(shared, "b", top={"seed": 2}, optim={"lr": 0.01, "weight_decay": 0.01}, train={"grad_clip": 0.5})]
    results = train_population(cfgs, log=quiet, stepper=stepper)
    for cfg, r in zip(cfgs, results):
        assert losses(r.folder)[-1] < losses(r.folder)[0]  # it learns
        assert_same_run(r.folder, alone(cfg))
    with pytest.raises(ConfigError, match="model.conv"):  # members of other convolutions are not one population
        train_population([cfgs[0], vary(cfgs[1], "d", model={"conv": conv[:1]})], log=quiet)


def test_dlbase_train_seeds_of_a_cnn(tmp_path, base):
    r = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "pop.yaml"), "--seeds", "2", "--set",
                                 "model.conv=[{channels: 2, kernel: 5, pool: 4, dropout: 0.2}]", "--set",
                                 "train.epochs=1"])
    assert r.exit_code == 0 and "2 seeds: best val_accuracy" in r.stdout, r.output
    assert all((tmp_path / "ckpt" / f"p-seed{s}" / "best.ckpt").exists() for s in (0, 1))


@pytest.mark.parametrize("stepper", ["stacked", "vmap", "loop"])
def test_augmented_members_equal_lone_runs(base, stepper):
    """train.augment inside the population's step: each member draws from its own generator, seeded as its
    lone run's, and the draws are applied to the whole (K*B) batch at once; each member equals train() alone."""
    from dlbase.core.schema import AugmentConfig
    aug = AugmentConfig(translate=2, degrees=10, scale=(0.9, 1.1), shear=5, elastic_alpha=8, elastic_sigma=3)
    cfgs = [vary(base, name, top={"seed": seed}, train={"augment": aug}) for name, seed in (("a", 1), ("b", 2))]
    results = train_population(cfgs, log=quiet, stepper=stepper)
    assert [r.status for r in results] == ["finished", "finished"]
    for cfg, r in zip(cfgs, results):
        assert "augment" in checkpoint.load(r.folder / "last.ckpt")["rng"]
        assert_same_run(r.folder, alone(cfg))


def test_an_augmented_seeds_population_stopped_mid_epoch_resumes_as_if_never_stopped(base, tmp_path, monkeypatch):
    """The same with train.augment: each member's augmentation generator is saved in its checkpoint
    (rng["augment"]) and restored, so the resumed population draws what the uninterrupted one drew."""
    cfg, runner = tmp_path / "pop.yaml", CliRunner()
    aug = ["--set", "train.augment.translate=2", "--set", "train.augment.degrees=10",
           "--set", "train.augment.elastic_alpha=4"]
    with monkeypatch.context() as m:
        m.setattr("dlbase.population.loop.Preemption", StopAt(7))
        stopped = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "2", *aug])
    assert stopped.exit_code == 143, stopped.output
    folders = [tmp_path / "ckpt" / f"p-seed{s}" for s in range(2)]
    payload = checkpoint.load(folders[1] / "last.ckpt")
    assert payload["in_epoch"]["batch"] >= 1 and "augment" in payload["rng"]
    resumed = runner.invoke(app, ["train", "--resume", str(folders[0])])
    assert resumed.exit_code == 0, resumed.output
    whole = runner.invoke(app, ["train", "--config", str(cfg), "--seeds", "2", *aug, "--set",
                                f"checkpoint.dir={tmp_path / 'whole'}"])
    assert whole.exit_code == 0, whole.output
    for s, folder in enumerate(folders):
        (w, rows), (w0, rows0) = _weights_and_rows(folder), _weights_and_rows(tmp_path / "whole" / f"p-seed{s}")
        assert rows == rows0, (rows, rows0)
        assert all(torch.equal(w[k], w0[k]) for k in w0), s
