"""Models out of dlbase: ONNX, safetensors and TorchScript files; and predictions on image files."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dlbase.config import to_dict
from dlbase.errors import DlbaseError

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".pt"}


class WithProbabilities(nn.Module):
    """The exported graph: pixels in [0, 1], (B, H*W) -> logits (B, 10). The encoding is part of the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def export(ckpt: Path, fmt: str, out: Optional[Path] = None) -> Path:
    """Write the checkpoint's model in `fmt` next to it (or to `out`); returns the path."""
    from dlbase.state import load_for_eval
    if fmt not in FORMATS:
        raise DlbaseError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    cfg, model, payload = load_for_eval(ckpt, torch.device("cpu"))
    model.eval()
    out = Path(out) if out is not None else Path(ckpt).with_suffix(FORMATS[fmt])
    h, w = payload["input_shape"]
    example = torch.rand(2, h * w)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch's notes on jit and the exporter
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        if fmt == "safetensors":
            from safetensors.torch import save_file
            meta = {"dlbase_config": json.dumps(to_dict(cfg)), "input_shape": json.dumps([h, w]),
                    "format": "dlbase MLP state_dict; rebuild with dlbase.model.MLP(config.model, H*W)"}
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=meta)
        elif fmt == "torchscript":
            traced = torch.jit.trace(WithProbabilities(model), example)
            traced.save(str(out))
        else:
            torch.onnx.export(WithProbabilities(model), (example,), str(out), input_names=["pixels"],
                              output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
    except ImportError as e:
        raise DlbaseError(f"--format {fmt}: needs the {e.name} package (pip install {e.name})") from None
    except OSError as e:
        raise DlbaseError(f"{out}: cannot write: {e.strerror or e}") from None
    return out


def load_image(path: Path, size: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """An image file of any size -> (H*W,) pixels in [0, 1], prepared the way MNIST was: grey levels, ink bright
    on dark, the digit scaled to fit a 20x20 box (for 28x28) keeping its aspect ratio, then placed so its
    centre of mass is the image's centre."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L")
    except FileNotFoundError:
        raise DlbaseError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DlbaseError(f"{path}: not a readable image ({type(e).__name__}); give a PNG or JPEG file") from None
    x = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(grey.height, grey.width).float() / 255
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
    from dlbase.state import load_for_eval
    cfg, model, payload = load_for_eval(ckpt, torch.device("cpu"))
    model.eval()
    h, w = payload["input_shape"]
    x = torch.stack([load_image(p, (h, w)) for p in images])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return [{"image": str(p), "label": int(pr.argmax()), "probability": float(pr.max())} for p, pr in zip(images, probs)]
