"""The JSON Schema for editors (editorschema.json_schema) against its oracle, the loader: the shipped configs pass both,
configs/dlbase.schema.json is what the generator writes, and on random documents near every key's type and range
rules the schema accepts exactly what load_config's checker accepts (cross_checks aside: the schema leaves them
to the loader)."""
import copy
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.checker import all_paths as _all_paths
from dlbase.core.config import config_from_dict, load_config, to_dict
from dlbase.core.errors import ConfigError
from dlbase.core.editorschema import NUMBER_STRING, json_schema
from dlbase.core.schema import Config

jsonschema = pytest.importorskip("jsonschema")  # a dev dependency; machines without it skip this module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
HEADER = "# yaml-language-server: $schema=./dlbase.schema.json"
SCHEMA = json_schema()
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def schema_errors(doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def loader_error(doc) -> str:
    """'' when the loader's type/range/choice checks accept doc (cross_checks not run), else its message."""
    try:
        config_from_dict(doc, "<doc>", cross=False)
    except ConfigError as e:
        return str(e)
    return ""


def test_the_schema_is_a_draft7_schema_and_takes_the_defaults():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#" and SCHEMA["title"]
    assert "cross_checks" in SCHEMA["description"]
    assert schema_errors(to_dict(Config())) == [] and schema_errors({}) == [] and schema_errors(None) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_the_schema_and_the_loader(path):
    text = path.read_text()
    assert text.splitlines()[0] == HEADER, f"{path.name}: the first line should be {HEADER}"
    raw = yaml.safe_load(text)
    assert schema_errors(raw) == []
    if "sweep" in raw:  # read by dlbase sweep: the rest is an ordinary config, the section a sweep spec
        from dlbase.search.sweep import parse_spec
        spec = raw.pop("sweep")
        config_from_dict(raw, str(path))
        parse_spec(spec, str(path), "base_sweep")
    else:
        load_config(path)


def test_the_schema_file_is_what_the_generator_writes():
    shipped = (REPO / "configs" / "dlbase.schema.json").read_text()
    assert shipped == json.dumps(SCHEMA, indent=2) + "\n", \
        "configs/dlbase.schema.json is stale: dlbase config schema --out configs/dlbase.schema.json --force"


def test_config_schema_command(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["config", "schema"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == SCHEMA
    out = tmp_path / "s.json"
    r = runner.invoke(app, ["config", "schema", "--out", str(out)])
    assert r.exit_code == 0 and r.stdout.strip() == str(out)
    assert json.loads(out.read_text()) == SCHEMA
    r = runner.invoke(app, ["config", "schema", "--out", str(tmp_path / "no" / "s.json")])
    assert r.exit_code == 2 and "cannot write schema" in r.output


@pytest.mark.parametrize("text", ["1", "1.", ".5", "-0", "+.5e-3", "1E+05", "00012", "1_000.000_1", "1e1_0",
                                  " 2.5\n", "\t3", "1__0", "_1", "1_", "1 000", ".", "", "  ", "e5", "1e", "1.2.3",
                                  "0x10", "1.5f", "inf", "-Infinity", "nan", "1e-3\n\n"])
def test_number_strings_are_what_float_reads(text):
    try:
        expected = math.isfinite(float(text.strip()))
    except ValueError:
        expected = False
    assert bool(re.search(NUMBER_STRING, text)) == expected


# ----------------------------------------------------------------------------- values at and past the rules

def _unwrap(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def _leaves(cls, prefix=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, hints[f.name]


LEAVES = list(_leaves(Config))
SECTIONS = [()] + sorted({path[:i] for path, _, _ in LEAVES for i in range(1, len(path))})
WRONG = [None, True, False, "x", "", [], {}, {"a": 1}, [[1]]]
NOT_SECTIONS = [None, {}, [], 3, "x", [{"a": 1}]]
UNKNOWN_KEYS = ["lerning_rate", "hidden_size", "Name", "lr", "epochs", "hidden", "", 0, 1.5, None, "data", "sweep"]


def _bounds(m, prefix=""):
    ge, gt, le, lt = (m.get(prefix + k) for k in ("ge", "gt", "le", "lt"))
    return (ge if ge is not None else gt), (le if le is not None else lt)


def _inside(m):
    """The closed range of a float key: its bounds, or the next floats inside them."""
    lo, hi = _bounds(m)
    return (lo if m["gt"] is None else math.nextafter(lo, math.inf)), (hi if m["lt"] is None else
                                                                     math.nextafter(hi, -math.inf))


def _texts(x: float) -> list[str]:
    # texts that read back as exactly x: a rounded one could leave the range (a difference the schema documents)
    return [repr(x), f"{x:.16e}", f"  {x!r}\n", f"+{x!r}" if x >= 0 else repr(x)]


def _section_list_values(m) -> list:
    """A list of sections (model.conv): the list's own edges, and each inner key's edge values in a list of one."""
    n = m["max_len"]
    inner = [[{path[-1]: v}] for path, g, t in _leaves(m["item_type"]) for v in edge_values(g, t)]
    return WRONG + [[{}], [{}] * n, [{}] * (n + 1), [None], [1], ["x"], [[{}]], [{}, None], [{}, []], {"channels": 8},
                    [{"lerning_rate": 1}], [{"kernel_size": 3}], [{0: 1}], [{"channels": 8, "sweep": 1}]] + inner


def edge_values(f, tp) -> list:
    """One key's values at and just past its rules: bounds either side, wrong types, near-miss choices, lengths."""
    m, (tp, _) = f.metadata, _unwrap(tp)
    if tp is tuple and dataclasses.is_dataclass(m["item_type"]):
        return _section_list_values(m)
    if tp is tuple:
        lo, hi = _bounds(m, "item_")
        if m["item_type"] is int:  # integral floats are integers to both (JSON Schema's rule)
            items, fill = [lo - 1, lo, hi, hi + 1, -(2**70), 1.5, float(lo), float(hi), float(hi) + 1, True, "1",
                           None, [1]], lo
        else:
            items, fill = [lo, -0.0, math.nextafter(lo, -1), math.nextafter(hi, -1), hi, 1, 0, -1, 2, math.inf,
                           -math.inf, True, "0.5", None, [0.5]], 0.5
        n, need = m["length"] or m["max_len"], m["length"] or 1
        sizes = sorted({0, 1, n - 1, n, n + 1})
        return ([[fill] * k for k in sizes] + [[x] + [fill] * (need - 1) for x in items] + items + WRONG
                + ["512", "[512]"])
    if tp is bool:
        return WRONG + [0, 1, "true", "yes", 1.0]
    if tp is int:
        lo, hi = m["ge"], m["le"]
        return WRONG + [lo - 1, lo, hi, hi + 1, float(lo), float(lo) - 1, lo + 0.5, float(hi) + 2, -(2**63), 2**63,
                        2**64, float(2**63), 1e300, -1e300, math.inf, -math.inf, "5", "1e3"]
    if tp is float:
        lo, hi = _bounds(m)
        inside = _inside(m)
        return WRONG + [lo, hi, *inside, math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf), lo - 1, hi + 1,
                        10**400, -10**400, math.inf, -math.inf, int(hi) + 1, int(lo) - 1, "abc", "inf", "-inf",
                        "nan", "1e", ".", "1.2.3", "0x10", "1__0", "_1", "1,5", "1 0", ""] + \
            [t for x in inside for t in _texts(x)]
    if m["choices"]:
        return WRONG + list(m["choices"]) + [c.upper() for c in m["choices"]] + [c + " " for c in m["choices"]] + \
            [0, 1, 2.5, "none-of-them"]
    if m["pattern"]:
        return WRONG + ["mnist\n", "\nmnist", "-x", "x" * 129, "x" * 128, "cuda:1234", "cuda:12", "cuda:", "cuda:0\n",
                        " auto", "auto", "CPU", 7, 1.5]
    return WRONG + [0, -1, 2.5, 10**30, math.nan, math.inf, "x y", "../a"]


def good(f, tp):
    """Random values meant to pass (the judges decide)."""
    m, (tp, optional) = f.metadata, _unwrap(tp)
    if tp is tuple and dataclasses.is_dataclass(m["item_type"]):  # a list of sections: each of its keys or not
        keys = {path[-1]: good(g, t) for path, g, t in _leaves(m["item_type"])}
        s = st.lists(st.fixed_dictionaries({}, optional=keys), max_size=3)
    elif tp is tuple:
        item = (st.integers(m["item_ge"], m["item_le"]) if m["item_type"] is int else
                st.floats(m["item_ge"], m["item_lt"] if m["item_lt"] is not None else m["item_le"],
                          exclude_max=m["item_lt"] is not None))
        if m["length"] is not None:
            s = st.lists(item, min_size=m["length"], max_size=m["length"])
        else:
            s = st.lists(item, max_size=4) | item  # `hidden: 256` is [256]
    elif tp is bool:
        s = st.booleans()
    elif tp is int:
        s = st.integers(m["ge"], m["le"]) | st.integers(m["ge"], min(m["le"], 2**52)).map(float)
    elif tp is float:
        floats = st.floats(*_inside(m))
        s = floats | floats.flatmap(lambda x: st.sampled_from(_texts(x)))
    elif m["choices"]:
        s = st.sampled_from(m["choices"])
    elif m["pattern"]:
        s = st.from_regex(m["pattern"], fullmatch=True)
    else:
        s = st.text(max_size=10) | st.integers() | st.floats()
    return s | st.none() if optional else s


def _put(doc, path, value):
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = copy.deepcopy(value)  # the value tables' lists and dicts are shared


def _one_change_documents():
    """Each key, section and unknown key on its own: (what, document)."""
    for path, f, tp in LEAVES:
        for v in edge_values(f, tp):
            doc = {}
            _put(doc, path, v)
            yield f"{'.'.join(path)}={v!r}", doc
    for where in SECTIONS:
        for v in NOT_SECTIONS:
            doc = {}
            if where:
                _put(doc, where, v)
            yield f"{'.'.join(where) or '(top level)'}={v!r}", doc if where else v
        for key in UNKNOWN_KEYS:
            if not (key == "sweep" and where == ()):  # the top level's sweep: is dlbase sweep's (tested below)
                doc = {}
                _put(doc, where + (key,), 1)
                yield f"{'.'.join(where + (str(key),))}: 1", doc


def test_every_key_at_and_past_its_rules():
    verdicts = [(what, schema_errors(doc), loader_error(doc)) for what, doc in _one_change_documents()]
    differ = [f"{what}: schema {schema[:1] or 'accepts'}, loader {loader or 'accepts'}"
              for what, schema, loader in verdicts if (schema == []) != (loader == "")]
    assert len(verdicts) > 1000 and differ == []


@st.composite
def documents(draw):
    """About half the keys with random values meant to pass, then up to three changes near or past the rules."""
    doc = {}
    for path, f, tp in LEAVES:
        if draw(st.booleans()):
            _put(doc, path, draw(good(f, tp)))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["value", "value", "value", "unknown key", "section"]))
        if what == "value":
            path, f, tp = draw(st.sampled_from(LEAVES))
            text = st.nothing() if _unwrap(tp)[0] is float else st.text(max_size=6)  # "5": a documented difference
            _put(doc, path, draw(good(f, tp) | st.sampled_from(edge_values(f, tp)) | text))
        else:
            where = draw(st.sampled_from(SECTIONS))
            if what == "section" and where:
                _put(doc, where, draw(st.sampled_from(NOT_SECTIONS)))
            elif what == "unknown key":
                _put(doc, where + (draw(st.sampled_from(UNKNOWN_KEYS).filter(lambda k: k != "sweep" or where)),), 1)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents())
def test_the_schema_accepts_exactly_what_the_loader_accepts(doc):
    schema_says, loader_says = schema_errors(doc), loader_error(doc)
    note(f"schema: {schema_says}\nloader: {loader_says}")
    assert (schema_says == []) == (loader_says == "")


# ----------------------------------------------------------------------------- the sweep: section

DOTTED = sorted(_all_paths(Config))


def _dist(name, **keys):
    return {"distribution": name, **keys}


SPACES = [[], [1], [None], [[1], "a"], [1, 1], [1, 1.0], ["a", "b", "a"], 3, "x", None, True, {}, {"low": 0, "high": 1}, _dist(None),
          _dist("normal", low=0, high=1), _dist("choice"), _dist("choice", values=[]),
          _dist("choice", values=[1, "a"]), _dist("choice", values="ab"), _dist("choice", values=[1], low="x"),
          _dist("uniform", low=0, high=1), _dist("uniform", low=-1.5, high=2), _dist("uniform", low="0", high=1),
          _dist("uniform", low=True, high=1), _dist("uniform", low=None, high=1), _dist("uniform", high=1),
          _dist("uniform", low=0), _dist("uniform", low=0, high=1, values="x"),
          _dist("log_uniform", low=1e-3, high=1), _dist("log_uniform", low=[1], high=2),
          _dist("int_uniform", low=1, high=5), _dist("int_uniform", low=1.0, high=5.0),
          _dist("int_uniform", low=1.5, high=5), _dist("int_uniform", low=1, high=5.5),
          _dist("int_uniform", low=True, high=5), _dist("int_uniform", low="1", high=5)]
SWEEP_VALUES = {"name": WRONG + ["sweep_1", "a.b-c", "x" * 128, "x" * 129, "-x", "a b", "a\n", 0, 2024, -1, 10**127,
                                 10**128, 1.5],
                "method": WRONG + ["grid", "random", "tpe", "pbt", "Grid", "bayes", 1],
                "pruner": WRONG + ["none", "median", "hyperband", "halving", None, "asha", "Median", 0],
                "prune_after": WRONG + [-1, 0, 3, 10**6 + 1, "3", 1.5],
                "heartbeat": WRONG + [0, 1, 30, 10**6 + 1, "30", 0.5],
                "retries": WRONG + [-1, 0, 3, 10**6 + 1, "3"],
                "storage": WRONG + [None, "sqlite:///x.db", "study.log", "", " ", 1, ["a"]],
                "trials": WRONG + [0, 1, 10**6, 10**6 + 1, "3", 2.5, -1],
                "interval": WRONG + [0, 1, 5, 10**6 + 1, "2", 1.5],
                "reduction": WRONG + [1, 2, 3, 10**6 + 1, "3", 2.5],
                "min_epochs": WRONG + [0, 1, 4, "1", 1.5],
                "quantile": WRONG + [0, 0.0, 0.1, 0.25, 0.5, 0.51, -0.1, "0.25", True, 1],
                "resample": WRONG + [0, 0.0, 0.25, 1, 1.0, 1.1, -0.1, "0.5", True],
                "perturb": WRONG + [[1.2, 0.8], [2], [], [0], [-1.0], [1.2, "0.8"], 1.2, [True], [10**7]],
                "seed": WRONG + [-1, 0, 10**6, 10**6 + 1, "0", 0.5],
                "cv_folds": WRONG + [1, 2, 10**6, 10**6 + 1, "5", 2.5],
                "metric": WRONG + ["val_accuracy", "val_loss", "test_accuracy", "train_loss", 1],
                "mode": WRONG + ["max", "min", "maximum", 0],
                "params": WRONG + [{"optim.lx": [1]}, {"sweep": [1]}, {1: [1]}, {"model.hidden.x": [1]},
                                   {"model.encoding": [{"name": "fourier"}]}, {"optim.lr": [0.1], "seed": [0, 1]}]}
BASE_SWEEP = {"params": {"optim.lr": [0.1, 0.01]}}


def sweep_error(spec) -> str:
    """parse_spec's verdict, with the check `dlbase sweep` makes before any trial: each params key names a key."""
    from dlbase.search.sweep import parse_spec
    try:
        parse_spec(spec, "<sweep>", "base_sweep")
    except ConfigError as e:
        return str(e)
    unknown = [k for k in spec["params"] if k not in DOTTED]
    return f"unknown keys {unknown}" if unknown else ""


def _random_if_distributions(spec: dict) -> dict:
    """Distributions need method random or tpe: a cross rule, left to parse_spec; these documents keep to it."""
    if isinstance(spec.get("params"), dict) and any(isinstance(v, dict) for v in spec["params"].values()) \
            and spec.get("method", "grid") == "grid":
        spec["method"] = "random"
    return spec


def _one_change_sweeps():
    yield "no params", {"method": "grid"}
    yield "not a mapping", [BASE_SWEEP]
    for key, values in SWEEP_VALUES.items():
        for v in values:
            yield f"{key}={v!r}", _random_if_distributions({**BASE_SWEEP, key: v})
    for space in SPACES:
        yield f"params.optim.lr={space!r}", _random_if_distributions({"params": {"optim.lr": space}})
    for key in ("params_", "trial", 0, "sweep"):
        yield f"{key}: 1", {**BASE_SWEEP, key: 1}


def test_every_sweep_key_at_and_past_its_rules():
    verdicts = [(what, schema_errors({"sweep": spec}), sweep_error(spec)) for what, spec in _one_change_sweeps()]
    differ = [f"{what}: schema {schema[:1] or 'accepts'}, sweep {sweep or 'accepts'}"
              for what, schema, sweep in verdicts if (schema == []) != (sweep == "")]
    assert differ == []


def _reads_as_itself(text: str) -> bool:
    """A string the sweep reads as that string: "1", "" and "#" are 1 and null to it (its YAML reading), so
    [1, "1"] or ["", "#"] repeat a value there and not in the schema, a documented difference (CONFIGURATION.md)."""
    from dlbase.core.config import parse_yaml
    try:
        return parse_yaml(text, "<t>") == text
    except ConfigError:
        return False


@st.composite
def sweeps(draw):
    """A sweep section meant to pass, then up to two changes at or past the rules."""
    texts = st.text(max_size=3).filter(_reads_as_itself)
    spec = {"params": draw(st.dictionaries(st.sampled_from(DOTTED), st.lists(st.integers() | texts,
                                                                             min_size=1, max_size=3),
                                           min_size=1, max_size=3))}
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["key", "key", "space", "space", "unknown"]))
        if what == "key":
            key = draw(st.sampled_from(sorted(SWEEP_VALUES)))
            spec[key] = copy.deepcopy(draw(st.sampled_from(SWEEP_VALUES[key])))
        elif what == "space" and isinstance(spec["params"], dict):
            spec["params"][draw(st.sampled_from(DOTTED))] = copy.deepcopy(draw(st.sampled_from(SPACES)))
        elif what == "unknown":
            spec[draw(st.sampled_from(["params_", "trial", 0]))] = 1
    return _random_if_distributions(spec)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=sweeps())
