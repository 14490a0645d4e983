"""Checking plain values (from YAML, --set or a checkpoint) against the schema in dlbase/core/schema.py: unknown keys
with a close match, types, ranges, choices and patterns, lists of numbers and lists of sections (model.conv), each
mistake one ConfigError naming the source, the dotted key, the value and what is allowed. No YAML here."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from typing import Any

from dlbase.core.errors import ConfigError
from dlbase.core.schema import Config

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxdict = 4
_short.maxlevel = 2


def show(value: Any) -> str:
    return _short.repr(value)




def _type_name(tp: Any, m: dict | None = None) -> str:
    """What a key takes, in words (never a Python class: a user reads this)."""
    if tp is tuple and m is not None:
        return _list_words(m)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "a value")


def _list_words(m: dict) -> str:
    """`a list of positive integers, e.g. [512, 512]`: what a tuple key takes."""
    if dataclasses.is_dataclass(m["item_type"]):  # a list of sections: its field says it in words
        return m["allowed"]
    if m["item_type"] is int:
        items = "positive integers" if m["item_ge"] == 1 else "integers"
        example = "[512, 512]" if m["item_le"] == 1 << 16 else "[5, 8]"
    else:
        items, example = "numbers", "[0.9, 0.999]"
    count = f"{m['length']} " if m["length"] is not None else ""
    return f"a list of {count}{items}, e.g. {example}"


def all_paths(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of a config class -> its field (sections included)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(all_paths(hints[f.name], prefix + f.name + "."))
    return out


def suggest(key: str, prefix: str, cls: type) -> str:
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
    elsewhere = [p for p, f in _leaf_paths().items()
                 if p.rsplit(".", 1)[-1] == lowered or lowered in f.metadata.get("aliases", ())]
    return elsewhere[0] if elsewhere else ""


def _leaf_paths() -> dict[str, dataclasses.Field]:
    """all_paths(Config), and the keys of each entry of a list of sections as `model.conv[i].kernel`."""
    out = all_paths(Config)
    for p, f in list(out.items()):
        if dataclasses.is_dataclass(f.metadata.get("item_type")):
            out.update(all_paths(f.metadata["item_type"], p + "[i]."))
    return out


class Checker:
    def __init__(self, source: str, overridden: dict[str, str]):
        self.source = source
        self.overridden = overridden  # dotted key -> the --set text that gave its value

    def fail(self, key: str, msg: str) -> ConfigError:
        # the --set that gave this key's value, or a section or list around it (the most specific one), or an
        # entry of this list (model.conv[1]={...} for `model.conv: entry 1 ...`)
        given = [k for k in self.overridden
                 if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + "[")]
        origin = f"--set {self.overridden[max(given, key=len)]}" if given else self.source
        return ConfigError(f"{origin}: {key}: {msg}")

    def section(self, cls: type, raw: Any, prefix: str) -> Any:
        key = prefix.rstrip(".") or "(top level)"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"expected a mapping of keys, got {show(raw)}")
        names = {f.name for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names:
                if prefix == "" and k == "sweep":
                    raise self.fail("sweep", "a sweep: section is read by dlbase sweep, not here; run dlbase sweep "
                                             "--config with this file")
                hint = suggest(k, prefix, cls)
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
            raise self.fail(key, f"{show(v)} is not one of {', '.join(m['choices'])}"
                            + (f"; did you mean {close[0]}?" if close else ""))
        if m["pattern"] and not re.fullmatch(m["pattern"], out):
            raise self.fail(key, f"{show(v)} is not allowed; expected {m['allowed']}")
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
                    raise self.fail(key, f"{show(v)} is too large{self._allowed(m)}") from None
                if not math.isfinite(out):
                    raise self.fail(key, f"{show(v)} is not a finite number{self._allowed(m)}")
                return out
        elif tp is str:
            if isinstance(v, str):
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not m["choices"] and not m["pattern"]:
                return str(v)
        raise self.fail(key, f"{show(v)} is not {_type_name(tp)}{self._allowed(m)}")

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
            raise self.fail(key, f"{show(v)} is out of range; expected a value{self._allowed(m)}")

    def sections(self, key: str, m: dict, v: Any) -> tuple:
        """A list of sections (model.conv): each entry a mapping, checked as its section class under `key[i].`."""
        if not isinstance(v, (list, tuple)):
            raise self.fail(key, f"{show(v)} is not {_list_words(m)}")
        if m["max_len"] is not None and len(v) > m["max_len"]:
            raise self.fail(key, f"{len(v)} entries; at most {m['max_len']} allowed")
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                raise self.fail(key, f"entry {i} ({show(item)}) is not a mapping of keys; expected {_list_words(m)}")
        return tuple(self.section(m["item_type"], item, f"{key}[{i}].") for i, item in enumerate(v))

    def tuple_of(self, key: str, m: dict, v: Any) -> tuple:
        if dataclasses.is_dataclass(m["item_type"]):
            return self.sections(key, m, v)
        item_type, example = m["item_type"], "[512, 512]" if m["item_type"] is int else "[0.9, 0.999]"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and m["length"] is None:
            v = [v]  # `hidden: 256` means one layer of 256
        if not isinstance(v, (list, tuple)):
            raise self.fail(key, f"{show(v)} is not {_list_words(m)}")
        if m["length"] is not None and len(v) != m["length"]:
            raise self.fail(key, f"{show(v)} has {len(v)} entries; expected exactly {m['length']}, e.g. {example}")
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
                raise self.fail(key, f"entry {i} ({show(item)}) is not {_type_name(item_type)}; "
                                     f"expected a list like {example}")
            lo, hi, lt = m["item_ge"], m["item_le"], m["item_lt"]
            if (lo is not None and item < lo) or (hi is not None and item > hi) or (lt is not None and item >= lt):
                bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                                  f"<= {hi}" if hi is not None else "",
                                                  f"< {lt}" if lt is not None else "") if b)
                raise self.fail(key, f"entry {i} ({item}) is out of range; each must be {bounds}")
            out.append(item)
        return tuple(out)
