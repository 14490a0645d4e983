import math

import pytest
import torch

from dlbase.core import config as C
from dlbase.core.config import ScheduleConfig, load_config
from dlbase.core.optim import OPTIMIZER_PARAMS, build_optimizer, build_schedule
from dlbase.core.schema import OPTIM_INFO as OPTIMIZERS

LRS = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.1, "rmsprop": 0.01, "adadelta": 1.0,
       "adam": 0.01, "adamw": 0.01}


def test_names_agree_with_the_config():
    assert tuple(OPTIMIZERS) == C.OPTIMIZERS and tuple(OPTIMIZER_PARAMS) == C.OPTIMIZERS


@pytest.mark.parametrize("name", C.OPTIMIZERS)
def test_every_optimiser_from_yaml_lowers_the_loss(tmp_path, name):
    p = tmp_path / "c.yaml"
    p.write_text(f"optim:\n  name: {name}\n  lr: {LRS[name]}\n  weight_decay: 0.0001\n")
    cfg = load_config(p).optim
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x @ torch.randn(20, 3)).argmax(1)  # a linearly separable 3-class problem
    model = torch.nn.Linear(20, 3)
    opt = build_optimizer(model.parameters(), cfg)
    losses = []
    for _ in range(400 if name == "adadelta" else 60):  # adadelta starts with tiny steps (sqrt(eps) scale)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_table_s_state_keys_are_torch_s(name):
    """One optimiser table: the stacked optimiser keeps OPTIM_INFO's state_keys and step count, so they must be
    exactly what torch's own optimiser keeps per parameter after a step (oracle: its state_dict)."""
    info = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.randn(3))
    opt = getattr(torch.optim, info.torch_class)([p], lr=0.01, **info.extra,
                                                **({"momentum": 0.9} if info.extra or name == "momentum" else {}))
    p.grad = torch.ones(3)
    opt.step()
    keys = {k for k, v in opt.state_dict()["state"].get(0, {}).items() if v is not None}
    assert keys - {"step"} == set(info.state_keys), keys
    assert ("step" in keys) == info.counts_steps, keys


def test_optimiser_parameters_reach_torch():
    cfg = load_config(None, ["optim.name=nesterov", "optim.momentum=0.8"]).optim
    g = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg).param_groups[0]
    assert g["nesterov"] and g["momentum"] == 0.8
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.8, 0.95]", "optim.eps=1e-6",
                             "optim.weight_decay=0.05"]).optim
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    assert g["weight_decay"] == 0.05
    g = build_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config(None, ["optim.name=rmsprop",
                        "optim.alpha=0.9"]).optim).param_groups[0]
    assert g["alpha"] == 0.9
    g = build_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config(None, ["optim.name=adadelta",
                        "optim.rho=0.95"]).optim).param_groups[0]
    assert g["rho"] == 0.95
    g = build_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config(None, ["optim.impl=foreach"]).optim
                        ).param_groups[0]
    assert g["foreach"] is True


def sched(steps_per_epoch=10, total=100, **kw):
    return build_schedule(ScheduleConfig(**kw), 0.1, steps_per_epoch, total)


def test_constant_and_warmup():
    s = sched(name="constant", warmup_steps=5)
    assert [s(i) for i in range(7)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1])


def test_step_edges():
    s = sched(name="step", gamma=0.5, step_size=3)  # epochs 0-2: 0.1, 3-5: 0.05, ...
    assert s(29) == pytest.approx(0.1) and s(30) == pytest.approx(0.05) and s(60) == pytest.approx(0.025)


def test_multistep_edges():
    s = sched(name="multistep", gamma=0.1, milestones=(2, 5))
    assert s(19) == pytest.approx(0.1) and s(20) == pytest.approx(0.01) and s(49) == pytest.approx(0.01)
    assert s(50) == pytest.approx(0.001)


def test_exponential_per_epoch():
    s = sched(name="exponential", gamma=0.9)
    assert s(9) == pytest.approx(0.1) and s(10) == pytest.approx(0.09) and s(95) == pytest.approx(0.1 * 0.9 ** 9)


def test_cosine_end_and_middle_after_warmup():
    s = sched(name="cosine", min_lr=0.001, warmup_steps=10)
    assert s(9) == pytest.approx(0.1) and s(10) == pytest.approx(0.1)  # warm-up end, cosine start
    assert s(99) == pytest.approx(0.001)  # the last step reaches min_lr
    mid = 10 + 89 / 2
    assert sched(name="cosine", min_lr=0.001, warmup_steps=10)(int(mid)) == pytest.approx(
        0.001 + 0.099 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)) / 2)


