"""dlbase landscape (dlbase/tools/landscape.py, population/vmapped.py's evaluate_stacked) and the init.ckpt it
starts from, against their oracles: `dlbase eval`'s loss of the two checkpoints at the line's ends and of the final
one at the slice's centre, each point evaluated alone, the model a fresh run builds, an uninterrupted run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.core.loss import build_eval_loss
from dlbase.core.model import build_model
from dlbase.population.vmapped import evaluate_stacked
from dlbase.tools import lab
from dlbase.tools.landscape import filter_normalised, landscape, line_alphas, plane_axis
from dlbase.training import checkpoint
from dlbase.training.evaluate import evaluate, evaluate_checkpoint
from dlbase.training.state import configure
from dlbase.training.train import train

runner = CliRunner()


def quiet(line):
    pass


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("dlbase.training.report.plot_run", lambda folder: [])


@pytest.fixture
def run(tiny_config):
    """A tiny run with dropout and batch norm (eval mode must switch both off), 2 epochs."""
    return train(load_config(tiny_config, ["train.epochs=2", "model.dropout=0.2", "model.norm=batch",
                                           "train.tensorboard=false"]), log=quiet)


def test_a_fresh_run_keeps_its_initial_weights_once(run, tiny_config):
    init = checkpoint.load(run.folder / "init.ckpt")
    assert init["epoch"] == 0 and init["step"] == 0 and init["config"] == checkpoint.load(run.folder / "last.ckpt")["config"]
    cfg = load_config(tiny_config, ["train.epochs=2", "model.dropout=0.2", "model.norm=batch"])
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg, (28, 28), torch.device("cpu")).state_dict()  # the weights train() starts from
    for k, v in fresh.items():
        if not k.startswith("encoding."):  # the standardisation's statistics are set from the data after
            assert torch.equal(init["model"][k], v), k
    before = (run.folder / "init.ckpt").read_bytes()
    go_on = configure(None, ["train.epochs=3"], run.folder / "last.ckpt")
    assert train(go_on.cfg, go_on.resume, go_on.payload, log=quiet).epochs_done == 3
    assert (run.folder / "init.ckpt").read_bytes() == before  # never rewritten on resume


def test_the_lines_ends_are_dlbase_evals_losses_and_the_slices_centre_too(run, tmp_path):
    r = landscape(run.folder, resolution=5, samples=10**6, out=tmp_path / "out", log=quiet)
    alphas = r["line"]["alpha"]
    assert alphas[0] < 0 and alphas[-1] > 1 and 0.0 in alphas and 1.0 in alphas
    mid = len(r["plane"]["a"]) // 2
    for split in ("train", "val"):
        at_init = evaluate_checkpoint(run.folder / "init.ckpt", split)
        at_end = evaluate_checkpoint(run.folder / "best.ckpt", split)
        assert r["samples"][split] == at_end["n"]
        line = r["line"][split]
        assert all(math.isfinite(v) for v in line["loss"])  # beyond the ends too (batch norm's variance stays > 0)
        assert line["loss"][alphas.index(0.0)] == pytest.approx(at_init["loss"], rel=1e-5)
        assert line["loss"][alphas.index(1.0)] == pytest.approx(at_end["loss"], rel=1e-5)
        assert line["accuracy"][alphas.index(1.0)] == pytest.approx(at_end["accuracy"], abs=1e-12)
        assert r["plane"][split]["loss"][mid][mid] == pytest.approx(at_end["loss"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["landscape.json", "landscape.csv", "landscape_line.png", "landscape_2d.png"])
    saved = json.loads((tmp_path / "out" / "landscape.json").read_text())
    assert saved["plane"]["train"]["loss"] == r["plane"]["train"]["loss"]
    rows = (tmp_path / "out" / "landscape.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (len(alphas) + 25)


def test_bf16_is_within_its_stated_error_of_fp32(run, tmp_path):
    exact = landscape(run.folder, resolution=3, out=tmp_path / "a", log=quiet)
    fast = landscape(run.folder, resolution=3, out=tmp_path / "b", precision="bf16", log=quiet)
    for kind in ("line", "plane"):
        a, b = (torch.tensor(r[kind]["val"]["loss"]) for r in (exact, fast))
        assert torch.allclose(b, a, rtol=0.03, atol=1e-4), (kind, a, b)


def test_stacked_points_equal_each_point_evaluated_alone(run):
    """evaluate_stacked on K weight vectors at once against training/evaluate.py's evaluate of each in turn."""
    loaded = lab.load(run.folder / "best.ckpt", torch.device("cpu"))
    model, part = loaded.model, loaded.data.val
    loss_fn = build_eval_loss("cross_entropy", "softmax")
    d = filter_normalised(model, torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    coeffs = [0.0, 0.3, -0.7, 1.5]
    stacked = {k: torch.stack([state[k] + c * d[k] for c in coeffs]) for k in d}
    shared = {k: v for k, v in state.items() if k not in d}
    losses, accs = evaluate_stacked(model, stacked, shared, part.x, part.y, loss_fn, batch_size=37)
    for i, c in enumerate(coeffs):
        model.load_state_dict({**state, **{k: state[k] + c * d[k] for k in d}})
        alone = evaluate(model, part, loss_fn)
        assert float(losses[i]) == pytest.approx(alone["loss"], rel=1e-5)
        assert float(accs[i]) == pytest.approx(alone["accuracy"], abs=1e-12)


def test_directions_are_normalised_filter_by_filter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    d = filter_normalised(model, torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0  # biases and batch norm's scales stay put
        else:
            assert torch.allclose(d[name].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1), rtol=1e-5)
    assert line_alphas(5) == [-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25] and plane_axis(3, 2.0) == [-2.0, 0.0, 2.0]


def test_a_run_without_init_ckpt_gets_the_slice_and_one_line(run, tmp_path):
    (run.folder / "init.ckpt").unlink()
    said = []
    r = landscape(run.folder / "best.ckpt", splits="val", resolution=3, out=tmp_path / "o", log=said.append)
    assert "line" not in r and list(r["samples"]) == ["val"] and len(r["plane"]["val"]["loss"]) == 3
    assert len(said) == 1 and "no init.ckpt" in said[0]
    assert not (tmp_path / "o" / "landscape_line.png").exists() and (tmp_path / "o" / "landscape_2d.png").exists()


def test_dlbase_landscape_on_the_command_line(run):
    r = runner.invoke(app, ["landscape", str(run.folder), "--resolution", "3", "--samples", "50"])
    assert r.exit_code == 0, r.output
    assert "line, train (50 images)" in r.stdout and "2-D slice, val" in r.stdout
    assert (run.folder / "landscape_2d.png").stat().st_size > 1000
    h = runner.invoke(app, ["landscape", "--help"])
    assert h.exit_code == 0 and all(o in h.stdout for o in ("--resolution", "--span", "--samples", "--split"))


@pytest.mark.parametrize("args,words", [
    (["landscape", "{bad}"], "not a readable checkpoint"),
    (["landscape", "{tmp}"], "no best.ckpt or last.ckpt in this folder"),
    (["landscape", "{bad}", "--resolution", "0"], "--resolution: 0 is out of range; allowed: 2 to 201"),
    (["landscape", "{bad}", "--span", "-1"], "--span: -1.0 is out of range"),
    (["landscape", "{ckpt}", "--split", "train,tset"], "unknown split tset"),
    (["landscape", "{ckpt}", "--precision", "fp8"], "--precision: 'fp8' is not one of fp32, bf16"),
])
def test_landscape_mistakes_exit_2_with_one_line(run, tmp_path, args, words):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage" * 50)
    args = [a.format(bad=bad, tmp=tmp_path, ckpt=run.folder / "best.ckpt") for a in args]
    r = runner.invoke(app, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and words in lines[0] and lines[0].startswith("error: "), r.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_landscape_on_cuda_equals_the_cpus(run, tmp_path):
    cpu = landscape(run.folder, resolution=3, samples=100, out=tmp_path / "c", device="cpu", log=quiet)
    gpu = landscape(run.folder, resolution=3, samples=100, out=tmp_path / "g", device="cuda", log=quiet)
    assert gpu["plane"]["val"]["loss"] == pytest.approx(cpu["plane"]["val"]["loss"], rel=1e-3)
    assert gpu["line"]["train"]["loss"] == pytest.approx(cpu["line"]["train"]["loss"], rel=1e-3)
