"""The learned update rule (paper §4): the student step of meta-training and its Task-B method.

The student sees only Task B. Its backbone moves by `w ← w − α δ ⊙ ĝ` (with `meta.pull`, also
− ρ ⊙ (w − w0), ρ ∈ [0, meta.pull_max], w0 the backbone it started the task from) with gates δ
from the meta-learner (`l2r.metalearner`), fed with the weights, the gradient and the layer
taps of the same forward pass (no second pass); its Task-B head moves by plain SGD (§5.1:
"except the classification layer"). The Task-A head is never touched.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from l2r import metalearner, models, training
from l2r.methods.base import Batch, Method


class Rule(NamedTuple):
    """A meta-trained update rule: its meta-learner, θ and the student's learning rate."""

    ml: Any
    theta: Any
    learning_rate: float


class StudentState(NamedTuple):
    network: dict  # {'backbone', 'head_a', 'head_b'}
    lstm: metalearner.State  # the meta-learner's memory, carried across steps


def build_metalearner(model: models.Model, input_shape, config: metalearner.Config):
    """The meta-learner of `model`'s backbone, from shapes only (nothing is computed)."""
    input_shape = (1, *tuple(input_shape)[1:])
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape))
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    taps = jax.eval_shape(lambda p, x: model.apply(p, x, taps=True).taps, params, x)
    return metalearner.make(params, taps, config)


def student_step(model, ml, theta, learning_rate, network, lstm, x_b, y_b):
    """One student update on a Task-B batch.

    Args:
      model: the backbone `Model`.
      ml: the `MetaLearner` of that backbone.
      theta: meta-parameters.
      learning_rate: α (§3: 0.1).
      network: {'backbone', 'head_a', 'head_b'}.
      lstm: the meta-learner state.
      x_b: [B, H, W, C] Task-B images; y_b: [B] labels.

    Returns:
      (network, lstm, Task-B loss before the step, deltas).
    """

    def loss_fn(backbone, head_b):
        out = model.apply(backbone, x_b, taps=True)
        logits = models.apply_head(head_b, out.representation)
        return training.cross_entropy(logits, y_b), out.taps

    (loss, taps), (g_body, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        network["backbone"], network["head_b"]
    )
    deltas, pulls, lstm = ml.gates(theta, lstm, network["backbone"], g_body, taps)
    first_order = ml.config.first_order
    backbone = metalearner.update(
        network["backbone"], g_body, deltas, learning_rate, first_order=first_order,
        pulls=pulls, anchor=lstm.anchor,
    )  # fmt: skip
    head_b = jax.tree.map(lambda p, g: p - learning_rate * g, network["head_b"], g_head)
    return {**network, "backbone": backbone, "head_b": head_b}, lstm, loss, deltas


def make_learned(model, ml, theta, learning_rate: float, name: str = "learned") -> Method:
    """The trained rule as a Task-B method (meta-test: no teacher, §5)."""

    def init(network, data_a, key):
        del data_a, key
        return StudentState(network, ml.start(network["backbone"]))

    def step(state: StudentState, batch: Batch, key):
        del key
        network, lstm, loss, deltas = student_step(
            model, ml, theta, learning_rate, state.network, state.lstm, batch.x_b, batch.y_b
        )
        mean_delta = jnp.mean(jnp.stack([jnp.mean(d) for d in jax.tree.leaves(deltas)]))
        return StudentState(network, lstm), {"loss": loss, "mean_delta": mean_delta}

    params = {"theta": theta, "learning_rate": learning_rate, "rule": tuple(ml.config)}
    return Method(name=name, init=init, step=step, network=lambda s: s.network, params=params)
