"""TensorBoard event files, read back with TensorBoard's own reader and served by a real `tensorboard` process:
the scalars' steps against metrics.csv and an uninterrupted run, the HParams table, eval's test accuracy."""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from conftest import StopAt
from dlbase.training import checkpoint, train as train_module  # noqa: E402
from dlbase.core.config import load_config  # noqa: E402
from dlbase.training.evaluate import evaluate_checkpoint  # noqa: E402
from dlbase.training.tblog import HPARAMS_FILE, METRICS, STEP_LOSS_TAG  # noqa: E402
from dlbase.training.train import train  # noqa: E402

SPE = 10  # tiny_data: 500 training images (100 held out) at batch 50
EPOCH_TAGS = ("loss/train", "loss/val", "accuracy/val", "lr", "time/epoch_seconds", "norms/grad_norm_1", "epoch")


def process_files(folder: Path) -> list[Path]:
    """The event files the training processes wrote (the HParams file aside)."""
    return [p for p in folder.glob("events.out.tfevents.*") if p.name != HPARAMS_FILE]


def events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def steps(ea: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in ea.Scalars(tag)]


def quiet(line: str) -> None:
    pass


def test_scalars_match_metrics_csv_and_hparams_are_in_the_run_s_own_file(tiny_config):
    run = train(load_config(tiny_config, ["train.log_every=3"]), log=quiet)
    files = process_files(run.folder)
    assert len(files) == 1 and (run.folder / HPARAMS_FILE).is_file() and [p for p in run.folder.iterdir() if p.is_dir()] == []  # no add_hparams folder
    ea = events(run.folder)
    rows = (run.folder / "metrics.csv").read_text().splitlines()[1:]
    csv_steps = [int(r.split(",")[1]) for r in rows]
    assert csv_steps == [SPE, 2 * SPE, 3 * SPE]
    for tag in EPOCH_TAGS:
        assert steps(ea, tag) == csv_steps, tag
    val_loss = [float(r.split(",")[3]) for r in rows]
    assert [e.value for e in ea.Scalars("loss/val")] == pytest.approx(val_loss, rel=1e-5, abs=1e-6)
    # every log_every steps at its own step, and each epoch's tail at the epoch's end
    assert steps(ea, STEP_LOSS_TAG) == sorted(set(range(3, 3 * SPE + 1, 3)) | {SPE, 2 * SPE, 3 * SPE})
    # HParams: the flattened resolved config and the metric names, as the plugin reads them
    tags = ea.summary_metadata
    start = plugin_data_pb2.HParamsPluginData.FromString(
        tags[hp_metadata.SESSION_START_INFO_TAG].plugin_data.content).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.01)
    assert start.hparams["model.hidden"].string_value == "[32]"
    assert start.hparams["train.max_steps"].string_value == "null"
    exp = plugin_data_pb2.HParamsPluginData.FromString(tags[hp_metadata.EXPERIMENT_TAG].plugin_data.content).experiment
    assert {m.name.tag for m in exp.metric_infos} == set(METRICS.values())
    best = max(float(r.split(",")[4]) for r in rows)
    assert ea.Scalars(METRICS["best_val_accuracy"])[-1].value == pytest.approx(best)
    assert ea.Scalars(METRICS["final_train_loss"])[-1].value == pytest.approx(float(rows[-1].split(",")[2]), abs=1e-6)


def test_off_switch_writes_no_event_file(tiny_config):
    run = train(load_config(tiny_config, ["train.tensorboard=false", "train.epochs=1"]), log=quiet)
    assert not list(run.folder.glob("events.out.tfevents.*"))


def assert_no_zigzag(ea: EventAccumulator, ref: EventAccumulator) -> None:
    for tag in ea.Tags()["scalars"]:
        s = steps(ea, tag)
        assert s == sorted(set(s)), (tag, s)  # strictly increasing: no duplicated or rewound step
    for tag in EPOCH_TAGS + (METRICS["best_val_accuracy"],):
        assert steps(ea, tag)[-1] == steps(ref, tag)[-1], tag
    for tag in EPOCH_TAGS:
        assert steps(ea, tag) == steps(ref, tag), tag


