"""The population loop: K members of one shape trained by one batched step (stacked.py, optim.py), each member
otherwise an ordinary run: its own data order (its Batcher, drawn as `dlbase train` draws it), validation split,
monitor, early stop, NaN guard, checkpoints, metrics.csv, TensorBoard events and plots, in its own run folder.
Members that stop (early, pruned, diverged) leave the population at the boundary where they stop."""
from __future__ import annotations

import math
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dlbase.training import checkpoint, runrecord
from dlbase.core import rundir
from dlbase.core.augment import augmenter
from dlbase.core.backprop import layer_norms
from dlbase.core.curvature import epoch_curvature
from dlbase.core.config import Config
from dlbase.core.data import Batcher
from dlbase.training.engine import Plan
from dlbase.training.evaluate import evaluate
from dlbase.core.loss import build_eval_loss
from dlbase.core.model import build_model, standardizes
from dlbase.core.optim import build_optimizer, build_schedule
from dlbase.population.stacked import activation_bytes_per_member
from dlbase.population.member import Member, MemberResult
from dlbase.population.restore import restore_member, restore_position
from dlbase.population.exploit import gather_members
from dlbase.population.steppers import PopStepper, stack_members
from dlbase.population.optim import PopOptimizer
from dlbase.population.data import PopulationData
from dlbase.training.phases import Phases
from dlbase.training.preempt import Preemption
from dlbase.training.state import Monitor
from dlbase.training.progress import Progress, Snapshots, epoch_sizes, run_epoch, run_epochs, seed_everything

EXIT_DIVERGED = 3  # TrainingDiverged's exit code


