"""The recipes: one commented YAML per recipe. Installed, this folder is the package dlbase.recipes (pyproject.toml
maps it), so `dlbase recipes`, `dlbase recipes copy NAME` and `--config NAME` find them without a checkout; in a
checkout they stay at configs/NAME.yaml. Nothing here is imported for its code: this file only makes the folder a
package that an editable install can find.

Each recipe opens with comments, in this order (dlbase/core/recipes.py reads them, tests/test_recipes.py checks):
  1. `# yaml-language-server: $schema=./dlbase.schema.json`, the editor's schema modeline (optional);
  2. the recipe's idea in one sentence ending with a full stop, at most 100 characters: `dlbase recipes` shows it;
  3. `# measured: 98.36% test accuracy (seed 0; where; when)`, written by `scripts/results.py --stamp`; none
     means unmeasured (never write one by hand from a run the line does not describe);
  4. the details: what it is, where it comes from, what differs, units.
"""
