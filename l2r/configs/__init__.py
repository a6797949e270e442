"""The experiment configs shipped with l2r: `fig1` and `exp1`-`exp5`, each with its presets.

`l2r-run --config=exp3:cpu` (or `--config=exp3.py:cpu`, or a path to a config file of one's own)
runs one; `describe()` lists them (it is the `--help` text of `--config`).
"""

import importlib
import os

EXPERIMENTS = ("fig1", "exp1", "exp2", "exp3", "exp4", "exp5")
FOLDER = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str | None:
    """The shipped config file a bare name (`exp3`, `exp3.py`, `experiments/configs/exp3.py`)
    stands for, or None when it names none."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return os.path.join(FOLDER, f"{stem}.py") if stem in EXPERIMENTS else None


def describe() -> str:
    """One line per experiment (its docstring's first line) and its presets."""
    lines = []
    for name in EXPERIMENTS:
        module = importlib.import_module(f"l2r.configs.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:5s} {summary} Presets: {', '.join(module.PRESETS)}.")
    return "\n".join(lines)
