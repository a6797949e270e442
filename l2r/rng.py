"""Named, reproducible random streams.

Everything random in an experiment derives from `config.seed` through a stream name and integer
ids (checkpoint index, Task-B seed, ...), so adding a new stream never shifts an existing one and
the same config always gives the same numbers.
"""

import hashlib

import jax
import numpy as np


def seed_for(root: int, stream: str, *ids: int) -> int:
    """A 31-bit integer seed for `stream` (e.g. "pretrain", "task_b") and `ids` under `root`."""
    digest = hashlib.sha256(f"{root}/{stream}/{'/'.join(map(str, ids))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def key_for(root: int, stream: str, *ids: int) -> jax.Array:
    """A typed JAX key for the same stream."""
    return jax.random.key(seed_for(root, stream, *ids))


def numpy_rng(root: int, stream: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(root, stream, *ids))
