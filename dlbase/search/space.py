"""The search space in Optuna's terms, below the spec (spec.py) and the study (study.py), which both read it:
the methods and pruners, each value's encoding as an Optuna choice, the distributions, the trial slots fixed in
advance, and a trial's value for a key. Optuna is imported lazily: `dlbase train` never needs it."""
from __future__ import annotations

import json
from typing import Any

from dlbase.core.errors import DlbaseError

METHODS = ("grid", "random", "tpe", "pbt")  # pbt: random draws that then train as one population (search/pbt.py)
PRUNERS = ("none", "median", "hyperband", "halving")  # halving: successive halving inside a population (pbt.py)


def optuna_module():
    """Optuna, imported on first use, quiet, without its experimental-feature warnings."""
    import warnings

    try:
        import optuna  # lazy: `dlbase train` never needs it
    except ImportError:
        raise DlbaseError("dlbase sweep runs on Optuna, which is not installed here: pip install 'optuna>=4.9'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlbase prints its own line per trial
    # heartbeat, retry and fail_stale_trials are marked experimental; dlbase pins optuna>=4 and tests them
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def encode(value: Any) -> Any:
    """Optuna's categorical choices are None, bool, int, float or str: a list (model.hidden) travels as JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def distributions(params: dict) -> dict:
    """dotted key -> Optuna distribution, for a spec's params (lists and distribution mappings)."""
    optuna_module()
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    out = {}
    for key, space in params.items():
        if isinstance(space, list):
            out[key] = CategoricalDistribution([encode(v) for v in space])
        elif space["distribution"] == "choice":
            out[key] = CategoricalDistribution([encode(v) for v in space["values"]])
        elif space["distribution"] == "int_uniform":
            out[key] = IntDistribution(int(space["low"]), int(space["high"]))
        else:
            out[key] = FloatDistribution(space["low"], space["high"], log=space["distribution"] == "log_uniform")
    return out


def decode(params: dict, values: dict) -> dict:
    """Optuna's param values -> the spec's values (a JSON-encoded choice back to its list)."""
    out = {}
    for key, v in values.items():
        space = params[key]
        choices = space if isinstance(space, list) else space.get("values")
        out[key] = choices[[encode(c) for c in choices].index(v)] if choices is not None else v
    return out


def slots(spec) -> list[dict]:
    """Every trial the study will hold, as Optuna param values fixed in advance: the grid's points (in order),
    `trials` seeded draws of Optuna's RandomSampler, or for TPE its seeded start-up draws then empty slots."""
    import itertools
    keys = list(spec.params)
    if spec.method == "grid":
        return [dict(zip(keys, (encode(v) for v in combo))) for combo in itertools.product(*spec.params.values())]
    n_random = spec.trials if spec.method in ("random", "pbt") else tpe_startup(spec.trials)
    optuna = optuna_module()
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed))  # in memory
    dists = distributions(spec.params)
    out = []
    for _ in range(n_random):
        t = draws.ask(dists)
        draws.tell(t, 0.0)
        out.append(dict(t.params))
    return out + [{} for _ in range(spec.trials - n_random)]


def tpe_startup(trials: int) -> int:
    """TPE's random start-up trials: a quarter of the budget, at least 2, at most 10 (Optuna's default)."""
    return max(2, min(10, trials // 4)) if trials > 2 else trials



def suggest(trial, key: str, dist) -> Any:
    """The trial's value for key: fixed in its slot, kept from before a retry, or chosen by the sampler."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)
