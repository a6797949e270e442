r"""Runs one l2r experiment from a config file.

  python -m experiments.run --config=experiments/configs/fig1.py:cpu --workdir=/tmp/fig1
  python -m experiments.run --config=experiments/configs/fig1.py:smoke --workdir=/tmp/s \
      --config.task_b.steps=40 --overwrite

`--config.<field>=value` overrides any field; an unknown field is an error.

Launched on several processes (TPU pod, SLURM, `launch/`), every process runs this same command:
`l2r.distributed.initialize()` connects them, process 0 writes the logs, tables and figures and
all of them write the (collective) Orbax checkpoints. `--num_cpu_devices=N` runs on N simulated
CPU devices, to test sharded code on one machine.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from l2r import distributed
from l2r import workdir as workdir_lib
from l2r.pipelines import PIPELINES

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:preset].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and logs.")
flags.DEFINE_bool("overwrite", False, "Replace finished results already in --workdir.")
flags.DEFINE_integer(
    "num_cpu_devices", 0, "Run on N simulated CPU devices (testing); 0: as found.", lower_bound=0
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def quiet_libraries(record) -> bool:
    """Drops Orbax's per-save INFO chatter from the console; its warnings still show.

    (absl's `logging.WARNING` is its verbosity 1, not the record level 30: use the stdlib's.)
    """
    return "/orbax/" not in record.pathname or record.levelno >= std_logging.WARNING


def start_runtime() -> None:
    """Sets up JAX's devices and processes from the flags and the launch environment.

    Both steps configure the JAX backend, so this runs before anything that starts one.
    """
    if FLAGS.num_cpu_devices:
        distributed.simulated_cpu_devices(FLAGS.num_cpu_devices)
    try:
        distributed.initialize()
    except ValueError as e:  # A launch environment set wrongly (see l2r/distributed.py).
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not distributed.is_main():  # One copy of the progress lines; warnings still show.
        logging.set_verbosity(logging.WARNING)
    logging.info("JAX runtime: %s", distributed.describe())


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(quiet_libraries)
    start_runtime()
    config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
    if config.experiment not in PIPELINES:
        raise app.UsageError(f"No pipeline for experiment {config.experiment!r}.")
    import importlib

    from l2r.config_checks import ConfigError
    from l2r.data.sources import DataError

    pipeline = importlib.import_module(PIPELINES[config.experiment])
    try:
        pipeline.check_config(config)  # Cheap checks before the workdir is touched.
        with workdir_lib.locked(workdir, FLAGS.overwrite):
            pipeline.run(config, workdir)
    except (ConfigError, DataError, workdir_lib.WorkdirError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
