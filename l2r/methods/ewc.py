"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), the §4 "EWC" baseline.

Before Task B, `init` summarises Task A by the diagonal Fisher information F of the Task-A loss
at the pre-trained weights w* (backbone + Task-A head), with respect to the backbone. Task B is
then learned by SGD on

    loss = CE(head_b(x_b), y_b) + (coef / 2) · Σ_i F_i (w_i − w*_i)²

over the backbone and the Task-B head; the Task-A head stays frozen, as for SGD (it is not used
by the Task-B loss, and the probe's "Original" reads it).

Conventions:
  * F is the mean over `fisher_examples` Task-A training examples (drawn without replacement
    with the `init` key) of the *squared per-example gradients* of −log p(y | x), not the square
    of the mean gradient (which vanishes at a minimum).
  * "empirical": y is the example's true label (the "empirical Fisher" of Kunstner et al. 2019);
    "true": y is sampled from the model's own softmax p(· | x) (one label per example, drawn with
    the `init` key), an unbiased one-sample estimate of the Fisher E_{y~p}[g g^T]'s diagonal.
  * The 1/2 follows Kirkpatrick et al.'s Eq. 3 (λ/2 · Σ F (θ − θ*)²), so `coef` is their λ
    (§4: 1.0); the penalty's gradient is coef · F ⊙ (w − w*).
  * Only the backbone is anchored: head_a is frozen and head_b is new.
  * Plain SGD on the quadratic penalty is stable only while learning_rate · coef · max_i F_i < 2
    (each weight's pull towards w* overshoots beyond that); mind this when sweeping `coef` up.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from l2r import models, training
from l2r.methods.base import Batch, Method

FISHER_KINDS = ("empirical", "true")


class EwcState(NamedTuple):
    network: dict  # {'backbone', 'head_a', 'head_b'}; backbone and head_b are trained.
    anchor: dict  # w*: the pre-trained backbone.
    fisher: dict  # Diagonal Fisher F, same structure as the backbone.


def _default_chunk() -> int:
    # Per-example gradients of a conv under vmap are grouped convolutions, which XLA:CPU runs
    # off its fast path (see `training.map_seeds`): one at a time is faster on CPU
    # (docs/benchmarks.md, "Measured facts behind code choices").
    return 1 if jax.default_backend() == "cpu" else 64


def _example_loss(model, backbone, head, x_HWC, y):
    """−log p(y | x) of one example."""
    logits_K = models.apply_head(head, model.apply(backbone, x_HWC[None]).representation)[0]
    return -jax.nn.log_softmax(logits_K)[y]


def sample_labels(model, backbone, head, x_NHWC, key, chunk: int = 64) -> jax.Array:
    """Labels [N] drawn from the network's softmax, y_n ~ p(· | x_n), forward in chunks."""

    def logits(x_HWC):
        return models.apply_head(head, model.apply(backbone, x_HWC[None]).representation)[0]

    logits_NK = jax.lax.map(logits, x_NHWC, batch_size=min(chunk, x_NHWC.shape[0]))
    return jax.random.categorical(key, logits_NK, axis=-1).astype(jnp.int32)


def diagonal_fisher(model, backbone, head, x_NHWC, y_N, chunk: int | None = None):
    """Mean over the N examples of the squared per-example gradient of −log p(y_n | x_n).

    Args:
      model: the backbone's `Model`.
      backbone: backbone params (the gradient is taken with respect to these).
      head: a linear head {'kernel','bias'} on the representation (held fixed).
      x_NHWC: float images [N, H, W, C].
      y_N: int labels [N].
      chunk: examples whose gradients are computed at once (vmapped); memory grows as
        chunk × backbone size. None = 1 on CPU, 64 on accelerators.

    Returns:
      A pytree like `backbone`: F = mean_n (∂/∂w −log p(y_n | x_n))².
    """
    n = x_NHWC.shape[0]
    chunk = min(chunk or _default_chunk(), n)
    num_chunks = -(-n // chunk)
    # Pad to whole chunks by wrapping around; the extra examples get weight 0.
    idx = jnp.arange(num_chunks * chunk) % n
    x = x_NHWC[idx].reshape(num_chunks, chunk, *x_NHWC.shape[1:])
    y = y_N[idx].reshape(num_chunks, chunk)
    real = (jnp.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)
    grad_fn = jax.grad(_example_loss, argnums=1)
    per_example = jax.vmap(lambda x1, y1: grad_fn(model, backbone, head, x1, y1))

    def body(total, xs):
        x_c, y_c, real_c = xs
        g = per_example(x_c, y_c)
        return jax.tree.map(
            lambda t, gc: t + jnp.einsum("c,c...->...", real_c.astype(gc.dtype), gc**2), total, g
        ), None

    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, backbone), (x, y, real))
    return jax.tree.map(lambda t: t / n, total)


