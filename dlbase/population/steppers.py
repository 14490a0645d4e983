"""How a population's members are stacked into one model: the choice between the two steppers, which share one
interface (params, buffers, forward, to_member, keep, nbytes)."""
from __future__ import annotations

from typing import Sequence

import torch

from dlbase.core.model import MLP
from dlbase.population.stacked import StackedMLP
from dlbase.population.vmapped import VmappedModel

# how a population's members are stacked: the hand-stacked MLP (torch.baddbmm; stacked.py), or torch.func over
# whatever build_model makes (vmapped.py). scripts/population_bench.py measured the hand-stacked one faster for
# MLPs on this CPU (9% of the steps for 4 x [512, 512], 32% for 4 x [64]; BENCHMARKS.md), so auto takes it for
# MLPs and torch.func for every other model. (On a GPU: not measured yet.)
STEPPERS = ("auto", "stacked", "vmap")


def stack_members(models: Sequence[torch.nn.Module], cfgs: Sequence, stepper: str = "auto"):
    """The members' models as one stacked model (StackedMLP or VmappedModel: one interface)."""
    from dlbase.core.errors import ConfigError
    if stepper not in STEPPERS:
        raise ConfigError(f"population stepper {stepper!r} is not one of {', '.join(STEPPERS)}")
    mlp = all(type(m) is MLP for m in models)
    if stepper == "stacked" and not mlp:
        raise ConfigError("population stepper 'stacked' is the hand-stacked MLP; this model needs 'vmap' (or auto)")
    if stepper == "auto":
        stepper = "stacked" if mlp else "vmap"
    return VmappedModel(models, cfgs) if stepper == "vmap" else StackedMLP(models, cfgs)
