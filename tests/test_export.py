"""Exports checked by their real consumers: onnxruntime, the safetensors library, torch.jit.load in a process
that never imports dlbase; and predictions on image files."""
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.config import load_config
from dlbase.train import train

runner = CliRunner()


@pytest.fixture
def trained(tiny_config):
    cfg = load_config(tiny_config, ["model.encoding.name=fourier", "model.encoding.num_freqs=2",
                                    "model.activation=gelu", "model.hidden=[32, 16]", "train.epochs=2"])
    result = train(cfg, log=lambda s: None)
    from dlbase.data import load_dataset
    from dlbase.state import load_for_eval
    _, model, _ = load_for_eval(result.folder / "best.ckpt", torch.device("cpu"))
    x = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.x[:37]  # real test images, an odd batch
    with torch.no_grad():
        ref = model.eval()(x)
    return result.folder / "best.ckpt", x, ref


def test_onnx_matches_pytorch_in_onnxruntime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ckpt, x, ref = trained
    r = runner.invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for batch in (x, x[:1]):  # the batch axis is dynamic
        got = torch.from_numpy(sess.run(None, {"pixels": batch.numpy()})[0])
        want = ref[:batch.shape[0]]
        diff = (got - want).abs().max().item()
        print(f"onnxruntime vs pytorch, batch {batch.shape[0]}: max abs difference {diff:.2e}")
        assert diff < 1e-4


def test_safetensors_loads_into_a_fresh_model(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    ckpt, x, ref = trained
    r = runner.invoke(app, ["export", str(ckpt), "--format", "safetensors"])
    assert r.exit_code == 0, r.output
    path = ckpt.with_suffix(".safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    from dlbase.config import config_from_dict
    from dlbase.model import MLP
    cfg = config_from_dict(json.loads(meta["dlbase_config"]))
    h, w = json.loads(meta["input_shape"])
    model = MLP(cfg.model, in_features=h * w)
    model.load_state_dict(safetensors.load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)


def test_torchscript_loads_without_dlbase(trained, tmp_path):
    ckpt, x, ref = trained
    out = tmp_path / "m.pt"
    assert runner.invoke(app, ["export", str(ckpt), "--format", "torchscript", "--out", str(out)]).exit_code == 0
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    code = (f"import sys, torch; m = torch.jit.load({str(out)!r}); io = torch.load({str(tmp_path / 'io.pt')!r}); "
            f"d = (m(io['x']) - io['ref']).abs().max().item(); "
            f"assert 'dlbase' not in sys.modules; print(d); assert d < 1e-5")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_export_errors(trained, tmp_path):
    ckpt, _, _ = trained
    r = runner.invoke(app, ["export", str(ckpt), "--format", "pickle"])
    assert r.exit_code == 2 and "onnx, safetensors, torchscript" in r.stderr
    r = runner.invoke(app, ["export", str(tmp_path / "none.ckpt"), "--format", "onnx"])
    assert r.exit_code == 2 and "not found" in r.stderr


def save_png(path, img28, size, invert=False):
    from PIL import Image
    a = (img28.reshape(28, 28) * 255).to(torch.uint8)
    if invert:
        a = 255 - a
    Image.frombytes("L", (28, 28), bytes(a.flatten().tolist())).resize(size).save(path)


def test_predict_on_png_and_jpeg_files(mnist_root, tmp_path):
    from dlbase.data import load_dataset
    cfg = load_config(None, [f"data.root={mnist_root}", "device=cpu", "model.hidden=[256]", "train.epochs=2",
                             f"checkpoint.dir={tmp_path}", "data.val_size=1000"])
    result = train(cfg, log=lambda s: None)
    test = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test
    files, labels = [], []
    for i in range(20):
        kind = i % 3
        p = tmp_path / (f"d{i}.jpg" if kind == 2 else f"d{i}.png")
        # as MNIST (28x28), scaled up (140x140), and dark ink on white paper as a photo would be
        save_png(p, test.x[i], (28, 28) if kind == 0 else (140, 140), invert=kind == 2)
        files.append(str(p))
        labels.append(int(test.y[i]))
    r = runner.invoke(app, ["predict", str(result.folder / "best.ckpt"), *files, "--json"])
    assert r.exit_code == 0, r.output
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["image"] for g in got] == files and all(0 < g["probability"] <= 1 for g in got)
    right = sum(g["label"] == y for g, y in zip(got, labels))
    assert right >= 17, (right, [g["label"] for g in got], labels)


def test_predict_refuses_bad_images(trained, tmp_path):
    ckpt, _, _ = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = runner.invoke(app, ["predict", str(ckpt), str(bad)])
    assert r.exit_code == 2 and "bad.png: not a readable image" in r.stderr
    from PIL import Image
    Image.new("L", (30, 30), 255).save(tmp_path / "blank.png")
    r = runner.invoke(app, ["predict", str(ckpt), str(tmp_path / "blank.png")])
    assert r.exit_code == 2 and "no digit found" in r.stderr
    r = runner.invoke(app, ["predict", str(ckpt), str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "not found" in r.stderr
