"""dlbase optimizers (dlbase/tools/optpaths.py): gradient descent on a quadratic against its closed form, the
momentum, Nesterov, Adam and AdamW paths against torch.optim's own classes and against the update rules written
out as D2L chapter 11 writes them, the gradient noise, and the command's files and errors."""
from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.schema import OPTIM_INFO, OptimConfig
from dlbase.tools.optpaths import FUNCTIONS, path

runner = CliRunner()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUAD = FUNCTIONS["quadratic"]  # x1^2 + 2 x2^2: the Hessian's eigenvalues (lambda) are 2 and 4


def test_gradient_descent_on_a_quadratic_is_the_closed_form_exactly():
    """x_t = (1 - eta lambda)^t x_0 per coordinate; eta = 1/8 keeps every product exact in float64."""
    x0, eta, steps = (-5.0, -2.0), 0.125, 30
    pts = path(QUAD, "sgd", eta, x0, steps)
    t = torch.arange(steps + 1, dtype=torch.float64)
    closed = torch.stack([x0[0] * (1 - eta * 2) ** t, x0[1] * (1 - eta * 4) ** t], 1)
    assert torch.equal(pts, closed)
    pts = path(QUAD, "sgd", 0.1, x0, steps)  # D2L 11.3's eta: equal to rounding
    closed = torch.stack([x0[0] * 0.8 ** t, x0[1] * 0.6 ** t], 1)
    assert torch.allclose(pts, closed, rtol=1e-13, atol=1e-300)


def _torch_path(cls, fn, x0, steps, **kw):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = cls([x], **kw)
    out = [x.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        fn.f(x[0], x[1]).backward()
        opt.step()
        out.append(x.detach().clone())
    return torch.stack(out)


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn.f(x[0], x[1]).backward()
    return x.grad


def _d2l_path(name, fn, x0, steps, lr, beta=0.9, b1=0.9, b2=0.999, eps=1e-8):
    """The update rules as D2L 11.6 (momentum: v <- beta v + g, x <- x - eta v; no dampening) and 11.10 (Adam with
    bias-corrected moments; eps added to sqrt(v_hat), as torch places it) write them, by hand."""
    x = torch.tensor(x0, dtype=torch.float64)
    v, s = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    out = [x.clone()]
    for t in range(1, steps + 1):
        g = _grad(fn, x)
        if name == "momentum":
            v = beta * v + g
            x = x - lr * v
        else:
            v, s = b1 * v + (1 - b1) * g, b2 * s + (1 - b2) * g * g
            x = x - lr * (v / (1 - b1 ** t)) / ((s / (1 - b2 ** t)).sqrt() + eps)
        out.append(x.clone())
    return torch.stack(out)


@pytest.mark.parametrize("fname", ["ill_conditioned", "rosenbrock", "himmelblau"])
def test_momentum_and_adam_paths_are_torch_s_and_d2l_s(fname):
    fn = FUNCTIONS[fname]
    lr, steps = fn.lr, min(fn.steps, 200)
    for name, cls, kw in (("momentum", torch.optim.SGD, {"momentum": 0.9}), ("adam", torch.optim.Adam, {})):
        ours = path(fn, name, lr, fn.start, steps)
        assert torch.allclose(ours, _torch_path(cls, fn, fn.start, steps, lr=lr, **kw), rtol=1e-12, atol=1e-12)
        assert torch.allclose(ours, _d2l_path(name, fn, fn.start, steps, lr), rtol=1e-9, atol=1e-9), name


def test_nesterov_and_adamw_take_their_settings_from_the_optim_config():
    fn = FUNCTIONS["ill_conditioned"]
    settings = OptimConfig(momentum=0.5, weight_decay=0.1, betas=(0.8, 0.99))
    ours = path(fn, "nesterov", 0.1, fn.start, 20, settings=settings)
    ref = _torch_path(torch.optim.SGD, fn, fn.start, 20, lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.1)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    ours = path(fn, "adamw", 0.1, fn.start, 20, settings=settings)
    ref = _torch_path(torch.optim.AdamW, fn, fn.start, 20, lr=0.1, betas=(0.8, 0.99), weight_decay=0.1)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours, path(fn, "adam", 0.1, fn.start, 20, settings=settings))  # decoupled decay


def test_gradient_noise_is_seeded_and_moves_the_path():
    a, b = path(QUAD, "sgd", 0.1, (-5.0, -2.0), 10, noise=1.0), path(QUAD, "sgd", 0.1, (-5.0, -2.0), 10, noise=1.0)
    assert torch.equal(a, b) and not torch.equal(a, path(QUAD, "sgd", 0.1, (-5.0, -2.0), 10))


def test_cli_writes_every_optimisers_path(tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["optimizers", "--function", "himmelblau", "--steps", "15", "--out", str(out),
                            "--lr", "0.02", "--lr", "adam=0.3", "--start", "0.5,-1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "paths.csv")))
    assert len(rows) == len(OPTIM_INFO) * 16 and {x["optimizer"] for x in rows} == set(OPTIM_INFO)
    lr = {x["optimizer"]: float(x["lr"]) for x in rows}
    assert lr["adam"] == 0.3 and lr["sgd"] == 0.02 and lr["adadelta"] == 0.02
    first = [x for x in rows if x["step"] == "0"]
    assert all((float(x["x1"]), float(x["x2"])) == (0.5, -1.0) for x in first)
    assert (out / "optimizers.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["optimizers", "-f", "saddle", "-O", "sgd,adam", "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0 and {x["optimizer"] for x in csv.DictReader(open(out / "paths.csv"))} == {"sgd", "adam"}
    assert "adadelta" not in r.stdout and "wrote" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--function", "rastrigin"], "rosenbrock"),
    (["--optimizer", "yogi"], "adamw"),
    (["--optimizer", "adma"], "did you mean adam"),
    (["--start", "1"], "--start"),
    (["--lr", "adam=-1"], "--lr"),
    (["--lr", "yogi=0.1"], "--optimizer 'yogi'"),
    (["--steps", "0"], "--steps"),
    (["--set", "optim.lr=0.1"], "--lr"),
    (["--set", "optim.momentum=2"], "optim.momentum"),
    (["--device", "gpu"], "--device"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, words):
    r = runner.invoke(app, ["optimizers", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()  # refused before the folder is made


@cuda
@pytest.mark.cuda
def test_paths_on_cuda_equal_the_cpu_s():
    fn = FUNCTIONS["rosenbrock"]
    for name in OPTIM_INFO:
        cpu = path(fn, name, 1e-3, fn.start, 200)
        gpu = path(fn, name, 1e-3, fn.start, 200, device=torch.device("cuda"))  # torch's fused kernels there
        assert torch.allclose(cpu, gpu, rtol=1e-9, atol=1e-9), name