def test_the_sweep_schema_accepts_exactly_what_dlbase_sweep_accepts(spec):
    schema_says, sweep_says = schema_errors({"sweep": spec}), sweep_error(spec)
    note(f"schema: {schema_says}\nsweep: {sweep_says}")
    assert (schema_says == []) == (sweep_says == "")


def test_the_sweep_schema_names_what_parse_spec_reads():
    from dlbase.search import sweep
    sub = SCHEMA["properties"]["sweep"]
    assert sorted(sub["properties"]) == sorted(sweep.SWEEP_KEYS)
    assert tuple(sub["properties"]["params"]["additionalProperties"]["anyOf"][1]["properties"]["distribution"]
                 ["enum"]) == sweep.DISTRIBUTIONS


def test_a_sweep_section_is_for_dlbase_sweep_only():
    doc = {"name": "base", "sweep": BASE_SWEEP}
    assert schema_errors(doc) == []
    with pytest.raises(ConfigError, match="read by dlbase sweep"):
        config_from_dict(doc)


# ----------------------------------------------------------------------------- where the two knowingly differ

@pytest.mark.parametrize("doc", [
    {"model": {"dropout": "5"}},  # a number written as a string: its range is checked on loading only
    {"optim": {"lr": "1e400"}},  # (and so is its overflow to inf)
    {"model": {"dropout": math.nan}},  # YAML's .nan (JSON has none) compares false with every bound
    {"sweep": {"params": {"optim.lr": [0.1]}, "trials": 3.0}},
    {"sweep": {"params": {"optim.lr": [0.1]}, "name": 2024.0}},
    {"sweep": {"params": {"optim.lr": {"distribution": "uniform", "low": 0, "high": math.inf}}, "method": "random"}},
    {"sweep": {"params": {"model.hidden": [[8], "[8]"]}}},  # a list and its JSON text: one Optuna choice
    {"sweep": {"params": {"optim.lr": [True, 1]}}},  # JSON tells true from 1; Optuna's choices (Python ==) do not
])
def test_the_documented_differences(doc):
    """The schema accepts these and the loader refuses them: if one goes away, drop it here and in docs/CONFIGURATION.md (Editors)."""
    assert schema_errors(doc) == []
    if "sweep" in doc:
        assert sweep_error(doc["sweep"])
    else:
        assert loader_error(doc)


