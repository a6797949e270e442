"""Orbax checkpoints for pre-trained networks (and, later, meta-training state).

A checkpoint is a directory written by Orbax's `StandardCheckpointer` (which writes to a
temporary directory and renames it when complete, so a killed save leaves no half checkpoint),
with a small JSON file beside the arrays for metadata such as the test accuracy.
"""

import json
import os

import jax
import orbax.checkpoint as ocp

META_FILE = "l2r_meta.json"


def save(path: str, tree, meta: dict | None = None) -> None:
    path = os.path.abspath(path)
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
    """Restores the arrays of `path` (shaped like `like` when given) and its metadata."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    if like is not None:
        like = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    tree = checkpointer.restore(path, like)
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    return tree, meta