class Population:
    """`Population(configs, ...).fit()` trains the members together and returns one MemberResult per config."""

    def __init__(self, configs: Sequence[Config], folders: Sequence[Optional[Path]],
                 folds: Sequence[Optional[tuple[int, int]]], data: PopulationData, device: torch.device,
                 run_plan: Plan, log: Callable[[str], None] = print,
                 on_epoch: Sequence[Optional[Callable[[int, dict], bool]]] = (), phases: Optional[Phases] = None,
                 resumed: Sequence[tuple[Path, checkpoint.Payload]] = (), stepper: str = "auto",
                 after_epoch: Optional[Callable[["Population"], None]] = None):
        """resumed: each member's (checkpoint path, payload) to go on from, all at one position (resume.py's
        resume_members groups them so), instead of starting; their folders are the checkpoints' own.
        stepper: how the members are stacked (steppers.STEPPERS). after_epoch(pop): after every member's epoch
        end (its files written, its decisions taken), before members leave: search inside the population
        (search/pbt.py) exploits or prunes there, through the methods below."""
        self.after_epoch = after_epoch
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
        e = epoch_sizes(cfg, sizes[0])
        self.n_used, self.steps_per_epoch, self.total_steps = e.n_used, e.steps_per_epoch, e.total_steps
        self.schedules = [build_schedule(c.schedule, c.optim.lr, self.steps_per_epoch, self.total_steps)
                          for c in configs]
        self.members = members  # the members still training, in the order of the stacked axis
        self.all = list(members)
        self.train_idx = torch.stack(train_idx)  # (K, N) each member's training samples, indices into data.x
        net = stack_members([m.model for m in members], [c.model for c in configs], stepper)
        lr_table = torch.tensor([s.table() for s in self.schedules], dtype=torch.float64, device=device)  # (K, T)
        self.stepper = PopStepper(net, PopOptimizer(net.params, [c.optim for c in configs], lr_table), data.x,
                                  data.y, cfg, run_plan, device, *self._per_member_settings())
        self.stepper.augmenters = [m.augmenter for m in members if m.augmenter is not None]
        self.eval_loss = build_eval_loss(cfg.train.loss, cfg.model.output)
        self.progress = Progress()  # the population's position: every member is at it
        self.snaps = Snapshots(min(c.train.log_every for c in configs), self.steps_per_epoch, self.stepper.loss_sum)
        self.train_seconds = 0.0
        self.resumed = bool(resumed)
        if resumed:
            self._start_sums = restore_position(self, resumed)
        for m, folder in zip(members, folders):  # last: every check has passed, now claim the folders
            m.claim(folder)

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
            members.append(Member(cfg=c, monitor=Monitor(c, val is not None), log=self.log, prefix=f"[{c.name}] ",
                                  on_epoch=on_epoch[i] if on_epoch else None, model=model,
                                  optimizer=build_optimizer(model.parameters(), c.optim, device),
                                  batcher=Batcher(idx.shape[0], self.B, device, c.seed), val=val,
                                  torch_rng=torch.get_rng_state(), fold=folds[i],
                                  augmenter=augmenter(c.train.augment, data.input_shape, device, c.seed)))
            if resumed:
                restore_member(self, members[-1], *resumed[i])
            train_idx.append(idx)
        return members, train_idx

    def _per_member_settings(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Label smoothing and gradient clipping per member, (K,) device tensors (None when no member uses it)."""
        smooth = [c.train.label_smoothing for c in self.configs]
        smoothing = torch.tensor(smooth, device=self.device) if any(smooth) else None  # (K,)
        clips = [c.train.grad_clip for c in self.configs]
        clip = (torch.tensor([c if c is not None else math.inf for c in clips], device=self.device)
                if any(c is not None for c in clips) else None)  # (K,)
        return smoothing, clip

    _start_sums: Optional[list] = None
    _drawn = False  # the epoch in progress has drawn its members' orders

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[MemberResult]:
        K0, p = len(self.members), self.progress
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        m0 = self.configs[0].model
        shape = (f"conv {[c.channels for c in m0.conv]}, hidden " if m0.conv else "") + str(m0.hidden)
        self.log(f"population: {K0} members of one shape ({shape}, {self.configs[0].optim.name}, "
                 f"batch {self.B}) in one step on {self.device}; {self.steps_per_epoch} steps per epoch; run folders: "
                 f"{rundir.folder_list([m.folder for m in self.members])}")
        try:
            for k, m in enumerate(self.members):
                m.start(p.step)
                if not self.resumed:  # each member keeps its initial weights, as a lone run does (init.ckpt)
                    m.keep_init(self._payload(m, k, {}))
            with Preemption() as self.preempt:
                run_epochs(lambda: p.step < self.total_steps and bool(self.members), self._train_epoch,
                           self._end_epoch)
            self.peak_bytes = self._peak_bytes(K0)
            results = [self._finish(m) for m in self.all]
            with self.phases("plots"):
                self._plots()
            self.log(self.phases.line())
            return results
        finally:
            for m in self.all:
                m.close()

    def _train_epoch(self) -> bool:
        """Train the epoch in progress to its end, stopping at mid-epoch checkpoints (and there on a signal)."""
        p, every = self.progress, self.configs[0].checkpoint.every_steps
        if p.batch == 0:
            for m in self.members:
                m.epoch_rng = m.batcher.generator.get_state()  # before this epoch's draw
        self._t0 = time.perf_counter()
        perms = torch.stack([m.batcher.perm()[:self.n_used] for m in self.members])  # (K, N) each member's order
        self._drawn = True
        self._order = self.train_idx.gather(1, perms)  # (K, N) indices into data.x; batch b: [:, b*B:(b+1)*B]
        n_steps = min(self.steps_per_epoch, p.batch + self.total_steps - p.step)
        self._seen = min(self.n_used, n_steps * self.B)
        self.snaps.begin(p.step, p.batch)
        return run_epoch(p, n_steps, every, self.stepper, lambda: self._order,
                         lambda step: self.snaps.on_step(step, self.stepper.loss_sum),
                         lambda: self.preempt.requested, self._at_boundary)

    def _at_boundary(self) -> bool:
        """A mid-epoch boundary (every_steps reached, or asked to stop): the NaN guard per member, every
        member's last.ckpt, the stop."""
        self._count_seconds(time.perf_counter() - self._t0)
        if not self._guard(self.stepper.loss_sum.tolist()):  # note: sync, at a checkpoint boundary
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

    def _end_epoch(self) -> None:
        """The epoch's one sync, then each member's validation and metrics, and its record's epoch end."""
        p, was = self.progress, list(self.members)
        K = len(was)
        read = torch.cat([self.stepper.take_sums(), self.snaps.taken()]).tolist()  # note: sync, per epoch
        sums, ce_sums, snaps = read[:K], read[K:2 * K], read[2 * K:]
        train_seconds = time.perf_counter() - self._t0
        self._count_seconds(train_seconds)
        share = train_seconds / K  # each member's part of the epoch's steps
        p.epoch, p.batch = p.epoch + 1, 0
        self._drawn = False
        if not self._guard(sums):
            return
        signalled = self.preempt.requested
        for k, m in enumerate(self.members):
            j, c = was.index(m), m.cfg  # j: its place in the sums read (members that diverged have left since)
            self.stepper.net.to_member(k, m.model)
            with self.phases("validation"):
                val = evaluate(m.model, m.val, self.eval_loss) if m.val is not None else None
            lr = self.schedules[self.all.index(m)](p.step - 1)
            plain = c.train.loss == "cross_entropy" and c.train.label_smoothing > 0
            norms = {**layer_norms(m.model), **self._curvature(m, k)}
            metrics = runrecord.epoch_metrics(sums[j] / max(1, self._seen), ce_sums[j] / max(1, self._seen)
                                              if plain else None, val, lr, time.perf_counter() - self._t0, share,
                                              norms)
            m.epochs_done, m.steps_done, m.metrics = p.epoch, p.step, metrics
            start = self._start_sums[self.all.index(m)] if self._start_sums else 0.0
            losses = self.snaps.losses(snaps, j, K, start, self.B, self.n_used, end=(p.step, sums[j]))
            m.end_epoch(p.epoch, p.step, self.epochs_planned(), metrics, lambda: self._payload(m, k, metrics),
                        losses, self.phases)
            m.decide(p.epoch, metrics, p.step < self.total_steps, lambda: signalled)
        if self.after_epoch is not None:
            self.after_epoch(self)
        self._start_sums = None  # only the first epoch after a mid-epoch resume starts from a saved sum
        self._drop()

    def _curvature(self, m: Member, k: int) -> dict:
        """train.hessian_every for member k (its model holds the stacked weights: to_member first), on the first
        train.hessian_samples of its own training samples, the batch its lone run measures on."""
        every, n = m.cfg.train.hessian_every, m.cfg.train.hessian_samples
        if not every or self.progress.epoch % every:
            return {}
        idx = self.train_idx[k][:n]
        with self.phases("curvature"):
            return epoch_curvature(m.model, self.data.x.index_select(0, idx).float(), self.data.y.index_select(0, idx),
                                   self.eval_loss)

    # ------------------------------------------------------------------ members leaving
    def _guard(self, sums: list[float]) -> bool:
        """The NaN guard per member: a member whose loss sum is not finite is stopped (status.json: diverged,
        nothing of this epoch saved), the others go on. False when no member is left."""
        p = self.progress
        for s, m in zip(sums, list(self.members)):
            if not math.isfinite(s):
                m.status = "diverged"
                epoch = p.epoch if p.batch == 0 else p.epoch + 1  # end of epoch: already counted
                lr = self.schedules[self.all.index(m)](max(0, p.step - 1))
                m.say(runrecord.diverged_text(epoch, p.step, lr, runrecord.kept_text(m.folder, "its "), others=True))
                m.mark(p.step)
        self._drop()
        return bool(self.members)

    def _drop(self) -> None:
        """Members no longer running leave the stacked axis: every (K, ...) tensor is cut to the rest."""
        keep = [k for k, m in enumerate(self.members) if m.status == "running"]
        if len(keep) == len(self.members):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.stepper.keep(idx)
        self.train_idx = self.train_idx.index_select(0, idx)
        if self.progress.batch:  # mid-epoch: this epoch's order loses the same rows
            self._order = self._order.index_select(0, idx)
        self.snaps.keep(idx)
        self.members = [self.members[k] for k in keep]
        self.stepper.augmenters = [m.augmenter for m in self.members if m.augmenter is not None]

    # ------------------------------------------------------------------ search inside the population
    def replace_members(self, dst: Sequence[Member], src: Sequence[Member]) -> None:
        """Each dst[i] takes src[i]'s weights, optimiser state and hyperparameters (its config's optim and
        schedule sections); it keeps its own folder, name, data order, record and monitor."""
        place = self.members.index
        gather_members(self.stepper, [place(m) for m in dst], [place(m) for m in src])
        for d, s in zip(dst, src):
            self.set_config(d, replace(d.cfg, optim=s.cfg.optim, schedule=s.cfg.schedule), gathered=True)

    def set_config(self, m: Member, cfg: Config, gathered: bool = False) -> None:
        """Member m's hyperparameters from cfg (optim, schedule; the other keys must not change): its config (what
        its checkpoints record), its schedule and lr table row, its optimiser's (K,) values."""
        j, k = self.all.index(m), self.members.index(m)
        m.cfg = self.configs[j] = cfg
        self.schedules[j] = build_schedule(cfg.schedule, cfg.optim.lr, self.steps_per_epoch, self.total_steps)
        row = torch.tensor(self.schedules[j].table(), dtype=torch.float64, device=self.device)  # (T,)
        self.stepper.opt.set_member(k, cfg.optim, row)
        if not gathered and getattr(self.stepper.net, "p_drop", None) is not None:
            self.stepper.net.p_drop[k] = cfg.model.dropout

    def save_last(self, m: Member) -> None:
        """Member m's last.ckpt at the population's position (after its weights or hyperparameters changed)."""
        self._save(m, self.members.index(m), "last.ckpt", m.metrics or {})

    def prune(self, m: Member) -> None:
        """Member m leaves at this epoch's end as pruned (status.json, its result), as the sweep's pruner does."""
        m.say(runrecord.pruned_line(self.progress.epoch))
        m.status = "pruned"

    def scalars(self, m: Member, values: dict) -> None:
        """Scalars in member m's TensorBoard events at the population's step (its hyperparameters, say)."""
        if m.events is not None:
            for tag, v in values.items():
                m.events.writer.add_scalar(tag, v, self.progress.step)
            m.events.writer.flush()

    # ------------------------------------------------------------------ files
    def _payload(self, m: Member, k: int, metrics: dict) -> checkpoint.Payload:
        """Member k's checkpoint, as a lone run of its config would write it at this position (its model must
        hold the stacked weights: to_member first)."""
        p, st = self.progress, self.stepper
        # the order's generator before the epoch in progress drew its order (also when a stop comes before its
        # first batch: a rerun draws that order again), or as it is between epochs
        drawn = p.batch or self._drawn
        rng = {"torch": m.torch_rng, "batcher": m.epoch_rng if drawn else m.batcher.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if m.augmenter is not None:
            rng["augment"] = m.augmenter.generator.get_state()
        in_epoch = None
        if p.batch:
            loss_sum, ce_sum = st.loss_sum[k].item(), st.ce_sum[k].item()  # note: sync, at a checkpoint
            in_epoch = {"batch": p.batch, "loss_sum": loss_sum, "ce_sum": ce_sum}
        return runrecord.payload(m.cfg, self.data.input_shape, m.model, st.opt.torch_state_dict(k, m.optimizer),
                                 {"epoch": p.epoch, "step": p.step, "steps_per_epoch": self.steps_per_epoch},
                                 metrics, m.monitor.state(), rng, m.fold, in_epoch)

    def _save(self, m: Member, k: int, name: str, metrics: dict) -> None:
        self.stepper.net.to_member(k, m.model)
        m.epochs_done, m.steps_done = self.progress.epoch, self.progress.step
        with self.phases("checkpoints"):
            checkpoint.save(m.folder / name, self._payload(m, k, metrics))

    def _count_seconds(self, seconds: float) -> None:
        """The population's training-step time, and each member's share of it (members in the step)."""
        self.train_seconds += seconds
        self.phases.add("training", seconds)
        for m in self.members:
            m.train_seconds += seconds / len(self.members)

    def _finish(self, m: Member) -> MemberResult:
        """Each member's end, as a single run's: status.json, its HParams, its closing lines."""
        if m.status == "running":
            m.status = "finished"
        code = {"preempted": self.preempt.exit_code, "diverged": EXIT_DIVERGED}.get(m.status, 0)
        result = MemberResult(m.folder, m.epochs_done, m.monitor.metric, m.monitor.value, m.monitor.epoch,
                              m.rows[-1] if m.rows else {}, m.train_seconds, m.status, code,
                              self.peak_bytes, len(self.all))
        inside = m.steps_done - m.epochs_done * self.steps_per_epoch  # steps of the epoch in progress
        stopped = (runrecord.stopped_line(self.preempt.signum, m.steps_done, m.epochs_done, inside,
                                          self.steps_per_epoch) if m.status == "preempted" else "")
        # the command that goes on with the whole population is said once, by train.py's summary
        m.finish(result, m.steps_done, stopped, f"its share of the training steps {m.train_seconds:.2f}s",
                 how_to_go_on=False)
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
        p = self.progress
        return p.epoch + max(0, -(-(self.total_steps - p.step) // self.steps_per_epoch))

    def _peak_bytes(self, k0: int) -> int:
        """Peak memory per member: on CUDA the allocator's peak over the population; on the CPU (where the
        allocator keeps no peak) the stacked weights, gradients, optimiser state and one step's activations."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) // k0
        net, opt = self.stepper.net, self.stepper.opt
        K = max(1, net.K)
        weights = sum(p.numel() * p.element_size() for p in net.params)
        state = sum(t.numel() * t.element_size() for ts in opt.state.values() for t in ts)
        return (2 * weights + state + net.nbytes() - weights) // K + activation_bytes_per_member(
            self.configs[0].model, net.encoding.out_features, self.B, self.data.input_shape)


PLOT_MEMBERS = 16  # a larger population draws no plots by itself (dlbase plot draws any member's)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
