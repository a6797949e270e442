"""Learners on a sequence of tasks with one head per task (Exp 5, paper §5.6).

A network of the three-task sequence carries the heads 'head_a' (Task 1, pre-trained),
'head_b' (Task 2) and 'head_c' (Task 3), with fixed meanings. The oracle teacher learns the
current task while rehearsing every earlier one, each example through its own task's head
(`multitask_loss`; Algorithm 1: D_A = D_1..k-1). Learners that see only the current task (SGD,
the learned rule) learn Task 3 through a view with 'head_b' and 'head_c' exchanged (`on_task_3`),
so the Task-B step of Exps 1-4 trains Task 3's head and leaves Task 2's as it was.
"""

import jax
import jax.numpy as jnp
import optax

from l2r import models
from l2r.methods.base import Method

HEADS = ("head_a", "head_b", "head_c")  # the heads of Tasks 1, 2, 3


def swap_heads(tree):
    """`tree` with 'head_b' and 'head_c' exchanged in every network (dict holding both) in it:
    the view in which a Task-B learner trains Task 3's head."""
    is_net = lambda x: isinstance(x, dict) and "head_b" in x and "head_c" in x  # noqa: E731
    swap = lambda x: {**x, "head_b": x["head_c"], "head_c": x["head_b"]} if is_net(x) else x  # noqa: E731
    return jax.tree.map(swap, tree, is_leaf=is_net)


def multitask_loss(model, network, x_a, y_a, x_b, y_b, phase, num_classes_1):
    """The teacher's loss on x_a ∪ x_b, each example through its own task's head (§4).

    Args:
      x_a, y_a: [Ba, ...], [Ba] the earlier tasks: labels 0..n1-1 are Task 1's, labels from
        n1 = `num_classes_1` on are Task 2's (offset by n1, as `tasks.union`).
      x_b, y_b: [Bb, ...], [Bb] the task being learned: Task 2 (phase 0) or Task 3 (phase 1).
      phase: int 0 or 1 (may be traced).

    Returns:
      (mean cross-entropy over the union, mean cross-entropy on B).
    """
    rep = model.apply(network["backbone"], jnp.concatenate([x_a, x_b])).representation
    from_2 = y_a >= num_classes_1
    task = jnp.concatenate([from_2.astype(jnp.int32), jnp.full(y_b.shape, 1 + phase, jnp.int32)])
    label = jnp.concatenate([jnp.where(from_2, y_a - num_classes_1, y_a), y_b])
    ce = jnp.stack([
        optax.softmax_cross_entropy_with_integer_labels(
            models.apply_head(network[h], rep),
            jnp.minimum(label, network[h]["bias"].shape[-1] - 1),  # other tasks' rows: masked
        )
        for h in HEADS
    ])  # fmt: skip
    ce = jnp.take_along_axis(ce, task[None], axis=0)[0]  # [Ba + Bb]
    return jnp.mean(ce), jnp.mean(ce[y_a.shape[0] :])


def teacher_step(model, learning_rate, num_classes_1, network, x_a, y_a, x_b, y_b, phase):
    """One multi-task SGD step of the teacher: (network, {'loss' on B, 'loss_union'})."""
    (loss, loss_b), grads = jax.value_and_grad(
        lambda net: multitask_loss(model, net, x_a, y_a, x_b, y_b, phase, num_classes_1),
        has_aux=True,
    )(network)
    network = jax.tree.map(lambda p, g: p - learning_rate * g, network, grads)
    return network, {"loss": loss_b, "loss_union": loss}


def make_multitask_teacher(
    model, learning_rate, num_classes_1, phase: int, name="teacher"
) -> Method:
    """The oracle on Task 2 (phase 0: A = Task 1) or Task 3 (phase 1: A = Task 1 ∪ Task 2)."""
    step = lambda net, batch, key: teacher_step(  # noqa: E731
        model, learning_rate, num_classes_1, net, batch.x_a, batch.y_a, batch.x_b, batch.y_b, phase
    )
    return Method(name, lambda net, data_a, key: net, step, lambda s: s, uses_task_a=True)


def on_task_3(method: Method) -> Method:
    """A Task-B learner that trains 'head_c' (Task 3) instead of 'head_b' (Task 2)."""

    def step(state, batch, key):
        state, metrics = method.step(swap_heads(state), batch, key)
        return swap_heads(state), metrics

    return method._replace(step=step)
