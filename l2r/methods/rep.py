"""Rep (paper §5.1): Task B learned by SGD from a backbone pre-trained with cross-entropy on
Task A plus the meta-training classes, so only the starting network differs from SGD's
(`pretrain_rep`; Task B itself is `make_sgd`).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from l2r import checkpoint, console, keys, models, pretrain, rng, training
from l2r.data import stream


def num_classes(data: training.DeviceTask) -> int:
    return int(np.asarray(data.train_labels).max()) + 1


def joint_labels(labels_meta: jax.Array, num_classes_a: int) -> jax.Array:
    """Meta-training labels in the joint label space: K_a + y (Task A keeps 0..K_a-1)."""
    return labels_meta + num_classes_a


def split_head(head: dict, num_classes_a: int) -> tuple[dict, dict]:
    """Joint head {'kernel' [D, K_a+K_m], 'bias' [K_a+K_m]} -> (Task-A head, meta head)."""
    head_a = jax.tree.map(lambda v: v[..., :num_classes_a], head)
    head_meta = jax.tree.map(lambda v: v[..., num_classes_a:], head)
    return head_a, head_meta


def batch_split(batch_size: int, n_a: int, n_meta: int) -> tuple[int, int]:
    """(Task-A, meta) examples per batch, proportional to the training-set sizes, each >= 1."""
    if batch_size < 2:
        raise ValueError(f"Rep needs a batch of at least 2 (one per task), got {batch_size}.")
    b_a = int(round(batch_size * n_a / (n_a + n_meta)))
    b_a = min(max(b_a, 1), batch_size - 1)
    return b_a, batch_size - b_a


def rep_pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.pretrain` with `steps` replaced by `task_b.rep.steps` when that is > 0."""
    cfg = ml_collections.ConfigDict(config.pretrain.to_dict())
    if config.task_b.rep.steps > 0:
        cfg.steps = config.task_b.rep.steps
    return cfg


def fingerprint(config, data_a: training.DeviceTask, data_meta: training.DeviceTask) -> str:
    """The key of Rep's networks: pre-training's `recipe` with Rep's step count, the content of
    both tasks (the meta-training data is built by each experiment, so no config field names
    it fully) and the source this module executes."""
    return keys.stage_key(
        **pretrain.recipe(config, rep_pretrain_config(config)),
        data_a=checkpoint.digest(data_a),
        data_meta=checkpoint.digest(data_meta),
        code=keys.source_digest(__name__),
    )


def train_joint(config, model, data_a, data_meta, seeds, ckpt_ids):
    """Trains len(seeds) networks on A ∪ meta with one joint softmax, together.

    Returns:
      (params stacked [S, ...] {'backbone', 'head'} with the joint head [D, K_a+K_m],
       Task-A test accuracy of the A block [S], meta test accuracy of the meta block [S],
       training loss of every step [S, steps]).
    """
    cfg = rep_pretrain_config(config)
    opt = pretrain.make_optimizer(cfg)
    k_a, k_m = num_classes(data_a), num_classes(data_meta)
    n_a, n_m = data_a.train_labels.shape[0], data_meta.train_labels.shape[0]
    b_a, b_m = batch_split(cfg.batch_size, n_a, n_m)
    if data_a.train_images.shape[1:] != data_meta.train_images.shape[1:]:
        raise ValueError(
            f"Task A images {data_a.train_images.shape[1:]} and meta-training images "
            f"{data_meta.train_images.shape[1:]} differ in shape; load both at one image_size."
        )
    input_shape = (1, *data_a.train_images.shape[1:])

    keys = jnp.stack([rng.key_for(config.seed, "rep_init", i) for i in ckpt_ids])
    params = jax.vmap(lambda k: pretrain.init_network(model, k, input_shape, k_a + k_m))(keys)
    opt_state = jax.vmap(opt.init)(params)
    idx_a = stream.index_streams(
        n_a, b_a, cfg.steps, [rng.seed_for(config.seed, "rep_data_a", s) for s in seeds]
    )
    idx_m = stream.index_streams(
        n_m, b_m, cfg.steps, [rng.seed_for(config.seed, "rep_data_meta", s) for s in seeds]
    )
    aug = (
        training.augment_streams(cfg.batch_size, cfg.steps, seeds) if config.data.augment else None
    )

    def loss_fn(p, x, y):
        logits = models.apply_head(p["head"], model.apply(p["backbone"], x).representation)
        return training.cross_entropy(logits, y)

    @jax.jit
    def run_chunk(carry, data_a, data_m, xs):
        def step(carry, xs):
            p, s = carry
            ia, im, au = xs
            au_a = au_m = None
            if au is not None:
                au_a = jax.tree.map(lambda v: v[:b_a], au)
                au_m = jax.tree.map(lambda v: v[b_a:], au)
            x_a, y_a = training.gather(data_a, ia, au_a)
            x_m, y_m = training.gather(data_m, im, au_m)
            # One forward pass over the union batch (GroupNorm is per example).
            x = jnp.concatenate([x_a, x_m])
            y = jnp.concatenate([y_a, joint_labels(y_m, k_a)])
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        def one_seed(p, s, ia, im, au):
            return jax.lax.scan(step, (p, s), (ia, im, au))

        return training.map_seeds(one_seed, *carry, *xs)

    (params, _), losses = training.run_chunked(
        lambda carry, xs: run_chunk(carry, data_a, data_meta, xs),
        (params, opt_state),
        cfg.steps,
        training.CHUNK_STEPS,
        lambda start, stop: (
            idx_a[:, start:stop],
            idx_m[:, start:stop],
            training.slice_steps(aug, start, stop),
        ),
        progress=console.Progress(cfg.steps, f"rep pretrain x{len(seeds)}"),
        on_chunk=lambda stop, carry, loss: {"loss": float(loss.mean())},
    )

    @jax.jit
    def test_accuracies(params, data_a, data_m):
        def one(p):
            head_a, head_m = split_head(p["head"], k_a)
            acc = []
            for data, head in ((data_a, head_a), (data_m, head_m)):
                rep = training.features(
                    model.apply, p["backbone"], data.test_images, data.mean, data.std
                )
                acc.append(training.accuracy(models.apply_head(head, rep), data.test_labels))
            return tuple(acc)

        return jax.lax.map(one, params)

    acc_a, acc_m = test_accuracies(params, data_a, data_meta)
    losses = np.concatenate([np.asarray(loss) for loss in losses], axis=1)
    return params, np.asarray(acc_a), np.asarray(acc_m), losses


