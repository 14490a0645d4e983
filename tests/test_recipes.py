"""Recipes that travel with the package (STYLE habit 16): `dlbase recipes` lists every YAML in configs/ with its idea
and measured accuracy, `--config NAME` reads a bundled one from any folder, `dlbase recipes copy` writes one out
byte for byte; and a wheel built from the checkout holds them, installed into a fresh venv and run from an empty
folder."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from dlbase.cli import app
from dlbase.core import recipes
from dlbase.core.config import load_config, to_dict
from dlbase.core.errors import ConfigError

runner = CliRunner()
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = ["--set", "device=cpu", "--set", "data.subset=300", "--set", "data.val_size=100", "--set", "train.epochs=1",
        "--set", "data.download=false"]


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


# ----------------------------------------------------------------------------- the listing


def test_the_listing_holds_every_yaml_in_configs():
    assert recipes.folder() == REPO / "configs"  # a checkout reads its own configs/
    assert recipes.names() == [p.stem for p in CONFIGS]
    r = runner.invoke(app, ["recipes", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["name"] for row in rows] == [p.stem for p in CONFIGS]
    for row, p in zip(rows, CONFIGS):
        text = p.read_text()
        assert row["kind"] == ("sweep" if "sweep" in yaml.safe_load(text) else "train")
        assert row["idea"] == recipes.header(text).idea
    table = runner.invoke(app, ["recipes"]).stdout
    for row in rows:
        line = next(line for line in table.splitlines() if line.startswith(row["name"] + " "))
        assert row["idea"] in line
        if row["kind"] == "train":
            shown = "unmeasured" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
            assert f"  {shown}  " in line
    assert "sweep_lr_hidden" in table.split("dlbase sweep --config NAME")[1]  # the sweep under its own heading


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_opens_with_its_idea_and_maybe_its_measurement(path):
    text = path.read_text()
    head = recipes.header(text)
    assert head.idea and len(head.idea) <= 100 and head.idea.endswith("."), \
        f"{path.name}: line 2 (after the schema modeline) must be its idea in one sentence (configs/__init__.py)"
    below = text.splitlines()[2]
    if below.startswith("# measured"):  # a measured line that does not parse would show as unmeasured
        assert head.accuracy is not None and 0 <= head.accuracy <= 1, below
        assert re.search(r"\(seed \d+; .+; \d{4}-\d\d-\d\d\)$", below), below
    else:
        assert head.accuracy is None and head.measured is None


def test_measured_lines_agree_with_the_results_table():
    """docs/RESULTS.md's CPU table and the recipes' `# measured:` lines come from the same scripts/results.py run
    (--stamp): a table rewritten without restamping the recipes fails here."""
    first_table = (REPO / "docs" / "RESULTS.md").read_text().split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)\.yaml` \| ([\d.]+)% \|", first_table, re.M)
    assert len(rows) >= 5
    for name, figure in rows:
        head = recipes.header((REPO / "configs" / f"{name}.yaml").read_text())
        assert head.accuracy == pytest.approx(float(figure) / 100, abs=1e-9), \
            f"{name}: RESULTS.md says {figure}%, its # measured: line {head.measured}; rerun with --stamp"


def test_stamping_replaces_or_inserts_the_measured_line_and_nothing_else():
    line = recipes.measured_line(0.98765, "seed 0; somewhere; 2030-01-01")
    assert line == "# measured: 98.77% test accuracy (seed 0; somewhere; 2030-01-01)"
    measured = (REPO / "configs" / "mnist_cnn.yaml").read_text().splitlines(keepends=True)
    unmeasured = "".join(row for row in measured if not row.startswith("# measured:"))  # as it was before its run
    assert unmeasured.count("\n") == len(measured) - 1
    stamped = recipes.stamp_measured(unmeasured, line)
    assert stamped.splitlines()[2] == line
    assert stamped.replace(line + "\n", "", 1) == unmeasured
    assert recipes.header(stamped).accuracy == pytest.approx(0.9877)
    again = recipes.stamp_measured(stamped, recipes.measured_line(0.5, "seed 1; elsewhere; 2031-01-01"))
    assert again.count("# measured:") == 1 and recipes.header(again).accuracy == 0.5
    no_modeline = "# An idea.\nname: x\n"
    assert recipes.stamp_measured(no_modeline, line) == f"# An idea.\n{line}\nname: x\n"
    with pytest.raises(ValueError, match="idea"):
        recipes.stamp_measured("name: x\n", line)


def test_results_script_stamps_a_line_that_the_listing_reads(tmp_path):
    spec = importlib.util.spec_from_file_location("results_script", REPO / "scripts" / "results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    copy = tmp_path / "mnist_mlp.yaml"
    shutil.copy(REPO / "configs" / "mnist_mlp.yaml", copy)
    script.stamp(copy, {"test_accuracy": 0.9712, "seed": 3, "device": "cpu"})
    head = recipes.header(copy.read_text())
    assert head.accuracy == pytest.approx(0.9712) and head.measured.startswith("97.12% test accuracy (seed 3; ")


# ----------------------------------------------------------------------------- --config NAME


def test_a_bundled_name_loads_the_same_config_as_its_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # empty: no configs/ here
    by_path = to_dict(load_config(REPO / "configs" / "mnist_mlp.yaml"))
    assert to_dict(load_config("mnist_mlp")) == by_path == to_dict(load_config("mnist_mlp.yaml"))
    shown = runner.invoke(app, ["config", "show", "--config", "mnist_mlp", "--set", "optim.lr=0.01"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout) == {**by_path, "optim": {**by_path["optim"], "lr": 0.01}}
    assert runner.invoke(app, ["config", "validate", "--config", "sweep_lr_hidden"]).exit_code == 0


def test_a_file_that_exists_wins_over_the_bundled_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mnist_mlp.yaml").write_text("name: my_copy\n")
    assert load_config("mnist_mlp.yaml").name == "my_copy"
    assert load_config("mnist_mlp").name == "my_copy"  # the copy being edited, not the bundled one beside it
    Path("mnist_mlp").write_text("name: no_suffix\n")
    assert load_config("mnist_mlp").name == "no_suffix"
    assert load_config("mnist_cnn").name == "mnist_cnn"  # no copy of that one here


def test_a_bundled_recipe_trains_from_an_empty_folder(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["train", "--config", "mnist_mlp", *TINY, "--set", f"data.root={tiny_data}",
                            "--set", "checkpoint.dir=ckpt"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ckpt" / "mnist_mlp" / "best.ckpt").is_file()


@pytest.mark.parametrize("cmd", [["train"], ["train", "--seeds", "2"], ["config", "show"], ["config", "validate"],
                                 ["sweep"], ["gradcheck"]], ids=" ".join)
def test_a_name_that_is_neither_a_file_nor_a_recipe_is_one_line_with_the_close_ones(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(runner.invoke(app, [*cmd, "--config", "mnist_mpl"]))
    assert line == ("error: mnist_mpl: config file not found, nor a bundled recipe of that name; did you mean "
                    "mnist_mlp? (`dlbase recipes` lists the bundled recipes)")


def test_a_path_that_is_missing_points_at_the_recipe_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a README command run outside a checkout
    with pytest.raises(ConfigError, match=r"configs/mnist_mlp.yaml: config file not found.*did you mean mnist_mlp\?"):
        load_config("configs/mnist_mlp.yaml")
    with pytest.raises(ConfigError, match=r"^zzz: config file not found, nor a bundled recipe of that name "
                                          r"\(`dlbase recipes` lists"):
        load_config("zzz")
    assert recipes.close_matches("speedrun")[:2] == ["mnist_speedrun", "mnist_cpu_speedrun"]
    for odd in ("", ".yaml", "..", "../configs/mnist_mlp", "a\x00b"):
        assert recipes.find(odd) is None


# ----------------------------------------------------------------------------- dlbase recipes copy


def test_copy_writes_the_same_bytes_and_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["recipes", "copy", "mnist_lenet5"])
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert out[0] == "mnist_lenet5.yaml" and out[1] == "run it: dlbase train --config mnist_lenet5.yaml"
    assert "dlbase config schema --out dlbase.schema.json" in out[2]
    assert Path("mnist_lenet5.yaml").read_bytes() == (REPO / "configs" / "mnist_lenet5.yaml").read_bytes()
    Path("sub").mkdir()
    r = runner.invoke(app, ["recipes", "copy", "sweep_lr_hidden.yaml", "sub"])
    assert r.exit_code == 0 and r.stdout.splitlines()[:2] == [
        "sub/sweep_lr_hidden.yaml", "run it: dlbase sweep --config sub/sweep_lr_hidden.yaml"], r.output
    r = runner.invoke(app, ["recipes", "copy", "mnist_mlp", "sub/mine.yaml"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "sub/mine.yaml", r.output
    assert Path("sub/mine.yaml").read_bytes() == (REPO / "configs" / "mnist_mlp.yaml").read_bytes()


def test_copy_refuses_to_overwrite_unless_forced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mnist_mlp.yaml").write_text("name: edited\n")
    line = one_error_line(runner.invoke(app, ["recipes", "copy", "mnist_mlp"]))
    assert line == "error: mnist_mlp.yaml: already exists; add --force to replace it"
    assert Path("mnist_mlp.yaml").read_text() == "name: edited\n"
    assert runner.invoke(app, ["recipes", "copy", "mnist_mlp", "--force"]).exit_code == 0
    assert Path("mnist_mlp.yaml").read_bytes() == (REPO / "configs" / "mnist_mlp.yaml").read_bytes()


@pytest.mark.parametrize("args,words", [
    (["mnist_lenet"], "mnist_lenet: no bundled recipe of that name; did you mean mnist_lenet5? (`dlbase recipes`"),
    (["mnist_mlp", "nowhere"], "nowhere: no such folder; give an existing folder or a file name ending .yaml"),
    (["mnist_mlp", "nowhere/x.yaml"], "nowhere/x.yaml: its folder nowhere does not exist"),
])
def test_copy_refusals_are_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    assert words in one_error_line(runner.invoke(app, ["recipes", "copy", *args]))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the wheel, installed


def _can_build_wheels() -> bool:
    """setuptools with bdist_wheel (its own from 70.1, else the wheel package), and pip's --python (22.3)."""
    from importlib.metadata import PackageNotFoundError, version  # not imported: setuptools fights distutils

    def of(name: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in re.findall(r"\d+", version(name))[:2])
        except PackageNotFoundError:
            return (0,)
    return (of("setuptools") >= (70, 1) or of("wheel") > (0,)) and of("pip") >= (22, 3)


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          capture_output=True, text=True, timeout=300)


