r"""Sweeps config fields: every combination of the given values, one run each, one table.

  l2r-sweep --config=fig1:smoke --workdir=/tmp/sweep \
      --sweep=task_b.ewc.coef=0.1,1,10 --sweep=task_b.lwf.coef=0.5,1 \
      --config.task_b.methods="('ewc','lwf')"

Each `--sweep=<field>=<v1>,<v2>,...` names an existing config field and its values (parsed to
the field's type; tuples in parentheses, e.g. `--sweep=model.widths=(8,16),(16,32)`). The
cartesian product of all of them runs setting by setting, each in `<workdir>/<NNN>_<setting>/`
with the experiment's usual artefacts. Task-A pre-training is shared through
`<workdir>/pretrain` (unless `pretrain.dir` is set), so settings that do not change it reuse one
set of checkpoints; finished Task-B runs are shared through `<workdir>/task_b` (unless
`task_b.cache_dir` is set), so a method whose own settings did not change (`sgd` in a sweep of
`task_b.ewc.coef`) runs once. After every setting, `<workdir>/sweep.md` and `sweep.json` are
rewritten: one row per setting × method with readout accuracy on A before and after Task B,
the forgetting of A and the final readout on B (mean ± std over seeds). Runs that diverged
(`l2r.divergence`) are left out of those numbers and counted in the method cell; a setting
whose every run of a method diverged reads "diverged" and holds no numbers for it.

`--select=validation` makes it a hyper-parameter selection: every setting runs on a validation
split held out from each class's training examples (`config.validation`, 10% when unset), each
method keeps its setting with the best average readout accuracy over the tasks at the last step
there, and the kept settings run again on the test split (`<workdir>/test/`); `selected.md` and
`selected.json` report those test numbers. The test split is read only by the kept settings.

Every key, value and resulting config is checked before anything runs. A sweep that is
interrupted resumes where it stopped: settings whose run finished (their `results.json` exists,
for the same config) are not run again. `--overwrite` reruns them all.
"""

import copy
import functools
import importlib
import json
import math
import os
import re
import sys

import ml_collections
from absl import app, flags, logging

from l2r import distributed, divergence, report
from l2r import workdir as workdir_lib
from l2r.cli import run as run_lib  # Shares --config, --workdir, --overwrite and PIPELINES.
from l2r.cli.grid import EXAMPLE, SweepError, parse_sweeps, parse_value, settings  # noqa: F401
from l2r.selection import score, select, stat_columns, summary_rows  # noqa: F401 (re-exported)

flags.DEFINE_multi_string(
    "sweep",
    [],
    "A field and its values, <field>=<v1>,<v2>,... (repeatable; the cartesian product runs).",
)
flags.DEFINE_enum(
    "select",
    "",
    ["", "validation"],
    "validation: run every setting on a validation split held out from the training data, pick "
    "each method's best setting there (average readout accuracy over the tasks at the last step), "
    "then run the picked settings on the test split and report those numbers (selected.md).",
)
FLAGS = flags.FLAGS

SWEEP_FILE, TABLE_FILE = "sweep.json", "sweep.md"
SELECTED_FILE, SELECTED_TABLE = "selected.json", "selected.md"
TEST_DIR = "test"  # <workdir>/test/<run>: the picked settings, rerun on the test split.
DEFAULT_VALIDATION = 0.1  # Held-out share of the training data when the config sets none.


def _fmt_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_fmt_value(v) for v in value) + ")"
    return str(value)


def run_name(index: int, setting: dict) -> str:
    """Directory name of a setting: its index and its values, filesystem-safe."""
    text = "_".join(f"{k}={_fmt_value(v)}" for k, v in setting.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._=+,()-]", "-", text)[:150]


