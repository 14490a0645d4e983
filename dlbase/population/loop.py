"""The population loop: K members of one shape trained by one batched step (stacked.py, optim.py), each member
otherwise an ordinary run: its own data order (its Batcher, drawn as `dlbase train` draws it), validation split,
monitor, early stop, NaN guard, checkpoints, metrics.csv, TensorBoard events and plots, in its own run folder.
Members that stop (early, pruned, diverged) leave the population at the boundary where they stop."""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dlbase.training import checkpoint, runrecord
from dlbase.core import rundir
from dlbase.core.backprop import layer_norms
from dlbase.core.config import Config, to_yaml
from dlbase.core.data import Batcher
from dlbase.training.engine import Plan, autocast
from dlbase.training.evaluate import evaluate
from dlbase.core.loss import build_eval_loss
from dlbase.core.model import build_model, standardizes
from dlbase.core.optim import build_optimizer, build_schedule
from dlbase.population.stacked import activation_bytes_per_member, clip_grad_norms, member_losses
from dlbase.population.member import Member, MemberResult
from dlbase.population.restore import restore_member, restore_position
from dlbase.population.steppers import stack_members
from dlbase.population.optim import PopOptimizer
from dlbase.population.data import PopulationData
from dlbase.training.phases import Phases
from dlbase.training.preempt import Preemption
from dlbase.training.state import Monitor
from dlbase.training.progress import run_epoch, run_epochs, seed_everything, step_losses

EXIT_DIVERGED = 3  # TrainingDiverged's exit code


