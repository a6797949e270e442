r"""Every method of an experiment at hyper-parameters selected on validation data, then tested.

  l2r-validate --config=exp2:cpu --workdir=/tmp/exp2_validated \
      --methods=sgd,sgd_x0.1,teacher,lwf,ewc,hat,oml,rep,learned
  python -m experiments.validate --config=fig1:smoke --workdir=/tmp/v --grid=task_b.lwf.coef=1,3

1. **Selection.** Each method with a grid (`GRIDS`; `--grid=<field>=<v1>,<v2>,...` replaces the
   grid of the method whose group holds the field) is swept alone with `l2r-sweep
   --select=validation` in `<workdir>/select/<method>/`: every value runs on a validation split
   held out from each class's training examples (`config.validation`, 10% when unset), and the
   value with the best average readout accuracy over the tasks at the last step is kept. SGD's step
   scale is selected the same way among `sgd_x<f>` for the factors of `--sgd_scales`
   (`<workdir>/select/sgd/`); the kept one joins the methods as "SGD with a validated scale".
2. **Test.** One run of every method with its kept values on the test split, in
   `<workdir>/final/`: the experiment's usual `results.json`, tables and figures.
3. `<workdir>/validated.md` and `validated.json`: each method's grid, kept values and their
   validation score.

Pre-training and Task-B runs are shared through `<workdir>/pretrain` and `<workdir>/task_b`, so
methods without a grid run once and the final run reuses the selection's test runs (the teacher,
when compared, runs beside every swept method for their per-layer CKA to it, once per split). An
interrupted run resumes: finished settings and runs are reused.
"""

import copy
import functools
import os
import re
import sys

import ml_collections
from absl import app, flags, logging

from l2r import distributed, report
from l2r import workdir as workdir_lib
from l2r.cli import run as run_lib  # Shares --config, --workdir and --overwrite.
from l2r.cli import sweep

flags.DEFINE_list(
    "methods", None, "Methods to compare (default: the config's task_b.methods)."
)  # fmt: skip
flags.DEFINE_multi_string(
    "grid", [], "<field>=<v1>,<v2>,...: replaces the default grid of the method owning the field."
)
flags.DEFINE_list(
    "sgd_scales",
    ["1", "0.3", "0.1", "0.03"],
    "Step scales of SGD selected on validation (sgd_x<f>); empty: no validated SGD.",
)
FLAGS = flags.FLAGS

# Each method's hyper-parameters and the values tried (§4's defaults included). EWC's larger
# coefficients may diverge (lr · coef · max Fisher > 2): a setting where any seed diverged is
# never kept while another is finite.
GRIDS = {
    "lwf": {"task_b.lwf.coef": (0.1, 0.3, 1.0, 3.0, 10.0)},
    "ewc": {"task_b.ewc.coef": (1.0, 10.0, 100.0, 1000.0)},
    "hat": {"task_b.hat.s_max": (1.0, 3.0, 10.0), "task_b.hat.reg": (0.25, 0.75, 2.5)},
    "oml": {"task_b.oml.outer_lr": (3e-5, 1e-4, 3e-4, 1e-3)},
}
SGD_FAMILY = "sgd"
SELECT_DIR, FINAL_DIR = "select", "final"
SUMMARY_FILE, SUMMARY_TABLE = "validated.json", "validated.md"


def sgd_family(method: str) -> str:
    """ "sgd" for SGD at any step scale (sgd, sgd_x<f>), the method itself otherwise."""
    return SGD_FAMILY if method == "sgd" or re.fullmatch(r"sgd_x[0-9.eE+-]+", method) else method


def scale_name(factor: str) -> str:
    return "sgd" if float(factor) == 1.0 else f"sgd_x{factor}"


def grids(config, methods, overrides=(), sgd_scales=()) -> dict[str, list[tuple[str, list]]]:
    """{method: [(field, values)]} of the methods that have a grid, parsed against `config`
    (`sweep.parse_sweeps`: unknown fields and wrong types are errors); `overrides` replace a
    method's default grid; SGD's scales become a sweep of `task_b.methods`."""
    specs = {m: [f"{k}={','.join(map(str, v))}" for k, v in GRIDS[m].items()]
             for m in methods if m in GRIDS}  # fmt: skip
    given = {}
    for spec in overrides:
        field = spec.partition("=")[0].strip()
        parts = field.split(".")
        owner = parts[1] if len(parts) == 3 and parts[0] == "task_b" else None
        if owner not in methods:
            raise sweep.SweepError(
                f"--grid={spec}: {field} is not a field of a compared method's group "
                f"(task_b.<method>.<field>, methods {', '.join(methods)})."
            )
        given.setdefault(owner, []).append(spec)
    specs.update(given)
    out = {m: sweep.parse_sweeps(config, s) for m, s in specs.items()}
    if sgd_scales:
        names = ",".join(f"({scale_name(f)},)" for f in sgd_scales)
        out[SGD_FAMILY] = sweep.parse_sweeps(config, [f"task_b.methods={names}"])
    return out


