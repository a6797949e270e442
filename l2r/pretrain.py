"""Task-A pre-training (§3: SGD, lr 0.1, momentum 0.9, batch 128), many seeds in one compiled
call, cached as Orbax checkpoints keyed by what the training reads (`fingerprint`), so a rerun,
or another experiment with the same Task A, reuses finished networks instead of training again.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from l2r import checkpoint, console, keys, models, rng, training
from l2r.data import stream
from l2r.models import registry as model_registry

# `pretrain` fields that say how many networks there are, how many train per call and where
# they are kept: none changes what network i is.
BUDGET_FIELDS = ("num_checkpoints", "seeds_per_call", "dir")


def recipe(config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict | None = None):
    """The config fields a Task-A-style training run reads: the seed, augmentation, the model
    (and, for a model registered from a user's file, that file's source) and the optimiser
    group `cfg` (default `config.pretrain`) less its `BUDGET_FIELDS`."""
    cfg = config.pretrain if cfg is None else cfg
    user_model = model_registry.user_code(config.model)  # {} for l2r's own models
    return {
        "seed": config.seed,
        "augment": config.data.augment,
        "model": config.model.to_dict(),
        "pretrain": {k: v for k, v in cfg.to_dict().items() if k not in BUDGET_FIELDS},
        **({"model_code": user_model} if user_model else {}),
    }


def fingerprint(config: ml_collections.ConfigDict, task: training.DeviceTask) -> str:
    """The key of Task-A pre-training: its `recipe`, the content of `task` (the training data
    it learns from, the test split it reports accuracy on) and the source it executes."""
    return keys.stage_key(
        **recipe(config), data=checkpoint.digest(task), code=keys.source_digest(__name__)
    )


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
    def run_chunk(carry, data, xs):
        def one_seed(p, s, i, a):
            (p, s, _), losses = jax.lax.scan(step, (p, s, data), (i, a))
            return (p, s), losses.mean()

        return training.map_seeds(one_seed, *carry, *xs)

    (params, _), _ = training.run_chunked(
        lambda carry, xs: run_chunk(carry, task, xs),
        (params, opt_state),
        cfg.steps,
        training.CHUNK_STEPS,
        lambda start, stop: (idx[:, start:stop], training.slice_steps(aug, start, stop)),
        progress=console.Progress(cfg.steps, f"pretrain x{len(seeds)}"),
        on_chunk=lambda stop, carry, loss: {"loss": float(loss.mean())},
    )

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
    root = os.path.join(cfg.dir or os.path.join(workdir, "pretrain"), fingerprint(config, task_a))

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
