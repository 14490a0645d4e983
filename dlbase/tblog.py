"""TensorBoard event files in a run's folder: per-epoch metrics, the training loss every train.log_every steps,
the run's hyperparameters with its final metrics (the HParams tab), and `dlbase eval`'s test accuracy and report
images. torch.utils.tensorboard is imported only here, and only when train.tensorboard is on: without the
tensorboard package a run goes on without event files."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from dlbase import rundir
from dlbase.config import Config, to_dict

# metrics.csv names -> TensorBoard tags, grouped as TensorBoard groups them (by the part before the slash)
TAGS = {"train_loss": "loss/train", "train_ce": "loss/train_cross_entropy", "val_loss": "loss/val",
        "val_accuracy": "accuracy/val", "lr": "lr", "seconds": "time/epoch_seconds",
        "train_seconds": "time/train_seconds"}
STEP_LOSS_TAG = "loss/train_steps"  # the mean training loss since the previous point, every train.log_every steps
# The HParams tab's metric columns: every run declares all of them, so one table holds every run of a folder.
# Their values are scalars under these tags, written when the run ends (test accuracy: when `dlbase eval` runs).
METRICS = {"best_val_accuracy": "hparams/best_val_accuracy", "final_train_loss": "hparams/final_train_loss",
           "final_val_loss": "hparams/final_val_loss", "test_accuracy": "hparams/test_accuracy"}
# RunResult.status -> the HParams session status shown in its table (the plugin has no "aborted": a preempted
# run, which a resume continues, is "unknown")
SESSION_STATUS = {"finished": "STATUS_SUCCESS", "early_stopped": "STATUS_SUCCESS", "preempted": "STATUS_UNKNOWN",
                  "nothing_to_do": "STATUS_SUCCESS"}


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat dotted keys with the values the HParams plugin takes (str, int, float, bool):
    null becomes "null" and lists their JSON text, so every run of every config writes the same keys."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is None:
                out[prefix + k] = "null"
            elif isinstance(v, (bool, int, float, str)):
                out[prefix + k] = v
            else:
                out[prefix + k] = json.dumps(v)
    walk(to_dict(cfg), "")
    return out


def _writer(folder: Path, purge_step: Optional[int] = None):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _session_end(writer, status: str, step: int) -> None:
    """The HParams session's end (success, or unknown for a preempted run), in the run's own event file."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    code = Status.Value(status) if status in Status.keys() else Status.Value("STATUS_UNKNOWN")
    content = HParamsPluginData(session_end_info=SessionEndInfo(status=code),
                                version=PLUGIN_DATA_VERSION)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                  content=content.SerializeToString()))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=meta)]),
                                          step)


class EventLog:
    """One SummaryWriter on the run folder. A resumed run opens it with purge_step one past the step it resumes
    from: TensorBoard drops whatever a killed process wrote after its checkpoint (no rewound or duplicated
    steps) and keeps the point of the checkpoint's own step, which the resumed run does not write again."""

    def __init__(self, folder: Path, cfg: Config, start_step: int):
        self.folder, self.cfg = folder, cfg
        self.step = start_step  # the furthest step this process wrote: where finish() puts the run's metrics
        self.writer = _writer(folder, start_step + 1 if start_step else None)
        self._hparams(start_step)

    def _hparams(self, step: int) -> None:
        """The hyperparameters, at the start (so a run killed at once is in the table too), the way Lightning's
        TensorBoardLogger.log_hyperparams does it: the hparams summaries go into this run's own event file,
        not into the new folder SummaryWriter.add_hparams would make (pytorch#32651)."""
        from torch.utils.tensorboard.summary import hparams
        exp, ssi, _ = hparams(flat_hparams(self.cfg), {tag: 0.0 for tag in METRICS.values()})
        fw = self.writer._get_file_writer()
        fw.add_summary(exp, step)
        fw.add_summary(ssi, step)
        self.writer.flush()

    def epoch(self, epoch: int, step: int, metrics: dict, step_losses: list[tuple[int, float]]) -> None:
        """An epoch's metrics at its last step; the training-loss points at their own steps."""
        w = self.writer
        for s, loss in step_losses:
            w.add_scalar(STEP_LOSS_TAG, loss, s)
        for key, value in metrics.items():
            tag = TAGS.get(key) or (f"norms/{key}" if key.startswith(("grad_norm_", "weight_norm_")) else None)
            if tag is not None:
                w.add_scalar(tag, value, step)
        w.add_scalar("epoch", epoch, step)
        w.flush()
        self.step = max(self.step, step)

    def finish(self, result) -> None:
        """When a run ends (finished, early-stopped, preempted): the HParams metrics (best validation accuracy
        over the whole run's metrics.csv, the last epoch's losses) and the session's status."""
        step = self.step  # past any earlier process's metrics: a run preempted twice leaves one point per stop
        for key, value in final_metrics(Path(result.folder)).items():
            self.writer.add_scalar(METRICS[key], value, step)
        _session_end(self.writer, SESSION_STATUS.get(result.status, "STATUS_UNKNOWN"), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def final_metrics(folder: Path) -> dict[str, float]:
    """best_val_accuracy, final_train_loss, final_val_loss of a run folder's metrics.csv (those it has)."""
    rows = rundir.read_metrics(folder / "metrics.csv")
    out: dict[str, float] = {}
    accs = [a for a in (rundir.number(r.get("val_accuracy")) for r in rows) if a is not None]
    if accs:
        out["best_val_accuracy"] = max(accs)
    if rows:
        for key, col in (("final_train_loss", "train_loss"), ("final_val_loss", "val_loss")):
            v = rundir.number(rows[-1].get(col))
            if v is not None:
                out[key] = v
    return out



def open_events(folder: Path, cfg: Config, start_step: int, log: Callable[[str], None]) -> Optional[EventLog]:
    """The run's event log, or None (with a note) when the tensorboard package is not installed."""
    try:
        return EventLog(folder, cfg, start_step)
    except ImportError:
        log("note: the tensorboard package is not installed: no TensorBoard event files (pip install tensorboard)")
        return None


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def write_eval(folder: Path, step: int, test_accuracy: Optional[float], images: dict[str, bytes]) -> bool:
    """`dlbase eval`'s results in the run's events (a new event file in the same folder, so the same run):
    the test accuracy as the HParams metric, and the report's PNGs as images under eval/. False when the
    tensorboard package is not installed."""
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        writer = _writer(folder)
    except ImportError:
        return False
    try:
        if test_accuracy is not None:
            writer.add_scalar(METRICS["test_accuracy"], test_accuracy, step)
        for tag, png in images.items():  # the PNG as it is: TensorBoard shows encoded images, no decoding here
            h, w = _png_size(png)
            image = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)  # 4: RGBA
            writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        writer.flush()
    finally:
        writer.close()
    return True