def test_a_run_preempted_twice_mid_epoch_continues_its_curves(tiny_config, tmp_path, monkeypatch):
    sets = ["train.log_every=2", "checkpoint.every_steps=4"]
    ref = train(load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'ref'}"]), log=quiet)
    cfg = load_config(tiny_config, sets)
    for stop_after in (13, 7):  # stop in epoch 2 (step 13), then again mid-epoch after resuming
        monkeypatch.setattr(train_module, "Preemption", StopAt(stop_after))
        last = tmp_path / "ckpt" / "tiny" / "last.ckpt"
        payload = checkpoint.load(last) if last.exists() else None
        r = train(cfg, resume=last if payload else None, resume_payload=payload, log=quiet)
        assert r.status == "preempted"
        assert "in_epoch" in checkpoint.load(last)  # stopped mid-epoch
    monkeypatch.undo()
    run = train(cfg, resume=last, resume_payload=checkpoint.load(last), log=quiet)
    assert run.status == "finished" and run.folder == last.parent
    assert len(process_files(run.folder)) == 3
    ea, ref_ea = events(run.folder), events(ref.folder)
    assert_no_zigzag(ea, ref_ea)
    for tag in ("loss/train", "loss/val", "accuracy/val"):  # the resumed run is the uninterrupted one
        assert [e.value for e in ea.Scalars(tag)] == pytest.approx([e.value for e in ref_ea.Scalars(tag)], abs=1e-5)
    # the step-loss points: a subset of the uninterrupted run's (the points of a stopped epoch before its
    # checkpoint are not carried over the stop), and the same from the resumed epoch's end on
    assert set(steps(ea, STEP_LOSS_TAG)) <= set(steps(ref_ea, STEP_LOSS_TAG))
    assert [s for s in steps(ea, STEP_LOSS_TAG) if s > 2 * SPE] == [s for s in steps(ref_ea, STEP_LOSS_TAG) if s > 2 * SPE]


def test_resuming_an_earlier_checkpoint_in_place_drops_the_later_points(tiny_config, tmp_path, monkeypatch):
    """The run went on past the checkpoint it is resumed from (a last.ckpt put back by hand, or a run killed
    after its events): purge_step hides those later points, so TensorBoard draws no zig-zag."""
    sets = ["train.log_every=2", "checkpoint.every_steps=4"]
    snapshots = []
    real_save = checkpoint.save

    def keep(path, payload):
        real_save(path, payload)
        if Path(path).name == "last.ckpt":
            snapshots.append(Path(path).read_bytes())
    monkeypatch.setattr(checkpoint, "save", keep)
    ref = train(load_config(tiny_config, sets + [f"checkpoint.dir={tmp_path / 'ref'}"]), log=quiet)
    monkeypatch.undo()
    by_step = {checkpoint.load(_blob_file(tmp_path, b))["step"]: b for b in snapshots}  # 4, 8, 10, 12, 16, ...
    for i, blob in ((16, by_step[16]), (10, by_step[10])):  # mid-epoch 2, and epoch 1's end
        folder = tmp_path / f"copy{i}" / "tiny"
        shutil.copytree(ref.folder, folder)
        (folder / "last.ckpt").write_bytes(blob)
        (folder / "best.ckpt").unlink()  # else the newer best.ckpt would be the folder's newest checkpoint
        payload = checkpoint.load(folder / "last.ckpt")
        assert payload["step"] == i and ("in_epoch" in payload) == (i == 16)
        time.sleep(1.05)  # event files are named by the second: the resumed run's file sorts after the first
        cfg = load_config(tiny_config, sets + [f"checkpoint.dir={folder.parent}"])
        train(cfg, resume=folder / "last.ckpt", resume_payload=payload, log=quiet)
        ea, ref_ea = events(folder), events(ref.folder)
        assert_no_zigzag(ea, ref_ea)
        assert steps(ea, STEP_LOSS_TAG) == steps(ref_ea, STEP_LOSS_TAG)


