"""MAML in the style of OML (Javed & White 2019), as the paper replicates it (§5.1): the
pre-trained backbone is meta-trained so that a readout learns fast on its representation
(`meta_loss`), and Task B is then learned from it with `make_sgd` like every other method.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2r import checkpoint, console, keys, models, training


def adapt_readout(head: dict, h_TBD: jax.Array, y_TB: jax.Array, learning_rate: float):
    """`T` SGD steps of a linear readout, one per support batch (a `lax.scan`).

    Args:
      head: {'kernel' [D, K], 'bias' [K]}, the readout before the first step.
      h_TBD: representations of the T support batches [T, B, D].
      y_TB: their labels, int [T, B].
      learning_rate: the SGD step size.

    Returns:
      (the head after T steps, the cross-entropy before each step [T]).
    """

    def step(head, hy):
        h_BD, y_B = hy
        loss_fn = lambda w: training.cross_entropy(models.apply_head(w, h_BD), y_B)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(head)
        return jax.tree.map(lambda w, g: w - learning_rate * g, head, grads), loss

    return jax.lax.scan(step, head, (h_TBD, y_TB))


def meta_loss(
    model, backbone, x_support, y_support, x_query, y_query, num_classes: int, inner_lr: float
):
    """OML's meta-loss of `backbone`: a zero readout adapted on the support trajectory, then
    evaluated on the query batch ∪ the trajectory.

    The paper: "MAML unrolls the readout SGD steps for 10 steps on Task B, and backprop through
    SGD from the 'query' set to learn a good representation of the backbone." Following OML:
    the readout starts from zero over the step's classes (OML resets the output rows of the
    classes it is about to learn) and takes one SGD step per support batch on the frozen
    backbone's representations (`adapt_readout`); the meta-loss is the adapted readout's
    cross-entropy on the query set, which is, as in OML, the random batch together with the
    trajectory's own examples; its gradient w.r.t. the backbone goes through the
    representations of both sets and through the whole unroll (second-order terms included).

    Departures from OML: it also meta-learns the readout's initialisation, but the meta-test
    readout here is the pipeline's fresh Task-B head, so only the backbone is kept. Its
    trajectories are class-incremental; the paper unrolls "readout SGD steps on Task B", whose
    batches are i.i.d., so the support batches are i.i.d. too. Task A is not in the query
    (OML's query is the meta-training task alone). The unroll is not rematerialised: the
    backbone runs once on all examples, and the scanned readout steps hold only [B, D]
    representations and a [D, K] head.

    Args:
      model: the backbone's `models.Model`.
      backbone: its parameters (the argument to differentiate).
      x_support: images [T, B, H, W, C] of the T inner steps; y_support: labels int [T, B].
      x_query: images [Q, H, W, C]; y_query: labels int [Q].
      num_classes: K, the readout's width (labels are in 0..K-1).
      inner_lr: the readout's SGD step size.

    Returns:
      (loss, {'query_loss', 'inner_loss_first', 'inner_loss_last'}).
    """
    t, b = y_support.shape
    x = jnp.concatenate([x_support.reshape(t * b, *x_support.shape[2:]), x_query])
    # One forward pass over support and query (GroupNorm is per example).
    h_ND = model.apply(backbone, x).representation
    h_TBD = h_ND[: t * b].reshape(t, b, -1)
    zeros = lambda *s: jnp.zeros(s, h_ND.dtype)  # noqa: E731
    head0 = {"kernel": zeros(h_ND.shape[-1], num_classes), "bias": zeros(num_classes)}
    head, inner = adapt_readout(head0, h_TBD, y_support, inner_lr)
    loss = training.cross_entropy(
        models.apply_head(head, h_ND), jnp.concatenate([y_support.reshape(-1), y_query])
    )
    return loss, {"query_loss": loss, "inner_loss_first": inner[0], "inner_loss_last": inner[-1]}


def sample_episode(key, labels_N, classes_K, n_way: int, num_support: int, num_query: int):
    """Indices of one outer step's examples, all distinct, from `n_way` random classes.

    Args:
      key: PRNG key.
      labels_N: the meta-training task's labels, int [N].
      classes_K: number of classes K of the task.
      n_way: classes per outer step; K = all of them, labels kept as they are.
      num_support, num_query: examples to draw (trajectory, then query).

    Returns:
      (indices int [num_support + num_query], their labels in 0..n_way-1).
    """
    k_cls, k_ex = jax.random.split(key)
    if n_way == classes_K:
        remap = jnp.arange(classes_K, dtype=jnp.int32)
    else:
        chosen = jax.random.permutation(k_cls, classes_K)[:n_way]
        remap = (
            jnp.full(classes_K, -1, jnp.int32).at[chosen].set(jnp.arange(n_way, dtype=jnp.int32))
        )
    new = remap[labels_N]
    # Gumbel top-k: a uniform draw without replacement from the eligible examples.
    g = jnp.where(new >= 0, jax.random.gumbel(k_ex, labels_N.shape), -jnp.inf)
    _, idx = jax.lax.top_k(g, num_support + num_query)
    return idx, new[idx]


def _check(cfg, labels, n_way):
    counts = np.bincount(labels)
    need = cfg.inner_steps * cfg.support_batch + cfg.query_batch
    if min(cfg.inner_steps, cfg.support_batch, cfg.query_batch, cfg.outer_steps) < 1:
        raise ValueError(
            "task_b.oml.{inner_steps, support_batch, query_batch, outer_steps} must all be >= 1."
        )
    if not 1 <= n_way <= len(counts):
        raise ValueError(f"n_way={n_way} must be between 1 and the {len(counts)} classes.")
    fewest = int(np.sort(counts)[:n_way].sum())
    if fewest < need:
        raise ValueError(
            f"An OML step draws {need} distinct examples (inner_steps x support_batch + "
            f"query_batch) but {n_way} classes of the meta-training data may hold only {fewest}; "
            "lower task_b.oml.support_batch or query_batch, or raise n_way."
        )


def meta_train_oml(
    config, model, pretrained, data_a, data_meta, key, n_way: int | None = None, ids=None
):
    """Meta-trains each pre-trained backbone with OML's objective (`meta_loss`), by Adam.

    Each outer step draws `inner_steps` support batches of `support_batch` examples and a
    random query batch of `query_batch`, all distinct examples of the meta-training task
    (`sample_episode`). The Task-A head is returned unchanged, so the Original-A probe sees how
    far the backbone moved away from it.

    Args:
      config: the experiment config; reads `task_b.oml` {inner_steps, inner_lr, outer_lr,
        outer_steps, support_batch, query_batch}.
      model: the backbone (`models.Model`).
      pretrained: stacked [n, ...] {'backbone', 'head'} (`pretrain.pretrained_networks`).
      data_a: Task A on the device; unused (OML's query holds no Task-A data, see `meta_loss`).
      data_meta: the meta-training data on the device, labels 0..K-1.
      key: PRNG key; checkpoint i uses `fold_in(key, i)`, its step t `fold_in(that, t)`, so
        a checkpoint's result does not depend on how many are trained or how they are grouped.
      n_way: classes per outer step (the readout's width); None = all K classes.
      ids: the checkpoint number i of each network of `pretrained` (default 0..n-1).

    Returns:
      (networks stacked [n, ...] {'backbone', 'head'} with the meta-trained backbones and the
       unchanged Task-A heads, meta-loss before each outer step [n, outer_steps], seconds).
    """
    del data_a
    cfg = config.task_b.oml
    labels = np.asarray(data_meta.train_labels)
    classes = int(labels.max()) + 1
    n_way = classes if n_way is None else n_way
    _check(cfg, labels, n_way)
    t, b, q = cfg.inner_steps, cfg.support_batch, cfg.query_batch
    opt = optax.adam(cfg.outer_lr)
    n = jax.tree.leaves(pretrained)[0].shape[0]
    ids = jnp.arange(n) if ids is None else jnp.asarray(ids)
    net_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)

    def outer_step(carry, step, k, data):
        backbone, s = carry
        idx, y = sample_episode(
            jax.random.fold_in(k, step), data.train_labels, classes, n_way, t * b, q
        )
        x, _ = training.gather(data, idx)
        grad_fn = jax.value_and_grad(meta_loss, argnums=1, has_aux=True)
        (loss, _), grads = grad_fn(
            model,
            backbone,
            x[: t * b].reshape(t, b, *x.shape[1:]),
            y[: t * b].reshape(t, b),
            x[t * b :],
            y[t * b :],
            n_way,
            cfg.inner_lr,
        )
        updates, s = opt.update(grads, s, backbone)
        return (optax.apply_updates(backbone, updates), s), loss

    # The data is an argument, not a closure, so it is not baked into the program.
    @jax.jit
    def run_chunk(backbones, opt_state, net_keys, data, steps):
        def one(backbone, s, k):
            body = lambda c, step: outer_step(c, step, k, data)  # noqa: E731
            return jax.lax.scan(body, (backbone, s), steps)

        return training.map_seeds(one, backbones, opt_state, net_keys)

    def train(backbones, net_keys):
        (backbones, _), losses = training.run_chunked(
            lambda carry, steps: run_chunk(*carry, net_keys, data_meta, steps),
            (backbones, jax.vmap(opt.init)(backbones)),
            cfg.outer_steps,
            training.CHUNK_STEPS,
            lambda start, stop: jnp.arange(start, stop),
            progress=console.Progress(cfg.outer_steps, f"oml x{len(net_keys)}"),
            on_chunk=lambda stop, carry, loss: {"query_loss": float(loss[:, -1].mean())},
        )
        return backbones, np.concatenate([np.asarray(loss) for loss in losses], axis=1)

    # Like pre-training, `pretrain.seeds_per_call` checkpoints at a time bound the memory.
    t0 = time.time()
    per_call = config.pretrain.seeds_per_call
    parts = [
        train(
            jax.tree.map(lambda a, i=i: a[i : i + per_call], pretrained["backbone"]),
            net_keys[i : i + per_call],
        )
        for i in range(0, n, per_call)
    ]
    backbones = jax.tree.map(lambda *a: jnp.concatenate(a), *(p[0] for p in parts))
    losses = np.concatenate([p[1] for p in parts])
    networks = {"backbone": backbones, "head": pretrained["head"]}
    return networks, losses, time.time() - t0


def fingerprint(config, pretrained, data_meta: training.DeviceTask, key, n_way: int | None) -> str:
    """The key of OML's networks: `task_b.oml`, the model, n_way and the PRNG key, the content
    of the starting networks and of the meta-training data, and the source this module
    executes."""
    return keys.stage_key(
        oml=config.task_b.oml.to_dict(),
        model=config.model.to_dict(),
        n_way=n_way,
        key=np.asarray(jax.random.key_data(key)).tolist(),
        pretrained=checkpoint.digest(pretrained),
        data_meta=training.train_digest(data_meta),
        code=keys.source_digest(__name__),
    )


def oml_starts(config, model, pretrained, data_meta, key, workdir: str, n_way: int | None = None):
    """`meta_train_oml`, cached like pre-training: one Orbax checkpoint per pre-trained network,
    under <pretrain dir>/oml-<fingerprint>/ckpt_<i>, trained only where missing.

    Returns:
      (networks stacked [n, ...] {'backbone', 'head'}, seconds spent training).
    """
    root = os.path.join(
        config.pretrain.dir or os.path.join(workdir, "pretrain"),
        "oml-" + fingerprint(config, pretrained, data_meta, key, n_way),
    )
    n = jax.tree.leaves(pretrained)[0].shape[0]

    def train(ids):
        nets, losses, _ = meta_train_oml(
            config, model, jax.tree.map(lambda a: a[np.asarray(ids)], pretrained), None,
            data_meta, key, n_way=n_way, ids=ids,
        )  # fmt: skip
        return [
            (jax.tree.map(lambda a, j=j: a[j], nets),
             {"query_loss_first": float(losses[j, 0]), "query_loss_last": float(losses[j, -1])})
            for j in range(len(ids))
        ]  # fmt: skip

    nets, _, seconds = checkpoint.cached_networks(
        root, n, config.pretrain.seeds_per_call, train, "OML"
    )
    return nets, seconds
