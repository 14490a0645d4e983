"""Search inside a population (search/pbt.py): PBT's exploit (a gather along the stacked axis), its explore, its
records and replay, its resume; successive halving; each against an oracle (equal tensors, the bounds, a plain
population, an uninterrupted run, the rung's ranking read from metrics.csv)."""
import csv
import json
import os
import random
import signal
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.optim import build_schedule
from dlbase.core.schema import ScheduleConfig
from dlbase.search import pbt
from dlbase.training import checkpoint

runner = CliRunner()


def base(tmp_path, tiny_data, sweep: str, epochs: int = 4, optim: str = "momentum"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "base.yaml"
    p.write_text(f"""
name: base
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [16]}}
optim: {{name: {optim}}}
train: {{epochs: {epochs}, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""" + ("" if sweep is None else f"sweep:\n  name: sw\n  trials: 4\n  metric: val_loss\n{sweep}\n"))
    return p


SPACE = """  params:
    optim.lr: {distribution: log_uniform, low: 0.001, high: 0.3}
"""


def rows(path):
    return list(csv.DictReader(open(path)))


def curve(run):
    """A run's metrics.csv less its timings: (epoch, step, train_loss, val_loss, val_accuracy, lr) per epoch."""
    return [tuple(r[k] for k in ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr"))
            for r in rows(run / "metrics.csv")]


def ranking(root):
    return [(r["trial"], r["status"], r["score"], r["epochs"]) for r in rows(root / "results.csv")]


def weights(path):
    return checkpoint.load(path)["model"]


# ----------------------------------------------------------------------------- the schedule's table
def test_the_schedule_table_is_its_closed_form():
    named = build_schedule(ScheduleConfig(name="cosine", warmup_steps=3), 0.1, 10, 60)
    tabled = build_schedule(ScheduleConfig(name="cosine", warmup_steps=3, table_epochs=(0, 2, 5),
                                           table_factors=(0.5, 2.0, 0.25)), 0.1, 10, 60)
    factor = lambda s: 0.5 if s < 20 else 2.0 if s < 50 else 0.25  # noqa: E731 - the points' definition
    assert [tabled(s) for s in range(60)] == [named(s) * factor(s) for s in range(60)]
    late = build_schedule(ScheduleConfig(table_epochs=(3,), table_factors=(3.0,)), 0.1, 10, 60)
    assert late(29) == 0.1 and late(30) == pytest.approx(0.3)  # 1 before the first point


@pytest.mark.parametrize("sets", [["schedule.table_epochs=[2, 1]", "schedule.table_factors=[1.0, 2.0]"],
                                  ["schedule.table_epochs=[1, 2]", "schedule.table_factors=[1.0]"]])
def test_a_bad_table_is_one_line(tiny_config, sets):
    r = runner.invoke(app, ["config", "validate", "--config", str(tiny_config), *(x for s in sets for x in
                                                                                  ("--set", s))])
    assert r.exit_code == 2 and "schedule.table_epochs" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------- exploit and explore
def test_an_exploit_copies_exactly_the_chosen_members_weights_optimiser_state_and_hyperparameters(tmp_path,
                                                                                                 tiny_data):
    from dlbase.population.train import train_population
    cfg = load_config(base(tmp_path, tiny_data, None, epochs=2, optim="adamw"))
    configs = [replace(cfg, name=f"m{i}", optim=replace(cfg.optim, lr=lr, weight_decay=wd))
               for i, (lr, wd) in enumerate([(0.01, 0.0), (0.003, 0.1), (0.03, 0.01)])]
    seen = {}

    def hook(pop):
        if pop.progress.epoch != 1:
            return
        st = pop.stepper
        before = [t.clone() for t in (*st.net.params, *st.opt.hp.values(), st.opt.lr_table,
                                      *(s for ss in st.opt.state.values() for s in ss))]
        m0, m1, m2 = pop.members
        pop.replace_members([m0], [m2])
        after = [*st.net.params, *st.opt.hp.values(), st.opt.lr_table, *(s for ss in st.opt.state.values() for s in ss)]
        seen["rows"] = [(torch.equal(a[0], b[2]), torch.equal(a[1], b[1]), torch.equal(a[2], b[2]))
                        for a, b in zip(after, before)]
        seen["cfg"] = (m0.cfg.optim == m2.cfg.optim, m0.cfg.name, pop.schedules[0].table() == pop.schedules[2].table())
        seen["state_keys"] = sorted(st.opt.state)
    train_population(configs, log=lambda line: None, after_epoch=hook)
    assert seen["state_keys"] == ["exp_avg", "exp_avg_sq"]
    assert seen["rows"] and all(all(r) for r in seen["rows"])  # row 0 = row 2 before; rows 1 and 2 untouched
    assert seen["cfg"] == (True, "m0", True)  # its hyperparameters (and lr table) too; its own name and folder


@pytest.mark.parametrize("space", [{"distribution": "uniform", "low": 0.5, "high": 0.9},
                                   {"distribution": "log_uniform", "low": 1e-4, "high": 0.1},
                                   {"distribution": "int_uniform", "low": 1, "high": 5},
                                   {"distribution": "choice", "values": [0.1, 0.01, 0.001]}, [0.3, 0.5]])
def test_perturbations_stay_within_their_distributions_bounds(space):
    rng, values = random.Random(0), pbt._choices(space)
    lo, hi = (min(values), max(values)) if values else (space["low"], space["high"])
    v, seen = (values or [lo])[0], set()
    for _ in range(2000):  # a walk: each value explored from the last, resampled or perturbed (x1.2, x0.8)
        v = pbt.explore(v, space, rng, (1.2, 0.8), 0.25)
        assert lo <= v <= hi and (values is None or v in values)
        seen.add(v)
    assert len(seen) > 2 if values is None else seen == set(values)  # it moves, and reaches every choice


# ----------------------------------------------------------------------------- PBT sweeps
def test_pbt_with_an_interval_past_the_run_is_the_same_members_as_a_plain_population(tmp_path, tiny_data):
    a = base(tmp_path / "a", tiny_data, "  method: pbt\n  interval: 99\n" + SPACE)
    b = base(tmp_path / "b", tiny_data, "  method: random\n  pruner: none\n  population: 4\n" + SPACE)
    for cfg in (a, b):
        r = runner.invoke(app, ["sweep", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
    ra, rb = (tmp_path / x / "ckpt" / "sw" for x in "ab")
    assert ranking(ra) == ranking(rb)
    for t in (f"trial-{i:03d}" for i in range(4)):
        assert curve(ra / t) == curve(rb / t)
        wa, wb = weights(ra / t / "last.ckpt"), weights(rb / t / "last.ckpt")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rows(ra / "lineage.csv") == []


PBT = "  method: pbt\n  quantile: 0.5\n" + SPACE


def test_pbt_records_its_lineage_and_best_yaml_replays_the_winners_schedule(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, PBT)
    r = runner.invoke(app, ["sweep", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "sw"
    lineage = rows(root / "lineage.csv")
    assert len(lineage) == 3 * 2  # epochs 1-3 (none after the last), the bottom half of 4 each time
    for ex in lineage:  # each copy was a bottom member copying a top one, by that epoch's val_loss
        e = int(ex["epoch"])
        loss = {t: float(rows(root / t / "metrics.csv")[e - 1]["val_loss"]) for t in (f"trial-{i:03d}" for i in
                                                                                     range(4))}
        assert loss[ex["from"]] < loss[ex["member"]] and sorted(loss, key=loss.get).index(ex["from"]) < 2
    state = json.loads((root / "pbt.json").read_text())
    assert len(state["exploits"]) == 6 and (root / "pbt.png").stat().st_size > 1000
    assert len(rows(root / "schedules.csv")) == 4 * 4
    # TensorBoard: each member's value at each exploit, from that epoch on (schedules.csv's)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sched = {(x["member"], int(x["epoch"])): float(x["optim.lr"]) for x in rows(root / "schedules.csv")}
    for t in (f"trial-{i:03d}" for i in range(4)):
        ea = EventAccumulator(str(root / t), size_guidance={"scalars": 0})
        ea.Reload()
        points = [(e.step, e.value) for e in ea.Scalars("pbt/optim.lr")]
        assert [s for s, _ in points] == [10, 20, 30]  # the exploits after epochs 1-3 (10 steps per epoch)
        assert [v for _, v in points] == pytest.approx([sched[(t, s // 10)] for s, _ in points], rel=1e-6)
    best = load_config(root / "best.yaml")
    winner = json.loads((root / "winner.json").read_text())["winner"]["trial"]
    last = checkpoint.load(root / winner / "last.ckpt")["config"]
    assert list(best.schedule.table_epochs) == last["schedule"]["table_epochs"]
    # the replay: best.yaml from scratch as an ordinary run trains the winner's lineage's lr at every step, and
    # every member shares the seed (init, data order): its weights are the winner's, to the population's 1e-5
    r = runner.invoke(app, ["train", "--config", str(root / "best.yaml"), "--set", f"checkpoint.dir={tmp_path / 'r'}"])
    assert r.exit_code == 0, r.output
    alone = weights(next((tmp_path / "r").glob("*/last.ckpt")))
    won = weights(root / winner / "last.ckpt")
    assert all(torch.allclose(alone[k], won[k], atol=1e-5) for k in won)
    # and its lr in each epoch is that of the member whose weights the winner's were then (lineage.csv, read back)
    who, until, owner = winner, 4, {}
    for ex in reversed(lineage):
        if ex["member"] == who and int(ex["epoch"]) <= until:
            owner.update({e: who for e in range(int(ex["epoch"]), until)})
            who, until = ex["from"], int(ex["epoch"])
    owner.update({e: who for e in range(until)})
    lrs = [x["lr"] for x in rows(next((tmp_path / "r").glob("*/metrics.csv")))]
    assert lrs == [rows(root / owner[e] / "metrics.csv")[e]["lr"] for e in range(4)]


def test_a_stopped_pbt_sweep_goes_on_with_the_same_lineage_as_an_uninterrupted_one(tmp_path, tiny_data,
                                                                                   monkeypatch):
    a, b = (base(tmp_path / x, tiny_data, PBT) for x in "ab")
    r = runner.invoke(app, ["sweep", "--config", str(a)])
    assert r.exit_code == 0, r.output
    call = pbt.PBT.__call__

    def stop_after_epoch_2(self, pop):  # a real SIGTERM, right after epoch 2's exploit
        call(self, pop)
        if pop.progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(pbt.PBT, "__call__", stop_after_epoch_2)
    r = runner.invoke(app, ["sweep", "--config", str(b)])
    assert r.exit_code == 143, r.output
    monkeypatch.setattr(pbt.PBT, "__call__", call)
    r = runner.invoke(app, ["sweep", "--config", str(b)])
    assert r.exit_code == 0, r.output
    ra, rb = (tmp_path / x / "ckpt" / "sw" for x in "ab")
    assert rows(ra / "lineage.csv") == rows(rb / "lineage.csv")
    assert ranking(ra) == ranking(rb)
    for t in (f"trial-{i:03d}" for i in range(4)):
        wa, wb = weights(ra / t / "last.ckpt"), weights(rb / t / "last.ckpt")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert curve(ra / t) == curve(rb / t)


@pytest.mark.parametrize("sweep, words", [
    ("  method: pbt\n  params:\n    model.hidden: [[16], [32]]\n", "sweep.params.model.hidden: method pbt"),
    ("  method: pbt\n  population: 2\n" + SPACE, "sweep.population: 2 with method pbt"),
    ("  method: pbt\n  pruner: median\n" + SPACE, "sweep.pruner: median with method pbt"),
    ("  method: random\n  pruner: halving\n" + SPACE, "sweep.pruner: halving prunes inside a population"),
])
def test_what_search_inside_a_population_cannot_do_is_one_line(tmp_path, tiny_data, sweep, words):
    r = runner.invoke(app, ["sweep", "--config", str(base(tmp_path, tiny_data, sweep))])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "ckpt" / "sw" / "study.db").exists()


# ----------------------------------------------------------------------------- successive halving
def test_halving_keeps_the_best_of_each_rung_and_prunes_the_rest(tmp_path, tiny_data):
    cfg = base(tmp_path, tiny_data, "  method: random\n  pruner: halving\n  population: 4\n  reduction: 2\n" + SPACE)
    r = runner.invoke(app, ["sweep", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    root = tmp_path / "ckpt" / "sw"
    res = {x["trial"]: x for x in rows(root / "results.csv")}
    loss = {t: [float(m["val_loss"]) for m in rows(root / t / "metrics.csv")] for t in res}
    at1 = sorted(res, key=lambda t: loss[t][0])  # rung 1: the best 2 of 4 by epoch 1's val_loss go on
    assert {t for t in res if res[t]["epochs"] == "1"} == set(at1[2:])
    at2 = sorted(at1[:2], key=lambda t: loss[t][1])  # rung 2: the best 1 of 2
    assert res[at2[1]]["epochs"] == "2" and res[at2[0]]["epochs"] == "4"
    assert [res[t]["status"] for t in (*at1[2:], at2[1])] == ["pruned"] * 3 and res[at2[0]]["status"] == "finished"
    for t in (*at1[2:], at2[1]):
        assert json.loads((root / t / "status.json").read_text())["status"] == "pruned"
