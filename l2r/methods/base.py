"""The one interface every Task-B learner implements.

A method is a bundle of pure functions over a pytree state, so the same scan/map machinery
(`l2r.task_b`) runs SGD, the multi-task teacher, the baselines and the learned rule, and the
same probe measures them:

    state = method.init(network, data_a, key)       # network: {'backbone','head_a','head_b'}
    state, metrics = method.step(state, batch, key) # one Task-B update
    network = method.network(state)                 # what the probe looks at
    state = method.switch(state, data_done, key)    # a later task begins (Exp 5)

`network` is the pre-trained network with a fresh Task-B head; `data_a` is Task A on the
device (`training.DeviceTask`), for methods that summarise A before B starts (EWC's Fisher);
Task-B learners never see Task-A batches during B, except the oracle teacher
(`uses_task_a`). Learning several tasks in turn (Exp 5), a method has one `Method` per task;
each later one may give `switch`, which turns the state left by the previous task (whose data is
`data_done`) into its own: LwF records the new targets, EWC adds the finished task's Fisher.
A method whose representation depends on the task (HAT's masks) gives
`represent(network, x, task)` with task 0 = A, 1 = B; the default is the backbone's output.
Such a method also gives `taps(network, x, task)`, the layers' `Tap`s of that same forward pass,
so that per-layer CKA measures what the method computes (without it: the plain backbone's).
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
    init: Callable[[Any, Any, jax.Array], Any]  # (network, data_a, key) -> state
    step: Callable[[Any, Batch, jax.Array], tuple[Any, dict]]
    network: Callable[[Any], Any]
    uses_task_a: bool = False  # True for the oracle teacher, which trains on A∪B.
    # (network, x [B,H,W,C], task: 0 = A, 1 = B) -> representation [B, D]; None = backbone's.
    represent: Callable[[Any, jax.Array, int], jax.Array] | None = None
    # What the method's behaviour depends on beyond the config's `task_b` group (the learned
    # rule's θ and its hyper-parameters): part of the key under which its results are cached.
    params: Any = None
    # (state after the previous task, that task's data (DeviceTask), key) -> state; None: the
    # state carries on as it is. Called when this method takes over from the previous task's.
    switch: Callable[[Any, Any, jax.Array], Any] | None = None
    # (network, x [B,H,W,C], task) -> {layer path: models.Tap} of `represent`'s forward pass
    # (`Model.apply(..., taps=True)`); None = the backbone's. What per-layer CKA measures.
    taps: Callable[[Any, jax.Array, int], dict] | None = None
