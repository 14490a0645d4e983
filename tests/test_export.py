"""Exports checked by their real consumers: onnxruntime, the safetensors library, torch.export.load and
torch.jit.load in a process that never imports dlbase; exports that never destroy a file; and predictions on image
files (8 and 16 bits, with transparency)."""
import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import load_config
from dlbase.training.train import train

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained once for the module (tests that could harm it work on a copy), real test images
    and the model's logits on them."""
    from conftest import make_dataset
    from dlbase.core.data import load_dataset
    from dlbase.training.state import load_for_eval
    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "tiny")
    cfg = load_config(None, ["device=cpu", f"data.root={data}", "data.download=false", "data.val_size=100",
                             f"checkpoint.dir={root / 'ckpt'}", "name=tiny", "optim.lr=0.01", "train.batch_size=50",
                             "model.encoding.name=fourier", "model.encoding.num_freqs=2", "model.activation=gelu",
                             "model.hidden=[32, 16]", "train.epochs=2"])
    result = train(cfg, log=lambda s: None)
    _, model, _ = load_for_eval(result.folder / "best.ckpt", torch.device("cpu"))
    x = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.x[:37]  # real test images, an odd batch
    with torch.no_grad():
        ref = model.eval()(x)
    return result.folder / "best.ckpt", x, ref


@pytest.fixture
def ckpt_copy(trained, tmp_path):
    """A copy of the trained checkpoint in tmp_path, for tests whose failure could overwrite it."""
    ckpt = tmp_path / "run" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(trained[0].read_bytes())
    return ckpt


def one_line_error(r, *words):
    """The CLI refused with exit 2 and one line on stderr holding every word."""
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, (word, r.stderr)
    return r.stderr


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
    from dlbase.core.config import config_from_dict
    from dlbase.core.model import build_model
    cfg = config_from_dict(json.loads(meta["dlbase_config"]))
    h, w = json.loads(meta["input_shape"])
    model = build_model(cfg, (h, w), torch.device("cpu"))  # with the input standardisation's buffers
    model.load_state_dict(safetensors.load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)


def test_a_cnn_exports_to_onnx_and_safetensors(tmp_path, tiny_data):
    """model.conv goes where a model goes: onnxruntime gives its logits, and its safetensors rebuild through
    build_model from the metadata alone."""
    ort = pytest.importorskip("onnxruntime")
    safetensors = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    from dlbase.core.config import config_from_dict
    from dlbase.core.data import load_dataset
    from dlbase.core.model import CNN, build_model
    from dlbase.training.state import load_for_eval
    cfg = load_config(None, ["device=cpu", f"data.root={tiny_data}", "data.download=false", "data.val_size=100",
                             f"checkpoint.dir={tmp_path / 'ckpt'}", "name=cnn", "train.batch_size=50",
                             "model.conv=[{channels: 3, kernel: 5, pool: 2, norm: batch}, {channels: 4, kernel: 3, "
                             "pool: 2, pool_type: avg, dropout: 0.2}]", "model.hidden=[16]", "train.epochs=1",
                             "train.tensorboard=false"])
    ckpt = train(cfg, log=lambda s: None).folder / "best.ckpt"
    _, model, _ = load_for_eval(ckpt, torch.device("cpu"))
    assert isinstance(model, CNN)
    x = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test.x[:37]
    with torch.no_grad():
        ref = model.eval()(x)
    for fmt in ("onnx", "safetensors"):
        r = runner.invoke(app, ["export", str(ckpt), "--format", fmt])
        assert r.exit_code == 0, r.output
    sess = ort.InferenceSession(str(ckpt.with_suffix(".onnx")))
    for batch in (x, x[:1]):
        got = torch.from_numpy(sess.run(None, {"pixels": batch.numpy()})[0])
        assert (got - ref[:batch.shape[0]]).abs().max().item() < 1e-4
    with safe_open(str(ckpt.with_suffix(".safetensors")), "pt") as f:
        meta = f.metadata()
    rebuilt = build_model(config_from_dict(json.loads(meta["dlbase_config"])), tuple(json.loads(meta["input_shape"])),
                          torch.device("cpu"))
    rebuilt.load_state_dict(safetensors.load_file(str(ckpt.with_suffix(".safetensors"))))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), ref)


