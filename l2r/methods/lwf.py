"""Learning without Forgetting (Li & Hoiem 2016), the §4 "LwF" baseline.

While SGD learns Task B, the network is also asked to keep giving the *pre-trained* network's
Task-A answers on the new data: the frozen pre-trained backbone and Task-A head (recorded at
`init`) label every Task-B batch with soft Task-A targets, and the current network's Task-A
head is distilled towards them. No Task-A image is ever seen.

    loss = CE(head_b(x_b), y_b) + coef · T² · mean_b KL(softmax(z_old/T) ‖ softmax(z/T))

where z = head_a(backbone(x_b)) and z_old the same through the frozen pre-trained copies.

Choices (documented departures / conventions):
  * KL instead of Li & Hoiem's cross-entropy H(p_old, p): the two differ by the entropy of the
    fixed targets, so they have the same gradient; the KL is 0 when the network equals the
    pre-trained one, which makes the term readable in logs and testable.
  * × T² (Hinton et al. 2015): keeps the distillation gradient's scale independent of T, so
    `coef` (§4: 1.0) means the same at any temperature. Li & Hoiem's own loss omits it; at their
    T = 2 this makes our term 4× theirs.
  * The targets are recomputed on each (possibly augmented) batch rather than stored once before
    training (Li & Hoiem's recording step); with a frozen old network the two are the same on
    un-augmented data, and ours also covers augmentation.
  * Unlike SGD, LwF trains the Task-A head too: it is the old-task head being distilled (Li &
    Hoiem train θ_s, θ_o and θ_n jointly after a warm-up of θ_n, which we skip as §4 does not
    mention it). All of backbone, head_a and head_b take plain SGD steps at the Task-B rate.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from l2r import models, training
from l2r.methods.base import Batch, Method


class LwfState(NamedTuple):
    """The network being trained and the frozen copy that provides the targets."""

    network: dict  # {'backbone', 'head_a', 'head_b', ...}, all trained.
    old_backbone: dict  # The backbone before the current task, frozen.
    old_heads: dict  # {head name: frozen copy} of every earlier task's head.


def distillation(old_logits_BK: jax.Array, logits_BK: jax.Array, temperature: float) -> jax.Array:
    """T² · mean over the batch of KL(softmax(old/T) ‖ softmax(new/T)); 0 when they are equal.

    Args:
      old_logits_BK: targets' logits [B, K] (the caller stops their gradient).
      logits_BK: the current network's logits [B, K].
      temperature: T > 0; larger T softens both distributions.

    Returns:
      Scalar distillation loss.
    """
    log_p_old = jax.nn.log_softmax(old_logits_BK / temperature, axis=-1)
    log_p = jax.nn.log_softmax(logits_BK / temperature, axis=-1)
    kl_B = jnp.sum(jnp.exp(log_p_old) * (log_p_old - log_p), axis=-1)
    return temperature**2 * kl_B.mean()


def objective(
    model: models.Model,
    network: dict,
    old_backbone: dict,
    old_heads: dict,
    batch: Batch,
    coef: float,
    temperature: float,
    head: str = "head_b",
):
    """The LwF loss of `network` on one batch of the task whose head is `head`.

    Args:
      old_heads: {head name: frozen head} of the earlier tasks; each of `network`'s heads of
        those names is distilled towards the frozen copy's answers (the terms summed).

    Returns:
      (total loss, (the current task's cross-entropy, distillation term before `coef`));
      differentiate with respect to `network` only (the old copies are constants).
    """
    rep_BD = model.apply(network["backbone"], batch.x_b).representation
    ce_b = training.cross_entropy(models.apply_head(network[head], rep_BD), batch.y_b)
    old_rep_BD = model.apply(old_backbone, batch.x_b).representation
    terms = [
        distillation(jax.lax.stop_gradient(models.apply_head(old, old_rep_BD)),
                     models.apply_head(network[name], rep_BD), temperature)
        for name, old in old_heads.items()
    ]  # fmt: skip
    distill = sum(terms[1:], terms[0])
    return ce_b + coef * distill, (ce_b, distill)


def make_lwf(
    model: models.Model,
    learning_rate: float,
    coef: float,
    temperature: float,
    name: str = "lwf",
    head: str = "head_b",
) -> Method:
    """LwF on Task B: SGD at `learning_rate` on CE_B + coef · T² · KL to the frozen old A head.

    With `head` another task's head ('head_c': Task 3 of Exp 5), the method learns that task
    after the one before it: its `switch` freezes the network as it is then, and every earlier
    head is distilled towards the frozen copy (Li & Hoiem's multi-task form, the terms summed).

    Args:
      model: the backbone.
      learning_rate: plain SGD step size for backbone, head_a and head_b (no momentum).
      coef: distillation weight (§4: 1.0; config `task_b.lwf.coef`).
      temperature: distillation temperature T (Li & Hoiem: 2; config `task_b.lwf.temperature`).
      name: method name in results.

    Returns:
      The `Method`; its state is an `LwfState` and its step metrics are `loss` (Task-B
      cross-entropy, as for every method), `distill` (the KL term before `coef`) and `total`.
    """
    if temperature <= 0:
        raise ValueError(f"LwF temperature must be > 0, got {temperature!r} (Li & Hoiem use 2).")

    def init(network, data_a, key):
        del data_a, key
        return LwfState(network, network["backbone"], {"head_a": network["head_a"]})

    def step(state: LwfState, batch: Batch, key):
        del key
        trainable = {k: state.network[k] for k in ("backbone", *state.old_heads, head)}
        grad_fn = jax.value_and_grad(objective, argnums=1, has_aux=True)
        (total, (ce_b, distill)), grads = grad_fn(
            model, trainable, state.old_backbone, state.old_heads, batch, coef, temperature, head
        )
        trainable = jax.tree.map(lambda p, g: p - learning_rate * g, trainable, grads)
        metrics = {"loss": ce_b, "distill": distill, "total": total}
        # Entries other than the three trained ones (if a start network carries any) pass on.
        return state._replace(network={**state.network, **trainable}), metrics

    def switch(state: LwfState, data_done, key):
        del data_done, key
        net = state.network
        earlier = {k: v for k, v in sorted(net.items()) if k.startswith("head_") and k < head}
        return LwfState(net, net["backbone"], earlier)

    return Method(name=name, init=init, step=step, network=lambda s: s.network,
                  switch=switch if head != "head_b" else None)  # fmt: skip
