"""Reading configs: load_config() (the only place YAML is read), --set overrides, to_yaml(). The schema they are
checked against (the dataclasses, their defaults, help and ranges) is in dlbase/core/schema.py, the checking in
dlbase/core/checker.py."""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from dlbase.core import recipes
from dlbase.core.checker import Checker, show, suggest
from dlbase.core.errors import ConfigError
from dlbase.core.schema import (ACTIVATIONS, COMPILES, DATASETS, ENCODINGS, FUSED_OPTIMIZERS,  # noqa: F401 (re-exported)
                           GRAPH_OPTIMIZERS, INITS, LOSSES, METRICS, NORMS, OPTIM_IMPLS, OPTIMIZERS, OUTPUTS,
                           PRECISIONS, SCHEDULES, CheckpointConfig, Config, ConvLayerConfig, DataConfig,
                           EarlyStopConfig, EncodingConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig,
                           cross_checks)

# Largest config file we read at all: a run config is a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


# ----------------------------------------------------------------------------- reading

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
    """Read a YAML file into plain Python values; every failure is a ConfigError naming the file. A path that does
    not exist may name a bundled recipe (`mnist_mlp` or `mnist_mlp.yaml`, see core/recipes.py): a file that
    exists always wins, and so does the copy ./mnist_mlp.yaml being edited in the current folder."""
    p = Path(path)
    if not p.exists():
        found = recipes.locate(str(path))
        if found is None:
            raise ConfigError(recipes.unknown(str(path), "config file not found, nor a bundled recipe of that name"))
        if not isinstance(found, Path):  # package data that is no file (a zipped install): read it whole
            return parse_yaml(_utf8(found.read_bytes(), str(path)), str(path))
        p = found  # the bundled recipe's file, or the user's copy ./NAME.yaml of it
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, expected a YAML config file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file is over {MAX_CONFIG_BYTES} bytes; a run config is a few hundred")
    return parse_yaml(_utf8(raw, str(p)), str(p))


def _utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


# ----------------------------------------------------------------------------- overrides


_INDEXED = re.compile(r"([A-Za-z_]\w*)\[(\d{1,4})\]")  # `conv[1]`: an entry of a list of sections


def _part(part: str) -> tuple[str, int | None]:
    m = _INDEXED.fullmatch(part)
    return (m.group(1), int(m.group(2))) if m else (part, None)


def _apply_override(raw: dict, text: str, overridden: dict[str, str]) -> None:
    """Apply one `--set a.b=value` (value parsed as a YAML scalar or list) to the raw mapping; an entry of a list of
    sections is `model.conv[1].kernel=5` (or a whole entry, `model.conv[1]={channels: 8}`)."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.01")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text}: {key!r} is not a dotted key like optim.lr")
    value = parse_yaml(value_text, f"--set {text}") if value_text.strip() else None
    _check_override_key(text, parts)
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):  # down to the section that holds the last key, made where missing
        name, index = _part(part)
        holder, slot = (node, name) if index is None else (_entries(node, name, index, text, parts[:depth]), index)
        if (index is None and slot not in holder) or holder[slot] is None:  # a section not given, or empty
            holder[slot] = {}
        if not isinstance(holder[slot], dict):
            raise ConfigError(f"--set {text}: {part}: the file gives it as {show(holder[slot])}, not a section")
        node = holder[slot]
    name, index = _part(parts[-1])
    if index is None:
        node[name] = value
    else:
        _entries(node, name, index, text, parts[:-1])[index] = value
    overridden[key] = text


def _entries(node: dict, name: str, index: int, text: str, above: list[str]) -> list:
    """node[name], a list of sections that --set reaches into at entry index (it must have that entry)."""
    entries, where = node.get(name), ".".join([*above, name])
    if not isinstance(entries, list) or index >= len(entries):
        given = f"{len(entries)} entries" if isinstance(entries, list) else "no list" if entries is None \
            else show(entries)
        raise ConfigError(f"--set {text}: {where}: the config gives {given}, so there is no entry {index} to set; "
                          f"give the whole list, e.g. --set '{where}=[{{channels: 8, kernel: 3}}]'")
    return entries


def _check_override_key(text: str, parts: list[str]) -> None:
    """Each part of an override's dotted key names a key of the section before it (`conv[1]`: a list of sections)."""
    cls: Any = Config
    for depth, part in enumerate(parts):
        name, index = _part(part)
        names = {f.name: f for f in dataclasses.fields(cls)}
        here = ".".join(parts[:depth + 1])
        if name not in names:
            hint = suggest(name, ".".join(parts[:depth]) + "." if depth else "", cls)
            raise ConfigError(f"--set {text}: {here}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
        tp, item = typing.get_type_hints(cls)[name], names[name].metadata.get("item_type")
        if index is not None:
            if not dataclasses.is_dataclass(item):
                raise ConfigError(f"--set {text}: {here}: {name} is not a list of sections; set it whole, e.g. "
                                  f"--set {'.'.join(parts[:depth] + [name])}=[...]")
            tp = item
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {text}: {here} is not a section; it has no key {parts[depth + 1]!r}")
        cls = tp


# ----------------------------------------------------------------------------- entry points


def config_from_dict(raw: Any, source: str = "<config>", overrides: typing.Sequence[str] = (),
                     cross: bool = True) -> Config:
    """Validate plain values (from YAML, --set or a checkpoint) into a Config. cross False: each key's type, range
    and choices only, without schema.cross_checks (what the JSON Schema checks; tests compare the two)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (name:, data:, model:, ...), "
                          f"got {show(raw)}")
    raw = _deep_copy(raw)
    overridden: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, overridden)
    checker = Checker(source, overridden)
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
    """Read, override and validate a config file (or a bundled recipe by its name). path None: the defaults."""
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
    """Block-style mappings, flow-style lists: `hidden: [512, 512]` reads like the shipped configs; a list of
    sections (model.conv) is one flow-style mapping per line."""


class _FlowMap(dict):
    pass


def _represent_list(d: yaml.SafeDumper, v: list) -> yaml.Node:
    if v and all(isinstance(x, dict) for x in v):
        return d.represent_sequence("tag:yaml.org,2002:seq", [_FlowMap(x) for x in v], flow_style=False)
    return d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(),
                                                                    flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