@pytest.mark.parametrize("fmt,suffix", [("export", ".pt2"), ("torchscript", ".pt")])
def test_torch_formats_load_without_dlbase_and_print_no_warnings(trained, tmp_path, fmt, suffix):
    """The real command in its own process (as a user runs it, with Python's default warning filters): no line on
    stderr, not even torch's FutureWarning about torch.jit.trace; the file loads where dlbase was never imported."""
    ckpt, x, ref = trained
    out = tmp_path / f"m{suffix}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "dlbase", "export", str(ckpt), "--format", fmt, "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env)  # this checkout's dlbase
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    assert r.stderr == ""
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    load = "torch.jit.load({!r})" if fmt == "torchscript" else "torch.export.load({!r}).module()"
    code = (f"import sys, torch; m = {load.format(str(out))}; io = torch.load({str(tmp_path / 'io.pt')!r}); "
            f"d = max((m(b) - r).abs().max().item() for b, r in ((io['x'], io['ref']), (io['x'][:1], io['ref'][:1]))); "
            f"assert 'dlbase' not in sys.modules; print(d); assert d < 1e-5")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_export_leaves_warning_filters_as_they_were(trained, tmp_path):
    """torch's deprecation notes are silenced for the export call alone, not by a global filter."""
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, ["export", str(trained[0]), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
        assert r.exit_code == 0, r.output
        inside = list(warnings.filters)
    assert [str(w.message) for w in caught] == [] and r.stderr == ""
    assert inside == [("always", None, Warning, None, 0)] + before and warnings.filters == before


def test_export_errors(trained, tmp_path):
    ckpt, _, _ = trained
    r = runner.invoke(app, ["export", str(ckpt), "--format", "pickle"])
    assert r.exit_code == 2 and "onnx, safetensors, torchscript, export" in r.stderr
    r = runner.invoke(app, ["export", str(tmp_path / "none.ckpt"), "--format", "onnx"])
    assert r.exit_code == 2 and "not found" in r.stderr


def test_export_never_writes_over_its_checkpoint(ckpt_copy, tmp_path, monkeypatch):
    """Issue 17 item 1: --out naming the checkpoint, by any spelling or link, is refused even with --force; so is
    a default output that would be the checkpoint (model.pt exported as TorchScript)."""
    saved = ckpt_copy.read_bytes()
    (tmp_path / "link.ckpt").symlink_to(ckpt_copy)
    os.link(ckpt_copy, tmp_path / "hard.ckpt")
    monkeypatch.chdir(tmp_path / "run")
    for out in (ckpt_copy, "best.ckpt", "./../run/best.ckpt", tmp_path / "link.ckpt", tmp_path / "hard.ckpt"):
        for force in ([], ["--force"]):
            r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "torchscript", "--out", str(out), *force])
            one_line_error(r, "is the checkpoint being read", "another --out")
    pt = tmp_path / "run" / "model.pt"
    os.replace(ckpt_copy, pt)
    for force in ([], ["--force"]):
        r = runner.invoke(app, ["export", "model.pt", "--format", "torchscript", *force])
        one_line_error(r, "model.pt (the default output", "is the checkpoint being read")
    assert pt.read_bytes() == saved and sorted(p.name for p in pt.parent.iterdir()) == ["model.pt"]


def test_export_replaces_a_file_only_with_force(ckpt_copy, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"someone's model")
    r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", str(out)])
    one_line_error(r, str(out), "already exists", "--force")
    assert out.read_bytes() == b"someone's model"
    default = ckpt_copy.with_suffix(".onnx")
    default.write_bytes(b"an older export")
    r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx"])
    one_line_error(r, str(default), "--force")
    assert default.read_bytes() == b"an older export"
    for path in (out, default):
        r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", str(path), "--force"])
        assert r.exit_code == 0 and r.stdout.strip() == str(path), r.output
        ort.InferenceSession(str(path))  # a whole ONNX file where the old one was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]  # no temp file left
    assert sorted(p.name for p in ckpt_copy.parent.iterdir()) == ["best.ckpt", "best.onnx"]


