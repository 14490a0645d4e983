"""Many trainings in one batched step: the stacked model and optimisers, the population's data and loop, and the
entry points (train.py). The entry points' names are importable from here, loaded on first use:

    from dlbase.population import train_population, train_seeds, group_by_shape, same_shape
"""
from __future__ import annotations

from typing import Any

__all__ = ["train_population", "train_seeds", "group_by_shape", "same_shape", "choose_k", "bytes_per_member",
           "seed_configs", "parse_seeds", "check_population", "MemberResult", "PopulationData",
           "load_population_data", "SeedSummary", "SHAPE_KEYS"]


def __getattr__(name: str) -> Any:
    if name in __all__:  # lazily: the submodules import this package first, and train.py imports them
        from dlbase.population import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
