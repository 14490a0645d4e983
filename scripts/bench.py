"""Seconds per epoch of the same model on MNIST, trained the usual ways and dlbase's ways, in one process.

    python scripts/bench.py                                  # this machine's default device, the MLP
    python scripts/bench.py --device cuda --batch-size 512 --json bench.json
    python scripts/bench.py --ways dataloader_w0 dlbase_eager  # a subset
    python scripts/bench.py --model cnn                      # pytorch/examples' CNN against configs/mnist_cnn.yaml

Models (--model; the optimiser, loss and 60,000 training samples per epoch are the same in every way of a run):
  mlp   MLP 784-512-512-10, ReLU, Adam lr 1e-3, batch 128 (dlbase's default config, pixels in [0, 1])
  cnn   pytorch/examples' mnist net (conv 32@3x3, conv 64@3x3, max pool 2, dropout 0.25, fc 9216->128, dropout
        0.5, fc 128->10; Adadelta lr 1.0, batch 64): their own Net class in the usual ways, the same net as
        configs/mnist_cnn.yaml (model.conv) in dlbase's
Ways:
  dataloader_w0   torchvision.datasets.MNIST + ToTensor/Normalize + DataLoader(num_workers=0), the
                  pytorch/examples way (loss.item() every 10 batches, as it logs)
  dataloader_w4   the same with num_workers=4, pin_memory=True
  lightning       a LightningModule under lightning's Trainer over the w4 loader (when lightning is installed)
  dlbase_eager    dlbase's engine: the set on the device, normalised once, randperm index batches, eager fp32
  dlbase_*        dlbase's other modes: graph_fp32, graph_tf32, graph_bf16 (CUDA), compile (torch.compile)
Each way runs --warmup epochs untimed (data loader start-up, graph capture, compilation), then --epochs timed
epochs; s/epoch is their mean, with a device synchronisation before each clock reading.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core.config import load_config  # noqa: E402
from dlbase.core.data import Batcher, load_dataset  # noqa: E402
from dlbase.core.idx import SPLIT_FILES, find_split, locate  # noqa: E402
from dlbase.training.engine import Engine, Plan, reasons, set_matmul_precision  # noqa: E402
from dlbase.core.loss import build_loss  # noqa: E402
from dlbase.core.model import MLP, build_model, standardizes  # noqa: E402
from dlbase.core.optim import build_optimizer, build_schedule  # noqa: E402

DLBASE_MODES = {  # name -> (precision, compile)
    "dlbase_eager": ("fp32", "none"),
    "dlbase_compile": ("fp32", "default"),
    "dlbase_graph_fp32": ("fp32", "graph"),
    "dlbase_graph_tf32": ("tf32", "graph"),
    "dlbase_graph_bf16": ("bf16", "graph"),
}


class ExamplesNet(nn.Module):
    """pytorch/examples' mnist/main.py Net, as written there: (B, 1, 28, 28) images -> log-probabilities (B, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 64, 24, 24)
        x = self.dropout1(F.max_pool2d(x, 2))  # (B, 64, 12, 12)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))  # (B, 128)
        return F.log_softmax(self.fc2(x), dim=1)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the usual ways (DataLoader, Lightning) train: the net, its optimiser and its loss, as their authors
    write them. The net takes the loader's (B, 1, 28, 28) batches."""
    net: nn.Module
    optimizer: Callable[[object], torch.optim.Optimizer]  # parameters -> optimiser
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (net output (B, 10), labels (B,)) -> mean loss


@dataclasses.dataclass(frozen=True)
class Model:
    """One --model: the dlbase config of its dlbase ways, the reference of its usual ways, the table's words."""
    config: Optional[Path]  # None: dlbase's defaults
    sets: tuple[str, ...]  # --set overrides of that config, before the bench's own
    reference: Callable[[object], Reference]  # the config -> the usual ways' net, optimiser and loss
    describe: str


def mlp_reference(cfg) -> Reference:
    # the MLP takes flat pixels: nn.Flatten is a view, as the x.view(B, -1) it replaces
    return Reference(nn.Sequential(nn.Flatten(), MLP(cfg.model)), lambda p: torch.optim.Adam(p, lr=cfg.optim.lr),
                     F.cross_entropy)


def examples_reference(cfg) -> Reference:
    # their main.py: Adadelta(lr=args.lr=1.0), nll_loss over log_softmax; their StepLR steps once per epoch, which
    # costs nothing measurable and is left out
    return Reference(ExamplesNet(), lambda p: torch.optim.Adadelta(p, lr=1.0), F.nll_loss)