@pytest.mark.parametrize("key,text,accepted", [
    ("train.epochs", "1e3", True), ("train.epochs", "1.0e3", True), ("train.epochs", "1.5", False),
    ("train.epochs", '"1e3"', False), ("data.subset", "1E3", True), ("optim.lr", "1e-4", True),
    ("optim.lr", ".5e-1", True), ("optim.lr", '"1e3"', True), ("optim.lr", "1e7", False),
    ("model.hidden", "[1e3, 256.0]", True), ("model.hidden", "[1.5]", False), ("model.hidden", '["1e3"]', False),
])
def test_the_shipped_schema_and_config_validate_agree_on_number_forms(tmp_path, key, text, accepted):
    """The same YAML to jsonschema with configs/dlbase.schema.json (read as an editor reads it, YAML 1.2 numbers)
    and to `dlbase config validate`: both accept, or both refuse."""
    from dlbase.core.config import parse_yaml
    *parents, last = key.split(".")
    yaml_text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{last}: {text}\n"
    shipped = jsonschema.Draft7Validator(json.loads((REPO / "configs" / "dlbase.schema.json").read_text()))
    schema_ok = not list(shipped.iter_errors(parse_yaml(yaml_text, "<t>")))
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    r = CliRunner().invoke(app, ["config", "validate", "--config", str(p)])
    assert r.exit_code in (0, 2), r.output
    assert (schema_ok, r.exit_code == 0) == (accepted, accepted), (yaml_text, r.output)
