"""Orbax checkpoints of trained networks, with a small JSON file of metadata (such as the test
accuracy) beside the arrays, and the content digests that key cached stages: a stage's networks
are saved once (`cached_networks`) and found again by every run that would compute the same.
"""

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from l2r import distributed

META_FILE = "l2r_meta.json"
DIGEST_KEY = "arrays_sha256"  # In the metadata: `digest` of the arrays, checked on restore.
FILES_KEY = "files_sha256"  # In the metadata: `file_digests` of the checkpoint's files.
MANIFEST_FILE = "l2r_files.json"  # `file_digests` beside a checkpoint with no l2r metadata.


class DamagedCheckpoint(RuntimeError):
    """A cached checkpoint cannot be read, or its arrays differ from those written."""


def digest(arrays) -> str:
    """SHA-256 of a sequence of arrays (or of a pytree's leaves): dtypes, shapes and bytes.
    With several processes, every process must call it for arrays sharded over processes.

    The key of cached stage outputs that depend on data or on networks by content."""
    h = hashlib.sha256()
    for a in jax.tree.leaves(arrays):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            # Sharded over processes: every process gathers the whole array (a collective).
            a = multihost_utils.process_allgather(a, tiled=True)
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_digests(folder: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file below `folder`, but l2r's own metadata files.

    Recorded when a checkpoint is written and compared before it is read, so a truncated or
    altered file is found without handing it to Orbax (whose failing reads, done in parallel,
    print pages of tracebacks before they raise)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name in (META_FILE, MANIFEST_FILE) or name.endswith(".tmp"):
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, folder)] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(out.items()))


def check_files(folder: str, expected: dict[str, str]) -> None:
    """Raises DamagedCheckpoint when the files below `folder` differ from `expected`."""
    found = file_digests(folder)
    if found != expected:
        bad = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
        raise DamagedCheckpoint(f"{folder}: {len(bad)} file(s) differ from those written, "
                                f"e.g. {bad[0]}")  # fmt: skip


def write_manifest(folder: str) -> None:
    """Records `file_digests(folder)` in `folder/l2r_files.json` (process 0), for
    `verify_manifest`."""
    if distributed.is_main():
        tmp = os.path.join(folder, f"{MANIFEST_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(file_digests(folder), f, indent=1)
        os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def verify_manifest(folder: str) -> None:
    """Checks `folder` against its `l2r_files.json`; one without it (written before l2r kept
    one, or killed just before) is left to the reader's own checks."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            expected = json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path} cannot be read ({describe_error(e)})") from e
    check_files(folder, expected)


def _all_devices() -> jax.sharding.NamedSharding:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return jax.sharding.NamedSharding(mesh, distributed.REPLICATED)


def save(path: str, tree, meta: dict | None = None) -> None:
    """Writes `tree` to `path` with Orbax's `StandardCheckpointer` (through a temporary
    directory renamed when complete, so a killed save leaves no half checkpoint), and `meta`
    beside it last (`exists` looks for it).

    Several processes (`jax.distributed`) compute the same networks, so the arrays are made
    global arrays replicated over all devices and Orbax writes them once, collectively: every
    process must call this.
    """
    path = os.path.abspath(path)
    if meta is not None:
        meta = {**meta, DIGEST_KEY: digest(tree)}
    if jax.process_count() > 1:
        tree = distributed.replicate(tree, _all_devices().mesh)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    if meta is not None:
        if jax.process_count() > 1:  # Every process's files are in place.
            multihost_utils.sync_global_devices(f"l2r_saved_{os.path.basename(path)}")
        meta[FILES_KEY] = file_digests(path)
        # Every process of a multi-host run gets here; each writes through its own temporary
        # name, and the rename of identical content is atomic, so none sees a half file.
        tmp = os.path.join(path, f"{META_FILE}.{jax.process_index()}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(path, META_FILE))


def exists(path: str) -> bool:
    """True only for a finished checkpoint (its metadata is written last)."""
    return os.path.exists(os.path.join(path, META_FILE))


def restore(path: str, like=None):
    """Restores the arrays of `path` (shaped like `like` when given) and its metadata.

    Without `like`, on this process's first device whatever topology wrote the checkpoint;
    with several processes, as each process's local copy of arrays replicated on all devices
    (however many processes and devices there are now).

    Raises:
      DamagedCheckpoint: the files cannot be read, or the arrays' digest differs from the one
        recorded when they were saved (a truncated or altered file).
    """
    path = os.path.abspath(path)
    try:
        meta = _read_meta(path)
        if FILES_KEY in meta:
            check_files(path, meta.pop(FILES_KEY))
        tree = _restore_arrays(path, like)
    except DamagedCheckpoint:
        raise
    except Exception as e:  # Orbax and TensorStore raise many types, some bare Exception.
        raise DamagedCheckpoint(f"{path} cannot be read ({describe_error(e)})") from e
    expected = meta.pop(DIGEST_KEY, None)
    if expected is not None and digest(tree) != expected:
        raise DamagedCheckpoint(f"{path} holds other arrays than were saved (digest mismatch)")
    return tree, meta


def describe_error(e: BaseException) -> str:
    """`e` in one short line, for a warning or a message: "Type: its first line"."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def _restore_arrays(path: str, like):
    checkpointer = ocp.StandardCheckpointer()
    multi = jax.process_count() > 1
    if like is None or multi:
        shapes = like if like is not None else checkpointer.metadata(path).item_metadata.tree
        sharding = (_all_devices() if multi else
                    jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))  # fmt: skip
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            shapes)  # fmt: skip
    else:
        like = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    tree = checkpointer.restore(path, like)
    return distributed.local_copy(tree) if multi else tree


