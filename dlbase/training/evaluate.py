"""evaluate(): accuracy and mean loss of a model on a device-resident split."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlbase.core.data import DeviceSplit
from dlbase.core.errors import DlbaseError
from dlbase.core.loss import LossFn


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceSplit, loss_fn: Optional[LossFn] = None,
             batch_size: int = 4096) -> dict[str, float]:
    """{"n", "accuracy" (fraction), "loss" (mean of loss_fn, default cross-entropy)}; one host sync at the end."""
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y))
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        xb = split.x[start:start + batch_size].float()  # (B, D); eval runs in fp32 whatever trained
        yb = split.y[start:start + batch_size]
        logits = model(xb).float()
        loss_sum += loss_fn(logits, yb) * yb.shape[0]
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = len(split)
    # note: a CPU-GPU sync point, once per evaluation
    return {"n": n, "accuracy": correct.item() / n, "loss": loss_sum.item() / n}


SPLITS = ("test", "val", "train")


def checkpoint_data(ckpt: Path, cfg, payload: dict, device: torch.device, data_root: Optional[Path] = None):
    """The data a checkpoint was trained on, split as its run split it (its seed, val_size or fold), on device;
    data_root: the IDX files there instead of the config's data.root (never downloading into it)."""
    from dlbase.core.data import load_dataset
    from dlbase.training.checkpoint import fold_of

    data_cfg = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=str(data_root), download=False)
    data = load_dataset(data_cfg, cfg.seed, device, fold=fold_of(payload))  # a fold's val is its held-out part
    if tuple(payload["input_shape"]) != data.input_shape:
        raise DlbaseError(f"{ckpt}: trained on {tuple(payload['input_shape'])} images; the data at "
                          f"{data.folder} has {data.input_shape}")
    return data


def evaluate_checkpoint(ckpt: Path, split: str = "test", data_root: Optional[Path] = None,
                        report: Optional[Path] = None) -> dict:
    """`dlbase eval`: rebuild the model from the checkpoint alone, evaluate it on a split of its data, with
    per-class accuracy and the confusion matrix; report: also write confusion.png, mistakes.png and the pictures
    of the model's inside (filters.png; featuremaps.png for a CNN) there, listed in the result's report_files."""
    from dlbase.training.engine import resolve_device
    from dlbase.core.loss import build_eval_loss
    from dlbase.training.report import confusion, eval_report, predictions
    from dlbase.training.state import load_for_eval

    if split not in SPLITS:
        raise DlbaseError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    device = resolve_device("auto")
    cfg, model, payload = load_for_eval(ckpt, device)
    data = checkpoint_data(ckpt, cfg, payload, device, data_root)
    part = data.split(split)
    result = evaluate(model, part, build_eval_loss(cfg.train.loss, cfg.model.output))
    if report is not None:
        title = f"{cfg.name}, {split} split, epoch {payload['epoch']}"
        details = eval_report(model, part.x, part.y, data.input_shape, report, title)
    else:
        cm = confusion(predictions(model, part.x).cpu(), part.y.cpu())
        details = {"per_class": (cm.diag().double() / cm.sum(1).clamp_min(1).double()).tolist(),
                   "confusion": cm.tolist()}
    record_eval(Path(ckpt), cfg.train.tensorboard, payload, split, result, details.get("report_files", ()))
    return {"checkpoint": str(ckpt), "split": split, "n": result["n"], "accuracy": result["accuracy"],
            "loss": result["loss"], "epoch": int(payload["epoch"]), "dataset": cfg.data.dataset,
            "fold": payload.get("fold"), **details}


EVAL_FILE = "eval.json"  # in the run folder: per checkpoint name, its last evaluation on each split


def record_eval(ckpt: Path, tensorboard: bool, payload: dict, split: str, result: dict,
                pictures: Sequence[str] = ()) -> None:
    """Keep the evaluation with its run, for `dlbase runs` (eval.json) and TensorBoard (the test accuracy as the
    HParams metric, the report's PNGs as images). Only in a run folder; a folder we cannot write to (a checkpoint
    on read-only media) is left as it is: the result is still printed."""
    from dlbase.core import rundir
    from dlbase.core.errors import CheckpointError
    from dlbase.training.tblog import write_eval

    folder = ckpt.parent
    if not rundir.has_run(folder):
        return
    path = folder / EVAL_FILE
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        old = {}
    record = old if isinstance(old, dict) else {}
    entry = record.get(ckpt.name) if isinstance(record.get(ckpt.name), dict) else {}
    entry[split] = {"accuracy": result["accuracy"], "loss": result["loss"], "n": result["n"],
                    "epoch": int(payload["epoch"]), "step": int(payload["step"])}
    record[ckpt.name] = entry
    # the PNGs this evaluation's --report wrote (never an older one left in that folder)
    images = {f"eval/{split}_{Path(p).stem}": Path(p).read_bytes() for p in pictures}
    try:
        rundir.write_atomic(path, json.dumps(record, indent=1), "eval.json")
        if tensorboard:
            write_eval(folder, int(payload["step"]), result["accuracy"] if split == "test" else None, images)
    except (CheckpointError, OSError):
        pass


def format_result(r: dict, report: Optional[Path] = None) -> str:
    """evaluate_checkpoint's result as the text `dlbase eval` prints."""
    lines = [f"{r['checkpoint']}: {r['split']} accuracy {100 * r['accuracy']:.2f}%  loss {r['loss']:.4f}  "
             f"(n={r['n']}, epoch {r['epoch']}, {r['dataset']}"
             + (f", cross-validation fold {r['fold'][0] + 1} of {r['fold'][1]}" if r.get("fold") else "") + ")",
             "per class: " + "  ".join(f"{k}: {100 * a:.1f}%" for k, a in enumerate(r["per_class"]))]
    if report is not None:
        lines.append("report: " + ", ".join(r.get("report_files") or [str(Path(report) / n) for n in
                                                                      ("confusion.png", "mistakes.png")]))
    return "\n".join(lines)
