"""A sweep's results and its winner: the ranking, results.csv and the log's table; best.yaml, the winner's
retraining on every training image (with cross-validation), the test set read once for the whole study, and
winner.json. The functions that take a Sweep (dlbase/search/sweep.py) read its spec, folder and log."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import replace

from dlbase.core import rundir
from dlbase.core.config import Config, to_yaml
from dlbase.core.errors import SweepStopped, TrainingDiverged
from dlbase.search.folder import refuse_if_changed
from dlbase.training import checkpoint

TESTED = "dlbase.winner"  # the study's record of the winner's one test (winner.json's contents)


def rank(rows: list[dict], mode: str) -> list[dict]:
    """Finished trials by score (best first, ties in trial order), then the pruned ones likewise, then the
    failed ones in trial order."""
    def by_score(status: str) -> list[dict]:
        return sorted((r for r in rows if r.get("status", "finished") == status and r.get("score") is not None),
                      key=lambda r: (-r["score"] if mode == "max" else r["score"], r["trial"]))
    done = by_score("finished") + by_score("pruned")
    return done + sorted((r for r in rows if r not in done), key=lambda r: r["trial"])


def finished(row: dict) -> bool:
    return row.get("status", "finished") == "finished"  # results written before failures were recorded finished


def fields(spec) -> list[str]:
    """results.csv's columns (and the log's table's)."""
    return ["rank", "trial", *spec.params, "status", "score", "std", "epochs", "seconds"]


def write_results(sweep, ranked: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields(sweep.spec), lineterminator="\n")
    w.writeheader()
    for i, r in enumerate(ranked, 1):
        w.writerow(_cells(sweep.spec, i, r))
    rundir.write_atomic(sweep.root / "results.csv", buf.getvalue(), "results.csv")


def _cells(spec, rank: int, row: dict) -> dict:
    """A row of results.csv (and of the table in the log); None for a failed trial's score, std, epochs."""
    return {"rank": rank, **{k: row.get(k) for k in fields(spec)[1:]}, "status": row.get("status", "finished")}


def _table(sweep, ranked: list[dict]) -> None:
    sweep.log("")
    sweep.log(" ".join(f"{h:>12}" for h in fields(sweep.spec)))
    for i, r in enumerate(ranked, 1):
        sweep.log(" ".join(f"{rundir.cell(v):>12}" for v in _cells(sweep.spec, i, r).values()))


# ----------------------------------------------------------------------------- the winner, and the test set once
def measure_winner(sweep, study, winner: dict, ranked: list[dict]) -> dict:
    """best.yaml; with cross-validation the winner's retraining on every training image; then the test set,
    once for the whole study, on the winner's checkpoint, by the one process that holds it; winner.json."""
    from dlbase.search.study import claim

    spec, root = sweep.spec, sweep.root
    slot = int(winner["trial"].split("-", 1)[1])
    win_cfg = sweep.config_for({k: winner[k] for k in spec.params}, slot)
    if spec.method == "pbt" and (root / winner["trial"] / "last.ckpt").exists():  # its schedule, as it trained
        from dlbase.search.pbt import replay_config
        win_cfg = replay_config(sweep, winner["trial"])
    final_cfg, epochs_note = _final_config(sweep, win_cfg) if spec.cv_folds else (win_cfg, "")
    best_cfg = replace(final_cfg, name=f"{spec.name[:123]}_best",
                       checkpoint=replace(final_cfg.checkpoint, dir=sweep.base.checkpoint.dir))
    how = f", as retrained on every training image for {epochs_note}" if spec.cv_folds else ""
    head = (f"# the winner of sweep {spec.name} ({winner['trial']}), resolved{how}; train it with\n"
            f"#   dlbase train --config {rundir.quote(root / 'best.yaml')}\n")
    rundir.write_atomic(root / "best.yaml", head + to_yaml(best_cfg), "best.yaml")
    _table(sweep, ranked)
    tested = study.noted(TESTED)
    if tested is None and (root / winner["trial"]).is_dir() and claim(root / "winner.lock"):
        try:
            tested = study.noted(TESTED) or _test_once(sweep, winner, win_cfg, final_cfg, epochs_note)
            study.note(TESTED, tested)  # every other worker and machine reads it: the test set stays untouched
        finally:
            (root / "winner.lock").unlink(missing_ok=True)
    if tested is None:
        where = winner.get("host", "another machine")
        sweep.log(f"winner {winner['trial']} ({spec.metric} {winner['score']:.4f}) was trained on {where}; its "
                  f"one test runs there (rerun the same command on {where})  -> {root / 'best.yaml'}")
        return {"winner": _shown_row(winner), "test_accuracy": None}
    rundir.write_atomic(root / "winner.json", json.dumps(tested, indent=2), "winner.json")
    sweep.log(f"winner {winner['trial']} ({spec.metric} {winner['score']:.4f}); test accuracy, measured once: "
              f"{100 * tested['test_accuracy']:.2f}%  -> {root / 'best.yaml'}")
    return tested


