"""Shared fixtures: tiny IDX datasets written into tmp_path, and the real MNIST when it is on disk."""
from __future__ import annotations

import gzip
import os
import signal
import struct
from pathlib import Path

import pytest

# MKL may use fewer threads than asked when the machine is busy (MKL_DYNAMIC), and another thread count rounds a
# float32 matmul differently: the tests that hold a resumed run to the uninterrupted one bit for bit, across
# processes, would then fail on a busy machine for a reason that is not dlbase's. Fixed thread counts, here and in
# every subprocess the tests start (they inherit the environment); set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, data: torch.Tensor, gz: bool | None = None) -> Path:
    """Write a uint8 tensor as an IDX file (gzipped when the name ends in .gz)."""
    data = data.to(torch.uint8).contiguous()
    header = struct.pack(">I", 0x0800 + data.dim()) + b"".join(struct.pack(">I", d) for d in data.shape)
    raw = header + data.numpy().tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def synthetic_digits(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: class k lights a 6x6 block at a class-specific place, over noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, size, size), generator=g)
    for k in range(10):
        r, c = 2 + (k // 5) * 12, 2 + (k % 5) * 5
        images[labels == k, r:r + 6, c:c + 4] = 250
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, size: int = 28) -> Path:
    ext = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_digits(n, seed, size)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels)
    return folder


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_data: Path) -> Path:
    """A small, fast config over tiny_data that writes into tmp_path/ckpt."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
device: cpu
data: {{root: {tiny_data}, download: false, val_size: 100}}
model: {{hidden: [32]}}
optim: {{lr: 0.01}}
train: {{epochs: 3, batch_size: 50}}
checkpoint: {{dir: {tmp_path / 'ckpt'}}}
""")
    return cfg


def mnist_dir() -> Path | None:
    for cand in (os.environ.get("DLBASE_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").exists():
            return Path(cand)
    return None


@pytest.fixture
def mnist_root() -> Path:
    root = mnist_dir()
    if root is None:
        pytest.skip("real MNIST not found: set DLBASE_DATA to the folder with the four IDX files")
    return root


class StopAt:
    """Stands in for dlbase.training.preempt.Preemption: a stop request once `after` steps have been asked about (the real
    stop path, no signal needed). monkeypatch dlbase.training.train.Preemption with StopAt(n)."""

    def __init__(self, after: int):
        self.after, self.calls, self.signum = after, 0, None

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def requested(self) -> bool:
        self.calls += 1
        if self.calls > self.after:
            self.signum = signal.SIGTERM
        return self.signum is not None

    exit_code = 143