def _read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE), "rb") as f:
        meta = json.loads(f.read().decode())
    if not isinstance(meta, dict):
        raise ValueError(f"{META_FILE} holds no JSON object")
    return meta


def discard(path: str) -> None:
    """Removes a damaged checkpoint so that it is written anew (process 0; all processes wait
    for it)."""
    if distributed.is_main():
        shutil.rmtree(path, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"l2r_discard_{os.path.basename(path)}")


def _describe(meta: dict) -> str:
    parts = [f"{k} {v:.4g}" for k, v in meta.items()
             if k != "test_accuracy" and isinstance(v, (int, float))]  # fmt: skip
    if "test_accuracy" in meta:
        parts.insert(0, f"Task-A test accuracy {100 * meta['test_accuracy']:.2f}%")
    return ", ".join(parts)


def cached_networks(
    root: str,
    count: int,
    group_size: int,
    train: Callable[[list[int]], Sequence[tuple[dict, dict]]],
    what: str,
):
    """Networks 0..count-1 cached under `root/ckpt_<i>`, training only the missing ones.

    Args:
      root: the folder of one recipe (its name should fingerprint everything that shapes the
        networks, so a changed recipe never reuses stale checkpoints).
      count: how many networks.
      group_size: missing networks trained together per `train` call.
      train: ids -> one (network, metadata) pair per id; metadata holds "test_accuracy" (Task A)
        where the recipe measures one.
      what: a name for the log lines ("Pre-trained", "HAT", ...).

    Returns:
      (networks stacked [count, ...], test accuracies [count] (NaN where not measured), seconds
       spent training).
    """
    paths = [os.path.join(root, f"ckpt_{i}") for i in range(count)]
    restored = {}
    for i, p in enumerate(paths):
        if exists(p):
            try:
                restored[i] = restore(p)
            except DamagedCheckpoint as e:
                logging.warning("Damaged %s checkpoint, recomputed: %s.", what, e)
    found = np.array([i in restored for i in range(count)])
    if jax.process_count() > 1:  # Every process must train (and save) the same networks.
        found = multihost_utils.broadcast_one_to_all(found)
    missing = [i for i in range(count) if not found[i]]
    t0 = time.time()
    for start in range(0, len(missing), group_size):
        ids = missing[start : start + group_size]
        for i, (net, meta) in zip(ids, train(ids), strict=True):
            discard(paths[i])  # A damaged or half-written one, if any.
            save(paths[i], net, meta)
            logging.info("%s checkpoint %d: %s", what, i, _describe(meta))
    train_s = time.time() - t0
    nets, accs = [], []
    for i, p in enumerate(paths):
        # Networks just trained are read back too: a reused run then computes with the very
        # same arrays as the run that trained them.
        net, meta = restored[i] if i in restored and found[i] else restore(p)
        nets.append(net)
        accs.append(meta.get("test_accuracy", np.nan))
        if i not in missing:
            logging.info("Reusing %s checkpoint %s (%s)", what, p, _describe(meta))
    return jax.tree.map(lambda *a: jnp.stack(a), *nets), np.asarray(accs), train_s
