"""Random and hostile YAML thrown at load_config and the CLI: accepted, or one line and exit 2. Never a
traceback, never a hang."""
import math
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.checker import all_paths as _all_paths
from dlbase.core.config import Config, load_config
from dlbase.core.errors import ConfigError
from dlbase.core.schema import ConvLayerConfig

# every key name, a model.conv layer's among them (random lists of mappings under `conv` reach those)
KEYS = sorted({p.rsplit(".", 1)[-1] for p in (*_all_paths(Config), *_all_paths(ConvLayerConfig))}) + [
    "lerning_rate", "", "0", "nan"]
SECTIONS = ["data", "model", "optim", "schedule", "train", "checkpoint", "encoding", "early_stop"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", ".nan", "-.inf", "1e-3", "1e400", "adam", "cuda:0", "auto", "", "..", "../x",
                     "sigmoid", "fourier", "cosine", "\x00", "ü" * 3]),
    st.text(max_size=20),
)


def trees(depth):
    key = st.one_of(st.sampled_from(KEYS + SECTIONS), st.text(max_size=8))
    leaf = st.one_of(scalars, st.lists(scalars, max_size=4))
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.dictionaries(key, trees(depth - 1), max_size=5), st.lists(trees(depth - 1), max_size=3))


documents = st.dictionaries(st.sampled_from(SECTIONS + KEYS), trees(2), max_size=6)
runner = CliRunner()


def check_one(path):
    try:
        cfg = load_config(path)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 2000, msg
        return None
    assert isinstance(cfg, Config)
    assert math.isfinite(cfg.optim.lr) and cfg.train.epochs >= 1
    return cfg


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=documents)
def test_random_documents_are_accepted_or_refused_cleanly(tmp_path_factory, doc):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    p.write_text(text, encoding="utf-8")
    check_one(p)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=documents)
def test_random_documents_through_the_cli(tmp_path_factory, doc):
    p = tmp_path_factory.mktemp("fuzzcli") / "c.yaml"
    try:
        p.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    except yaml.YAMLError:
        return
    r = runner.invoke(app, ["config", "validate", "--config", str(p)])
    assert r.exit_code in (0, 2), (r.exit_code, r.output, r.exception)
    if r.exit_code == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300))
def test_random_bytes(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("bytes") / "c.yaml"
    p.write_bytes(raw)
    check_one(p)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=200))
def test_random_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("text") / "c.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass") if False else p.write_bytes(
        text.encode("utf-8", errors="replace"))
    check_one(p)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.text(max_size=30), value=st.text(max_size=30))
def test_random_overrides(tmp_path_factory, key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert "\n" not in str(e)


def test_billion_laughs_is_refused_fast(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(p)
    assert time.perf_counter() - t0 < 5  # not a timing claim: a hang would take forever


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 400)),
                                  "{" * 3000, "model: {hidden: [" + ",".join(["1"] * 100) + "]}", "a: 1\n" * 10000])
def test_deep_and_big_documents(tmp_path, text):
    p = tmp_path / "deep.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_config(p)


def test_huge_file_refused(tmp_path):
    p = tmp_path / "huge.yaml"
    p.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="over"):
        load_config(p)
