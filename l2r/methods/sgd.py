"""Plain SGD on Task B (all layers), and the multi-task teacher (SGD on A∪B).

§3/§5.1: Task B is learned with SGD at the Task-A learning rate (α = 0.1), no momentum; the
"SGD x0.1" baseline divides it by ten. The teacher is the oracle: the same SGD on the union of
an A batch and a B batch (64 + 64 = 128 examples, §3), each through its own head, so it learns
B while rehearsing A.
"""

import jax

from l2r import models, training
from l2r.methods.base import Batch, Method


def _logits(model, network, x, head):
    return models.apply_head(network[head], model.apply(network["backbone"], x).representation)


def make_sgd(
    model: models.Model, learning_rate: float, name: str = "sgd", kernel_scale: float = 1.0
) -> Method:
    """SGD on the Task-B loss; updates the backbone and the Task-B head, never the A head.

    `kernel_scale` multiplies the steps of the backbone's conv and dense kernels only (leaves
    with ndim > 1): a hand-made "slow kernels, free norms and biases" rule, the pattern the
    meta-learned gates of Exp 1 settle on (docs/results.md)."""

    def loss_fn(trainable, frozen_head_a, batch):
        network = {**trainable, "head_a": frozen_head_a}
        return training.cross_entropy(_logits(model, network, batch.x_b, "head_b"), batch.y_b)

    def step(network, batch: Batch, key):
        del key
        trainable = {"backbone": network["backbone"], "head_b": network["head_b"]}
        loss, grads = jax.value_and_grad(loss_fn)(trainable, network["head_a"], batch)
        scale = {
            "backbone": jax.tree.map(
                lambda p: kernel_scale if p.ndim > 1 else 1.0, trainable["backbone"]
            ),
            "head_b": jax.tree.map(lambda p: 1.0, trainable["head_b"]),
        }
        trainable = jax.tree.map(lambda p, g, k: p - learning_rate * k * g, trainable, grads, scale)
        return {**network, **trainable}, {"loss": loss}

    return Method(
        name=name, init=lambda network, data_a, key: network, step=step, network=lambda s: s
    )


def make_teacher(model: models.Model, learning_rate: float, name: str = "teacher") -> Method:
    """Multi-task SGD on A∪B: the mean cross-entropy over both batches, each with its head."""

    def loss_fn(network, batch: Batch):
        ce_a = training.cross_entropy(_logits(model, network, batch.x_a, "head_a"), batch.y_a)
        ce_b = training.cross_entropy(_logits(model, network, batch.x_b, "head_b"), batch.y_b)
        n_a, n_b = batch.y_a.shape[0], batch.y_b.shape[0]
        # Mean over the union of the two batches, as one SGD step on A∪B.
        return (n_a * ce_a + n_b * ce_b) / (n_a + n_b), ce_b

    def step(network, batch: Batch, key):
        del key
        (loss, loss_b), grads = jax.value_and_grad(loss_fn, has_aux=True)(network, batch)
        network = jax.tree.map(lambda p, g: p - learning_rate * g, network, grads)
        return network, {"loss": loss_b, "loss_union": loss}

    return Method(
        name=name,
        init=lambda network, data_a, key: network,
        step=step,
        network=lambda s: s,
        uses_task_a=True,
    )
