"""TensorBoard event files in a run's folder: per-epoch metrics, the training loss every train.log_every steps,
the run's hyperparameters with its final metrics (the HParams tab), and `dlbase eval`'s test accuracy and report
images. torch.utils.tensorboard is imported only here, and only when train.tensorboard is on: without the
tensorboard package a run goes on without event files."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from dlbase.core import rundir
from dlbase.core.config import Config, to_dict

# metrics.csv names -> TensorBoard tags, grouped as TensorBoard groups them (by the part before the slash)
TAGS = {"train_loss": "loss/train", "train_ce": "loss/train_cross_entropy", "val_loss": "loss/val",
        "val_accuracy": "accuracy/val", "lr": "lr", "seconds": "time/epoch_seconds",
        "train_seconds": "time/train_seconds", "hessian_top": "curvature/hessian_top",
        "hessian_min": "curvature/hessian_min"}
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
    _after_earlier_files(folder)
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _after_earlier_files(folder: Path) -> None:
    """TensorBoard reads a run's event files in name order, and SummaryWriter names each by the second it opened
    it, then host and pid: a process that resumes the run within the same second as an earlier one could sort
    before it (pids compare as text), and its curves and HParams would be read first. Wait into the next second
    then (only then: a resume within a second of the previous start)."""
    import time
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")
               if p.name != HPARAMS_FILE and len(p.name.split(".")) > 4 and p.name.split(".")[3].isdigit()]
    if seconds and time.time() < max(seconds) + 1:
        time.sleep(max(seconds) + 1 - time.time())


HPARAMS_FILE = "events.out.tfevents.0000000000.dlbase-hparams"  # sorts before every SummaryWriter file


def _hparams_summaries(cfg: Config, status: Optional[str], start_time: float) -> list:
    """The HParams plugin's three records for this run: the experiment (every key's type, every metric tag), the
    session's start (the config's values; booleans as booleans, which torch's hparams() turns into 1.0) and,
    once the run has ended, the session's end with its status. (tensorboard's own hparams.summary needs
    TensorFlow; these are the same protos.)"""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo

    def summary(tag: str, **data) -> Summary:
        content = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data).SerializeToString()
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                      content=content))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    values = flat_hparams(cfg)
    kinds = {bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}
    infos = [api_pb2.HParamInfo(name=k, type=api_pb2.DataType.Value(kinds.get(type(v), "DATA_TYPE_FLOAT64")))
             for k, v in values.items()]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in METRICS.values()]
    start = SessionStartInfo(start_time_secs=start_time)
    for k, v in values.items():
        if isinstance(v, bool):  # before int: bool is an int in Python
            start.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[k].number_value = v
        else:
            start.hparams[k].string_value = v
    out = [summary(metadata.EXPERIMENT_TAG, experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)),
           summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]
    if status is not None:
        code = api_pb2.Status.Value(status if status in api_pb2.Status.keys() else "STATUS_UNKNOWN")
        out.append(summary(metadata.SESSION_END_INFO_TAG, session_end_info=SessionEndInfo(status=code)))
    return out


def _start_time(path: Path) -> Optional[float]:
    """The session start time recorded in an existing HPARAMS_FILE (the run's first process), if readable."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    try:
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.tag == metadata.SESSION_START_INFO_TAG:
                    return HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info.start_time_secs
    except Exception:  # noqa: BLE001 - a damaged file is rewritten with this process's time
        return None
    return None


def write_hparams(folder: Path, cfg: Config, status: Optional[str]) -> None:
    """The run's HParams records in their own event file, rewritten whole (atomically) by every process that
    trains the run: TensorBoard keeps the first record of a tag it reads in a run folder, and this file sorts
    first, so after any resume the table shows the config the run goes on with and how it ended. (A
    TensorBoard server already running picks the rewrite up when restarted.)"""
    import io
    import time
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = folder / HPARAMS_FILE
    start = (_start_time(path) if path.exists() else None) or time.time()
    buf = io.BytesIO()
    records = RecordWriter(buf)
    records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    for summary in _hparams_summaries(cfg, status, start):
        records.write(Event(wall_time=time.time(), step=0, summary=summary).SerializeToString())
    rundir.write_atomic(path, buf.getvalue(), "TensorBoard's hparams")


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
        """The hyperparameters, at the start (so a run killed at once is in the table too), in the run's own
        folder (not the new folder SummaryWriter.add_hparams would make, pytorch#32651): HPARAMS_FILE."""
        write_hparams(self.folder, self.cfg, None)

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
        self.writer.flush()
        write_hparams(self.folder, self.cfg, SESSION_STATUS.get(result.status, "STATUS_UNKNOWN"))

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
