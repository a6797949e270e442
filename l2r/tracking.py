"""Runs one can watch while they go and trace back after: metric writers, a log file, provenance.

Metric writers (`write_scalars(step, {name: value})`, `flush`, `close`; after clu's
`MetricWriter`) go to TensorBoard, one event-file run per name in `<workdir>/tb/<run>/`, and
to the absl log. `writers(workdir)` hands out one writer per run name: Task B streams each
method to `task_b/<method>` as it probes, so the methods overlay, and meta-training streams
every window to `meta`. Only process 0 writes; the other processes get writers that do nothing.
`attach_log_file` copies every log line into `<workdir>/log.txt`; `provenance` says which code,
libraries, devices and command made a result; `Stages` logs where a run is among its stages.
"""

import datetime
import importlib.metadata
import itertools
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np
from absl import logging as absl_logging

from l2r import console, distributed

LOG_FILE = "log.txt"
TB_DIR = "tb"
# Distributions whose versions a result records (`provenance`), by the name it records them as.
_PACKAGES = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
             "orbax": "orbax-checkpoint", "numpy": "numpy"}  # fmt: skip
_event_files = itertools.count()  # Tells apart event files opened in the same second.


class MetricWriter(Protocol):
    """What the runners write metrics to (clu's `MetricWriter`, scalars only)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NoOpWriter:
    """Writes nothing: the default of every runner, and what processes other than 0 get."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


NOOP = NoOpWriter()


class TensorBoardWriter:
    """Scalars as TensorBoard events in `logdir` (one run), written and flushed at once, so that
    TensorBoard shows each point while the run goes on and a killed run keeps what it wrote.
    Non-finite values (the loss before any step, a diverged run's mean) are left out. The event
    file is made by the first write: a run that writes nothing (a finished meta-training that
    resumes) leaves no empty one.

    tensorboardX's own `SummaryWriter` hands events to a thread and its `flush` does not wait for
    them: its plain record writer is used instead."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._events = None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX import summary  # Lazy, as the imports below: only writers pay them.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        values = [summary.scalar(k, float(v)).value[0] for k, v in scalars.items()
                  if math.isfinite(float(v))]  # fmt: skip
        if not values:
            return
        if self._events is None:
            os.makedirs(self.logdir, exist_ok=True)
            suffix = f".{os.getpid()}.{next(_event_files)}"
            self._events = EventsWriter(os.path.join(self.logdir, "events"), suffix)
        event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values))  # fmt: skip
        self._events.write_event(event)
        self._events.flush()

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


class LogWriter:
    """Scalars as one absl log line per write: `[task_b/sgd] step 20: loss=0.512, ...`."""

    def __init__(self, name: str):
        self.name = name

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
        absl_logging.info("[%s] step %d: %s", self.name, int(step), values)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter:
    """Writes to every one of `writers`."""

    def __init__(self, writers):
        self.writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


class Writers:
    """One `MetricWriter` per run name, made on first use: TensorBoard in `<tb_dir>/<run>/`
    (run names may nest: `task_b/sgd`) and, when `log`, the absl log. `tb_dir` None: every
    run gets `NOOP`. Usable as a context manager; `close` closes every run's writer."""

    def __init__(self, tb_dir: str | None, log: bool = True):
        self.tb_dir, self.log = tb_dir, log
        self._runs: dict[str, MetricWriter] = {}

    def __call__(self, run: str) -> MetricWriter:
        if self.tb_dir is None:
            return NOOP
        if run not in self._runs:
            tb = TensorBoardWriter(os.path.join(self.tb_dir, run))
            self._runs[run] = MultiWriter([tb, LogWriter(run)]) if self.log else tb
        return self._runs[run]

    def flush(self) -> None:
        for w in self._runs.values():
            w.flush()

    def close(self) -> None:
        for w in self._runs.values():
            w.close()
        self._runs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NO_WRITERS = Writers(None)


def writers(workdir: str, log: bool = True) -> Writers:
    """The run writers of `workdir` (TensorBoard runs in `<workdir>/tb/`); in any process but
    process 0 of a multi-process run, writers that write nothing."""
    if not distributed.is_main():
        return NO_WRITERS
    return Writers(os.path.join(os.fspath(workdir), TB_DIR), log)