class Population:
    """`Population(configs, ...).fit()` trains the members together and returns one MemberResult per config."""

    def __init__(self, configs: Sequence[Config], folders: Sequence[Optional[Path]],
                 folds: Sequence[Optional[tuple[int, int]]], data: PopulationData, device: torch.device,
                 run_plan: Plan, log: Callable[[str], None] = print,
                 on_epoch: Sequence[Optional[Callable[[int, dict], bool]]] = (), phases: Optional[Phases] = None,
                 resumed: Sequence[tuple[Path, checkpoint.Payload]] = (), stepper: str = "auto"):
        """resumed: each member's (checkpoint path, payload) to go on from, all at one position (train.py's
        resume_population groups them so), instead of starting; their folders are the checkpoints' own.
        stepper: how the members are stacked (steppers.STEPPERS)."""
        self.configs, self.data, self.device, self.plan, self.log = list(configs), data, device, run_plan, log
        self.phases = phases or Phases()  # where the time goes, printed as train()'s one line at the end
        cfg = configs[0]
        self.B = cfg.train.batch_size
        members, train_idx = self._build_members(folds, on_epoch, resumed)
        sizes = sorted({t.shape[0] for t in train_idx})
        if len(sizes) > 1:
            from dlbase.core.errors import ConfigError
            raise ConfigError(f"population: members train on {sizes} samples; one population needs one training-set "
                              f"size (folds of equal size: a data.subset that the fold count divides)")
        n = sizes[0]
        self.n_used = n - 1 if cfg.model.norm == "batch" and n % self.B == 1 and n > 1 else n
        self.steps_per_epoch = -(-self.n_used // self.B)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.schedules = [build_schedule(c.schedule, c.optim.lr, self.steps_per_epoch, self.total_steps)
                          for c in configs]
        self.members = members  # the members still training, in the order of the stacked axis
        self.all = list(members)
        self.train_idx = torch.stack(train_idx)  # (K, N) each member's training samples, indices into data.x
        self.net = stack_members([m.model for m in members], [c.model for c in configs], stepper)
        lr_table = torch.tensor([s.table() for s in self.schedules], dtype=torch.float64, device=device)  # (K, T)
        self.opt = PopOptimizer(self.net.params, [c.optim for c in configs], lr_table)
        self._per_member_settings()
        self.eval_loss = build_eval_loss(cfg.train.loss, cfg.model.output)
        K = len(members)
        self.loss_sum = torch.zeros(K, device=device)  # (K,) summed per-sample training loss, this epoch
        self.ce_sum = torch.zeros(K, device=device)  # (K,) the same for the plain cross-entropy
        self.log_every = min(c.train.log_every for c in configs)
        self.epoch = self.step = self.batch = 0
        self.train_seconds = 0.0
        if resumed:
            self._start_sums = restore_position(self, resumed)
        for m, folder in zip(members, folders):  # last: every check has passed, now claim the folders
            if folder is None:
                m.folder = rundir.new_run_dir(m.cfg.checkpoint.dir, m.cfg.name)
            else:
                m.folder = Path(folder)
                rundir.check_writable(m.folder)
                rundir.claim_existing(m.folder)

    def _build_members(self, folds, on_epoch, resumed) -> tuple[list[Member], list[torch.Tensor]]:
        """Each member set up exactly as a lone train() sets it up (or restored from its checkpoint), and its
        training indices into the shared data."""
        members, train_idx, data, device = [], [], self.data, self.device
        for i, c in enumerate(self.configs):
            seed_everything(c.seed)
            model = build_model(c, data.input_shape, device)
            idx, val = data.member_split(c, folds[i])
            if standardizes(c):
                model.encoding.set_stats(data.x.index_select(0, idx))  # the same tensor a lone run's train.x is
            members.append(Member(c, model, build_optimizer(model.parameters(), c.optim, device),
                                  Batcher(idx.shape[0], self.B, device, c.seed), val, Monitor(c, val is not None),
                                  torch.get_rng_state(), Path(), on_epoch[i] if on_epoch else None,
                                  fold=folds[i]))
            if resumed:
                restore_member(self, members[-1], *resumed[i])
            train_idx.append(idx)
        return members, train_idx

    def _per_member_settings(self) -> None:
        """Label smoothing and gradient clipping per member, (K,) device tensors (None when no member uses it)."""
        smooth = [c.train.label_smoothing for c in self.configs]
        self.smoothing = torch.tensor(smooth, device=self.device) if any(smooth) else None  # (K,)
        clips = [c.train.grad_clip for c in self.configs]
        self.clip = (torch.tensor([c if c is not None else math.inf for c in clips], device=self.device)
                     if any(c is not None for c in clips) else None)  # (K,)

    _start_sums: Optional[list] = None

    def _say(self, m: Member, line: str) -> None:
        self.log(f"[{m.cfg.name}] {line}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[MemberResult]:
        K0 = len(self.members)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log(f"population: {K0} members of one shape ({self.configs[0].model.hidden}, {self.configs[0].optim.name}, "
                 f"batch {self.B}) in one step on {self.device}; {self.steps_per_epoch} steps per epoch; run folders: "
                 f"{rundir.folder_list([m.folder for m in self.members])}")
        try:
            for m in self.members:
                rundir.write_atomic(m.folder / "config.yaml", to_yaml(m.cfg), "config.yaml")
                if m.cfg.train.tensorboard:
                    from dlbase.training.tblog import open_events
                    m.events = open_events(m.folder, m.cfg, self.step, self.log)
            with Preemption() as self.preempt:
                run_epochs(lambda: self.step < self.total_steps and bool(self.members), self._train_epoch,
                           self._end_epoch)
            self.peak_bytes = self._peak_bytes(K0)
            results = [self._finish(m) for m in self.all]
            with self.phases("plots"):
                self._plots()
            self.log(self.phases.line())
            return results
        finally:
            for m in self.all:
                if m.events is not None:
                    m.events.close()
                rundir.remove_if_empty(m.folder)

    def _train_epoch(self) -> bool:
        """Train the epoch in progress to its end, stopping at mid-epoch checkpoints (and there on a signal)."""
        every = self.configs[0].checkpoint.every_steps
        if self.batch == 0:
            for m in self.members:
                m.epoch_rng = m.batcher.generator.get_state()  # before this epoch's draw
        self._t0 = time.perf_counter()
        perms = torch.stack([m.batcher.perm()[:self.n_used] for m in self.members])  # (K, N) each member's order
        self._order = self.train_idx.gather(1, perms)  # (K, N) indices into data.x; batch b: [:, b*B:(b+1)*B]
        n_steps = min(self.steps_per_epoch, self.batch + self.total_steps - self.step)
        self._seen = min(self.n_used, n_steps * self.B)
        self._snap_list, self._snap_steps, self._snap_from = [], [], (self.step - self.batch, self.batch)
        if not run_epoch(self, n_steps, every, self._advance, self._at_boundary):
            return False
        self._snaps = torch.stack(self._snap_list) if self._snap_list else None  # (n_snaps, K)
        return True

    def _advance(self, stop: int) -> None:
        """Every member's steps up to batch `stop` of the epoch, or until a stop is asked for."""
        while self.batch < stop and not self.preempt.requested:  # a host flag: no sync
            self._step(self._order[:, self.batch * self.B:(self.batch + 1) * self.B])
            self.batch += 1
            self.step += 1
            if self.step % self.log_every == 0:
                self._snap_list.append(self.loss_sum.clone())  # (K,) device copy, read at the epoch's sync
                self._snap_steps.append(self.step)

    def _at_boundary(self) -> bool:
        """A mid-epoch boundary (every_steps reached, or asked to stop): the NaN guard per member, every
        member's last.ckpt, the stop."""
        self._count_seconds(time.perf_counter() - self._t0)
        if not self._guard(self.loss_sum.tolist()):  # note: sync, at a checkpoint boundary
            return False
        for k, m in enumerate(self.members):
            self._save(m, k, "last.ckpt", {})
        if self.preempt.requested:
            for m in self.members:
                m.status = "preempted"
            self._drop()
            return False
        self._t0 = time.perf_counter()
        return True

    def _step(self, ids: torch.Tensor) -> None:
        """One step of every member: ids (K, b) its samples. Gather, forward, loss, backward, clip, update, and
        the loss sums: device work only."""
        K, b = ids.shape
        flat = ids.reshape(-1)
        x = self.data.x.index_select(0, flat).view(K, b, -1)  # (K, b, D)
        y = self.data.y.index_select(0, flat).view(K, b)  # (K, b)
        with autocast(self.plan, self.device):
            logits = self.net.forward(x)  # (K, b, C)
        cfg = self.configs[0]
        losses, ce = member_losses(logits, y, cfg.train.loss, cfg.model.output, self.smoothing)  # (K,), (K,)
        for p in self.net.params:
            p.grad = None
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        if self.clip is not None:
            clip_grad_norms(self.net.params, self.clip)
        self.opt.step()
        self.loss_sum.add_(losses.detach(), alpha=b)
        if self.smoothing is not None:
            self.ce_sum.add_(ce.detach(), alpha=b)

    def _end_epoch(self) -> None:
        """The epoch's one sync, then each member's validation, metrics row, monitor and checkpoints."""
        K = len(self.members)
        parts = [self.loss_sum, self.ce_sum] + ([self._snaps.flatten()] if self._snaps is not None else [])
        read = torch.cat(parts).tolist()  # note: sync, per epoch
        sums, ce_sums, snaps = read[:K], read[K:2 * K], read[2 * K:]
        self.loss_sum.zero_()
        self.ce_sum.zero_()
        train_seconds = time.perf_counter() - self._t0
        self._count_seconds(train_seconds)
        share = train_seconds / K  # each member's part of the epoch's steps
        self.epoch, self.batch = self.epoch + 1, 0
        if not self._guard(sums):
            return
        sums = [s for s, m in zip(sums, self._was) if m.status == "running"]
        signalled = self.preempt.requested
        for k, m in enumerate(self.members):
            c = m.cfg
            train_loss = sums[k] / max(1, self._seen)
            plain = c.train.loss == "cross_entropy" and c.train.label_smoothing > 0
            self.net.to_member(k, m.model)
            with self.phases("validation"):
                val = evaluate(m.model, m.val, self.eval_loss) if m.val is not None else None
            lr = self.schedules[self.all.index(m)](self.step - 1)
            norms = layer_norms(m.model)
            train_ce = ce_sums[self._was.index(m)] / max(1, self._seen) if plain else None
            metrics = runrecord.epoch_metrics(train_loss, train_ce, val, lr, time.perf_counter() - self._t0, share,
                                              norms)
            improved = m.monitor.update(metrics, self.epoch)
            m.epochs_done, m.steps_done = self.epoch, self.step
            payload = self._payload(m, k, metrics)
            m.rows.append(rundir.metrics_row(self.epoch, self.step, metrics))
            runrecord.save_epoch(m.folder, m.rows, payload, improved, self.phases)
            if m.events is not None:
                mine = self._was.index(m)
                own = snaps[mine::len(self._was)]  # its column of the flattened (n_snaps, K) snapshots
                start = self._start_sums[self.all.index(m)] if self._start_sums else 0.0
                m.events.epoch(self.epoch, self.step, metrics, step_losses(
                    self._snap_steps, own, start, self._snap_from, self.B, self.n_used,
                    end=(self.step, read[mine])))
            self._say(m, runrecord.epoch_line(self.epoch, self.epochs_planned(), metrics, improved))
            warning = runrecord.vanishing_warning(norms)
            if warning is not None and not m.warned:
                m.warned = True
                self._say(m, warning)
            if m.monitor.should_stop:
                self._say(m, runrecord.early_stop_line(m.monitor))
                m.status = "early_stopped"
            elif signalled:
                m.status = "preempted"
            elif m.on_epoch is not None and self.step < self.total_steps and m.on_epoch(self.epoch, metrics):
                self._say(m, runrecord.pruned_line(self.epoch))
                m.status = "pruned"
        self._start_sums = None  # only the first epoch after a mid-epoch resume starts from a saved sum
        self._drop()

    # ------------------------------------------------------------------ members leaving
    def _guard(self, sums: list[float]) -> bool:
        """The NaN guard per member: a member whose loss sum is not finite is stopped (status.json: diverged,
        nothing of this epoch saved), the others go on. False when no member is left."""
        self._was = list(self.members)
        for s, m in zip(sums, self._was):
            if not math.isfinite(s):
                m.status = "diverged"
                epoch = self.epoch if self.batch == 0 else self.epoch + 1  # end of epoch: already counted
                lr = self.schedules[self.all.index(m)](max(0, self.step - 1))
                self._say(m, runrecord.diverged_text(epoch, self.step, lr, runrecord.kept_text(m.folder, "its "),
                                                     others=True))
                self._mark(m, "diverged")
        if any(m.status != "running" for m in self.members):
            self._drop()
        return bool(self.members)

    def _drop(self) -> None:
        """Members no longer running leave the stacked axis: every (K, ...) tensor is cut to the rest."""
        keep = [k for k, m in enumerate(self.members) if m.status == "running"]
        if len(keep) == len(self.members):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.net.keep(idx)
        self.opt.keep(idx, self.net.params)
        self.train_idx = self.train_idx.index_select(0, idx)
        if self.batch:  # mid-epoch: this epoch's order and loss snapshots lose the same rows
            self._order = self._order.index_select(0, idx)
            self._snap_list = [s.index_select(0, idx) for s in self._snap_list]
        self.loss_sum, self.ce_sum = self.loss_sum.index_select(0, idx), self.ce_sum.index_select(0, idx)
        if self.smoothing is not None:
            self.smoothing = self.smoothing.index_select(0, idx)
        if self.clip is not None:
            self.clip = self.clip.index_select(0, idx)
        self.members = [self.members[k] for k in keep]

    # ------------------------------------------------------------------ files
    def _payload(self, m: Member, k: int, metrics: dict) -> checkpoint.Payload:
        """Member k's checkpoint, as a lone run of its config would write it at this position (its model must
        hold the stacked weights: to_member first)."""
        rng = {"torch": m.torch_rng, "batcher": m.epoch_rng if self.batch else m.batcher.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        in_epoch = None
        if self.batch:
            loss_sum, ce_sum = self.loss_sum[k].item(), self.ce_sum[k].item()  # note: sync, at a checkpoint
            in_epoch = {"batch": self.batch, "loss_sum": loss_sum, "ce_sum": ce_sum}
        return runrecord.payload(m.cfg, self.data.input_shape, m.model, self.opt.torch_state_dict(k, m.optimizer),
                                 {"epoch": self.epoch, "step": self.step, "steps_per_epoch": self.steps_per_epoch},
                                 metrics, m.monitor.state(), rng, m.fold, in_epoch)

    def _save(self, m: Member, k: int, name: str, metrics: dict) -> None:
        self.net.to_member(k, m.model)
        m.epochs_done, m.steps_done = self.epoch, self.step
        with self.phases("checkpoints"):
            checkpoint.save(m.folder / name, self._payload(m, k, metrics))

    def _count_seconds(self, seconds: float) -> None:
        """The population's training-step time, and each member's share of it (members in the step)."""
        self.train_seconds += seconds
        self.phases.add("training", seconds)
        for m in self.members:
            m.train_seconds += seconds / len(self.members)

    def _mark(self, m: Member, status: str) -> None:
        """status.json at the member's own step (a pruned or early-stopped member left before the others)."""
        runrecord.mark(m.folder, status, m.steps_done if status != "diverged" else self.step)

    def _finish(self, m: Member) -> MemberResult:
        """Each member's end, as train()'s: status.json, its HParams, the eval line, its plots."""
        if m.status == "running":
            m.status = "finished"
        code = {"preempted": self.preempt.exit_code, "diverged": EXIT_DIVERGED}.get(m.status, 0)
        result = MemberResult(m.folder, m.epochs_done, m.monitor.metric, m.monitor.value, m.monitor.epoch,
                              m.rows[-1] if m.rows else {}, m.train_seconds, m.status, code,
                              self.peak_bytes, len(self.all))
        if m.status != "diverged":
            self._mark(m, m.status)
        if m.events is not None and m.status != "diverged":
            m.events.finish(result)
        if m.status == "preempted":
            inside = m.steps_done - m.epochs_done * self.steps_per_epoch  # steps of the epoch in progress
            self._say(m, f"{runrecord.stopped_line(self.preempt.signum, m.steps_done, m.epochs_done, inside, self.steps_per_epoch)}"
                         f"; to go on: dlbase train --resume {rundir.quote(m.folder / 'last.ckpt')}")
        elif (m.folder / "best.ckpt").exists():
            self._say(m, f"{m.status}: {m.monitor.describe()} -> {m.folder / 'best.ckpt'}; test it: dlbase eval "
                         f"{rundir.quote(m.folder / 'best.ckpt')}")
        return result

    def _plots(self) -> None:
        """Each member's curves.png and gradnorms.png, after every result is saved and printed: up to
        PLOT_MEMBERS members (each takes about a second); a signal stops the drawing at once."""
        todo = [m for m in self.all if m.rows and m.status != "preempted"]
        how = "dlbase plot <run folder> draws a member's curves.png and gradnorms.png"
        if len(todo) > PLOT_MEMBERS:
            self.log(f"plots: not drawn for {len(todo)} members (more than {PLOT_MEMBERS}); {how}")
            return
        from dlbase.training.report import plot_run
        with Preemption() as stop:
            for i, m in enumerate(todo):
                if stop.requested:
                    self.log(f"plots: stopped by a signal after {i} of {len(todo)} (every run is saved); {how}")
                    return
                plot_run(m.folder)

    def epochs_planned(self) -> int:
        """The epoch count shown in the epoch lines, as train() counts it."""
        return self.epoch + max(0, -(-(self.total_steps - self.step) // self.steps_per_epoch))

    def _peak_bytes(self, k0: int) -> int:
        """Peak memory per member: on CUDA the allocator's peak over the population; on the CPU (where the
        allocator keeps no peak) the stacked weights, gradients, optimiser state and one step's activations."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) // k0
        K = max(1, self.net.K)
        weights = sum(p.numel() * p.element_size() for p in self.net.params)
        state = sum(t.numel() * t.element_size() for ts in self.opt.state.values() for t in ts)
        return (2 * weights + state + self.net.nbytes() - weights) // K + activation_bytes_per_member(
            self.configs[0].model, self.net.encoding.out_features, self.B)


PLOT_MEMBERS = 16  # a larger population draws no plots by itself (dlbase plot draws any member's)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
