r"""Runs one l2r experiment from a config: `l2r-run` (installed), or `python -m experiments.run`
in a checkout.

  l2r-run --config=fig1:cpu --workdir=/tmp/fig1
  l2r-run --config=fig1:smoke --workdir=/tmp/s --config.task_b.steps=40 --overwrite
  l2r-run --config=exp3:cpu --workdir=/tmp/exp3 --dry_run

`--config=exp3:cpu` names a shipped config (`l2r/configs/exp3.py`) and its preset; a path to a
config file of one's own works too.
`--config.<field>=value` overrides any field; an unknown field is an error. A wrong flag, config
or workdir stops the run before any work with one line on stderr and exit status 2.

Launched on several processes (TPU pod, SLURM, `launch/`), every process runs this same command:
`l2r.distributed.initialize()` connects them, process 0 writes the logs, tables and figures and
all of them write the (collective) Orbax checkpoints. `--num_cpu_devices=N` runs on N simulated
CPU devices, to test sharded code on one machine.
"""

import contextlib
import importlib
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from l2r import configs, distributed, runtime, tracking
from l2r import workdir as workdir_lib
from l2r.config_checks import ConfigError
from l2r.data.sources import DataError
from l2r.pipelines import PIPELINES

config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config NAME[:PRESET] (or a config file of one's own, PATH[:PRESET]):\n"
    + configs.describe(),
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and logs.")
flags.DEFINE_bool("overwrite", False, "Replace finished results already in --workdir.")
flags.DEFINE_integer(
    "num_cpu_devices", 0, "Run on N simulated CPU devices (testing); 0: as found.", lower_bound=0
)
flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the resolved config and the stages that would run (and which are "
    "cached), then exit without running any.",
)
flags.DEFINE_string(
    "compilation_cache",
    None,
    "Folder of JAX's persistent compilation cache, reused by reruns and resumed runs; 'off' "
    "turns it off. Default: $L2R_COMPILATION_CACHE, else ~/.cache/l2r/jax (l2r/runtime.py).",
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

    Both steps configure the JAX backend, so this runs before anything that starts one. A
    launch environment set wrongly is a ConfigError (see l2r/distributed.py).
    """
    if FLAGS.num_cpu_devices:
        distributed.simulated_cpu_devices(FLAGS.num_cpu_devices)
    if FLAGS.compilation_cache is not None:
        runtime.set_compilation_cache(runtime.cache_path(FLAGS.compilation_cache))
    try:
        distributed.initialize()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not distributed.is_main():  # One copy of the progress lines; warnings still show.
        logging.set_verbosity(logging.WARNING)
    logging.info("JAX runtime: %s", distributed.describe())


def resolve_config_path(argv: list[str]) -> list[str]:
    """`--config=exp3[.py][:preset]` names the shipped `l2r/configs/exp3.py` unless a file of
    that name exists here, so the command works from any folder and installed alike."""
    out = []
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg[len("--config=") :]
        elif i > 0 and argv[i - 1] == "--config":
            value = arg
        if value is not None:
            name, sep, preset = value.partition(":")
            shipped = configs.path(name)
            if shipped and not os.path.exists(name):
                value = shipped + sep + preset
            arg = f"--config={value}" if arg.startswith("--config=") else value
        out.append(arg)
    return out


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from, outermost first."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _override(argv: list[str], field: str) -> str:
    """The `--config.` override among `argv` that names `field`, or a generic description."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and field in name[len("--config.") :].split("."):
            return name
    return "a --config. override"


def flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for a command line that absl or ml_collections refused (they raise with
    tracebacks and nested causes): what is wrong, and the fix where one is known."""
    chain = _chain(e)
    text = "\n".join(str(c) for c in chain)
    m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
    if m:
        good, bad = m.groups()
        flag = _override(argv, bad)
        return f"{flag}: the config has no field {bad!r}; did you mean {flag.replace(bad, good)}?"
    missing = [c for c in chain if isinstance(c, KeyError)]
    if missing:
        field = str(missing[-1].args[0]).strip("'")
        return (f"{_override(argv, field)}: the config has no field {field!r}; its fields are "
                "those of the config file.")  # fmt: skip
    m = re.search(r"No such file or directory: '([^']+)'", text)
    if m:
        return (f"config file {m.group(1)} not found; pass a shipped config (--config=fig1:cpu; "
                "l2r-run --help lists them) or a path to your own config file.")  # fmt: skip
    # absl's own message names the flag; it wraps the config file's errors in a traceback.
    root = chain[0] if "Traceback" not in str(chain[0]) else chain[-1]
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(root).__name__


def usage(program: str, module=None) -> str:
    """The `--help` text of the command whose module is `module` (None: this one): its
    docstring, then its own flags and the ones it shares with `l2r-run` (`--config` lists the
    experiments and their presets)."""
    del program
    this = sys.modules[__name__]
    module = module or this
    text = f"{module.__doc__.strip()}\n\nFlags:\n"
    if module is not this:
        text += FLAGS.module_help(module) + "\n\n"
    return text + FLAGS.module_help(this)


def parse_flags(argv: list[str], module=None) -> list[str]:
    """absl's flag parsing, with every refusal reported in one line (exit status 2); `--help`
    prints `module`'s usage (None: `l2r-run`'s)."""
    argv = resolve_config_path(argv)
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        print(usage(argv[0], module))
        sys.exit(0)
    try:
        rest = FLAGS(argv)
        FLAGS.config.get("experiment")  # A config file that failed to load raises here.
    except Exception as e:  # absl, ml_collections and the config file raise many types.
        print(f"error: {flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)
    return rest


@contextlib.contextmanager
def held_logs():
    """Holds back the absl log lines of the `with` body and shows them only if it ends well:
    a run refused for bad input prints its one error line and nothing else."""
    held, handler = [], logging.get_absl_handler()

    def hold(record) -> bool:
        held.append(record)
        return False

    handler.addFilter(hold)
    try:
        yield
    finally:
        handler.removeFilter(hold)
    for record in held:  # Reached only without an exception.
        handler.handle(record)


def run_main(argv):
    del argv
    logging.get_absl_handler().addFilter(quiet_libraries)
    config, workdir = FLAGS.config, FLAGS.workdir
    try:
        with held_logs():  # Every check of the flags, config, data and workdir: no work yet.
            start_runtime()  # First: the config checks below count devices.
            if not workdir.strip():
                raise workdir_lib.WorkdirError("--workdir is empty; name a folder for the results.")
            workdir = os.path.abspath(workdir)
            if config.experiment not in PIPELINES:
                raise ConfigError(f"config.experiment={config.experiment!r} has no pipeline; "
                                  f"choose one of {', '.join(PIPELINES)}.")  # fmt: skip
            pipeline = importlib.import_module(PIPELINES[config.experiment])
            pipeline.check_config(config)  # Cheap checks first: they need no data.
            workdir_lib.check_usable(workdir)
            workdir_lib.check_writable(workdir, FLAGS.overwrite)
            data = pipeline.load(config)
        if FLAGS.dry_run:
            print(dry_run(config, workdir, pipeline, data))
            return
        with workdir_lib.locked(workdir, FLAGS.overwrite):
            tracking.attach_log_file(workdir)  # Every log line from here on, in <workdir>/log.txt.
            pipeline.run(config, workdir, data)
    except (ConfigError, DataError, workdir_lib.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def dry_run(config, workdir: str, pipeline, data) -> str:
    """The resolved config and the stages of the run, with what is cached of them."""
    from l2r import histories, pretrain, training  # Here: --help needs none of them.

    task, mean, std = pipeline.first_task(data)
    cfg = config.pretrain
    key = pretrain.fingerprint(config, training.to_device(task, mean, std))
    root = os.path.join(cfg.dir or os.path.join(workdir, "pretrain"), key)
    done = sum(os.path.exists(os.path.join(root, f"ckpt_{i}", "l2r_meta.json"))
               for i in range(cfg.num_checkpoints))  # fmt: skip
    cache = histories.cache_dir(config, workdir)
    cached = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    methods = ", ".join(config.task_b.methods)
    stages = [
        f"data: {config.data.source} {config.data.get('name') or ''} (loaded and checked)",
        f"pre-training: {cfg.num_checkpoints} network(s) in {root}: {done} cached",
    ]
    if "learned" in config.task_b.methods:
        meta = os.path.join(workdir, "meta")
        runs = sorted(os.listdir(meta)) if os.path.isdir(meta) else []
        stages.append(f"meta-training: {config.meta.episodes} episodes in {meta}/<key> "
                      f"(runs there now: {', '.join(runs) or 'none'}; the key depends on "
                      "the pre-trained networks, resumed when it matches)")  # fmt: skip
    stages.append(f"Task B: {methods} × {config.num_seeds} seeds; {cached} histories cached "
                  f"in {cache} (each keyed by its method, networks and data)")  # fmt: skip
    stages.append(f"report: results.md, results.json, figures and tb/ in {workdir}")
    lines = [f"{i}. {s}" for i, s in enumerate(stages, 1)]
    return (
        f"Config ({config.experiment}, preset {config.get('preset')}):\n{config}\n"
        + "Stages:\n"
        + "\n".join(lines)
    )


def main() -> None:
    """The console script: parses the command line and runs."""
    app.run(run_main, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