def pretrain_rep(config, model, data_a, data_meta, workdir: str):
    """Rep's starting networks: one per `pretrain.num_checkpoints`, trained where missing.

    The paper says only "We use the meta-training 50 classes plus data from Task A to pretrain
    a representation backbone using cross entropy classification objective"; the choices it
    leaves open, made here:
      * one joint softmax over K_a + K_m classes: A's labels 0..K_a-1, then the meta-training
        labels offset by K_a (`joint_labels`);
      * trained from scratch with `config.pretrain`'s optimiser, batch and schedule, for
        `task_b.rep.steps` steps (0 = `pretrain.steps`), so Rep costs what pre-training does;
      * every batch holds a fixed share of each task, in proportion to their training-set sizes
        (`batch_split`): in expectation what uniform sampling from the union gives, with less
        variance; each part is normalised with its own task's statistics, so A and the
        meta-training data may come from different datasets;
      * the returned 'head' is the Task-A block of the joint head (`split_head`): its logits are
        exactly the joint logits of A's classes, so the Original-A probe reads the network as
        it reads a Task-A-only one.

    Args:
      config: the experiment config (`pretrain`, `task_b.rep`, `data.augment`, `seed`).
      model: the backbone (`models.Model`).
      data_a: Task A on the device, labels 0..K_a-1.
      data_meta: the meta-training data on the device, labels 0..K_m-1, classes disjoint from
        the meta-test Task B (Exp 1: DB1 of Task B; Exp 2-5: the meta-training class pool).
      workdir: checkpoints go under `pretrain.dir` or `<workdir>/pretrain`, in `rep-<fingerprint>`.

    Returns:
      (networks stacked [n, ...] {'backbone', 'head'} with 'head' the Task-A block of the joint
       head, Task-A test accuracies [n], seconds spent training).
    """
    cfg = config.pretrain
    root = os.path.join(
        cfg.dir or os.path.join(workdir, "pretrain"),
        f"rep-{fingerprint(config, data_a, data_meta)}",
    )
    k_a = num_classes(data_a)

    def train(ids):
        seeds = [rng.seed_for(config.seed, "rep_data", i) for i in ids]
        params, acc_a, acc_m, _ = train_joint(config, model, data_a, data_meta, seeds, ids)
        out = []
        for j in range(len(ids)):
            net = jax.tree.map(lambda a, j=j: a[j], params)
            net = {"backbone": net["backbone"], "head": split_head(net["head"], k_a)[0]}
            meta = {"test_accuracy": float(acc_a[j]), "meta_test_accuracy": float(acc_m[j]),
                    "seed": seeds[j]}  # fmt: skip
            out.append((net, meta))
        return out

    return checkpoint.cached_networks(root, cfg.num_checkpoints, cfg.seeds_per_call, train, "Rep")