def configure(config, setting: dict, workdir: str, probe_ends: bool = False):
    """A copy of `config` with `setting` applied and pre-training shared under the sweep;
    `probe_ends`: probes only at the start and at each task's end (`task_b.probe_every` the
    greatest common divisor of the tasks' steps), all that a selection score reads."""
    config = copy.deepcopy(config)
    for key, value in setting.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise SweepError(f"--sweep: cannot set {key}={value!r}: {e}") from None
    if not config.pretrain.dir:
        config.pretrain.dir = os.path.join(workdir, "pretrain")
    if "task_b" in config and not config.task_b.get("cache_dir"):
        config.task_b.cache_dir = os.path.join(workdir, "task_b")
    if probe_ends and "task_b" in config:
        b = config.task_b
        steps = [b[f] for f in b.keys() if f == "steps" or re.fullmatch(r"steps_\d+", f)]
        if all(isinstance(n, int) and n > 0 for n in steps):  # Else the checks name them.
            b.probe_every = math.gcd(*steps)
    return config


def _pipeline(config):
    if config.experiment not in run_lib.PIPELINES:
        raise SweepError(
            f"No pipeline for experiment {config.experiment!r}; sweeps run "
            f"{', '.join(run_lib.PIPELINES)}."
        )
    return importlib.import_module(run_lib.PIPELINES[config.experiment])


Planned = list[tuple[str, dict, ml_collections.ConfigDict]]


def plan(config, sweeps, workdir: str, probe_ends: bool = False) -> Planned:
    """Every setting's (run directory name, setting, config), each checked by its pipeline
    (`probe_ends`: see `configure`).

    Raises:
      SweepError: naming the setting whose config fails the experiment's checks.
    """
    planned = []
    for i, setting in enumerate(settings(sweeps)):
        cfg = configure(config, setting, workdir, probe_ends)
        try:
            _pipeline(cfg).check_config(cfg)
        except ValueError as e:  # ConfigError
            raise SweepError(f"Setting {_describe(setting)}: {e}") from None
        planned.append((run_name(i, setting), setting, cfg))
    return planned


def _describe(setting: dict) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in setting.items())


# ---------------------------------------------------------------------------- running


