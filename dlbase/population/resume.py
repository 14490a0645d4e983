"""A population going on from its members' checkpoints, together: `dlbase train --resume <member folder>` of a
--seeds population (resume_population, with the seeds' summary), and a sweep's population searched inside
(search/pbt.py: every member must go on in the same population, never alone). resume_members is both."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from dlbase.core.errors import CheckpointError
from dlbase.population.loop import Population
from dlbase.population.member import MemberResult
from dlbase.population.train import POPULATION_FILE, SeedSummary, load_population_data, same_shape, summarise


def population_of(folder: Path) -> Optional[list[Path]]:
    """The member folders of the population folder trained in (its population.json), or None when it trained
    alone or the record is unreadable (then it resumes alone, as any run)."""
    try:
        record = json.loads((folder / POPULATION_FILE).read_text())
        members = [folder.parent / m if "/" not in m else Path(m) for m in record["members"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return members if len(members) > 1 and all(isinstance(m, Path) for m in members) else None


def resume_population(folder: Path, sets: Sequence[str] = (), log: Callable[[str], None] = print) -> SeedSummary:
    """`dlbase train --resume <member folder>` of a --seeds population: every member goes on from its newest
    checkpoint (resume_members), then the seeds' summary."""
    members = population_of(folder)
    record = json.loads((folder / POPULATION_FILE).read_text())
    gone = [f for f in members if not f.is_dir()]
    if gone:  # deleted on purpose, say: the others go on
        log(f"not found, so not resumed: {', '.join(str(f) for f in gone)}")
        members = [f for f in members if f.is_dir()]
    results = resume_members(members, sets, log)
    ordered = [results[f] for f in members if f in results]
    return summarise(ordered, bool(record.get("test")), log)


def resume_members(members: Sequence[Path], sets: Sequence[str] = (), log: Callable[[str], None] = print,
                   after_epoch: Optional[Callable] = None, data=None) -> dict:
    """Every member folder goes on from its newest checkpoint, those at one position together as one population
    (a signal saves them all at one step), the ones already done (finished, early-stopped, pruned, diverged) as
    they are. after_epoch, data: Population's and train_population's. Returns folder -> MemberResult."""
    from dlbase.training.checkpoint import fold_of, newest
    from dlbase.training.engine import plan_run, resolve_device
    from dlbase.training.state import stored_config
    todo, results = [], {}
    for f in members:
        try:
            ckpt, payload = newest(f)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; the population goes on only with every member's checkpoint: resume the "
                                  f"others one by one (dlbase train --resume <folder>/last.ckpt), or delete "
                                  f"{f} to go on without it") from None
        cfg = stored_config(payload, ckpt, sets)
        spe = payload["steps_per_epoch"]
        total = cfg.train.max_steps or cfg.train.epochs * spe
        status = _status(f)
        if payload["step"] >= total or status in ("early_stopped", "pruned", "diverged"):
            results[f] = _done_result(f, payload, status or "finished")
        else:
            todo.append((f, ckpt, payload, cfg))
    log(f"resuming the population of {len(members)} members in {members[0].parent}: {len(todo)} to go on, "
        f"{len(results)} already done")
    groups: dict = {}
    for item in todo:
        f, ckpt, payload, cfg = item
        position = (payload["epoch"], payload["step"], (payload.get("in_epoch") or {}).get("batch", 0))
        key = next((k for k in groups if k[0] == position and not same_shape(groups[k][0][3], cfg)), None)
        groups.setdefault(key or (position, len(groups)), []).append(item)
    for (position, _), group in groups.items():
        configs = [cfg for _, _, _, cfg in group]
        device = resolve_device(configs[0].device)
        run_plan = plan_run(configs[0], device)
        here = data if data is not None else load_population_data(configs[0], device, run_plan.data_dtype)
        log(f"population: {len(group)} members at epoch {position[0]}, step {position[1]}: going on")
        pop = Population(configs, [f for f, _, _, _ in group], [fold_of(p) for _, _, p, _ in group], here, device,
                         run_plan, log, resumed=[(ckpt, p) for _, ckpt, p, _ in group], after_epoch=after_epoch)
        for (f, _, _, _), r in zip(group, pop.fit()):
            results[f] = r
        if any(r.status == "preempted" for r in results.values()):
            break
    return results


def _status(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _done_result(folder: Path, payload, status: str) -> MemberResult:
    """A member that needs no more training, as its files tell it."""
    from dlbase.core.rundir import read_metrics
    best = payload["best"]
    rows = read_metrics(folder / "metrics.csv", payload["epoch"])
    return MemberResult(folder, payload["epoch"], best["metric"], best["value"], best["epoch"],
                        rows[-1] if rows else {}, 0.0, status, 0)