def test_export_to_a_directory_a_device_or_under_a_file(ckpt_copy, tmp_path):
    """Issue 17 item 8: one line, exit 2, what is there untouched."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "keep.onnx").write_bytes(b"keep")
    for force in ([], ["--force"]):
        r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", str(folder), *force])
        one_line_error(r, str(folder), "is a directory", str(folder / "best.onnx"))
        under_a_file = folder / "keep.onnx" / "m.onnx"
        r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", str(under_a_file), *force])
        one_line_error(r, "m.onnx", "cannot", "a file is in the way")
        if os.path.exists("/dev/full"):  # never replaced by a file, even as root and with --force
            r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", "/dev/full", *force])
            one_line_error(r, "/dev/full", "not a regular file")
    assert [p.name for p in folder.iterdir()] == ["keep.onnx"] and (folder / "keep.onnx").read_bytes() == b"keep"
    if os.path.exists("/dev/full"):
        assert not os.path.isfile("/dev/full")


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "export", "torchscript"])
def test_export_on_a_full_disk_leaves_no_half_file(ckpt_copy, tmp_path, monkeypatch, fmt):
    """Issue 17 item 8: the disk fills half-way through the file: one line, exit 2, the file that was at --out
    before is whole, and no partial or temp file is left (each format is written by the one atomic write)."""
    from dlbase.core import rundir

    def full_disk(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        if "w" in mode:
            def write(data):
                fh.__class__.write(fh, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fh.write = write
        return fh
    monkeypatch.setattr(rundir, "open", full_disk, raising=False)
    out = tmp_path / "out" / "model.bin"
    r = runner.invoke(app, ["export", str(ckpt_copy), "--format", fmt, "--out", str(out)])
    one_line_error(r, str(out), "No space left on device")
    assert list(out.parent.iterdir()) == []
    out.write_bytes(b"the previous export")
    r = runner.invoke(app, ["export", str(ckpt_copy), "--format", fmt, "--out", str(out), "--force"])
    one_line_error(r, str(out), "No space left on device", "untouched")
    assert out.read_bytes() == b"the previous export" and list(out.parent.iterdir()) == [out]


def test_export_into_a_read_only_folder(ckpt_copy, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(b"keep")
    os.chmod(folder, 0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        for out, force in ((folder / "new.onnx", []), (folder / "m.onnx", ["--force"]), (folder / "a" / "m.onnx", [])):
            r = runner.invoke(app, ["export", str(ckpt_copy), "--format", "onnx", "--out", str(out), *force])
            one_line_error(r, str(out), "Permission denied")
    finally:
        os.chmod(folder, 0o700)
    assert [p.name for p in folder.iterdir()] == ["m.onnx"] and (folder / "m.onnx").read_bytes() == b"keep"


def ring(size=28):
    """A hand-drawn zero: a ring of bright ink with soft edges on black, (size, size) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size) - size / 2 + 0.5, torch.arange(size) - size / 2 + 0.5, indexing="ij")
    r = (yy ** 2 / 1.6 + xx ** 2).sqrt()
    return (1.5 - (r - size / 4).abs()).clamp(0, 1)


def to_bytes(a):
    return bytes((a * 255).round().to(torch.uint8).flatten().tolist())


