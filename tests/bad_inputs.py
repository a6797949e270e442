"""The corpus of bad command lines that must stop at once: one line on stderr, exit status 2.

Each case is (name, extra arguments, words its message must hold). `cli_test.py` runs every one
through `python -m experiments.run`; `python -m tests.bad_inputs` prints them as a table with
the seconds each took to exit (the table in the issue-13 note).
"""

import os
import subprocess
import sys
import time

FIG1 = "--config=fig1.py:smoke"
EXP1 = "--config=exp1.py:smoke"
EXP2 = "--config=exp2.py:smoke"

# {workdir}: a fresh folder; {finished}: a workdir holding finished results; {file}: a file.
CASES = [
    # Numbers a config must not hold (the check_config holes).
    ("task_b lr nan", [FIG1, "--config.task_b.learning_rate=nan"], "task_b.learning_rate=nan"),
    ("task_b lr < 0", [FIG1, "--config.task_b.learning_rate=-0.1"], "task_b.learning_rate=-0.1"),
    ("task_b lr 0", [FIG1, "--config.task_b.learning_rate=0"], "task_b.learning_rate=0"),
    ("pretrain lr inf", [FIG1, "--config.pretrain.learning_rate=inf"], "pretrain.learning_rate"),
    ("readout lr nan", [FIG1, "--config.readout.learning_rate=nan"], "readout.learning_rate"),
    ("batch < 0", [FIG1, "--config.task_b.batch_size=-3"], "task_b.batch_size=-3"),
    ("batch 0", [FIG1, "--config.task_b.batch_size=0"], "task_b.batch_size=0"),
    ("ckpt minutes < 0", [EXP1, "--config.meta.checkpoint_minutes=-1"], "checkpoint_minutes"),
    ("max windows < 0", [EXP1, "--config.meta.max_windows=-1"], "meta.max_windows"),
    (
        "lwf coef nan",
        [FIG1, "--config.task_b.methods=('lwf',)", "--config.task_b.lwf.coef=nan"],
        "task_b.lwf.coef",
    ),
    ("no methods", [EXP1, "--config.task_b.methods=()"], "task_b.methods is empty"),
    ("episodes vs parallel", [EXP1, "--config.meta.num_episodes_parallel=3"], "multiple of"),
    (
        "T-BPTT > episode",
        [EXP1, "--config.meta.tbptt=8", "--config.meta.tbptt_max=8"],
        "longer than an episode",
    ),
    ("seeds 0", [FIG1, "--config.num_seeds=0"], "num_seeds"),
    ("steps 0", [FIG1, "--config.task_b.steps=0"], "task_b.steps"),
    ("unknown method", [FIG1, "--config.task_b.methods=('sgd','nope')"], "nope"),
    ("unknown rep loss", [EXP1, "--config.meta.rep_loss=nope"], "meta.rep_loss"),
    ("unknown gate", [EXP1, "--config.meta.gate=nope"], "meta.gate"),
    ("train ckpts too many", [EXP1, "--config.meta.train_checkpoints=9"], "train_checkpoints"),
    ("n-way 1", [EXP2, "--config.pools.n_way=1"], "pools.n_way"),
    ("unknown model", [FIG1, "--config.model.name=nope"], "nope"),
    ("unknown data source", [FIG1, "--config.data.source=nope"], "nope"),
    ("unknown experiment", [FIG1, "--config.experiment=exp9"], "exp9"),
    # The command line and the config file.
    ("mistyped field", [FIG1, "--config.task_b.stepz=5"], "did you mean --config.task_b.steps"),
    ("unknown group", [FIG1, "--config.nope.x=3"], "no field 'nope'"),
    ("group set to a number", [FIG1, "--config.task_b=5"], "--config.task_b=5"),
    ("not a number", [FIG1, "--config.task_b.steps=abc"], "--config.task_b.steps=abc"),
    ("missing config file", ["--config=experiments/configs/nope.py"], "not found"),
    ("unknown preset", ["--config=fig1.py:nope"], "Unknown preset 'nope'"),
    ("mistyped flag", [FIG1, "--workdirr=x"], "Did you mean: workdir"),
    ("no --config", [], "--config"),
    ("no --workdir", [FIG1, "--workdir=None"], "--workdir"),
    ("negative devices", [FIG1, "--num_cpu_devices=-1"], "num_cpu_devices"),
    # The workdir.
    ("workdir is a file", [FIG1, "--workdir={file}"], "is a file"),
    ("workdir below a file", [FIG1, "--workdir={file}/sub"], "is a file"),
    ("workdir empty", [FIG1, "--workdir="], "--workdir is empty"),
    ("finished workdir", [FIG1, "--workdir={finished}"], "already holds finished results"),
    (
        "bad input, finished workdir",
        [FIG1, "--config.task_b.batch_size=0", "--workdir={finished}"],
        "task_b.batch_size=0",
    ),
    # The data.
    (
        "TFDS offline",
        ["--config=fig1.py:paper", "--config.data.data_dir={workdir}/tfds"],
        "is not prepared",
    ),
    (
        "missing image folder",
        [FIG1, "--config.data.source=image_folder", "--config.data.root={workdir}/none"],
        "{workdir}/none",
    ),
    ("classes overlap", [FIG1, "--config.data.classes_b=(0,4,5)"], "share classes"),
    ("class out of range", [FIG1, "--config.data.classes_b=(3,4,9)"], "out of range"),
]


def command(args: list[str], workdir: str, finished: str, file: str) -> list[str]:
    """The full command line of a case: a fresh --workdir unless the case names its own."""
    fill = lambda a: a.format(workdir=workdir, finished=finished, file=file)  # noqa: E731
    args = [fill(a) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={workdir}/run")
    args = [a for a in args if a != "--workdir=None"]
    return [sys.executable, "-m", "experiments.run", *args]


def run_case(args: list[str], workdir: str, finished: str, file: str, timeout: float = 120):
    """(exit status, stderr, seconds) of one case, run from the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.monotonic()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(command(args, workdir, finished, file), cwd=root, capture_output=True,
                         text=True, timeout=timeout, env=env)  # fmt: skip
    return out.returncode, out.stderr, time.monotonic() - t0


def make_finished(path: str) -> None:
    """A workdir as a finished run leaves it (results.json last)."""
    os.makedirs(path, exist_ok=True)
    for name, text in (("config.json", "{}"), ("results.md", "# done\n"), ("results.json", "{}")):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        finished, file = os.path.join(tmp, "finished"), os.path.join(tmp, "a_file")
        make_finished(finished)
        open(file, "w").close()
        print("| # | bad input | exit | lines | seconds | message |\n|---|---|---|---|---|---|")
        for i, (name, args, _) in enumerate(CASES, 1):
            work = os.path.join(tmp, f"case{i}")
            rc, err, seconds = run_case(args, work, finished, file)
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            message = lines[-1][:110] if lines else err.strip().splitlines()[-1][:110]
            print(f"| {i} | {name} | {rc} | {len(err.strip().splitlines())} | {seconds:.1f} | "
                  f"{message.replace('|', '/')} |", flush=True)  # fmt: skip