def _load_finished(path: str, config) -> dict | None:
    """The results of a finished run in `path` for the same config, None when there are none."""
    results_path = os.path.join(path, workdir_lib.RESULTS_FILE)
    if not os.path.exists(results_path):
        return None
    with open(results_path) as f:
        results = json.load(f)
    want = json.loads(json.dumps(report.to_jsonable(config.to_dict())))
    differ = _differences(results.get("config") or {}, want)
    if differ:
        raise SweepError(
            f"{path} holds results of a different config than this sweep's setting (differs in "
            f"{', '.join(differ[:5])}). Pass --overwrite to rerun it, or choose another --workdir."
        )
    return results


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _percent(stat: dict | None) -> str:
    return "diverged" if stat is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown(rows: list[dict], keys: list[str], note: str = "") -> str:
    """The sweep table: one row per setting × method, accuracies in %, forgetting in points;
    the method cell counts diverged runs, and a fully diverged one reads "diverged"."""
    stats = stat_columns(rows[0].get("tasks", ("A", "B"))) if rows else []
    header = ["run", *keys, "method", *(title for _, title in stats)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"].split("_", 1)[0]]
        cells += [_fmt_value(row["setting"][k]) for k in keys]
        cells.append(divergence.table_label(row["method"], row["diverged"], row["runs"]))
        cells += [_percent(row.get(s)) for s, _ in stats]
        lines.append("| " + " | ".join(cells) + " |")
    return (note + "\n\n" if note else "") + "\n".join(lines) + "\n"


def _write_tables(workdir: str, config, keys: list[str], rows: list[dict], total: int):
    if not distributed.is_main():  # Process 0 writes the tables of a multi-process sweep.
        return
    done = len({r["run"] for r in rows})
    note = (
        f"# Sweep of {', '.join(keys)}\n\nExperiment `{config.experiment}`, preset "
        f"`{config.get('preset', '')}`, {config.num_seeds} seeds; {done}/{total} settings done. "
        "Final values at the last probe step; mean ± std over seeds (ddof=1); forgetting = "
        "readout A at step 0 minus at the end (per seed)."
    )
    if config.get("validation"):
        note += (
            f" Measured on the validation split ({100 * config.validation:g}% of each class's "
            "training examples, held out from training), not on the test split."
        )
    workdir_lib.write_json_atomic(
        os.path.join(workdir, SWEEP_FILE),
        report.to_jsonable({"keys": keys, "settings_done": done, "settings": total, "rows": rows}),
    )
    workdir_lib.write_atomic(os.path.join(workdir, TABLE_FILE), markdown(rows, keys, note).encode())


def run_sweep(config, workdir: str, sweeps: list[tuple[str, list]], overwrite: bool = False,
              planned=None):  # fmt: skip
    """Runs every setting of `sweeps` on `config` and writes the sweep's tables.

    Args:
      config: the base config (left unchanged).
      workdir: the sweep's directory: one subdirectory per setting, plus `pretrain/`,
        `sweep.md` and `sweep.json`.
      sweeps: [(field, values)] from `parse_sweeps`.
      overwrite: rerun settings that already finished (otherwise their results are reused).
      planned: what `plan(config, sweeps, workdir)` returned (None: planned here).

    Returns:
      The table rows (`summary_rows`), in setting order.
    """
    workdir = os.path.abspath(workdir)
    if planned is None:  # Everything is checked before anything runs.
        planned = plan(config, sweeps, workdir)
    keys = [k for k, _ in sweeps]
    rows = []
    with workdir_lib.locked(workdir, overwrite):
        # Finished settings are found (and checked against their config) before any run.
        finished = [
            None if overwrite else _load_finished(os.path.join(workdir, name), cfg)
            for name, _, cfg in planned
        ]
        for i, ((name, setting, cfg), results) in enumerate(zip(planned, finished, strict=True)):
            path = os.path.join(workdir, name)
            if results is not None:
                logging.info("Setting %d/%d reused (finished before)", i + 1, len(planned))
            else:
                logging.info("Setting %d/%d: %s", i + 1, len(planned), _describe(setting))
                with workdir_lib.locked(path, overwrite):
                    results = _pipeline(cfg).run(cfg, path)
            rows += summary_rows(name, setting, results)
            _write_tables(workdir, config, keys, rows, len(planned))
    logging.info("Sweep table:\n%s", markdown(rows, keys))
    return rows


# ---------------------------------------------------------------------------- selection


def selection_markdown(selected: list[dict], keys: list[str], config) -> str:
    """The selected settings and their test numbers, one row per method."""
    tested = [row["test"] for row in selected if row["test"] is not None]
    stats = stat_columns(tested[0]["tasks"]) if tested else []
    lines = [
        f"# Hyper-parameters selected on validation: {', '.join(keys)}",
        "",
        f"Experiment `{config.experiment}`, preset `{config.get('preset', '')}`, "
        f"{config.num_seeds} seeds. Each method's setting is the one with the highest average "
        "readout accuracy over the tasks at the last step on the validation split "
        f"({100 * selected[0]['validation']:g}% of each class's training examples, held out); "
        "the numbers are that setting rerun on the test split (mean ± std over seeds).",
        "",
        "| method | " + " | ".join(keys) + " | validation score (%) | "
        + " | ".join(title for _, title in stats) + " |",
        "|" + "---|" * (len(keys) + 2 + len(stats)),
    ]  # fmt: skip
    for row in selected:
        if row["setting"] is None:
            cells = [row["method"], *("—" for _ in keys), "diverged at every setting"]
            cells += ["" for _ in stats]
        else:
            test = row["test"]
            cells = [divergence.table_label(row["method"], test["diverged"], test["runs"])]
            cells += [_fmt_value(row["setting"][k]) for k in keys]
            cells.append(f"{100 * row['validation_score']:.1f}")
            cells += [_percent(test[s]) for s, _ in stats]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_selection(config, workdir: str, sweeps: list[tuple[str, list]], overwrite: bool = False,
                  family=None):  # fmt: skip
    """Selects each method's setting of `sweeps` on validation data and reports it on test data.

    Every setting runs as in `run_sweep` with `validation` on (the config's share, or
    `DEFAULT_VALIDATION` when it has none), so it never reads the test split, probed only at
    each task's end (`configure`'s `probe_ends`); each method's
    setting is picked by `select`; the picked settings then run again with validation off in
    `<workdir>/test/<run>/`, each with only the methods that picked it and the teacher when
    compared (methods that no swept field touches pick the first setting and reuse the cached
    runs). Writes `selected.json` and
    `selected.md` in `workdir`.

    `family`: see `select`; the test run of a family's pick runs the picked method.

    Returns:
      One dict per method (or family): "method" (the picked method; the family's name when
      every run diverged), "family", "run", "setting" (None if every run diverged),
      "validation" (the held-out share), "validation_score", "validation_row" and "test" (its
      `summary_rows` row on the test split).
    """
    workdir = os.path.abspath(workdir)
    fraction = config.get("validation") or DEFAULT_VALIDATION
    val_config, test_config = copy.deepcopy(config), copy.deepcopy(config)
    with val_config.unlocked(), test_config.unlocked():
        val_config.validation, test_config.validation = float(fraction), 0.0
    # Checks every setting before anything runs. The validation runs probe only where the
    # score reads (each task's end): about a third of a run's time saved on the `cpu` presets.
    planned = plan(val_config, sweeps, workdir, probe_ends=True)
    keys = [k for k, _ in sweeps]
    rows = run_sweep(val_config, workdir, sweeps, overwrite, planned)
    picked = select(rows, family)
    by_run = {}
    for row in picked.values():
        if row is not None:
            by_run.setdefault(row["run"], (row["setting"], []))[1].append(row["method"])
    test_rows = {}
    os.makedirs(os.path.join(workdir, TEST_DIR), exist_ok=True)
    for name, (setting, methods) in by_run.items():
        cfg = configure(test_config, setting, workdir)
        if "teacher" in config.task_b.methods and "teacher" not in methods:
            methods = ["teacher", *methods]  # The reference of per-layer CKA (cached).
        with cfg.unlocked():
            cfg.task_b.methods = tuple(methods)
        path = os.path.join(workdir, TEST_DIR, name)
        results = None if overwrite else _load_finished(path, cfg)
        if results is None:
            logging.info("Test run of %s for %s", _describe(setting), ", ".join(methods))
            with workdir_lib.locked(path, overwrite):
                results = _pipeline(cfg).run(cfg, path)
        for r in summary_rows(name, setting, results):
            test_rows[(name, r["method"])] = r
    selected = []
    for group, row in picked.items():
        entry = {"method": group, "family": group, "validation": fraction, "run": None,
                 "setting": None, "validation_score": None, "validation_row": None,
                 "test": None}  # fmt: skip
        if row is not None:
            method = row["method"]
            entry.update(method=method, run=row["run"], setting=row["setting"],
                         validation_score=score(row), validation_row=row,
                         test=test_rows[(row["run"], method)])  # fmt: skip
        selected.append(entry)
    if distributed.is_main():
        saved = report.to_jsonable({"keys": keys, "selected": selected})
        workdir_lib.write_json_atomic(os.path.join(workdir, SELECTED_FILE), saved)
        table = selection_markdown(selected, keys, config)
        workdir_lib.write_atomic(os.path.join(workdir, SELECTED_TABLE), table.encode())
        logging.info("Selected on validation, measured on test:\n%s", table)
    return selected


def run_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(run_lib.quiet_libraries)
    from l2r.config_checks import ConfigError
    from l2r.data.sources import DataError

    try:
        with run_lib.held_logs():  # A refused sweep prints its one error line, nothing else.
            run_lib.start_runtime()
            sweeps = parse_sweeps(FLAGS.config, FLAGS.sweep)
            planned = plan(FLAGS.config, sweeps, os.path.abspath(FLAGS.workdir))
        if FLAGS.select == "validation":
            run_selection(FLAGS.config, FLAGS.workdir, sweeps, FLAGS.overwrite)
        else:
            run_sweep(FLAGS.config, FLAGS.workdir, sweeps, FLAGS.overwrite, planned)
    except (SweepError, ConfigError, DataError, workdir_lib.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """The console script: parses the command line and runs."""
    app.run(
        run_main, flags_parser=functools.partial(run_lib.parse_flags, module=sys.modules[__name__])
    )


if __name__ == "__main__":
    main()