def task_fisher(
    model: models.Model,
    network: dict,
    data_a: training.DeviceTask,
    key: jax.Array,
    kind: str = "empirical",
    num_examples: int = 1024,
    chunk: int | None = None,
):
    """The diagonal Fisher of Task A at `network` (backbone + head_a), w.r.t. the backbone.

    Args:
      network: {'backbone', 'head_a', ...}.
      data_a: Task A on the device; its training split is sampled (no augmentation).
      key: picks the examples and, for kind="true", the labels.
      kind: "empirical" (true labels) or "true" (labels sampled from the model).
      num_examples: examples averaged over (all of them when the split is smaller).
      chunk: see `diagonal_fisher`.

    Returns:
      (fisher like network['backbone'], example indices [n], labels used [n]).
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"fisher={kind!r}; choose one of {', '.join(FISHER_KINDS)}.")
    num_train = data_a.train_labels.shape[0]
    n = min(num_examples, num_train)
    key_idx, key_labels = jax.random.split(key)
    idx = jax.random.choice(key_idx, num_train, (n,), replace=False)
    x, y = training.gather(data_a, idx)
    backbone, head = network["backbone"], network["head_a"]
    if kind == "true":
        y = sample_labels(model, backbone, head, x, key_labels)
    return diagonal_fisher(model, backbone, head, x, y, chunk), idx, y


def penalty(backbone: dict, anchor: dict, fisher: dict, coef: float) -> jax.Array:
    """(coef / 2) · Σ_i F_i (w_i − w*_i)² over every leaf of the backbone."""
    terms = jax.tree.map(lambda w, a, f: jnp.sum(f * (w - a) ** 2), backbone, anchor, fisher)
    return 0.5 * coef * sum(jax.tree.leaves(terms))


def make_ewc(
    model: models.Model,
    learning_rate: float,
    coef: float,
    fisher: str = "empirical",
    fisher_examples: int = 1024,
    name: str = "ewc",
    chunk: int | None = None,
    head: str = "head_b",
) -> Method:
    """EWC on Task B: SGD at `learning_rate` on CE_B + (coef/2) Σ F (w − w*)².

    With `head` a later task's head ('head_c': Task 3 of Exp 5), the method learns that task
    after the one before it: its `switch` adds the finished task's Fisher (at the weights it
    ended with, through its own head, on its own training data) to the Fisher so far and moves
    the anchor w* there: the accumulated Laplace approximation of every earlier task (Huszár
    2018), one quadratic penalty whatever the number of tasks.

    Args:
      model: the backbone.
      learning_rate: plain SGD step size for backbone and head_b (no momentum).
      coef: λ, the penalty weight (§4: 1.0; config `task_b.ewc.coef`).
      fisher: "empirical" | "true" (config `task_b.ewc.fisher`); see the module docstring.
      fisher_examples: Task-A training examples the Fisher averages over
        (config `task_b.ewc.fisher_examples`).
      name: method name in results.
      chunk: per-example gradients computed at once for the Fisher (see `diagonal_fisher`).

    Returns:
      The `Method`; its state is an `EwcState` and its step metrics are `loss` (Task-B
      cross-entropy) and `penalty` (the EWC term, coef included).
    """
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher={fisher!r}; choose one of {', '.join(FISHER_KINDS)}.")
    if fisher_examples < 1:
        raise ValueError(f"fisher_examples={fisher_examples!r}; use 1 or more (§4: 1024).")

    def init(network, data_a, key):
        f, _, _ = task_fisher(model, network, data_a, key, fisher, fisher_examples, chunk)
        return EwcState(network, network["backbone"], f)

    def loss_fn(trainable, anchor, f, batch: Batch):
        rep_BD = model.apply(trainable["backbone"], batch.x_b).representation
        ce_b = training.cross_entropy(models.apply_head(trainable[head], rep_BD), batch.y_b)
        pen = penalty(trainable["backbone"], anchor, f, coef)
        return ce_b + pen, (ce_b, pen)

    def step(state: EwcState, batch: Batch, key):
        del key
        net = state.network
        trainable = {"backbone": net["backbone"], head: net[head]}
        (_, (ce_b, pen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state.anchor, state.fisher, batch
        )
        trainable = jax.tree.map(lambda p, g: p - learning_rate * g, trainable, grads)
        # head_a (and anything else the network carries) passes on unchanged.
        return state._replace(network={**net, **trainable}), {"loss": ce_b, "penalty": pen}

    def switch(state: EwcState, data_done, key):
        net = state.network
        previous = "head_" + chr(ord(head[-1]) - 1)  # the finished task's head
        f, _, _ = task_fisher(model, {**net, "head_a": net[previous]}, data_done, key, fisher,
                              fisher_examples, chunk)  # fmt: skip
        return EwcState(net, net["backbone"], jax.tree.map(jnp.add, state.fisher, f))

    return Method(name=name, init=init, step=step, network=lambda s: s.network,
                  switch=switch if head != "head_b" else None)  # fmt: skip