MODELS = {
    # the MLP rows always fed the model pixels in [0, 1] (no standardisation inside it): data.normalize=unit
    "mlp": Model(None, ("data.normalize=unit",), mlp_reference, "MLP 784-512-512-10, Adam"),
    "cnn": Model(REPO / "configs" / "mnist_cnn.yaml", (), examples_reference,
                 "pytorch/examples' CNN (conv 32@3, conv 64@3, max pool 2, fc 9216-128-10; configs/mnist_cnn.yaml "
                 "in dlbase), Adadelta"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epochs(run_epoch, device, warmup: int, epochs: int) -> list[float]:
    for _ in range(warmup):
        run_epoch()
    times = []
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        run_epoch()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def torchvision_root(tmp: Path, data_folder: Path) -> Path:
    """torchvision's MNIST wants root/MNIST/raw/<uncompressed files>: build that from the files we found."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "test"):
        for src, base in zip(find_split(data_folder, split), SPLIT_FILES[split]):
            opener = gzip.open if src.read_bytes()[:2] == b"\x1f\x8b" else open
            with opener(src, "rb") as fin, open(raw / base, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return tmp


def _subset(ds, cfg):
    """The first data.subset samples (--samples), as dlbase's ways take them."""
    from torch.utils.data import Subset
    return Subset(ds, range(cfg.data.subset)) if cfg.data.subset else ds


def mnist_loader(cfg, root: Path, batch_size: int, workers: int, device: torch.device):
    """torchvision's MNIST with ToTensor and Normalize in a shuffling DataLoader, as pytorch/examples builds it."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = _subset(datasets.MNIST(str(root), train=True, download=False, transform=tf), cfg)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=workers > 0 and device.type == "cuda", persistent_workers=workers > 0)


def dataloader_way(cfg, model: Model, device, root: Path, batch_size: int, workers: int):
    loader = mnist_loader(cfg, root, batch_size, workers, device)
    torch.manual_seed(0)
    ref = model.reference(cfg)
    net = ref.net.to(device)
    opt = ref.optimizer(net.parameters())

    def run_epoch():
        net.train()
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, 1, 28, 28), (B,)
            opt.zero_grad()
            loss = ref.loss(net(x), y)
            loss.backward()
            opt.step()
            if i % 10 == 0:
                loss.item()  # the examples' logging
    return run_epoch


def lightning_way(cfg, model: Model, device, root: Path, batch_size: int, warmup: int, epochs: int) -> list[float]:
    import lightning as L
    loader = mnist_loader(cfg, root, batch_size, 4, device)
    torch.manual_seed(0)
    ref = model.reference(cfg)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ref.net

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = ref.loss(self.net(x), y)
            self.log("loss", loss, prog_bar=False)
            return loss

        def configure_optimizers(self):
            return ref.optimizer(self.parameters())

    times: list[float] = []

    class Clock(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    trainer = L.Trainer(max_epochs=warmup + epochs, accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Clock()], num_sanity_val_steps=0)
    trainer.fit(Module(), loader)
    return times[warmup:]


def dlbase_way(cfg, device, precision: str, compile_mode: str):
    # what dlbase itself refuses on this device (graph or tf32 off CUDA) is a failed way, not a mislabelled number
    bad = reasons(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision,
                                                                     compile=compile_mode)), device)
    if bad:
        raise RuntimeError("; ".join(f"{key}: {why}" for key, why in bad))
    p = Plan(precision, compile_mode, torch.bfloat16 if precision == "bf16" else torch.float32)
    set_matmul_precision(p, device)
    torch.manual_seed(0)
    data = load_dataset(cfg.data, cfg.seed, device, p.data_dtype)
    model = build_model(cfg, data.input_shape, device)  # the MLP, or the CNN of model.conv
    if standardizes(cfg):
        model.encoding.set_stats(data.train.x)  # as dlbase train does, once, on the device
    opt = build_optimizer(model.parameters(), cfg.optim, device, graph=compile_mode == "graph")
    batcher = Batcher(len(data.train), cfg.train.batch_size, device, cfg.seed)
    spe = len(batcher)
    schedule = build_schedule(cfg.schedule, cfg.optim.lr, spe, spe * 1000)
    engine = Engine(model, opt, build_loss("cross_entropy", "softmax"), data.train, cfg.train, schedule, device, p)
    state = {"step": 0}

    def run_epoch():
        model.train()
        engine.epoch(batcher.perm(), state["step"], 0, spe, lambda s: None)
        state["step"] += spe
        engine.take_loss_sum()
    return run_epoch


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp",
                    help="which net every way trains (default: mlp); cnn: pytorch/examples' net")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="samples per step in every way (default: the model's recipe: 128 for mlp, 64 for cnn)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per way")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs per way first")
    ap.add_argument("--ways", nargs="*", help="which ways to run (default: all that apply to the device)")
    ap.add_argument("--data-root", help="folder with the MNIST IDX files (default: dlbase's search)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--samples", type=int, default=None,
                    help="train on the first N samples only (a quick check; the tables use all 60,000)")
    return ap, ap.parse_args()


def chosen_ways(ap: argparse.ArgumentParser, ways: Optional[list[str]], device: torch.device) -> list[str]:
    """--ways, or every way that applies to the device; an unknown name stops the bench before any way runs."""
    ways = ways or (["dataloader_w0", "dataloader_w4", "lightning", "dlbase_eager"]
                    + (["dlbase_graph_fp32", "dlbase_graph_tf32", "dlbase_graph_bf16"]
                       if device.type == "cuda" else ["dlbase_compile"]))
    known = ["dataloader_w0", "dataloader_w4", "lightning", *DLBASE_MODES]
    unknown = [w for w in ways if w not in known and not re.fullmatch(r"dataloader_w\d+", w)]
    if unknown:
        ap.error(f"--ways: unknown way(s) {', '.join(unknown)}; the ways are {', '.join(known)} "
                 f"(dataloader_wN for N workers)")
    return ways


def run_way(way: str, cfg, model: Model, device: torch.device, root: Path, args) -> list[float]:
    """One way's timed epochs (s)."""
    batch = cfg.train.batch_size
    if way == "lightning":
        return lightning_way(cfg, model, device, root, batch, args.warmup, args.epochs)
    if way.startswith("dataloader_w"):
        fn = dataloader_way(cfg, model, device, root, batch, int(way[len("dataloader_w"):]))
    else:
        fn = dlbase_way(cfg, device, *DLBASE_MODES[way])
    return timed_epochs(fn, device, args.warmup, args.epochs)


def measure(ways: list[str], cfg, model: Model, device: torch.device, root: Path, args, n: int):
    """(rows, failed): a row per way that ran; a way that raised is named in failed, and the others still run."""
    rows, failed = [], []
    for way in ways:
        gc.collect()  # the previous way's model, data and graphs go before this one is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            times = run_way(way, cfg, model, device, root, args)
        except ImportError as e:
            print(f"{way}: skipped ({e})", flush=True)
            continue
        except Exception as e:  # one broken way must not hide the others' numbers
            print(f"{way}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
            failed.append(way)
            continue
        s = sum(times) / len(times)
        # this way's own peak: what it allocated above what was already there
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
        rows.append({"way": way, "s_per_epoch": s, "samples_per_s": n / s, "peak_mib": peak,
                     "epochs_timed": len(times)})
        print(f"{way}: {s:.4f} s/epoch", flush=True)
    base = next((r["s_per_epoch"] for r in rows if r["way"] == "dataloader_w0"), None)
    for r in rows:
        r["vs_dataloader_w0"] = base / r["s_per_epoch"] if base else None
    return rows, failed


def table(header: str, rows: list[dict]) -> str:
    lines = [header, "", "| way | s/epoch | samples/s | peak GPU MiB | vs dataloader_w0 |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        ratio = f"{r['vs_dataloader_w0']:.1f}x" if r["vs_dataloader_w0"] else "-"
        lines.append(f"| {r['way']} | {r['s_per_epoch']:.4f} | {r['samples_per_s']:,.0f} | {peak} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap, args = parse_args()
    device = torch.device(args.device)
    model = MODELS[args.model]
    cfg = load_config(model.config, [*model.sets, "data.val_size=0", "data.download=false", f"device={args.device}"]
                      + ([f"train.batch_size={args.batch_size}"] if args.batch_size else [])
                      + ([f"data.root={args.data_root}"] if args.data_root else [])
                      + ([f"data.subset={args.samples}"] if args.samples else []))
    ways = chosen_ways(ap, args.ways, device)
    data_folder = locate(cfg.data.root, "mnist", download=False)
    n = cfg.data.subset or 60000
    with tempfile.TemporaryDirectory() as tmp:
        rows, failed = measure(ways, cfg, model, device, torchvision_root(Path(tmp), data_folder), args, n)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    header = (f"{where}, torch {torch.__version__}, {date.today().isoformat()}, {model.describe}, "
              f"batch {cfg.train.batch_size}, {n} samples/epoch, mean of {args.epochs} epochs after {args.warmup} "
              f"warm-up")
    print(table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "model": args.model, "rows": rows,
                                               "failed": failed}, indent=2))
    if failed:
        sys.exit(f"bench: {len(failed)} way(s) FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
