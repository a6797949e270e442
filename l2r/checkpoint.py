"""Orbax checkpoints of trained networks, with a small JSON file of metadata (such as the test
accuracy) beside the arrays, and the content digests that key cached stages: a stage's networks
are saved once (`cached_networks`) and found again by every run that would compute the same.
"""

import hashlib
import json
import os
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


def digest(arrays) -> str:
    """SHA-256 of a sequence of arrays (or of a pytree's leaves): dtypes, shapes and bytes.

    The key of cached stage outputs that depend on data or on networks by content."""
    h = hashlib.sha256()
    for a in jax.tree.leaves(arrays):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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
    if jax.process_count() > 1:
        tree = distributed.replicate(tree, _all_devices().mesh)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    if meta is not None:
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
    """
    path = os.path.abspath(path)
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
    return (distributed.local_copy(tree) if multi else tree), _read_meta(path)


def _read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def _describe(meta: dict) -> str:
    parts = [f"{k} {v:.4g}" for k, v in meta.items() if k != "test_accuracy"]
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
    found = np.array([exists(p) for p in paths])
    if jax.process_count() > 1:  # Every process must train (and save) the same networks.
        found = multihost_utils.broadcast_one_to_all(found)
    missing = [i for i in range(count) if not found[i]]
    t0 = time.time()
    for start in range(0, len(missing), group_size):
        ids = missing[start : start + group_size]
        for i, (net, meta) in zip(ids, train(ids), strict=True):
            save(paths[i], net, meta)
            logging.info("%s checkpoint %d: %s", what, i, _describe(meta))
    train_s = time.time() - t0
    nets, accs = [], []
    for i, p in enumerate(paths):
        net, meta = restore(p)
        nets.append(net)
        accs.append(meta.get("test_accuracy", np.nan))
        if i not in missing:
            logging.info("Reusing %s checkpoint %s (%s)", what, p, _describe(meta))
    return jax.tree.map(lambda *a: jnp.stack(a), *nets), np.asarray(accs), train_s