def _test_once(sweep, winner: dict, win_cfg: Config, final_cfg: Config, epochs_note: str) -> dict:
    """Retrain (cross-validation) and test the winner: the one time the sweep reads the test set."""
    from dlbase.core.data import load_dataset
    from dlbase.training.engine import resolve_device
    from dlbase.training.evaluate import evaluate
    from dlbase.core.loss import build_eval_loss
    from dlbase.training.state import load_for_eval

    spec, root = sweep.spec, sweep.root
    if spec.cv_folds:  # the folds' models each saw part of the data: retrain the winner on all of it, once
        trained_on = f"all {_retrain(sweep, final_cfg)} training images, {epochs_note}"
        ckpt = root / final_cfg.name / "last.ckpt"  # its last epoch: no validation data to choose another
        sweep.log(f"winner {winner['trial']} retrained on {trained_on}")
    else:
        ckpt = root / win_cfg.name / "best.ckpt"
    device = resolve_device(win_cfg.device)
    cfg, model, payload = load_for_eval(ckpt, device)
    if not spec.cv_folds:
        trained_on = (f"the training images less the {cfg.data.val_size} held out for validation; its best "
                      f"epoch by {spec.metric} (epoch {payload['epoch']})")
    test = evaluate(model, load_dataset(cfg.data, cfg.seed, device).test,
                    build_eval_loss(cfg.train.loss, cfg.model.output))
    summary = {"winner": _shown_row(winner), "trained_on": trained_on,
               "test_accuracy": test["accuracy"], "test_loss": test["loss"], "checkpoint": str(ckpt),
               "results": str(root / "results.csv"), "best_yaml": str(root / "best.yaml")}
    if cfg.train.tensorboard:  # the winner's HParams row gets its test accuracy, as `dlbase eval` gives a run's
        from dlbase.training.tblog import write_eval
        write_eval(ckpt.parent, int(payload["step"]), test["accuracy"], {})
    return summary


def _final_config(sweep, cfg: Config) -> tuple[Config, str]:
    """The winner's config for its retraining: every training image (no validation split) for the mean over
    folds of each fold's best epoch (rounded half up, at least 1); no early stopping, nothing to monitor but
    train_loss. And those epochs in words."""
    chosen = [checkpoint.load(sweep.root / cfg.name / f"fold-{f + 1}" / "best.ckpt")["epoch"]
              for f in range(sweep.folds)]
    epochs = max(1, math.floor(statistics.mean(chosen) + 0.5))
    stop = replace(cfg.train.early_stop, metric=None, patience=None)  # null: train_loss, with no val data
    train_cfg = replace(cfg.train, epochs=epochs, max_steps=None, early_stop=stop)
    note = (f"{epochs} epoch{'s' if epochs != 1 else ''} (mean best epoch over {sweep.folds} folds: "
            f"{', '.join(map(str, chosen))})")
    return replace(cfg, name="winner", data=replace(cfg.data, val_size=0), train=train_cfg), note


def _retrain(sweep, cfg: Config) -> int:
    """Train (or finish) the winner's final run in <sweep>/winner/; returns how many images it trained on."""
    from dlbase.training.train import train

    folder = sweep.root / cfg.name
    last = folder / "last.ckpt"
    payload = checkpoint.load(last) if last.exists() else None
    if payload is not None:
        refuse_if_changed(sweep, last, payload["config"], cfg, folder)
    data = sweep.dataset(cfg, None)
    try:
        result = train(cfg, resume=last if payload else None, resume_payload=payload, folder=folder,
                       dataset=data, log=lambda line: None)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"sweep {sweep.spec.name}: retraining the winner on every training image: "
                               f"{e}") from None
    if result.status == "preempted":
        raise SweepStopped(f"sweep {sweep.spec.name} stopped by a signal while retraining the winner; rerun the "
                           f"same command to go on", result.exit_code)
    return len(data.train)


def _shown_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("config", "host")}
