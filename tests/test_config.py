import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlbase.cli import app
from dlbase.core.config import Config, load_config, parse_yaml, to_yaml
from dlbase.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    return str(e.value)


def test_defaults_match_the_issue():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.name, cfg.seed, cfg.device) == ("mnist_mlp", 0, "auto")
    assert cfg.model.hidden == (512, 512) and cfg.optim.name == "adam" and cfg.optim.lr == 0.001
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.val_size) == (10, 128, 5000)


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for p in configs:
        if "sweep" in yaml.safe_load(p.read_text()):  # a base config with a sweep: section
            from dlbase.search.sweep import load_sweep
            load_sweep(p, None, [], [])
        else:
            load_config(p)


def test_config_is_frozen():
    with pytest.raises(Exception):
        load_config(None).seed = 3


def test_show_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "mnist_mlp.yaml", ["optim.lr=0.01", "model.hidden=[256, 128]"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg and again.model.hidden == (256, 128) and again.optim.lr == 0.01


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 0.1}"), ["optim.lr=1e-3", "data.subset=null", "data.download=false"])
    assert cfg.optim.lr == 1e-3 and cfg.data.subset is None and cfg.data.download is False


@pytest.mark.parametrize("text,key,words", [
    ("optim:\n  lerning_rate: 0.1\n", "optim.lerning_rate", ["unknown key", "did you mean optim.lr?"]),
    ("optim:\n  learning_rate: 0.1\n", "optim.learning_rate", ["did you mean optim.lr?"]),
    ("train:\n  lr: 0.1\n", "train.lr", ["did you mean optim.lr?"]),
    ("modle:\n  hidden: [3]\n", "modle", ["did you mean model?"]),
    ("optim:\n  lr: fast\n", "optim.lr", ["'fast'", "a number"]),
    ("optim:\n  lr: -0.1\n", "optim.lr", ["-0.1", "out of range", "> 0.0"]),
    ("optim:\n  lr: .nan\n", "optim.lr", ["finite"]),
    ("optim:\n  name: adm\n", "optim.name", ["'adm'", "sgd, momentum, nesterov", "did you mean adam?"]),
    ("train:\n  epochs: 2.5\n", "train.epochs", ["2.5", "an integer"]),
    ("train:\n  epochs: 0\n", "train.epochs", ["out of range", ">= 1"]),
    ("train:\n  batch_size: true\n", "train.batch_size", ["True", "an integer"]),
    ("model:\n  hidden: [512, x]\n", "model.hidden", ["entry 1", "not an integer"]),
    ("model:\n  hidden: [0]\n", "model.hidden", ["entry 0", "out of range"]),
    ("model: [1, 2]\n", "model", ["expected a mapping"]),
    ("device: gpu2\n", "device", ["'gpu2'", "auto, cpu, cuda or cuda:N"]),
    ("name: ../../etc\n", "name", ["'../../etc'", "letters, digits"]),
    ("data:\n  download: yes please\n", "data.download", ["true or false"]),
    ("data:\n  dataset: cifar10\n", "data.dataset", ["mnist, fashion_mnist"]),
    ("seed: null\n", "seed", ["must not be null"]),
])
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, text, key, words):
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'c.yaml'}: {key}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    msg = error_of(tmp_path, "name: a\nmodel:\n  hidden: [1,\n")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:4:") and "malformed YAML" in msg


def test_duplicate_keys_and_aliases_refused(tmp_path):
    assert "duplicate key 'seed'" in error_of(tmp_path, "seed: 1\nseed: 2\n")
    bomb = "a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    assert "aliases" in error_of(tmp_path, bomb)


def test_top_level_must_be_mapping(tmp_path):
    assert "top level must be a mapping" in error_of(tmp_path, "- 1\n- 2\n")


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_files_that_are_not_configs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_numbers_written_loosely(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 1e-3, weight_decay: 0}\nmodel: {hidden: 64}\ntrain: {epochs: 3.0}\n"))
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0 and cfg.model.hidden == (64,)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert math.isclose(cfg.optim.lr, 1e-3)