def seed_means(metrics: Mapping) -> dict[str, float]:
    """{name: mean over the seeds} of per-seed metrics {name: [S]} (NaN where one is NaN)."""
    return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in metrics.items()}


def write_history(writer: MetricWriter, steps, history: Mapping) -> None:
    """Writes a finished history {name: [S, P]} (e.g. read from a cache) as its seed means at
    each of the P `steps`, as streaming it would have."""
    for i, step in enumerate(steps):
        writer.write_scalars(step, seed_means({k: np.asarray(v)[:, i] for k, v in history.items()}))


def _git(root: str) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the checkout differs from it) of the git checkout holding `root`,
    or (None, None) when it is none or git cannot say."""

    def git(*args):
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=30, check=True)  # fmt: skip
        return out.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):  # No git, not a checkout, too slow.
        return None, None
    return commit, dirty


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """What made a result, for `results.json`: `commit` and `dirty` (the git checkout of the l2r
    source tree, None when it is not one), `versions` (python, jax, jaxlib, flax, optax,
    orbax, numpy, l2r), `devices` (`distributed.describe()` and the device kind), `command`
    (sys.argv), `hostname` and `time_utc`. Never raises for want of git or a package."""
    import jax  # The backend is up by the time a result is assembled.

    commit, dirty = _git(os.path.dirname(os.path.abspath(__file__)))
    versions = {"python": sys.version.split()[0]}
    versions |= {name: _version(dist) for name, dist in _PACKAGES.items()}
    # Read from sys.modules, not `import l2r`: the package's __init__ would then join the source
    # digest of every stage key that reads this module (`l2r.keys`).
    versions["l2r"] = sys.modules["l2r"].__version__
    return {
        "commit": commit,
        "dirty": dirty,
        "versions": versions,
        "devices": distributed.describe(),
        "device_kind": jax.devices()[0].device_kind,
        "command": list(sys.argv),
        "hostname": socket.gethostname(),
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


_log_handler: logging.Handler | None = None  # The one `attach_log_file` installed.


def attach_log_file(workdir: str) -> logging.Handler | None:
    """Copies every log line (absl's and the standard library's, at INFO and above) into
    `<workdir>/log.txt` from now on, in absl's format. The file (0644) is appended to across
    reruns, each run starting with one header line. Replaces the file of an earlier call, so one
    process logs to one workdir; process 0 only (None elsewhere).

    Returns:
      The handler on the root logger (`detach_log_file` removes it), or None.
    """
    global _log_handler
    detach_log_file()
    if not distributed.is_main():
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOG_FILE)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.chmod(path, 0o644)  # Readable by teammates whatever the umask, as the other artefacts.
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"==== {now} {socket.gethostname()} pid {os.getpid()}: "
                f"{' '.join(sys.argv)}\n")  # fmt: skip
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(absl_logging.PythonFormatter())
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)  # absl's logger hands its records on to the root.
    _log_handler = handler
    return handler


def detach_log_file() -> None:
    """Stops copying log lines into the file of `attach_log_file`, if any."""
    global _log_handler
    if _log_handler is not None:
        logging.getLogger().removeHandler(_log_handler)
        _log_handler.close()
        _log_handler = None


class Stages:
    """Logs where a run is among its stages, e.g. `[exp1] stage 2/5: meta-training (after 41s)`.
    Stages given as None (one a run skips) are left out of the count."""

    def __init__(self, name: str, *stages: str | None, clock=time.monotonic):
        self.name, self.stages, self._clock = name, [s for s in stages if s], clock
        self._t0 = clock()

    def begin(self, stage: str) -> str:
        """Logs and returns the line that `stage` (one of the stages) begins."""

        i = self.stages.index(stage) + 1
        line = f"[{self.name}] stage {i}/{len(self.stages)}: {stage}"
        if i > 1:
            line += f" (after {console.format_duration(self._clock() - self._t0)})"
        absl_logging.info("%s", line)
        return line
