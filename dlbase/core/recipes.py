"""The bundled recipes: where they are (a checkout's configs/, or the installed package dlbase.recipes), a recipe
found by its name (`--config mnist_mlp`), and what its opening comments say (its idea and measured accuracy).

A recipe's opening comment block follows one convention (configs/__init__.py states it for authors):

    # yaml-language-server: $schema=./dlbase.schema.json      <- optional: the editor's schema modeline
    # The recipe's idea in one sentence, ending with a full stop.     <- what `dlbase recipes` shows
    # measured: 98.36% test accuracy (seed 0; x86_64 CPU, 2 threads; torch 2.14.1+cu130; 2026-11-26)
    # ... the details, as many lines as they need

The `# measured:` line is written by `scripts/results.py --stamp` (stamp_measured); a recipe without one is
unmeasured. No YAML is parsed here: that is dlbase/core/config.py's.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; only the annotations name it
    from importlib.resources.abc import Traversable

SUFFIX = ".yaml"
MODELINE = "# yaml-language-server:"
MEASURED = "# measured:"
_MEASURED = re.compile(r"# measured: (\d{1,3}(?:\.\d+)?)% test accuracy\b(.*)")


@dataclasses.dataclass(frozen=True)
class Header:
    """What a recipe's opening comments say: its idea (one line) and its measurement, when it has one."""
    idea: str
    measured: Optional[str] = None        # the `# measured:` line's text after the tag, e.g. "98.36% test ..."
    accuracy: Optional[float] = None      # its test accuracy as a fraction in [0, 1]


def folder() -> Traversable:
    """The folder of bundled recipes. A source checkout's configs/ when this dlbase is a checkout's (on PYTHONPATH,
    or installed editable: the same folder), so a worktree always reads its own; else the installed package data
    of dlbase.recipes (a wheel's dlbase/recipes/, which pyproject.toml maps from configs/)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "configs" / "__init__.py").is_file():
        return root / "configs"
    return importlib.resources.files("dlbase.recipes")


def names() -> list[str]:
    """Every bundled recipe's name (its file name without .yaml), sorted."""
    return sorted(f.name[:-len(SUFFIX)] for f in folder().iterdir() if f.name.endswith(SUFFIX) and f.is_file())


def find(value: str) -> Optional[Traversable]:
    """The bundled recipe a --config value names (`mnist_mlp` or `mnist_mlp.yaml`), or None: a value with a
    folder in it is a path, never a name."""
    value = str(value)
    if "/" in value or os.sep in value or (os.altsep and os.altsep in value):
        return None
    stem = value[:-len(SUFFIX)] if value.endswith(SUFFIX) else value
    if not stem or stem.startswith("."):
        return None
    found = folder().joinpath(stem + SUFFIX)
    try:
        return found if found.is_file() else None
    except (OSError, ValueError):  # a name the file system cannot hold (NUL, too long) names no recipe
        return None


def locate(value: str) -> "Optional[Path | Traversable]":
    """What a --config value that is no existing file reads: for a bundled recipe's bare name NAME, the user's
    copy ./NAME.yaml when there is one (what `dlbase recipes copy NAME` writes; a file that exists wins), else the
    bundled recipe; None when the value names no bundled recipe."""
    found = find(value)
    if found is None:
        return None
    copy = Path(f"{value}{SUFFIX}")
    return copy if not str(value).endswith(SUFFIX) and copy.is_file() else found


def close_matches(value: str, most: int = 3) -> list[str]:
    """The bundled recipes whose names are near a mistyped one (its folder and .yaml left out): spelt nearly the
    same, whole or without the common `mnist_`, or holding it (`lenet` -> mnist_lenet5)."""
    stem = Path(str(value)).name
    stem = stem[:-len(SUFFIX)] if stem.endswith(SUFFIX) else stem
    every = names()
    short = {n.removeprefix("mnist_"): n for n in every}
    near = [*([stem] if stem in every else []), *difflib.get_close_matches(stem, every, n=most, cutoff=0.75),
            *(short[s] for s in difflib.get_close_matches(stem.removeprefix("mnist_"), list(short), most, 0.75)),
            *(n for n in every if len(stem) >= 3 and stem.lower() in n)]
    return list(dict.fromkeys(near))[:most]


def unknown(value: str, what: str) -> str:
    """One line for a value that names no bundled recipe: the value, what is wrong with it (what), the close
    matches among the bundled recipes, and the command that lists them."""
    close = close_matches(value)
    either = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
    hint = f"; did you mean {either}?" if close else ""
    return f"{value}: {what}{hint} (`dlbase recipes` lists the bundled recipes)"


def header(text: str) -> Header:
    """The idea and the measurement in a recipe's opening comments (see the module docstring); idea "" when the
    first line after the modeline is not a comment (tests/test_recipes.py holds every bundled recipe to it)."""
    lines = text.splitlines()
    if lines and lines[0].startswith(MODELINE):
        lines = lines[1:]
    if not lines or not lines[0].startswith("# ") or lines[0].startswith(MEASURED):
        return Header("")
    idea = lines[0][2:].strip()
    m = _MEASURED.fullmatch(lines[1].rstrip()) if len(lines) > 1 else None
    if m is None:
        return Header(idea)
    return Header(idea, lines[1][len(MEASURED):].strip(), round(float(m.group(1)) / 100, 6))


def measured_line(accuracy: float, where: str) -> str:
    """The `# measured:` line for a test accuracy (a fraction) measured as `where` says (seed, device, date)."""
    return f"{MEASURED} {100 * accuracy:.2f}% test accuracy ({where})"


def stamp_measured(text: str, line: str) -> str:
    """The recipe's text with its `# measured:` line (just below the idea) replaced by line, or line put there;
    every other byte as it was."""
    if not header(text).idea:
        raise ValueError("a recipe's first comment line (after the schema modeline) is its idea; the measured "
                         "line goes below it, and this recipe has none")
    lines = text.splitlines(keepends=True)
    at = 2 if lines[0].startswith(MODELINE) else 1
    newline = "\r\n" if lines[at - 1].endswith("\r\n") else "\n"
    if len(lines) > at and lines[at].startswith(MEASURED):
        lines[at] = line + newline
    else:
        lines.insert(at, line + newline)
    return "".join(lines)