@pytest.mark.parametrize("name,kw,torch_cls,torch_kw", [
    ("step", dict(gamma=0.5, step_size=2), torch.optim.lr_scheduler.StepLR, dict(step_size=2, gamma=0.5)),
    ("multistep", dict(gamma=0.3, milestones=(3, 7)), torch.optim.lr_scheduler.MultiStepLR,
     dict(milestones=[3, 7], gamma=0.3)),
    ("exponential", dict(gamma=0.8), torch.optim.lr_scheduler.ExponentialLR, dict(gamma=0.8)),
])
def test_epoch_schedules_match_torch(name, kw, torch_cls, torch_kw):
    s = sched(name=name, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch_cls(opt, **torch_kw)
    for epoch in range(10):
        assert s(epoch * 10) == pytest.approx(opt.param_groups[0]["lr"]), epoch
        assert s(epoch * 10 + 9) == pytest.approx(opt.param_groups[0]["lr"]), epoch
        opt.step()
        ref.step()


def test_onecycle_matches_torch_per_step():
    total = 100
    s = sched(name="onecycle", pct_start=0.25, div_factor=10.0, final_div_factor=100.0, total=total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.25,
                                              div_factor=10.0, final_div_factor=100.0, cycle_momentum=False)
    for step in range(total):
        assert s(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        ref.step()
    assert s(0) == pytest.approx(0.01) and s(total - 1) == pytest.approx(0.1 / 10 / 100)


@pytest.mark.parametrize("total,pct", [(10, 0.3), (37, 0.3), (1075, 0.3), (100, 0.25), (7, 0.5), (3, 0.1)])
def test_onecycle_matches_torch_at_every_step_for_odd_lengths(total, pct):
    """Issue 16 item 3: the phase boundary is pct_start * T - 1 unrounded, as torch has it (rounding gave a 32%
    lr error at T = 10)."""
    s = sched(name="onecycle", pct_start=pct, total=total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=pct,
                                              cycle_momentum=False)
    for step in range(total):
        assert s(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        opt.step()
        ref.step()


@pytest.mark.parametrize("name,kw,make", [
    ("multistep", dict(gamma=0.1, milestones=(1,)),
     lambda opt, spe: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1 * spe], gamma=0.1)),
    ("step", dict(gamma=0.5, step_size=2),
     lambda opt, spe: torch.optim.lr_scheduler.StepLR(opt, step_size=2 * spe, gamma=0.5)),
    ("exponential", dict(gamma=0.8),
     lambda opt, spe: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda k: 0.8 if k and k % spe == 0 else 1.0)),
])
def test_warmup_then_epoch_schedule_matches_sequential_lr(name, kw, make):
    """Issue 16 item 4: warm-up, then the schedule from its own start, as torch's SequentialLR runs them (the
    oracle: LinearLR over the warm-up, then the epoch schedule stepped per step with epochs in steps). With
    milestone 1, 6 warm-up steps and 4 steps per epoch the lr no longer climbs past the milestone and drops."""
    spe, warm, total = 4, 6, 40
    s = sched(name=name, warmup_steps=warm, steps_per_epoch=spe, total=total, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
              make(opt, spe)], milestones=[warm])
    for step in range(total):
        assert s(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), step
        opt.step()
        ref.step()
    lrs = [s(i) for i in range(warm + spe + 1)]
    assert max(lrs) == pytest.approx(0.1) and lrs == sorted(lrs[:warm]) + lrs[warm:]  # rises, then the schedule


def test_cosine_matches_torch_without_warmup():
    total = 50
    s = sched(name="cosine", min_lr=0.002, total=total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - 1, eta_min=0.002)
    for step in range(total):
        assert s(step) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        ref.step()


@pytest.mark.parametrize("name,lr", [("adadelta", 1.0), ("adagrad", 0.01), ("adam", 0.001), ("sgd", 0.001)])
def test_each_optimiser_gets_its_own_default_lr(name, lr):
    """Issue 16 item 5: published Adadelta has no learning rate (torch's 1.0 is the method); config show shows it."""
    assert load_config(None, [f"optim.name={name}"]).optim.lr == lr
    assert load_config(None, [f"optim.name={name}", "optim.lr=0.5"]).optim.lr == 0.5


def test_adadelta_with_its_default_learns_where_the_shared_default_barely_moves(tiny_config):
    from dlbase.training.train import train
    losses = {}
    for lr in ("null", "0.001"):  # tiny_config sets optim.lr; null asks for the optimiser's default
        cfg = load_config(tiny_config, ["optim.name=adadelta", f"optim.lr={lr}", "train.epochs=8"])
        losses[lr] = float(train(cfg, log=lambda s: None).last_metrics["train_loss"])
    assert losses["null"] < losses["0.001"] - 0.5, losses  # the shared 0.001 barely leaves ln(10) = 2.30