def shared(config, workdir: str, methods) -> ml_collections.ConfigDict:
    """`config` with `methods` and the workdir's shared pre-training and Task-B caches."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.task_b.methods = tuple(methods)
        if not config.pretrain.dir:
            config.pretrain.dir = os.path.join(workdir, "pretrain")
        if not config.task_b.cache_dir:
            config.task_b.cache_dir = os.path.join(workdir, "task_b")
    return config


def final_config(config, workdir, methods, selected: dict):
    """The test run's config: every method with its kept values; the SGD family's pick added
    to the methods when it is not one of them."""
    methods = list(methods)
    cfg = shared(config, workdir, methods)
    with cfg.unlocked():
        for method, entry in selected.items():
            if entry["setting"] is None:
                continue
            if method == SGD_FAMILY:
                if entry["method"] not in methods:
                    methods.append(entry["method"])
                continue
            for key, value in entry["setting"].items():
                *path, leaf = key.split(".")
                node = cfg
                for part in path:
                    node = node[part]
                node[leaf] = value
        cfg.task_b.methods = tuple(methods)
    return cfg


def summary_markdown(config, selected: dict, method_grids: dict) -> str:
    fraction = next(iter(selected.values()))["validation"] if selected else 0.0
    lines = [
        f"# {config.experiment} `{config.get('preset', '')}`: hyper-parameters selected on "
        "validation",
        "",
        "Each value was kept for the best average readout accuracy over the tasks at the last "
        f"step on a validation split ({100 * fraction:g}% of each class's training examples, held "
        f"out), {config.num_seeds} seeds; test numbers of every method at its kept values: "
        f"`{FINAL_DIR}/results.md`.",
        "",
        "| method | field | values tried | kept | validation score (%) |",
        "|---|---|---|---|---|",
    ]
    for method, entry in selected.items():
        for field, values in method_grids[method]:
            tried = ", ".join(sweep._fmt_value(v) for v in values)
            if entry["setting"] is None:
                kept, val = "every run diverged", ""
            else:
                kept = sweep._fmt_value(entry["setting"][field])
                val = f"{100 * entry['validation_score']:.1f}"
            lines.append(f"| {method} | {field} | {tried} | {kept} | {val} |")
    return "\n".join(lines) + "\n"


def run_validated(config, workdir: str, methods=None, overrides=(), sgd_scales=(),
                  overwrite: bool = False) -> dict:  # fmt: skip
    """Selects every method's hyper-parameters on validation and runs them all on test.

    Returns:
      {"selected": {method: `sweep.run_selection` entry}, "results": the final run's results}.
    """
    workdir = os.path.abspath(workdir)
    methods = list(methods or config.task_b.methods)
    method_grids = grids(config, methods, overrides, sgd_scales)
    pipeline = sweep._pipeline(config)
    # Everything is checked before anything runs: each selection sweep, and the test run.
    plans = {}
    # The teacher runs beside each swept method (once: its runs are shared), so that the
    # selection's test runs hold their per-layer CKA to it and the final run reuses them.
    with_teacher = ["teacher"] if "teacher" in methods else []
    for method, sweeps in method_grids.items():
        swept = ["sgd"] if method == SGD_FAMILY else [method]
        cfg = shared(config, workdir, with_teacher + swept)
        plans[method] = (cfg, sweeps)
        checked = copy.deepcopy(cfg)
        with checked.unlocked():
            checked.validation = config.get("validation") or sweep.DEFAULT_VALIDATION
        sweep.plan(checked, sweeps, os.path.join(workdir, SELECT_DIR, method))
    try:
        pipeline.check_config(shared(config, workdir, methods))
    except ValueError as e:
        raise sweep.SweepError(f"The test run: {e}") from None

    selected = {}
    for method, (cfg, sweeps) in plans.items():
        logging.info("Selecting %s on validation: %s", method, sweep._describe(dict(sweeps)))
        family = sgd_family if method == SGD_FAMILY else None
        entries = sweep.run_selection(
            cfg, os.path.join(workdir, SELECT_DIR, method), sweeps, overwrite, family
        )
        selected[method] = next(e for e in entries if e["family"] == method)

    final = final_config(config, workdir, methods, selected)
    path = os.path.join(workdir, FINAL_DIR)
    results = None if overwrite else sweep._load_finished(path, final)
    if results is None:
        with workdir_lib.locked(path, overwrite):
            results = pipeline.run(final, path)
    if distributed.is_main():
        saved = {"selected": selected, "grids": {m: dict(g) for m, g in method_grids.items()},
                 "final": os.path.join(FINAL_DIR, workdir_lib.RESULTS_FILE)}  # fmt: skip
        workdir_lib.write_json_atomic(
            os.path.join(workdir, SUMMARY_FILE), report.to_jsonable(saved)
        )
        table = summary_markdown(config, selected, method_grids)
        workdir_lib.write_atomic(os.path.join(workdir, SUMMARY_TABLE), table.encode())
        logging.info("Selected on validation:\n%s", table)
    return {"selected": selected, "results": results}


def run_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(run_lib.quiet_libraries)
    from l2r.config_checks import ConfigError
    from l2r.data.sources import DataError

    try:
        with run_lib.held_logs():  # A refused run prints its one error line, nothing else.
            run_lib.start_runtime()
            method_grids = grids(FLAGS.config, FLAGS.methods or FLAGS.config.task_b.methods,
                                 FLAGS.grid, FLAGS.sgd_scales)  # fmt: skip
            del method_grids  # Parsed here so that a bad flag fails before anything runs.
        run_validated(FLAGS.config, FLAGS.workdir, FLAGS.methods, FLAGS.grid, FLAGS.sgd_scales,
                      FLAGS.overwrite)  # fmt: skip
    except (sweep.SweepError, ConfigError, DataError, workdir_lib.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """The console script: parses the command line and runs."""
    app.run(
        run_main, flags_parser=functools.partial(run_lib.parse_flags, module=sys.modules[__name__])
    )


if __name__ == "__main__":
    main()
