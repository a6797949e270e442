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
import tempfile

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


def check_usable(workdir: str) -> None:
    """Raises WorkdirError (one line, with the fix) when `workdir` cannot hold a run: it is a
    file, or it (or the folder it would be made in) cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f"--workdir {workdir} is a file, not a folder; choose another --workdir."
        )
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--workdir {workdir} cannot be made: {existing} is a file; "
                           "choose another --workdir.")  # fmt: skip
    try:  # A real write: permissions, a read-only filesystem and root alike are answered.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir} is not writable ({existing}: {e.strerror}); "
                           "choose another --workdir.") from None  # fmt: skip


@contextlib.contextmanager
def locked(workdir: str, overwrite: bool = False):
    """Creates `workdir` if needed, checks it, and holds its lock for the `with` body.

    Processes other than 0 of a multi-process run only check: the lock is process 0's, and it
    stands for the whole run.
    """
    check_usable(workdir)
    check_writable(workdir, overwrite)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # E.g. a read-only filesystem, which os.access does not see.
        raise WorkdirError(f"--workdir {workdir} cannot be made ({e.strerror}); choose another "
                           "--workdir.") from None  # fmt: skip
    if not distributed.is_main():
        yield workdir
        return
    try:
        fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # A read-only filesystem or folder.
        raise WorkdirError(f"--workdir {workdir} is not writable ({e.strerror}); choose another "
                           "--workdir.") from None  # fmt: skip
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


def write_atomic(path, data: bytes) -> str:
    """Writes `data` to `path` through a temporary file in the same folder and a rename, so
    readers (and a rerun after a kill) never see half a file. The file gets mode 0666 less the
    umask (0644 under the usual 022), so teammates on a shared filesystem can read results.

    Only process 0 writes (see the module docstring); the others return the path at once.
    """
    path = os.fspath(path)
    if not distributed.is_main():
        return path
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp_{os.getpid()}_{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # Atomic on POSIX: source and target share a folder.
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str, obj) -> str:
    """Writes `obj` as JSON to `path` atomically (`write_atomic`)."""
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False).encode())