def test_override_errors_name_the_override(tmp_path):
    p = write(tmp_path, "")
    for text, words in (("optim.lr", "KEY=VALUE"), ("optim..lr=1", "dotted key"), ("optim.lr=[1", "malformed"),
                        ("name.x=1", "not a section"), ("optim.lr=-1", "--set optim.lr=-1: optim.lr:")):
        with pytest.raises(ConfigError) as e:
            load_config(p, [text])
        assert words in str(e.value) and str(e.value).startswith("--set "), str(e.value)


runner = CliRunner()


@pytest.mark.parametrize("text,key", [
    ("optim:\n  lerning_rate: 0.1\n", "optim.lerning_rate"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("optim:\n  name: lbfgs\n", "optim.name"),
    ("model:\n  hidden: [1,\n", "c.yaml:3:"),
])
def test_cli_exit_2_one_line(tmp_path, text, key):
    p = write(tmp_path, text)
    for cmd in (["config", "validate", "--config", str(p)], ["config", "show", "--config", str(p)],
                ["train", "--config", str(p)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "Traceback" not in r.output, r.stderr


def test_cli_show_prints_resolved_yaml(tmp_path):
    r = runner.invoke(app, ["config", "show", "--config", str(write(tmp_path, "seed: 7\n")), "--set", "optim.lr=0.5"])
    assert r.exit_code == 0
    shown = yaml.safe_load(r.stdout)
    assert shown["seed"] == 7 and shown["optim"]["lr"] == 0.5 and shown["model"]["hidden"] == [512, 512]
    assert shown["data"]["val_size"] == 5000


def test_cli_validate_ok(tmp_path):
    r = runner.invoke(app, ["config", "validate", "--config", str(REPO / "configs" / "mnist_mlp.yaml")])
    assert r.exit_code == 0 and "valid" in r.stdout


@pytest.mark.parametrize("text,key,words", [
    ("optim:\n  name: lbfgs\n", "optim.name", ["'lbfgs'", "adadelta"]),
    ("optim:\n  lr: -1\n", "optim.lr", ["out of range"]),
    ("model:\n  encoding: {name: fourier, num_freqs: 0}\n", "model.encoding.num_freqs", ["0", ">= 1"]),
    ("schedule: {name: multistep, milestones: [5, 3]}\n", "schedule.milestones", ["strictly increasing"]),
    ("schedule: {name: multistep}\n", "schedule.milestones", ["at least one milestone"]),
    ("schedule: {name: cosin}\n", "schedule.name", ["did you mean cosine?"]),
    ("optim: {betas: [0.9]}\n", "optim.betas", ["exactly 2"]),
    ("optim: {betas: [0.9, 1.0]}\n", "optim.betas", ["entry 1", "< 1.0"]),
    ("optim: {momentum: 1.5}\n", "optim.momentum", ["out of range", "< 1.0"]),
    ("optim: {name: rmsprop, impl: fused}\n", "optim.impl", ["no fused rmsprop"]),
    ("model: {output: sigmoid}\n", "model.output", ["mse"]),
    ("train: {label_smoothing: 0.1, loss: mse}\n", "train.label_smoothing", ["cross_entropy only"]),
    ("data: {val_size: 0}\ntrain: {early_stop: {metric: val_loss}}\n", "train.early_stop.metric",
     ["validation split"]),
    ("model: {activation: swish}\n", "model.activation", ["sigmoid, tanh, relu, leaky_relu, gelu, silu"]),
    ("model: {init: he}\n", "model.init", ["kaiming_normal"]),
    ("model: {batch_norm: true}\n", "model.batch_norm", ["did you mean model.norm?"]),
    ("train: {iterations: 100}\n", "train.iterations", ["did you mean train.max_steps?"]),
    ("train: {max_steps: 0}\n", "train.max_steps", [">= 1"]),
    ("train: {grad_clip: 0}\n", "train.grad_clip", ["> 0.0"]),
])
def test_bad_hyperparameters_fail_at_load(tmp_path, text, key, words):
    msg = error_of(tmp_path, text)
    assert f": {key}: " in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_issue3_keys_parse(tmp_path):
    cfg = load_config(write(tmp_path, """
model: {activation: sigmoid, init: xavier_uniform, norm: batch, output: sigmoid,
        encoding: {name: fourier, num_freqs: 4, include_input: false}}
optim: {name: nesterov, momentum: 0.95, betas: [0.8, 0.9]}
schedule: {name: multistep, milestones: [2, 4], gamma: 0.5, warmup_steps: 100}
train: {loss: mse, max_steps: 500, grad_clip: 1.0, early_stop: {patience: 3, metric: val_loss}}
"""))
    assert cfg.model.encoding.num_freqs == 4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.schedule.milestones == (2, 4) and cfg.train.early_stop.patience == 3


# ----------------------------------------------------------------------------- YAML 1.2 numbers (issue 21, item 16)

@pytest.mark.parametrize("text", ["1e3", "1.0e3", ".5e1", "1e-4", "+1E+2", "-2e-1", "1.5", "0.", "-.5", "1E3"])
def test_yaml_12_floats_read_as_the_float_python_reads(text):
    """YAML 1.1 (PyYAML) reads 1e3 and 1.0e3 as strings; the YAML 1.2 core schema, and editors, read numbers."""
    value = parse_yaml(f"x: {text}", "<t>")["x"]
    assert isinstance(value, float) and value == float(text), (text, value)


@pytest.mark.parametrize("text,expected", [("'1e3'", "1e3"), ("1e", "1e"), ("e3", "e3"), ("1e3x", "1e3x"),
                                           ("10", 10), ("-7", -7), (".inf", math.inf), ("-.Inf", -math.inf)])
def test_what_stays_a_string_or_an_integer(text, expected):
    value = parse_yaml(f"x: {text}", "<t>")["x"]
    assert value == expected and type(value) is type(expected), (text, value)


def test_integer_keys_take_integral_floats(tmp_path):
    cfg = load_config(write(tmp_path, "train: {epochs: 1e3, max_steps: 2.5e3}\ndata: {subset: 1.0e3}\n"
                                      "model: {hidden: [1e3, 2.56e2]}\nschedule: {milestones: [5.0, 8e0]}\n"),
                      ["train.batch_size=6.4e1"])
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.data.subset, cfg.train.batch_size) == (1000, 2500, 1000, 64)
    assert cfg.model.hidden == (1000, 256) and cfg.schedule.milestones == (5, 8)
    assert all(type(v) is int for v in (cfg.train.epochs, cfg.data.subset, *cfg.model.hidden, *cfg.schedule.milestones))


@pytest.mark.parametrize("text,key,words", [
    ("train: {epochs: 1.5e0}\n", "train.epochs", ["1.5", "an integer"]),
    ("train: {epochs: 1e7}\n", "train.epochs", ["out of range", "<= 1000000"]),
    ("model: {hidden: [2.5e-1]}\n", "model.hidden", ["entry 0", "0.25", "not an integer"]),
    ("optim: {lr: 1e7}\n", "optim.lr", ["out of range"]),
])
def test_non_integral_or_out_of_range_numbers_name_the_key(tmp_path, text, key, words):
    msg = error_of(tmp_path, text)
    assert f": {key}: " in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_sweep_distribution_takes_yaml_12_floats(tmp_path):
    from dlbase.search.spec import load_sweep
    p = write(tmp_path, "sweep:\n  method: random\n  params:\n"
                        "    optim.lr: {distribution: log_uniform, low: 1e-4, high: 1e-1}\n")
    _, spec, _ = load_sweep(p, None, [], [])
    assert spec is not None


def test_every_key_given_a_wrong_type_says_what_is_allowed_in_words():
    """No `<class 'tuple'>` reaches a user: each key, given null and values of the wrong type, names the key and
    what it takes in words."""
    import dataclasses
    from dlbase.core.checker import all_paths as _all_paths
    from dlbase.core.config import config_from_dict
    seen = 0
    for key, f in _all_paths(Config).items():
        if dataclasses.is_dataclass(f.type) or f.metadata.get("help") is None or "choices" not in f.metadata:
            continue
        for v in (None, "x", {}, {"a": 1}, [[1]], True, [None]):
            doc: dict = {}
            node = doc
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = v
            try:
                config_from_dict(doc, "<t>", cross=False)
            except ConfigError as e:
                msg, seen = str(e), seen + 1
                assert f"<t>: {key}: " in msg and "<class" not in msg and "of umbers" not in msg, msg
    assert seen > 100
    msg = str(pytest.raises(ConfigError, config_from_dict, {"model": {"hidden": None}}).value)
    assert "model.hidden: must not be null; expected a list of positive integers, e.g. [512, 512]" in msg, msg


# ----------------------------------------------------------------------------- model.conv: a list of sections

CONV2 = "model:\n  conv: [{channels: 8, kernel: 5, pool: 2}, {channels: 16, kernel: 3, pool: 2}]\n"


def test_conv_layers_load_with_their_defaults(tmp_path):
    from dlbase.core.schema import ConvLayerConfig
    cfg = load_config(write(tmp_path, CONV2))
    assert cfg.model.conv == (ConvLayerConfig(channels=8, kernel=5, pool=2), ConvLayerConfig(channels=16, kernel=3,
                                                                                             pool=2))
    first = cfg.model.conv[0]
    assert (first.stride, first.padding, first.pool_type, first.norm, first.activation, first.dropout) == \
        (1, 0, "max", "none", None, 0.0)
    assert load_config(None).model.conv == ()  # the MLP stays the default
    again = load_config(write(tmp_path, to_yaml(cfg)))  # config show's YAML reads back as the same config
    assert again == cfg
    shown = to_yaml(cfg)
    assert "  conv:\n  - {channels: 8, kernel: 5, stride: 1, padding: 0, pool: 2, pool_type: max" in shown


@pytest.mark.parametrize("layer,key,words", [
    ("{channels: 8, kernal: 3}", "model.conv[1].kernal", ["unknown key", "did you mean model.conv[1].kernel?"]),
    ("{kernel_size: 3}", "model.conv[1].kernel_size", ["did you mean model.conv[1].kernel?"]),
    ("{channels: 0}", "model.conv[1].channels", ["0", "out of range", ">= 1"]),
    ("{channels: 2.5}", "model.conv[1].channels", ["2.5", "an integer"]),
    ("{kernel: 0}", "model.conv[1].kernel", ["out of range", ">= 1"]),
    ("{stride: 0}", "model.conv[1].stride", ["0", "out of range", ">= 1"]),
    ("{padding: -1}", "model.conv[1].padding", ["-1", ">= 0"]),
    ("{padding: same}", "model.conv[1].padding", ["'same'", "an integer"]),
    ("{pool: 0}", "model.conv[1].pool", ["out of range", ">= 1"]),
    ("{pool_type: median}", "model.conv[1].pool_type", ["'median'", "max, avg"]),
    ("{norm: layer}", "model.conv[1].norm", ["'layer'", "none, batch"]),
    ("{activation: swish}", "model.conv[1].activation", ["sigmoid, tanh, relu"]),
    ("{dropout: 1.0}", "model.conv[1].dropout", ["out of range", "<= 0.99"]),
    ("5", "model.conv", ["entry 1 (5) is not a mapping", "[{channels: 32, kernel: 5, pool: 2}]"]),
    ("null", "model.conv", ["entry 1 (None) is not a mapping"]),
])
def test_bad_conv_layers_name_the_layer_key_value_and_what_is_allowed(tmp_path, layer, key, words):
    msg = error_of(tmp_path, f"model:\n  conv: [{{channels: 8}}, {layer}]\n")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}: {key}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("text,key,words", [
    ("model: {conv: 5}\n", "model.conv", ["5 is not a list of layer mappings"]),
    ("model: {conv: {channels: 8}}\n", "model.conv", ["is not a list of layer mappings"]),
    ("model: {conv: null}\n", "model.conv", ["must not be null"]),
    ("model: {conv: [" + ", ".join(["{}"] * 65) + "]}\n", "model.conv", ["65 entries; at most 64"]),
    ("model: {channels: 8}\n", "model.channels", ["did you mean model.conv[i].channels?"]),
    ("model: {convolutions: []}\n", "model.convolutions", ["did you mean model.conv?"]),
    (CONV2 + "  encoding: {name: fourier}\n", "model.encoding.name", ["fourier", "use none with model.conv"]),
    (CONV2 + "  norm: batch\ntrain: {engine: manual}\n", "model.norm", ["train.engine: manual",
                                                                         "model.conv[i].norm: batch is covered"]),
])
def test_bad_conv_lists_and_combinations(tmp_path, text, key, words):
    msg = error_of(tmp_path, text)
    assert f": {key}: " in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_the_manual_engine_takes_every_conv_layer(tmp_path):
    """train.engine: manual covers model.conv (core/convprop.py): batch norm, stride, padding, either pooling,
    dropout, a layer's own activation."""
    text = ("model:\n  conv: [{channels: 4, kernel: 5, stride: 2, padding: 2, norm: batch, pool: 2, pool_type: avg, "
            "dropout: 0.1, activation: tanh}, {channels: 8, kernel: 3, pool: 2}]\ntrain: {engine: manual}\n")
    cfg = load_config(write(tmp_path, text))
    assert cfg.train.engine == "manual" and cfg.model.conv[0].norm == "batch"


def test_set_reaches_into_a_conv_layer(tmp_path):
    p = write(tmp_path, CONV2)
    cfg = load_config(p, ["model.conv[1].kernel=5", "model.conv[0]={channels: 4, norm: batch}"])
    assert cfg.model.conv[1].kernel == 5 and cfg.model.conv[1].channels == 16
    assert cfg.model.conv[0].channels == 4 and cfg.model.conv[0].norm == "batch" and cfg.model.conv[0].kernel == 3
    whole = load_config(None, ["model.conv=[{channels: 6, kernel: 5, padding: 2}]"])
    assert whole.model.conv[0].padding == 2 and len(whole.model.conv) == 1
    for text, words in (("model.conv[2].kernel=3", "model.conv: the config gives 2 entries, so there is no entry 2"),
                        ("model.conv[0].kernal=3", "model.conv[0].kernal: unknown key; did you mean "
                                                   "model.conv[0].kernel?"),
                        ("model.conv[0].stride=0", "--set model.conv[0].stride=0: model.conv[0].stride: 0 is out of"),
                        ("model.conv=[{pool: 0}]", "--set model.conv=[{pool: 0}]: model.conv[0].pool: 0 is out of"),
                        ("model.conv[1]=3", "--set model.conv[1]=3: model.conv: entry 1 (3) is not a mapping"),
                        ("model.hidden[0]=3", "model.hidden[0]: hidden is not a list of sections"),
                        ("model.conv[0].kernel.x=3", "model.conv[0].kernel is not a section")):
        with pytest.raises(ConfigError) as e:
            load_config(p, [text])
        assert words in str(e.value) and str(e.value).startswith(f"--set {text}: "), str(e.value)
    with pytest.raises(ConfigError, match="the config gives no list, so there is no entry 0"):
        load_config(None, ["model.conv[0].kernel=3"])


def test_cli_refuses_a_bad_conv_layer_in_one_line(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(CONV2)
    p = write(tmp_path, "model:\n  conv: [{channels: 8}, {channels: 8, stride: 0}]\n")
    for cmd in (["config", "validate", "--config", str(p)], ["config", "show", "--config", str(p)],
                ["train", "--config", str(p)],
                ["config", "show", "--config", str(good), "--set", "model.conv[1].pool_type=median"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "model.conv[1]." in lines[0] and "Traceback" not in r.output, r.stderr
    r = runner.invoke(app, ["config", "show", "--config", str(p), "--set", "model.conv[1].stride=2"])
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["model"]["conv"][1]["stride"] == 2, r.output
