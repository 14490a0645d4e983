"""Seconds per epoch of the same MLP on MNIST, trained the usual ways and dlbase's ways, in one process.

    python scripts/bench.py                                  # this machine's default device
    python scripts/bench.py --device cuda --batch-size 512 --json bench.json
    python scripts/bench.py --ways dataloader_w0 dlbase_eager  # a subset

Ways (the model, optimiser, loss and 60,000 training samples per epoch are the same in every one):
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

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlbase.core.config import load_config  # noqa: E402
from dlbase.core.data import Batcher, load_dataset  # noqa: E402
from dlbase.core.idx import SPLIT_FILES, find_split, locate  # noqa: E402
from dlbase.training.engine import Engine, Plan, reasons, set_matmul_precision  # noqa: E402
from dlbase.core.loss import build_loss  # noqa: E402
from dlbase.core.model import MLP  # noqa: E402
from dlbase.core.optim import build_optimizer, build_schedule  # noqa: E402

DLBASE_MODES = {  # name -> (precision, compile)
    "dlbase_eager": ("fp32", "none"),
    "dlbase_compile": ("fp32", "default"),
    "dlbase_graph_fp32": ("fp32", "graph"),
    "dlbase_graph_tf32": ("tf32", "graph"),
    "dlbase_graph_bf16": ("bf16", "graph"),
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


def dataloader_way(cfg, device, root: Path, batch_size: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = _subset(datasets.MNIST(str(root), train=True, download=False, transform=tf), cfg)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=workers > 0 and device.type == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = MLP(cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)

    def run_epoch():
        model.train()
        for i, (x, y) in enumerate(loader):
            x, y = x.view(x.shape[0], -1).to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if i % 10 == 0:
                loss.item()  # the examples' logging
    return run_epoch


def lightning_way(cfg, device, root: Path, batch_size: int, warmup: int, epochs: int) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = _subset(datasets.MNIST(str(root), train=True, download=False, transform=tf), cfg)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=4, pin_memory=device.type == "cuda",
                        persistent_workers=True)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = MLP(cfg.model)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x.view(x.shape[0], -1)), y)
            self.log("loss", loss, prog_bar=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=cfg.optim.lr)

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
    torch.manual_seed(0)
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
    model = MLP(cfg.model, in_features=data.train.x.shape[1]).to(device)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per way")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs per way first")
    ap.add_argument("--ways", nargs="*", help="which ways to run (default: all that apply to the device)")
    ap.add_argument("--data-root", help="folder with the MNIST IDX files (default: dlbase's search)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--samples", type=int, default=None,
                    help="train on the first N samples only (a quick check; the tables use all 60,000)")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = load_config(None, [f"train.batch_size={args.batch_size}", "data.val_size=0", "data.download=false",
                             f"device={args.device}"] + ([f"data.root={args.data_root}"] if args.data_root else [])
                      + ([f"data.subset={args.samples}"] if args.samples else []))
    ways = args.ways or (["dataloader_w0", "dataloader_w4", "lightning", "dlbase_eager"]
                         + (["dlbase_graph_fp32", "dlbase_graph_tf32", "dlbase_graph_bf16"]
                            if device.type == "cuda" else ["dlbase_compile"]))
    known = ["dataloader_w0", "dataloader_w4", "lightning", *DLBASE_MODES]
    unknown = [w for w in ways if w not in known and not re.fullmatch(r"dataloader_w\d+", w)]
    if unknown:
        ap.error(f"--ways: unknown way(s) {', '.join(unknown)}; the ways are {', '.join(known)} "
                 f"(dataloader_wN for N workers)")
    data_folder = locate(cfg.data.root, "mnist", download=False)
    n = cfg.data.subset or 60000
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(tmp), data_folder)
        for way in ways:
            fn = None
            gc.collect()  # the previous way's model, data and graphs go before this one is measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            try:
                if way == "lightning":
                    times = lightning_way(cfg, device, root, args.batch_size, args.warmup, args.epochs)
                else:
                    if way.startswith("dataloader_w"):
                        fn = dataloader_way(cfg, device, root, args.batch_size, int(way[len("dataloader_w"):]))
                    else:
                        fn = dlbase_way(cfg, device, *DLBASE_MODES[way])
                    times = timed_epochs(fn, device, args.warmup, args.epochs)
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
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    header = (f"{where}, torch {torch.__version__}, {date.today().isoformat()}, MLP 784-512-512-10, Adam, "
              f"batch {args.batch_size}, {n} samples/epoch, mean of {args.epochs} epochs after {args.warmup} warm-up")
    lines = [header, "", "| way | s/epoch | samples/s | peak GPU MiB | vs dataloader_w0 |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        ratio = f"{r['vs_dataloader_w0']:.1f}x" if r["vs_dataloader_w0"] else "-"
        lines.append(f"| {r['way']} | {r['s_per_epoch']:.4f} | {r['samples_per_s']:,.0f} | {peak} | {ratio} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "failed": failed}, indent=2))
    if failed:
        sys.exit(f"bench: {len(failed)} way(s) FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