def test_sixteen_bit_png_read_at_full_depth(tmp_path):
    """Issue 17 item 13: a 16-bit greyscale PNG gives the pixels its 8-bit twin gives (oracle: the same levels
    times 257), not every level above 255/65535 clipped to white."""
    import numpy as np
    from PIL import Image
    from dlbase.tools.export import load_image
    digit = ring()
    levels = (digit * 255).round().to(torch.int32)
    Image.frombytes("L", (28, 28), to_bytes(digit)).save(tmp_path / "d8.png")
    Image.fromarray((levels.numpy() * 257).astype(np.uint16)).save(tmp_path / "d16.png")
    with Image.open(tmp_path / "d16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    want = load_image(tmp_path / "d8.png")
    assert torch.allclose(load_image(tmp_path / "d16.png"), want, atol=1e-6)
    # dark ink on white paper in 16 bits is inverted like its 8-bit twin
    Image.fromarray(((255 - levels.numpy()) * 257).astype(np.uint16)).save(tmp_path / "d16w.png")
    assert torch.allclose(load_image(tmp_path / "d16w.png"), want, atol=1e-6)


def test_transparency_composited_onto_the_implied_background(tmp_path):
    """Issue 17 item 13: black ink on a transparent background (RGBA, LA, P with a transparent index), white ink on
    one, and dark ink on opaque white paper with a transparent border all give the pixels of the same digit drawn
    bright on black (oracle: load_image of that plain greyscale file)."""
    from PIL import Image
    from dlbase.tools.export import load_image
    digit = ring()
    binary = (digit > 0.5).float()
    Image.frombytes("L", (28, 28), to_bytes(digit)).save(tmp_path / "plain.png")
    Image.frombytes("L", (28, 28), to_bytes(binary)).save(tmp_path / "plain_binary.png")
    zeros, ones, alpha = to_bytes(torch.zeros(28, 28)), to_bytes(torch.ones(28, 28)), to_bytes(digit)

    def rgba(grey, a):
        return Image.merge("RGBA", [Image.frombytes("L", (28, 28), b) for b in (grey, grey, grey, a)])
    rgba(zeros, alpha).save(tmp_path / "black_on_clear.png")
    rgba(ones, alpha).save(tmp_path / "white_on_clear.png")
    Image.merge("LA", [Image.frombytes("L", (28, 28), zeros), Image.frombytes("L", (28, 28), alpha)]).save(
        tmp_path / "black_on_clear_la.png")
    pal = Image.frombytes("P", (28, 28), bytes(binary.to(torch.uint8).flatten().tolist()))
    pal.putpalette([255, 255, 255, 0, 0, 0])  # index 0: white, transparent; 1: black ink
    pal.save(tmp_path / "black_on_clear_p.png", transparency=0)
    for border in (3, 12):  # a transparent border (of transparent black) round white paper, thin and wide
        paper = Image.new("RGBA", (28 + 2 * border,) * 2, (0, 0, 0, 0))
        paper.paste(Image.frombytes("L", (28, 28), to_bytes(1 - digit)).convert("RGBA"), (border, border))
        paper.save(tmp_path / f"paper_in_clear_border{border}.png")
    want = load_image(tmp_path / "plain.png")
    for name in ("black_on_clear.png", "white_on_clear.png", "black_on_clear_la.png", "paper_in_clear_border3.png",
                 "paper_in_clear_border12.png"):
        assert torch.allclose(load_image(tmp_path / name), want, atol=1e-5), name
    assert torch.allclose(load_image(tmp_path / "black_on_clear_p.png"), load_image(tmp_path / "plain_binary.png"),
                          atol=1e-6)
    Image.new("RGBA", (28, 28), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(Exception, match="no digit found"):
        load_image(tmp_path / "clear.png")


def save_png(path, img28, size, invert=False):
    from PIL import Image
    a = (img28.reshape(28, 28) * 255).to(torch.uint8)
    if invert:
        a = 255 - a
    Image.frombytes("L", (28, 28), bytes(a.flatten().tolist())).resize(size).save(path)


def test_predict_on_png_and_jpeg_files(mnist_root, tmp_path):
    from dlbase.core.data import load_dataset
    cfg = load_config(None, [f"data.root={mnist_root}", "device=cpu", "model.hidden=[256]", "train.epochs=2",
                             f"checkpoint.dir={tmp_path}", "data.val_size=1000"])
    result = train(cfg, log=lambda s: None)
    test = load_dataset(cfg.data, cfg.seed, torch.device("cpu")).test
    import numpy as np
    from PIL import Image
    files, labels, groups = [], [], []
    for i in range(20):
        kind = i % 3
        p = tmp_path / (f"d{i}.jpg" if kind == 2 else f"d{i}.png")
        # as MNIST (28x28), scaled up (140x140), and dark ink on white paper as a photo would be
        save_png(p, test.x[i], (28, 28) if kind == 0 else (140, 140), invert=kind == 2)
        files.append(str(p))
        labels.append(int(test.y[i]))
        groups.append("8-bit")
    for i in range(20):  # the same digits as 16-bit PNGs, and as black ink on a transparent background
        levels = (test.x[i].reshape(28, 28) * 255).round().numpy().astype(np.uint16)
        Image.fromarray(levels * 257).save(tmp_path / f"d{i}_16bit.png")
        ink = Image.fromarray(levels.astype(np.uint8))
        Image.merge("RGBA", [Image.new("L", (28, 28), 0)] * 3 + [ink]).save(tmp_path / f"d{i}_clear.png")
        files += [str(tmp_path / f"d{i}_16bit.png"), str(tmp_path / f"d{i}_clear.png")]
        labels += [int(test.y[i])] * 2
        groups += ["16-bit", "transparent"]
    r = runner.invoke(app, ["predict", str(result.folder / "best.ckpt"), *files, "--json"])
    assert r.exit_code == 0, r.output
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["image"] for g in got] == files and all(0 < g["probability"] <= 1 for g in got)
    for group in ("8-bit", "16-bit", "transparent"):
        picked = [(g["label"], y) for g, y, k in zip(got, labels, groups) if k == group]
        right = sum(label == y for label, y in picked)
        assert right >= 17, (group, right, picked)
    assert labels[3] == 0 and got[files.index(str(tmp_path / "d3_16bit.png"))]["label"] == 0  # the image


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
