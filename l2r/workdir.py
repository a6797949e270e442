"""The experiment's working directory: one writer at a time, finished results never clobbered.

A workdir holds `config.json`, `results.json`, tables, figures, TensorBoard scalars and cached
stage outputs (pre-trained checkpoints). Two guards protect it:
  * an exclusive, non-blocking `flock` on `<workdir>/.lock`, held for the whole run: the kernel
    drops it when the process dies, so a crashed run never leaves a stale lock behind;
  * a run refuses a workdir whose `results.json` already exists unless `overwrite=True`.

In a multi-process run (`l2r.distributed`) every process shares the one workdir: process 0 alone
takes the lock and writes the files (here and in `l2r.report`); Orbax checkpoints are collective
and are written by all processes.
"""

import contextlib
import fcntl
import json
import os

from l2r import distributed

RESULTS_FILE = "results.json"


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says how to proceed."""


def check_writable(workdir: str, overwrite: bool) -> None:
    """Raises WorkdirError when finished results exist and `overwrite` is False."""
    results = os.path.join(workdir, RESULTS_FILE)
    if os.path.exists(results) and not overwrite:
        raise WorkdirError(
            f"{workdir} already holds finished results ({results}). Pass --overwrite to replace "
            "them, or choose another --workdir."
        )


@contextlib.contextmanager
def locked(workdir: str, overwrite: bool = False):
    """Creates `workdir` if needed, checks it, and holds its lock for the `with` body.

    Processes other than 0 of a multi-process run only check: the lock is process 0's, and it
    stands for the whole run.
    """
    check_writable(workdir, overwrite)
    os.makedirs(workdir, exist_ok=True)
    if not distributed.is_main():
        yield workdir
        return
    fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(os.path.join(workdir, ".lock")) as f:
                holder = f.read().strip() or "another process"
            raise WorkdirError(
                f"{workdir} is in use by {holder}. Wait for that run to finish or choose another "
                "--workdir."
            ) from None
        # Checked again under the lock: a run that finished while we waited counts.
        check_writable(workdir, overwrite)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        yield workdir
    finally:
        os.close(fd)  # Closing the descriptor releases the flock.


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to `path` via a temporary file and a rename, so readers never see half.

    Only process 0 writes (see the module docstring); the others return at once.
    """
    if not distributed.is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
    os.replace(tmp, path)
