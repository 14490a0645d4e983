"""`dlbase recipes`: the bundled recipes, each with its idea and measured test accuracy, and `dlbase recipes copy`,
one written out for editing. Finding them and reading their opening comments is dlbase/core/recipes.py's."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dlbase.core import recipes
from dlbase.core.config import parse_yaml
from dlbase.core.errors import DlbaseError
from dlbase.core.rundir import quote, write_atomic

KINDS = {"train": "dlbase train --config NAME", "sweep": "dlbase sweep --config NAME"}  # what runs each kind
SCHEMA_FILE = "dlbase.schema.json"  # what the recipes' modeline points at, beside the file


@dataclass(frozen=True)
class Recipe:
    name: str                          # --config NAME
    kind: str                          # "train", or "sweep": the file holds a sweep: section
    idea: str                          # its first comment line
    test_accuracy: Optional[float]     # its `# measured:` figure as a fraction; None: unmeasured
    measured: Optional[str]            # that line's text: the figure, seed, device, torch, date


def list_recipes() -> list[Recipe]:
    """Every bundled recipe, by name."""
    found = []
    for name in recipes.names():
        text = recipes.find(name).read_text(encoding="utf-8")
        head = recipes.header(text)
        found.append(Recipe(name, _kind(text, name), head.idea, head.accuracy, head.measured))
    return found


def _kind(text: str, source: str) -> str:
    raw = parse_yaml(text, source)
    return "sweep" if isinstance(raw, dict) and "sweep" in raw else "train"


def as_json(r: Recipe) -> dict:
    return asdict(r)


def table(found: list[Recipe]) -> str:
    """The recipes to train, then the sweeps, each a block of aligned columns, and how to use them."""
    width = max([len(r.name) for r in found] + [6])
    blocks = []
    for kind, runs_it in KINDS.items():
        rows = [r for r in found if r.kind == kind]
        if not rows:
            continue
        if kind == "train":
            lines = [f"{'recipe':<{width}}  {'test acc':<10}  idea   ({runs_it})"]
            lines += [f"{r.name:<{width}}  {_accuracy(r):<10}  {r.idea}" for r in rows]
        else:
            lines = [f"{'sweep':<{width}}  idea   ({runs_it})"] + [f"{r.name:<{width}}  {r.idea}" for r in rows]
        blocks.append("\n".join(lines))
    blocks.append("test acc: one run's best.ckpt (picked on validation data) on the 10,000 test images; its seed, "
                  "machine and date: dlbase recipes --json.\nEdit one: dlbase recipes copy NAME [DEST], then --config "
                  "DEST/NAME.yaml.")
    return "\n\n".join(blocks)


def _accuracy(r: Recipe) -> str:
    return "unmeasured" if r.test_accuracy is None else f"{100 * r.test_accuracy:.2f}%"


def copy(name: str, dest: Optional[Path], force: bool) -> Path:
    """Write the bundled recipe `name` as it is, byte for byte, into dest: a folder (None: the current one), or a
    file path ending .yaml. Never over an existing file without force. Returns the file written."""
    found = recipes.find(name)
    if found is None:
        raise DlbaseError(recipes.unknown(name, "no bundled recipe of that name"))
    if dest is None:
        target = Path(found.name)
    elif dest.is_dir():
        target = dest / found.name
    elif dest.suffix in (".yaml", ".yml"):
        if not dest.parent.is_dir():
            raise DlbaseError(f"{dest}: its folder {dest.parent} does not exist")
        target = dest
    else:
        raise DlbaseError(f"{dest}: no such folder; give an existing folder or a file name ending .yaml")
    if target.exists() and not force:
        raise DlbaseError(f"{target}: already exists; add --force to replace it")
    if target.is_dir():
        raise DlbaseError(f"{target}: is a folder; give another DEST")
    write_atomic(target, found.read_bytes(), "recipe")
    return target


def next_steps(target: Path) -> list[str]:
    """What to do with a copied recipe: the command that runs it, and where its editor schema would go."""
    text = target.read_text(encoding="utf-8")
    lines = [f"run it: dlbase {_kind(text, str(target))} --config {quote(target)}"]
    first = text.split("\n", 1)[0]
    schema = target.parent / SCHEMA_FILE
    if first.startswith(recipes.MODELINE) and f"=./{SCHEMA_FILE}" in first and not schema.exists():
        lines.append(f"editor completion (its first line points there): dlbase config schema --out {quote(schema)}")
    return lines
