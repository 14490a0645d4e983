"""Models out of dlbase: ONNX, safetensors, torch.export (.pt2) and TorchScript files; and predictions on image
files."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from dlbase.core.config import Config, to_dict
from dlbase.core.errors import DlbaseError


class WithProbabilities(nn.Module):
    """The exported graph: pixels in [0, 1], (B, H*W) -> logits (B, 10). The encoding is part of the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's notes while it traces or exports (torch 2.14 deprecates torch.jit.trace with a
    FutureWarning; the ONNX exporter has its own): they are about torch's future, not the user's file. Scoped to
    the call, so the user's own warning filters come back afterwards."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        yield


def _onnx(model: nn.Module, example: torch.Tensor, cfg: Config, shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    with _quiet_torch():
        torch.onnx.export(WithProbabilities(model), (example,), buf, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buf.getvalue()


def _safetensors(model: nn.Module, example: torch.Tensor, cfg: Config, shape: tuple[int, int]) -> bytes:
    from safetensors.torch import save
    meta = {"dlbase_config": json.dumps(to_dict(cfg)), "input_shape": json.dumps(list(shape)),
            "format": "dlbase model state_dict (MLP or CNN); rebuild with "
                      "dlbase.core.model.build_model(config, (H, W), device)"}
    return save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def _torch_export(model: nn.Module, example: torch.Tensor, cfg: Config, shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    with _quiet_torch():
        program = torch.export.export(WithProbabilities(model), (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, buf)
    return buf.getvalue()


def _torchscript(model: nn.Module, example: torch.Tensor, cfg: Config, shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    with _quiet_torch():
        torch.jit.save(torch.jit.trace(WithProbabilities(model), example), buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Format:
    """One output format: its file suffix, the function that serialises the model to bytes (so that every format
    is written by the one atomic write), and whether this torch still offers it."""
    suffix: str
    write: Callable[[nn.Module, torch.Tensor, Config, tuple[int, int]], bytes]
    available: Callable[[], bool] = lambda: True


FORMATS = {
    "onnx": Format(".onnx", _onnx),
    "safetensors": Format(".safetensors", _safetensors),
    "torchscript": Format(".pt", _torchscript, lambda: hasattr(getattr(torch, "jit", None), "trace")),
    "export": Format(".pt2", _torch_export),  # torch.export.save; torch.export.load reads it without dlbase
}


def _check_out(ckpt: Path, out: Path, suffix: str, force: bool, given: bool) -> None:
    """Refuse an output that is the checkpoint being read (also through a link or another spelling of its path),
    one that is not a plain file, and an existing file unless force: before any work, so nothing is touched."""
    what = f"--out {out}" if given else f"{out} (the default output: the checkpoint's name with {suffix})"
    if out.exists() and os.path.samefile(ckpt, out):
        raise DlbaseError(f"{what} is the checkpoint being read, {ckpt}; give another --out")
    if out.is_dir():
        raise DlbaseError(f"{what} is a directory; give a file name, e.g. --out {out / ckpt.with_suffix(suffix).name}")
    if out.exists() and not out.is_file():
        raise DlbaseError(f"{what} is not a regular file (a device, pipe or socket); give a file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise DlbaseError(f"{what} already exists; add --force to replace it")


def export(ckpt: Path, fmt: str, out: Optional[Path] = None, force: bool = False) -> Path:
    """Write the checkpoint's model in `fmt` next to it (or to `out`); returns the path.

    Never writes over the checkpoint, replaces an existing file only when `force`, and writes through
    rundir.write_atomic: a failed export (full disk, read-only folder) leaves whatever was at `out` as it was."""
    from dlbase.core.rundir import write_atomic
    from dlbase.training.state import load_for_eval
    if fmt not in FORMATS:
        raise DlbaseError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    if not spec.available():
        raise DlbaseError(f"--format {fmt}: torch {torch.__version__} no longer has it; use --format export (a .pt2 "
                          f"file that torch.export.load reads)")
    ckpt = Path(ckpt).expanduser()
    cfg, model, payload = load_for_eval(ckpt, torch.device("cpu"))
    model.eval()
    given = out is not None
    out = Path(out).expanduser() if given else ckpt.with_suffix(spec.suffix)
    _check_out(ckpt, out, spec.suffix, force, given)
    h, w = payload["input_shape"]
    try:
        blob = spec.write(model, torch.rand(2, h * w), cfg, (h, w))  # (2, H*W): a batch of 2; the axis is dynamic
    except ImportError as e:
        raise DlbaseError(f"--format {fmt}: needs the {e.name} package (pip install {e.name})") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
        raise DlbaseError(f"{out}: cannot create its folder {out.parent}: "
                          f"{'a file is in the way' if in_the_way else e.strerror or e}") from None
    write_atomic(out, blob, f"the {fmt} file")
    return out


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how Pillow opens 16-bit greyscale PNG and TIFF files
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _composite(grey: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(H, W) grey levels and opacities in [0, 1] -> grey levels over the background the image implies.

    What is drawn (the opaque pixels) is either ink and paper (it holds both tones, or covers most of the image:
    a sheet in a transparent border), and then the background is the paper's tone, the tone of most of it; or the
    ink alone (one tone, on a mostly transparent image), and then the background is the opposite tone, so that
    black ink on a transparent background is not lost on black."""
    if bool(alpha.min() >= 1):
        return grey
    drawn = float(alpha.sum())
    if drawn == 0:
        return torch.zeros_like(grey)  # nothing drawn: blank
    light = float((alpha * (grey > 0.5)).sum()) / drawn  # the share of what is drawn that is light
    paper = min(light, 1 - light) > 0.05 or float(alpha.mean()) > 0.5
    background = float((light > 0.5) == paper)  # paper: its own tone; ink alone: the opposite one
    return alpha * grey + (1 - alpha) * background


def _grey_levels(im) -> torch.Tensor:
    """A PIL image -> (H, W) grey levels in [0, 1]: 16-bit files at their full depth (convert("L") would clip
    every level above 255 to white), transparency composited (convert("L") would drop it)."""
    import numpy as np
    if im.mode in SIXTEEN_BIT:
        levels = np.asarray(im).astype(np.float32)  # (H, W) in 0..65535
        grey = torch.from_numpy(levels / 65535).clamp(0, 1)
        key = im.info.get("transparency")  # a 16-bit PNG's transparency is one grey level
        return _composite(grey, torch.from_numpy((levels != key).astype(np.float32))) if isinstance(key, int) else grey
    if im.mode in ALPHA or "transparency" in im.info:
        la = im.convert("RGBA").convert("LA")
        grey, alpha = (torch.from_numpy(np.asarray(band, dtype=np.float32) / 255) for band in la.split())
        return _composite(grey, alpha)
    return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255)


def load_image(path: Path, size: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """An image file of any size -> (H*W,) pixels in [0, 1], prepared the way MNIST was: grey levels (8 or 16
    bits; transparency composited onto the background the image implies), ink bright on dark, the digit scaled
    to fit a 20x20 box (for 28x28) keeping its aspect ratio, then placed so its centre of mass is the image's
    centre."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            x = _grey_levels(im)  # (H, W)
    except FileNotFoundError:
        raise DlbaseError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise DlbaseError(f"{path}: not a readable image ({type(e).__name__}); give a PNG or JPEG file") from None
    if x.mean() > 0.5:  # dark ink on light paper: MNIST is light ink on black
        x = 1 - x
    ink = (x > 0.2).nonzero()
    if len(ink) == 0:
        raise DlbaseError(f"{path}: no digit found (the image is blank)")
    (r0, c0), (r1, c1) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
    crop = x[r0:r1 + 1, c0:c1 + 1]
    H, W = size
    box = max(1, round(min(H, W) * 20 / 28))
    scale = box / max(crop.shape)
    nh, nw = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = torch.nn.functional.interpolate(crop[None, None], size=(nh, nw), mode="bilinear", antialias=True,
                                            align_corners=False)[0, 0].clamp(0, 1)
    canvas = torch.zeros(H, W)
    rows, cols = torch.arange(nh, dtype=torch.float32), torch.arange(nw, dtype=torch.float32)
    mass = small.sum().clamp_min(1e-6)
    cy, cx = (small.sum(1) * rows).sum() / mass, (small.sum(0) * cols).sum() / mass
    top = int(round(H / 2 - float(cy) - 0.5))
    left = int(round(W / 2 - float(cx) - 0.5))
    top, left = min(max(top, 0), H - nh), min(max(left, 0), W - nw)
    canvas[top:top + nh, left:left + nw] = small
    return canvas.flatten()


def predict(ckpt: Path, images: list[Path]) -> list[dict]:
    from dlbase.training.state import load_for_eval
    cfg, model, payload = load_for_eval(ckpt, torch.device("cpu"))
    model.eval()
    h, w = payload["input_shape"]
    x = torch.stack([load_image(p, (h, w)) for p in images])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return [{"image": str(p), "label": int(pr.argmax()), "probability": float(pr.max())} for p, pr in zip(images, probs)]
