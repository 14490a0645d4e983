"""The config's JSON Schema for editors (draft-07, read by yaml-language-server), walked from the dataclasses in
dlbase/core/schema.py: what load_config accepts key by key, with defaults and help; `dlbase config schema` prints it."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dlbase.core.schema import UNSWEPT_KEYS as UNSWEPT, Config

# ----------------------------------------------------------------------------- the JSON Schema, for editors

# A number written as a string, as Python's float() reads it: the loader takes `lr: "1e-3"` (an unquoted 1e-3 it
# reads as a number, as YAML 1.2 and editors do). Finite numbers only: the loader refuses inf and nan.
_DIGITS = r"\d(?:_?\d)*"
NUMBER_STRING = rf"^\s*[+-]?(?:(?:{_DIGITS})?\.{_DIGITS}|{_DIGITS}\.?)(?:[eE][+-]?{_DIGITS})?\s*$"
_DESCRIPTION = ("A dlbase config (dlbase train, config validate, sweep), generated from dlbase/core/schema.py by "
                "`dlbase config schema`: each key's type, range and choices, checked as load_config checks them. "
                "Not checked here: the rules that tie keys together (schema.cross_checks, e.g. schedule.name: "
                "multistep needs milestones); `dlbase config validate --config FILE` checks those too. Also left "
                "to the loader: the range of a number written as a string (\"1e-3\") and .nan.")


def json_schema() -> dict:
    """The config file's JSON Schema (draft-07, which yaml-language-server reads), walked from the dataclasses above:
    what load_config accepts key by key, with each key's default and help."""
    out = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "dlbase config",
           **_section_schema(Config)}
    out["description"] = _DESCRIPTION
    out["properties"]["sweep"] = _sweep_schema()
    out["definitions"] = {"number_string": {"type": "string", "pattern": NUMBER_STRING}}
    return out