def _blob_file(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "blob.ckpt"
    path.write_bytes(blob)
    return path


def test_eval_records_test_accuracy_and_report_images(tiny_config, tmp_path):
    run = train(load_config(tiny_config, ["train.epochs=1"]), log=quiet)
    r = evaluate_checkpoint(run.folder / "best.ckpt", report=tmp_path / "report")
    record = json.loads((run.folder / "eval.json").read_text())
    assert record["best.ckpt"]["test"]["accuracy"] == r["accuracy"]
    ea = events(run.folder)
    assert ea.Scalars(METRICS["test_accuracy"])[-1].value == pytest.approx(r["accuracy"])
    # every PNG the report wrote (an MLP on plain pixels: its first layer's rows as filters too)
    assert set(ea.Tags()["images"]) == {"eval/test_confusion", "eval/test_mistakes", "eval/test_filters"}
    img = ea.Images("eval/test_confusion")[-1]
    assert img.encoded_image_string == (tmp_path / "report" / "confusion.png").read_bytes() and img.width > 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_a_real_tensorboard_server_shows_the_runs_and_one_hparams_table(tiny_config, tmp_path):
    for lr in ("0.01", "0.05"):
        train(load_config(tiny_config, [f"optim.lr={lr}", "train.epochs=1"]), log=quiet)
    logdir, port = tmp_path / "ckpt", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                             "--host", "127.0.0.1", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline, runs = time.time() + 15, []
        while time.time() < deadline:
            try:
                runs = get(f"{base}/runs")
                if len(runs) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert sorted(runs) == ["tiny", "tiny-2"], proc.stderr.read() if proc.poll() is not None else runs
        tags = get(f"{base}/plugin/scalars/tags")
        assert {"loss/train", "loss/val", "accuracy/val", "lr"} <= set(tags["tiny"])
        exp = get(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        assert {"optim.lr", "model.hidden", "train.epochs"} <= {h["name"] for h in exp["hparamInfos"]}
        groups = get(f"{base}/plugin/hparams/session_groups",
                     {"experimentName": "", "startIndex": 0, "sliceSize": 100, "allowedStatuses": [0, 1, 2, 3]})
        table = {g["name"]: g for g in groups["sessionGroups"]}
        assert {table[n]["hparams"]["optim.lr"] for n in ("tiny", "tiny-2")} == {0.01, 0.05}
        metrics = {m["name"]["tag"] for m in table["tiny"]["metricValues"]}
        assert {METRICS["best_val_accuracy"], METRICS["final_train_loss"]} <= metrics
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None


def test_a_sweep_winner_s_test_accuracy_reaches_its_hparams_row(tiny_config, tmp_path):
    """Issue 12: the sweep's one test measurement shows in TensorBoard beside the winner's hyperparameters."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from dlbase.search.sweep import load_sweep, run_sweep
    base_raw, spec, source = load_sweep(tiny_config, None, ["optim.lr=[0.01,0.001]"], ["train.epochs=1"])
    summary = run_sweep(base_raw, spec, source, ["train.epochs=1"], log=lambda s: None)
    folder = Path(summary["checkpoint"]).parent
    mux = EventMultiplexer().AddRunsFromDirectory(str(folder))
    mux.Reload()
    values = [e.value for run in mux.Runs() for tag in mux.Runs()[run].get("scalars", [])
              if tag == "hparams/test_accuracy" for e in mux.Scalars(run, tag)]
    assert values and values[-1] == pytest.approx(summary["test_accuracy"], abs=1e-6)


def _session(folder: Path):
    """(session start info, session end info or None) as TensorBoard's HParams plugin reads the run folder."""
    tags = events(folder).summary_metadata
    start = plugin_data_pb2.HParamsPluginData.FromString(
        tags[hp_metadata.SESSION_START_INFO_TAG].plugin_data.content).session_start_info
    end = tags.get(hp_metadata.SESSION_END_INFO_TAG)
    return start, (plugin_data_pb2.HParamsPluginData.FromString(end.plugin_data.content).session_end_info
                   if end is not None else None)


def test_after_a_resume_hparams_show_the_config_the_run_ended_with_and_its_final_status(tiny_config, monkeypatch):
    """Issue 21 items 3 and 4: TensorBoard keeps the first record per tag of a run folder; the table must show
    the last process's config and status, and booleans as booleans."""
    from tensorboard.plugins.hparams import api_pb2
    cfg = load_config(tiny_config)
    monkeypatch.setattr(train_module, "Preemption", StopAt(13))
    stopped = train(cfg, log=quiet)
    assert stopped.status == "preempted"
    start, end = _session(stopped.folder)
    assert api_pb2.Status.Name(end.status) == "STATUS_UNKNOWN"
    monkeypatch.undo()
    last = stopped.folder / "last.ckpt"
    more = load_config(tiny_config, ["train.epochs=4"])
    run = train(more, resume=last, resume_payload=checkpoint.load(last), log=quiet)
    assert run.status == "finished" and run.folder == stopped.folder
    start, end = _session(run.folder)
    assert api_pb2.Status.Name(end.status) == "STATUS_SUCCESS"
    assert start.hparams["train.epochs"].number_value == 4
    assert start.hparams["train.tensorboard"].WhichOneof("kind") == "bool_value"
    assert start.hparams["train.tensorboard"].bool_value is True
    assert start.hparams["data.download"].bool_value is False
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        events(run.folder).summary_metadata[hp_metadata.EXPERIMENT_TAG].plugin_data.content).experiment
    kinds = {h.name: api_pb2.DataType.Name(h.type) for h in exp.hparam_infos}
    assert kinds["train.tensorboard"] == "DATA_TYPE_BOOL" and kinds["optim.lr"] == "DATA_TYPE_FLOAT64"


def test_step_loss_points_cover_every_step_once_across_epoch_boundaries(tiny_config):
    """Issue 21 item 2. Oracle: the same run with log_every 1 (each point one step's mean loss); at log_every 5
    each point must be the sample-weighted mean of exactly the steps since the previous point, and the steps
    after an epoch's last multiple of 5 get their own point at the epoch's end."""
    sets = ["train.batch_size=42", "train.epochs=3"]  # 500 images: 12 steps per epoch, the last of 38
    every = train(load_config(tiny_config, sets + ["train.log_every=1", "name=every"]), log=quiet)
    five = train(load_config(tiny_config, sets + ["train.log_every=5", "name=five"]), log=quiet)
    per_step = {e.step: e.value for e in events(every.folder).Scalars(STEP_LOSS_TAG)}
    assert sorted(per_step) == list(range(1, 37))
    size = {s: (38 if s % 12 == 0 else 42) for s in per_step}
    got = [(e.step, e.value) for e in events(five.folder).Scalars(STEP_LOSS_TAG)]
    assert [s for s, _ in got] == [5, 10, 12, 15, 20, 24, 25, 30, 35, 36]
    prev = 0
    for s, value in got:
        window = range(prev + 1, s + 1)
        want = sum(per_step[t] * size[t] for t in window) / sum(size[t] for t in window)
        assert value == pytest.approx(want, rel=1e-5), s
        prev = s
