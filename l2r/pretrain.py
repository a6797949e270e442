"""Task-A pre-training: SGD with momentum, many seeds at once, cached as Orbax checkpoints.

§3 of the paper: lr 0.1, momentum 0.9, batch 128. Seeds are a mapped axis
(`training.map_seeds`), so `n` networks train in one compiled call (`pretrain.seeds_per_call` at
a time); steps run as a `lax.scan` in chunks so the console can show progress. Checkpoints are
keyed by a fingerprint of everything that determines them (data, classes, model, optimiser,
seed), so a rerun - or another experiment with the same Task A - finds and reuses finished
networks instead of training again.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from l2r import checkpoint, models, report, rng, training
from l2r.data import stream

CHUNK_STEPS = 100  # Scan length of one compiled call; progress is reported between calls.


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """Hash of every config field that changes what Task-A pre-training produces."""
    relevant = {
        "seed": config.seed,
        "data": config.data.to_dict(),
        "model": config.model.to_dict(),
        "pretrain": {
            k: v
            for k, v in config.pretrain.to_dict().items()
            if k not in ("num_checkpoints", "seeds_per_call", "dir")
        },
    }
    # The Task-B classes and TFDS paths do not change Task A.
    for k in ("classes_b", "data_dir", "download", "archive"):
        relevant["data"].pop(k, None)
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if cfg.schedule == "constant":
        lr = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    elif cfg.schedule == "step":
        lr = optax.piecewise_constant_schedule(
            cfg.learning_rate, {int(cfg.steps * 0.5): 0.1, int(cfg.steps * 0.75): 0.1}
        )
    else:
        raise ValueError(f"pretrain.schedule={cfg.schedule!r}; use constant, cosine or step.")
    if cfg.warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), lr],
            [cfg.warmup_steps],
        )
    # Weight decay on kernels only (ndim > 1), not on GroupNorm scales/offsets or biases.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=cfg.momentum),
    )


def init_network(model: models.Model, key, input_shape, num_classes: int):
    """A fresh {'backbone', 'head'} pair."""
    k_body, k_head = jax.random.split(key)
    backbone = model.init(k_body, input_shape)
    return {
        "backbone": backbone,
        "head": models.init_head(k_head, model.representation_dim, num_classes),
    }


def _train(config, model, task, seeds, ckpt_ids):
    """Trains len(seeds) networks on `task` together; returns stacked params and accuracies."""
    cfg = config.pretrain
    opt = make_optimizer(cfg)
    n_train = task.train_labels.shape[0]
    num_classes = int(task.train_labels.max()) + 1
    input_shape = (1, *task.train_images.shape[1:])

    keys = jnp.stack([rng.key_for(config.seed, "pretrain_init", i) for i in ckpt_ids])
    params = jax.vmap(lambda k: init_network(model, k, input_shape, num_classes))(keys)
    opt_state = jax.vmap(opt.init)(params)
    idx = stream.index_streams(n_train, cfg.batch_size, cfg.steps, seeds)  # [S, T, B]
    aug = (
        training.augment_streams(cfg.batch_size, cfg.steps, seeds) if config.data.augment else None
    )

    def loss_fn(p, x, y):
        logits = models.apply_head(p["head"], model.apply(p["backbone"], x).representation)
        return training.cross_entropy(logits, y)

    def step(carry, xs):
        p, s, data = carry
        idx_B, aug_B = xs
        x, y = training.gather(data, idx_B, aug_B)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s, data), loss

    # The task's arrays are an argument, not a closure: closed-over arrays would be baked into
    # the compiled program as constants.
    @jax.jit
    def run_chunk(p, s, data, idx_chunk, aug_chunk):
        def one_seed(p, s, i, a):
            (p, s, _), losses = jax.lax.scan(step, (p, s, data), (i, a))
            return p, s, losses.mean()

        return training.map_seeds(one_seed, p, s, idx_chunk, aug_chunk)

    progress = report.Progress(cfg.steps, f"pretrain x{len(seeds)}")
    for start in range(0, cfg.steps, CHUNK_STEPS):
        stop = min(start + CHUNK_STEPS, cfg.steps)
        params, opt_state, loss = run_chunk(
            params, opt_state, task, idx[:, start:stop], training.slice_steps(aug, start, stop)
        )
        progress.update(stop, loss=float(loss.mean()))

    @jax.jit
    def test_accuracies(params, data):
        def one(p):
            rep = training.features(
                model.apply, p["backbone"], data.test_images, data.mean, data.std
            )
            return training.accuracy(models.apply_head(p["head"], rep), data.test_labels)

        return jax.lax.map(one, params)

    return params, np.asarray(test_accuracies(params, task))


def pretrained_networks(config, model, task_a: training.DeviceTask, workdir: str):
    """Returns the `pretrain.num_checkpoints` Task-A networks, training only the missing ones.

    Returns:
      (params stacked over checkpoints [n, ...], test accuracies [n], seconds spent training).
    """
    cfg = config.pretrain
    root = os.path.join(cfg.dir or os.path.join(workdir, "pretrain"), fingerprint(config))

    def train(ids):
        seeds = [rng.seed_for(config.seed, "pretrain_data", i) for i in ids]
        params, accs = _train(config, model, task_a, seeds, ids)
        return [
            (jax.tree.map(lambda a, j=j: a[j], params),
             {"test_accuracy": float(accs[j]), "seed": seeds[j]})
            for j in range(len(ids))
        ]  # fmt: skip

    return checkpoint.cached_networks(root, cfg.num_checkpoints, cfg.seeds_per_call, train,
                                      "Pre-trained")  # fmt: skip