def _section_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    props = {f.name: _section_schema(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
             else _field_schema(f, hints[f.name]) for f in dataclasses.fields(cls)}
    # null: an empty section (`data:`) is the defaults
    return {"type": ["object", "null"], "description": (cls.__doc__ or "").strip(), "additionalProperties": False,
            "properties": props}


def _field_schema(f: dataclasses.Field, tp: Any) -> dict:
    m = f.metadata
    nullable = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if nullable:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    out: dict = {"description": m["help"], "default": default}
    if tp is tuple and dataclasses.is_dataclass(m["item_type"]):  # a list of sections (model.conv): no nulls in it
        out.update(type="array", maxItems=m["max_len"], items={**_section_schema(m["item_type"]), "type": "object"})
    elif tp is tuple:
        item = {"type": "integer" if m["item_type"] is int else "number",
                **_range(m["item_ge"], None, m["item_le"], m["item_lt"])}
        items: dict = {"type": "array", "items": item}
        if m["length"] is not None:
            items.update(minItems=m["length"], maxItems=m["length"])
        elif m["max_len"] is not None:
            items["maxItems"] = m["max_len"]
        # without a fixed length one number is a list of one: `hidden: 256` is [256]
        out["anyOf"] = [items] if m["length"] is not None else [items, item]
    elif tp is bool:
        out["type"] = "boolean"
    elif tp is int:
        out.update(type="integer", **_range(m["ge"], m["gt"], m["le"], m["lt"]))
    elif tp is float:
        out["anyOf"] = [{"type": "number", **_range(m["ge"], m["gt"], m["le"], m["lt"])},
                        {"$ref": "#/definitions/number_string"}]
    elif m["choices"]:
        out.update(type="string", enum=list(m["choices"]))
    elif m["pattern"]:
        out.update(type="string", pattern=_anchored(m["pattern"]))
    else:
        out["type"] = ["string", "number"]  # a number is taken as its text (checkpoint.dir: 2024)
    if nullable:
        if "anyOf" in out:
            out["anyOf"].append({"type": "null"})
        else:
            out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        if "enum" in out:
            out["enum"].append(None)
    return out


def _range(ge: Any, gt: Any, le: Any, lt: Any) -> dict:
    bounds = dict(minimum=ge, exclusiveMinimum=gt, maximum=le, exclusiveMaximum=lt)
    return {k: v for k, v in bounds.items() if v is not None}


def _anchored(pattern: str) -> str:
    # the whole string, as re.fullmatch: Python's `$` alone also matches before a final newline
    return rf"^(?:{pattern})$(?!\n)"


def _sweep_schema() -> dict:
    """The `sweep:` section, as dlbase/search/spec.py's parse_spec reads it (tests/test_schema.py holds the two together)."""
    name = next(f for f in dataclasses.fields(Config) if f.name == "name").metadata
    low_high = {"low": {"type": "number"}, "high": {"type": "number"}}
    distribution = {
        "type": "object", "required": ["distribution"],
        "description": "method random or tpe: a distribution to draw each trial's value from",
        "properties": {"distribution": {"enum": ["uniform", "log_uniform", "int_uniform", "choice"]},
                       "low": {"description": "uniform, log_uniform (> 0), int_uniform: the smallest value"},
                       "high": {"description": "uniform, log_uniform, int_uniform: above low"},
                       "values": {"description": "choice: the values to pick from"}},
        # each kind takes its own keys only (search/spec.py refuses any other key in a distribution)
        "anyOf": [{"properties": {"distribution": {"const": "choice"},
                                  "values": {"type": "array", "minItems": 1, "uniqueItems": True}},
                   "required": ["values"], "additionalProperties": False},
                  {"properties": {"distribution": {"enum": ["uniform", "log_uniform"]}, **low_high},
                   "required": ["low", "high"], "additionalProperties": False},
                  {"properties": {"distribution": {"const": "int_uniform"}, "low": {"type": "integer"},
                                  "high": {"type": "integer"}}, "required": ["low", "high"],
                   "additionalProperties": False}]}
    return {
        "type": "object", "additionalProperties": False, "required": ["params"],
        "description": "Read by `dlbase sweep` only (dlbase train refuses a config with it): the search space and "
                       "how trials are scored. Not checked here: low below high, log_uniform's low above 0, "
                       "distributions need method random or tpe; a list and its JSON text count as one value; params is "
                       "required here, though --grid can add it.",
        "properties": {
            "name": {"description": "the sweep's folder under checkpoint.dir; default: the run name + _sweep",
                     "anyOf": [{"type": "string", "pattern": _anchored(name["pattern"])},
                               {"type": "integer", "minimum": 0, "maximum": 10**128 - 1}]},
            "method": {"enum": ["grid", "random", "tpe", "pbt"],
                       "description": "grid: every combination | random: `trials` seeded draws | tpe: Optuna's TPE | "
                                      "pbt: PBT of `trials` random draws; default: tpe for distributions, else grid"},
            "trials": _count(1, "random, tpe: how many trials", 10),
            "seed": _count(0, "random, tpe: the samplers' seed", 0),
            "pruner": {"enum": ["none", "median", "hyperband", "halving", None], "description": "stop hopeless trials "
                       "early: none | median | hyperband | halving (in a population); default: median for random, tpe"},
            **_inside_schema(),
            "prune_after": _count(0, "median: trials that must finish before any is pruned", 3),
            "storage": {"type": ["string", "null"], "pattern": r"\S", "default": None,
                        "description": "the study's database: an Optuna storage URL (sqlite:///study.db, "
                                       "postgresql://user@host/db) or a journal file (.log, .journal, .jsonl); "
                                       "default: study.db in the sweep folder"},
            "heartbeat": _count(1, "seconds between a running trial's beats; 3 missed and it is retried", 30),
            "retries": _count(0, "how often a trial whose worker died or was stopped is retried", 3),
            "population": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 4096}],
                           "default": 1, "description": "trials a worker trains at once as one population "
                                                        "(same shape: one batched step); auto: as many as fit in "
                                                        "memory"},
            "metric": {"enum": ["val_accuracy", "val_loss"], "default": "val_accuracy",
                       "description": "what picks the winner (never the test set)"},
            "mode": {"enum": ["max", "min"], "description": "max or min of the metric; default: max for "
                                                            "val_accuracy, min for val_loss"},
            "cv_folds": _count(2, "k-fold cross-validation on the training set; null: the validation split", None),
            "params": {"type": "object", "minProperties": 1,
                       "description": "dotted config key -> a list of values, or a distribution (method random)",
                       # the keys every trial sets itself are not swept (search/spec.py: identical trials)
                       "propertyNames": {"enum": [k for k in _dotted_keys(Config) if k not in UNSWEPT]},
                       "additionalProperties": {"anyOf": [{"type": "array", "minItems": 1, "uniqueItems": True},
                                                         distribution]}}}}


def _inside_schema() -> dict:
    """The sweep keys of search inside a population (search/pbt.py): PBT's and successive halving's."""
    return {
        "interval": _count(1, "pbt: epochs between exploits", 1),
        "quantile": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 0.5, "default": 0.25,
                     "description": "pbt: the bottom fraction that copies the top fraction at each exploit"},
        "resample": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": 0.25,
                     "description": "pbt: probability that a copied hyperparameter is drawn anew"},
        "perturb": {"type": ["array", "null"], "minItems": 1, "default": [1.2, 0.8],
                    "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 10**6},
                    "description": "pbt: the factors a copied hyperparameter is multiplied by (one drawn)"},
        "reduction": _count(2, "halving: eta; the best 1/eta of the members go on at each rung", 3),
        "min_epochs": _count(1, "halving: the first rung (epochs); then min_epochs * eta^i", 1),
    }


def _count(lo: int, help: str, default: Any) -> dict:
    return {"type": ["integer", "null"], "minimum": lo, "maximum": 10**6, "default": default, "description": help}


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a sweep may set (sections too: `model.encoding: [{name: fourier}, {name: none}]`)."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _dotted_keys(hints[f.name], prefix + f.name + ".")
    return out