def _source_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied: building in the checkout would leave build/ and *.egg-info there."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for folder in ("dlbase", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _fresh_venv(where: Path) -> Path:
    """A venv that sees this interpreter's packages (torch, typer, ...) but not its dlbase: a .pth line adds their
    site-packages after the venv's own (--system-site-packages would not: they live in a venv here). Returns its
    python."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


needs_wheel_build = pytest.mark.skipif(not _can_build_wheels() or os.name != "posix", reason="building a wheel "
                                       "offline needs setuptools >= 70.1 (or wheel) and pip >= 22.3")


@needs_wheel_build
def test_a_wheel_holds_the_recipes_and_trains_one_from_an_empty_folder(tmp_path, tiny_data):
    src, dist = _source_copy(tmp_path), tmp_path / "dist"
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(dist))
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("dlbase-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    assert {f"dlbase/recipes/{p.name}" for p in CONFIGS} <= inside
    packages = {str(p.relative_to(REPO)) for p in (REPO / "dlbase").rglob("__init__.py")}
    assert packages <= inside, f"pyproject.toml's packages list misses {sorted(packages - inside)}"

    python = _fresh_venv(tmp_path / "venv")
    installed = _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([*args], cwd=empty, capture_output=True, text=True, timeout=300,
                           env=_clean_env(DLBASE_DATA=str(tiny_data)))
        assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    where = run(str(python), "-c", "import dlbase.core.recipes as r; print(r.folder())").stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # the wheel's package data, not the checkout
    listing = run(str(python), "-m", "dlbase", "recipes").stdout
    assert listing == runner.invoke(app, ["recipes"]).stdout  # the same table as the checkout's
    dlbase_exe = str(python.parent / "dlbase")
    shown = run(dlbase_exe, "config", "show", "--config", "mnist_lenet5").stdout
    assert yaml.safe_load(shown) == to_dict(load_config(REPO / "configs" / "mnist_lenet5.yaml"))
    trained = run(dlbase_exe, "train", "--config", "mnist_lenet5", *TINY, "--set", "checkpoint.dir=ckpt")
    assert "epoch 1/1" in trained.stdout and (empty / "ckpt" / "mnist_lenet5" / "best.ckpt").is_file()
    run(dlbase_exe, "recipes", "copy", "mnist_lenet5")
    assert (empty / "mnist_lenet5.yaml").read_bytes() == (REPO / "configs" / "mnist_lenet5.yaml").read_bytes()


@needs_wheel_build
def test_an_editable_install_finds_the_recipes_through_importlib_resources(tmp_path):
    src = _source_copy(tmp_path)
    python = _fresh_venv(tmp_path / "venv")
    installed = _pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                     str(src))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = ("import importlib.resources as r, json; print(json.dumps(sorted(f.name for f in "
             "r.files('dlbase.recipes').iterdir() if f.name.endswith('.yaml'))))")
    r = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=_clean_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [p.name for p in CONFIGS]
