"""A Task-B method of one's own, added from this file: SGD with an L2 pull towards the
pre-trained weights w* (an EWC with the Fisher replaced by 1 everywhere):

    loss = CE(head_b(x_b), y_b) + (coef / 2) · ||w − w*||²     over the backbone w

Registering it makes "l2_pull" a name of `task_b.methods`, and its hyper-parameters a config
group `task_b.l2_pull` with the defaults below, which the experiment configs pick up when they are
built after this file is imported (`--config.task_b.l2_pull.coef=0.3` then works). Nothing inside
l2r changes: see `compare.py` and `my_config.py` in this folder for the two ways to run it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from l2r import models, training
from l2r.methods import Batch, Method, register


class L2PullState(NamedTuple):
    network: dict  # {'backbone', 'head_a', 'head_b'}: backbone and head_b are trained.
    anchor: dict  # w*: the backbone as Task B starts.


def make_l2_pull(model: models.Model, learning_rate: float, coef: float,
                 name: str = "l2_pull") -> Method:  # fmt: skip
    """SGD at `learning_rate` on the Task-B loss plus (coef/2)·||w − w*||² on the backbone."""

    def loss_fn(trainable, anchor, batch: Batch):
        rep_BD = model.apply(trainable["backbone"], batch.x_b).representation
        ce = training.cross_entropy(models.apply_head(trainable["head_b"], rep_BD), batch.y_b)
        sq = jax.tree.map(lambda w, a: jnp.sum(jnp.square(w - a)), trainable["backbone"], anchor)
        pull = 0.5 * coef * sum(jax.tree.leaves(sq))
        return ce + pull, (ce, pull)

    def step(state: L2PullState, batch: Batch, key):
        del key  # Deterministic given the batch.
        net = state.network
        trainable = {"backbone": net["backbone"], "head_b": net["head_b"]}
        (_, (ce, pull)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state.anchor, batch
        )
        trainable = jax.tree.map(lambda p, g: p - learning_rate * g, trainable, grads)
        return state._replace(network={**net, **trainable}), {"loss": ce, "pull": pull}

    return Method(
        name=name,
        init=lambda network, data_a, key: L2PullState(network, network["backbone"]),
        step=step,
        network=lambda state: state.network,
    )


@register("l2_pull", group=dict(
    coef=1.0,  # Weight of the pull (0: plain SGD); SGD on it is stable while lr · coef < 2.
))  # fmt: skip
def build_l2_pull(name, model, task_b, context):
    """The registry's builder: the method from the `task_b` config group."""
    return make_l2_pull(model, task_b.learning_rate, task_b.l2_pull.coef, name)
