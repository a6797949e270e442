"""A run killed anywhere (kill -9) and rerun plainly ends with the numbers of a run never
interrupted, bitwise; a run whose caches were damaged heals them, with one warning each.

Exp 1 `smoke` through the command line, saving a meta-training checkpoint after every window,
so that kills land in pre-training, in its Orbax save, in meta-training windows and their saves,
in the Task-B runs and probes, and while the figures are written.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import golden_numbers
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=exp1.py:smoke", "--config.meta.checkpoint_minutes=0"]
# The compiled programs are shared by every run here (they do not change the numbers).
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "l2r-jax-tests"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}  # fmt: skip
# Where the kills land: a line of the run's log (or, for the figures, a file that appears).
KILL_POINTS = [
    r"\[pretrain x1\]",  # Pre-training done, its Orbax save under way.
    r"Meta-training run \w+ starts",  # Meta-training compiling its first window.
    r"\[meta-train\] \d+/4",  # A window done, its Orbax save under way.
    r"Before the first phase",  # The first Task-B method training.
    r"\[sgd_x0.1 x2\]",  # A later method's training and probes.
    "results.md",  # The figures being written (results.json comes last).
]


def command(workdir) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *ARGS, f"--workdir={workdir}"]


def run(workdir) -> str:
    """Runs to the end; returns the log."""
    out = subprocess.run(command(workdir), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def run_and_kill(workdir, point: str) -> bool:
    """Starts the run and kills it (SIGKILL) at `point`; False if it finished first."""
    proc = subprocess.Popen(command(workdir), cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        if point.endswith(".md"):  # A file: poll for it.
            target = os.path.join(workdir, point)
            while proc.poll() is None and not os.path.exists(target):
                time.sleep(0.01)
        else:
            for line in proc.stderr:
                if re.search(point, line):
                    break
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return killed


def numbers(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return golden_numbers.numbers(json.load(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    run(workdir)
    return workdir


@pytest.mark.slow
def test_kill_9_anywhere_then_plain_reruns_give_the_same_numbers(reference, tmp_path):
    workdir = tmp_path / "killed"
    killed = [point for point in KILL_POINTS if run_and_kill(workdir, point)]
    assert not (workdir / "results.json").exists()
    assert len(killed) >= len(KILL_POINTS) - 1, killed  # The last may lose the race.
    run(workdir)
    assert golden_numbers.differences(numbers(reference), numbers(workdir), atol=0) == []
    names = {os.path.basename(p) for p in glob.glob(str(reference / "*.png"))}
    assert names and names == {os.path.basename(p) for p in glob.glob(str(workdir / "*.png"))}


def damage(workdir) -> None:
    """Truncates a Task-B cache, garbles the pre-trained checkpoint's metadata and flips a byte
    of the newest meta-training checkpoint."""
    npz = glob.glob(str(workdir / "task_b" / "learned-*.npz"))[0]
    with open(npz, "r+b") as f:
        f.truncate(os.path.getsize(npz) // 2)
    (meta_json,) = glob.glob(str(workdir / "pretrain" / "*" / "ckpt_0" / "l2r_meta.json"))
    with open(meta_json, "wb") as f:
        f.write(b"\xff\xfe{garbled")
    steps = glob.glob(str(workdir / "meta" / "*" / "*" / "state" / "ocdbt.process_0" / "d" / "*"))
    newest = max(steps, key=lambda p: int(p.split(os.sep)[-5]))
    data = bytearray(open(newest, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(newest, "wb") as f:
        f.write(data)


@pytest.mark.slow
def test_damaged_caches_heal_with_one_warning_each(reference, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(reference, workdir)
    os.remove(workdir / "results.json")  # An unfinished run, its caches damaged.
    damage(workdir)
    log = run(workdir)
    warnings = [line for line in log.splitlines() if "Damaged" in line]
    assert len(warnings) == 3, warnings
    for what in ("Task-B cache", "Pre-trained checkpoint", "meta-training checkpoint"):
        assert sum(what in w for w in warnings) == 1, (what, warnings)
    assert "Traceback" not in log
    assert golden_numbers.differences(numbers(reference), numbers(workdir), atol=0) == []
