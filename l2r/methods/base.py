"""The one interface every Task-B learner implements.

A method is a bundle of pure functions over a pytree state, so the same scan/vmap machinery
(`l2r.run_b`) runs SGD, the multi-task teacher, the baselines and the learned rule, and the
same probe measures them:

    state = method.init(network, key)               # network: {'backbone','head_a','head_b'}
    state, metrics = method.step(state, batch, key) # one Task-B update
    network = method.network(state)                 # what the probe looks at
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Batch(NamedTuple):
    """One Task-B step's data. Task-A data is present only for methods that may see it."""

    x_b: jax.Array  # float32 [B, H, W, C]
    y_b: jax.Array  # int32 [B]
    x_a: jax.Array | None = None  # float32 [Ba, H, W, C] (teacher only)
    y_a: jax.Array | None = None


class Method(NamedTuple):
    name: str
    init: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, Batch, jax.Array], tuple[Any, dict]]
    network: Callable[[Any], Any]
    uses_task_a: bool = False  # True for the oracle teacher, which trains on A∪B.
