"""Reading and checking configs: load_config() (the only place YAML is read), --set overrides, to_yaml().
The schema it checks against (the dataclasses, their defaults, help and ranges) is in dlbase/core/schema.py."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dlbase.core.errors import ConfigError
from dlbase.core.schema import (ACTIVATIONS, COMPILES, DATASETS, ENCODINGS, FUSED_OPTIMIZERS,  # noqa: F401 (re-exported)
                           GRAPH_OPTIMIZERS, INITS, LOSSES, METRICS, NORMS, OPTIM_IMPLS, OPTIMIZERS, OUTPUTS,
                           PRECISIONS, SCHEDULES, CheckpointConfig, Config, DataConfig, EarlyStopConfig,
                           EncodingConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, cross_checks)

# Largest config file we read at all: a run config is a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


# ----------------------------------------------------------------------------- reading

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxdict = 4
_short.maxlevel = 2


def _show(value: Any) -> str:
    return _short.repr(value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses YAML aliases: a config never needs them, and they make billion-laughs bombs."""

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed in a config",
                                       event.start_mark)
        return super().compose_node(parent, index)


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            raise yaml.MarkedYAMLError(None, None, "a mapping key must be a plain value", key_node.start_mark)
        if key in seen:
            raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)
# YAML 1.2's core-schema floats: PyYAML (YAML 1.1) reads 1e-4, 1.0e3 and .5e1 as strings, editors (YAML 1.2) as
# numbers. Added after PyYAML's int resolver, which still takes plain integers (10) first.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely (YAML 1.2 floats, no aliases, no duplicate keys); errors name the source and the line.
    Every reader of user YAML goes through this (config files, --set, a sweep's spec and --grid)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(str(p) for p in (e.context, e.problem) if p) or "malformed YAML"
        raise ConfigError(f"{where}: malformed YAML: {what}") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:
        raise ConfigError(f"{source}: malformed YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_config_file(path: str | os.PathLike) -> Any:
    """Read a YAML file into plain Python values; every failure is a ConfigError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, expected a YAML config file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file is over {MAX_CONFIG_BYTES} bytes; a run config is a few hundred")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return parse_yaml(text, str(p))


# ----------------------------------------------------------------------------- checking


def _type_name(tp: Any, m: dict | None = None) -> str:
    """What a key takes, in words (never a Python class: a user reads this)."""
    if tp is tuple and m is not None:
        return _list_words(m)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "a value")


def _list_words(m: dict) -> str:
    """`a list of positive integers, e.g. [512, 512]`: what a tuple key takes."""
    if m["item_type"] is int:
        items = "positive integers" if m["item_ge"] == 1 else "integers"
        example = "[512, 512]" if m["item_le"] == 1 << 16 else "[5, 8]"
    else:
        items, example = "numbers", "[0.9, 0.999]"
    count = f"{m['length']} " if m["length"] is not None else ""
    return f"a list of {count}{items}, e.g. {example}"


def _all_paths(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of a config class -> its field (sections included)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_all_paths(hints[f.name], prefix + f.name + "."))
    return out


def _suggest(key: str, prefix: str, cls: type) -> str:
    """A close match for an unknown key: a sibling (or alias of one), else the same name in another section."""
    candidates: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for alias in (f.name, *f.metadata.get("aliases", ())):
            candidates[alias] = prefix + f.name
    lowered = str(key).lower()
    if lowered in candidates:
        return candidates[lowered]
    match = difflib.get_close_matches(lowered, list(candidates), n=1, cutoff=0.6)
    if match:
        return candidates[match[0]]
    elsewhere = [p for p, f in _all_paths(Config).items()
                 if p.rsplit(".", 1)[-1] == lowered or lowered in f.metadata.get("aliases", ())]
    return elsewhere[0] if elsewhere else ""


class _Checker:
    def __init__(self, source: str, overridden: dict[str, str]):
        self.source = source
        self.overridden = overridden  # dotted key -> the --set text that gave its value

    def fail(self, key: str, msg: str) -> ConfigError:
        origin = f"--set {self.overridden[key]}" if key in self.overridden else self.source
        return ConfigError(f"{origin}: {key}: {msg}")

    def section(self, cls: type, raw: Any, prefix: str) -> Any:
        key = prefix.rstrip(".") or "(top level)"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"expected a mapping of keys, got {_show(raw)}")
        names = {f.name for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names:
                if prefix == "" and k == "sweep":
                    raise self.fail("sweep", "a sweep: section is read by dlbase sweep, not here; run dlbase sweep "
                                             "--config with this file")
                hint = _suggest(k, prefix, cls)
                msg = "unknown key" + (f"; did you mean {hint}?" if hint else
                                       f"; allowed keys: {', '.join(sorted(names))}")
                raise self.fail(prefix + str(k), msg)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                values[f.name] = self.section(tp, raw[f.name], prefix + f.name + ".")
            else:
                values[f.name] = self.value(prefix + f.name, f, tp, raw[f.name])
        return cls(**values)

    def value(self, key: str, f: dataclasses.Field, tp: Any, v: Any) -> Any:
        m = f.metadata
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if v is None:
                return None
            tp = args[0]
        elif v is None:
            raise self.fail(key, f"must not be null; expected {_type_name(tp, m)}{self._allowed(m)}")
        if tp is tuple:
            return self.tuple_of(key, m, v)
        out = self.scalar(key, tp, v, m)
        self.check_range(key, out, m)
        if m["choices"] and out not in m["choices"]:
            close = difflib.get_close_matches(str(out), m["choices"], n=1)
            raise self.fail(key, f"{_show(v)} is not one of {', '.join(m['choices'])}"
                            + (f"; did you mean {close[0]}?" if close else ""))
        if m["pattern"] and not re.fullmatch(m["pattern"], out):
            raise self.fail(key, f"{_show(v)} is not allowed; expected {m['allowed']}")
        return out

    def scalar(self, key: str, tp: type, v: Any, m: dict) -> Any:
        if tp is bool:
            if isinstance(v, bool):
                return v
        elif tp is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 2**63:
                return int(v)
        elif tp is float:
            if isinstance(v, str):  # a quoted "1e-3": accept what Python reads as a number
                try:
                    v = float(v.strip())
                except ValueError:
                    pass
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    out = float(v)
                except OverflowError:
                    raise self.fail(key, f"{_show(v)} is too large{self._allowed(m)}") from None
                if not math.isfinite(out):
                    raise self.fail(key, f"{_show(v)} is not a finite number{self._allowed(m)}")
                return out
        elif tp is str:
            if isinstance(v, str):
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not m["choices"] and not m["pattern"]:
                return str(v)
        raise self.fail(key, f"{_show(v)} is not {_type_name(tp)}{self._allowed(m)}")

    @staticmethod
    def _allowed(m: dict) -> str:
        if m.get("choices"):
            return f" (one of {', '.join(m['choices'])})"
        parts = []
        if m.get("gt") is not None:
            parts.append(f"> {m['gt']}")
        if m.get("ge") is not None:
            parts.append(f">= {m['ge']}")
        if m.get("le") is not None:
            parts.append(f"<= {m['le']:g}" if isinstance(m["le"], float) else f"<= {m['le']}")
        if m.get("lt") is not None:
            parts.append(f"< {m['lt']}")
        return f" ({' and '.join(parts)})" if parts else ""

    def check_range(self, key: str, v: Any, m: dict) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if ((m["gt"] is not None and not v > m["gt"]) or (m["ge"] is not None and not v >= m["ge"])
                or (m["le"] is not None and not v <= m["le"]) or (m["lt"] is not None and not v < m["lt"])):
            raise self.fail(key, f"{_show(v)} is out of range; expected a value{self._allowed(m)}")

    def tuple_of(self, key: str, m: dict, v: Any) -> tuple:
        item_type, example = m["item_type"], "[512, 512]" if m["item_type"] is int else "[0.9, 0.999]"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and m["length"] is None:
            v = [v]  # `hidden: 256` means one layer of 256
        if not isinstance(v, (list, tuple)):
            raise self.fail(key, f"{_show(v)} is not {_list_words(m)}")
        if m["length"] is not None and len(v) != m["length"]:
            raise self.fail(key, f"{_show(v)} has {len(v)} entries; expected exactly {m['length']}, e.g. {example}")
        if m["max_len"] is not None and len(v) > m["max_len"]:
            raise self.fail(key, f"{len(v)} entries; at most {m['max_len']} allowed")
        out = []
        for i, item in enumerate(v):
            if item_type is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if item_type is int and isinstance(item, float) and item.is_integer():  # [1e3]: JSON Schema's integer
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, item_type) or (
                    item_type is float and not math.isfinite(item)):
                raise self.fail(key, f"entry {i} ({_show(item)}) is not {_type_name(item_type)}; "
                                     f"expected a list like {example}")
            lo, hi, lt = m["item_ge"], m["item_le"], m["item_lt"]
            if (lo is not None and item < lo) or (hi is not None and item > hi) or (lt is not None and item >= lt):
                bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                                  f"<= {hi}" if hi is not None else "",
                                                  f"< {lt}" if lt is not None else "") if b)
                raise self.fail(key, f"entry {i} ({item}) is out of range; each must be {bounds}")
            out.append(item)
        return tuple(out)


# ----------------------------------------------------------------------------- overrides


def _apply_override(raw: dict, text: str, overridden: dict[str, str]) -> None:
    """Apply one `--set a.b=value` (value parsed as a YAML scalar or list) to the raw mapping."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.01")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text}: {key!r} is not a dotted key like optim.lr")
    value = parse_yaml(value_text, f"--set {text}") if value_text.strip() else None
    cls: Any = Config
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        here = ".".join(parts[:depth + 1])
        if part not in names:
            hint = _suggest(part, ".".join(parts[:depth]) + "." if depth else "", cls)
            raise ConfigError(f"--set {text}: {here}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
        tp = typing.get_type_hints(cls)[part]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {text}: {here} is not a section; it has no key {parts[depth + 1]!r}")
        cls = tp
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {part}: the file gives it as {_show(child)}, not a section")
        node = child
    node[parts[-1]] = value
    overridden[key] = text


# ----------------------------------------------------------------------------- entry points


def config_from_dict(raw: Any, source: str = "<config>", overrides: typing.Sequence[str] = (),
                     cross: bool = True) -> Config:
    """Validate plain values (from YAML, --set or a checkpoint) into a Config. cross False: each key's type, range
    and choices only, without schema.cross_checks (what the JSON Schema checks; tests compare the two)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (name:, data:, model:, ...), "
                          f"got {_show(raw)}")
    raw = _deep_copy(raw)
    overridden: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, overridden)
    checker = _Checker(source, overridden)
    cfg = checker.section(Config, raw, "")
    for key, msg in cross_checks(cfg) if cross else ():
        raise checker.fail(key, msg)
    return cfg


def _deep_copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read, override and validate a config file. path None: the defaults."""
    raw = read_config_file(path) if path is not None else {}
    return config_from_dict(raw, str(path) if path is not None else "<defaults>", overrides)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, not tuples) of a config: what goes in YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `hidden: [512, 512]` reads like the shipped configs."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
