"""HAT: hard attention to the task (Serrà et al., 2018) as a Task-B method (§4 baseline).

Every unit layer l (each GroupNorm, and the dense `hidden` layer; `models.Model.units`) has a
learnable embedding e_t,l [C] per task t (A, B); its gate a_t,l = σ(s·e_t,l) multiplies the
layer's output channels after the normalisation (HAT §2.2, "after the normalisation" for
normalised layers). The scale s is annealed from 1/s_max to s_max over the batches of an epoch
(HAT eq. 1), s = 1/s_max + (s_max − 1/s_max)·(b − 1)/(B − 1) for batch b = 1..B, so the gates
are soft while training and almost binary at s = s_max, where a task is evaluated.

Task A (`pretrain_hat`): the backbone, the Task-A head and e_A train together with the gates
in the forward pass; an epoch is B = floor(n_train / batch_size) batches, the same epochs as
`l2r.data.stream.index_stream`, and s restarts at 1/s_max every epoch. Loss: cross-entropy +
λ·Σ_l Σ a_A,l / Σ_l C_l (HAT eq. 5 with nothing before A: the mean gate). Optimiser: the
pre-training one (`pretrain.make_optimizer`: SGD with momentum, the `pretrain` schedule, decay
on kernels only, so never on embeddings), from the same init and batches as plain pre-training
(same random streams), so HAT's Task-A network differs from the plain one only by HAT.

Task B (`make_hat`): a^{<B} = σ(s_max·e_A) (HAT keeps the cumulative gates at s_max, not
rounded to {0, 1}). Each step, with s annealed over the Task-B run (`anneal_steps` steps, the
run's length, restarting after that many steps):
  * loss: cross-entropy of the Task-B head on the backbone gated by a_B = σ(s·e_B), plus
    λ·Σ a_B·(1 − a^{<B}) / Σ (1 − a^{<B}) (HAT eq. 5; 0 if A uses every unit);
  * weight gradients multiplied by 1 − min(a^{<B}_out, a^{<B}_in) (HAT eq. 2): `out` the gate of
    the unit layer a weight writes to, `in` that of the units it reads (the max over the
    unit layers of a residual sum; 1 for the image). Conv kernels use, for `out`, the max gate
    over the output channel's GroupNorm group: GroupNorm's mean and variance couple the
    channels of a group, so a kernel feeding a channel A does not use still changes A's
    channels in the same group (with BatchNorm, as in HAT, this does not arise). GroupNorm
    scales/biases and dense biases act on one channel: 1 − a^{<B} of that channel;
  * the e_B gradient compensated (HAT eq. 3, as in the authors' code):
    g · s_max·[cosh(clip(s·e, ±50)) + 1] / (s·[cosh(e) + 1]), which turns the gradient through
    σ(s·e) into s_max·σ'(e)·∂L/∂a whatever s is; note the denominator is cosh(e), not cosh(s·e);
  * plain SGD (lr `learning_rate`, like the other Task-B methods) on the backbone, the Task-B
    head and e_B; then e_B is clipped to ±clip_embedding (the authors' code: 6).
The Task-A head and e_A are never updated. e_B starts N(0, 1) (the authors' torch.nn.Embedding
default), as does e_A. Not reproduced from the authors' code: its gradient-norm clipping at
10⁴ (never active at our scales) and its validation-based learning-rate decay.

With binary Task-A gates (large s_max) and SGD, every parameter that can change A's output
through A's gates gets a zero gradient, so A's gated representation is exactly preserved
(`hat_test.py`). With the paper's s_max = 3 the gates are σ(3·e) with |e| ≤ 6, so units A uses
keep a fraction 1 − σ(3·e) of their gradient (e.g. 5% at e = 1): protection is partial.

Network layout (what `init` takes and `network(state)` returns): the usual
{'backbone', 'head_a', 'head_b'} plus 'hat': {'emb_a': {unit: [C]}, 'emb_b': {unit: [C]}};
`init` draws 'emb_b' when it is missing and raises without 'emb_a'. `represent(network, x,
task)` is the backbone gated by task's gates at s = s_max (task 0 = A, 1 = B).
"""

import hashlib
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from l2r import checkpoint, models, pretrain, report, rng, training
from l2r.data import stream
from l2r.methods.base import Batch, Method

THRES_COSH = 50.0  # The authors' code clips s·e to ±50 inside the compensation's cosh.


class HatState(NamedTuple):
    """Task-B state: the network (with 'hat' embeddings) and the steps taken so far."""

    network: dict
    step: jax.Array  # int32 [], Task-B steps taken (sets s).


def init_embeddings(key: jax.Array, model: models.Model) -> dict:
    """Embeddings ~ N(0, 1), nested like the params ({"stage1_block0": {"gn1": [C]}, ...}, so
    checkpoints need no "/" in keys), drawn at once (one threefry call: fast to compile)."""
    names = sorted(model.units)
    sizes = [model.units[n] for n in names]
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    flat = dict(zip(names, jnp.split(noise, np.cumsum(sizes)[:-1]), strict=True))
    return traverse_util.unflatten_dict(flat, sep="/")


def gates(embeddings: dict, s) -> dict[str, jax.Array]:
    """HAT eq. 1: {unit layer path: σ(s·e)}, flat (the `masks` of `Model.apply`)."""
    flat = traverse_util.flatten_dict(embeddings, sep="/")
    return {k: jax.nn.sigmoid(s * e) for k, e in flat.items()}


def anneal(batch, num_batches: int, s_max: float):
    """s for 0-based `batch` of `num_batches` (HAT eq. 1 with b = batch + 1); s_max if B = 1."""
    if num_batches <= 1:
        return jnp.float32(s_max)
    frac = jnp.asarray(batch, jnp.float32) / (num_batches - 1)
    return 1.0 / s_max + (s_max - 1.0 / s_max) * frac


def attention_penalty(masks: dict[str, jax.Array], previous: dict | None = None) -> jax.Array:
    """HAT eq. 5 without λ: Σ a·(1 − a^{<t}) / Σ (1 − a^{<t}) over all units (mean a if none)."""
    if previous is None:
        total = sum(m.sum() for m in masks.values())
        return total / sum(m.size for m in masks.values())
    free = {k: 1.0 - previous[k] for k in masks}
    total = sum((masks[k] * free[k]).sum() for k in masks)
    return total / jnp.maximum(sum(f.sum() for f in free.values()), 1e-8)


def compensate(grads: dict, embeddings: dict, s, s_max: float) -> dict:
    """HAT eq. 3: g · s_max·[cosh(clip(s·e, ±50)) + 1] / (s·[cosh(e) + 1]), leafwise."""

    def one(g, e):
        num = jnp.cosh(jnp.clip(s * e, -THRES_COSH, THRES_COSH)) + 1.0
        return g * (s_max / s) * num / (jnp.cosh(e) + 1.0)

    return jax.tree.map(one, grads, embeddings)


def _group_max(gate: jax.Array, groups: int) -> jax.Array:
    """[C] gate -> [C], each channel given the max over its GroupNorm group (contiguous)."""
    per_group = gate.reshape(groups, -1).max(axis=1)
    return jnp.repeat(per_group, gate.shape[0] // groups)


def conditioning(model: models.Model, previous: dict[str, jax.Array], backbone: dict) -> dict:
    """HAT eq. 2: the factor 1 − min(a_out, a_in) for every leaf of `backbone` (same tree).

    Args:
      model: the backbone's model (its `wiring` and GroupNorm `groups`).
      previous: cumulative gates of earlier tasks, {unit layer: [C]} (a^{<B} = σ(s_max·e_A)).
      backbone: params or gradients, only for the tree structure and shapes.

    Returns:
      Factors shaped like `backbone`'s leaves: kernels [.., Cin, Cout] get 1 − min(a_in, a_out)
      (conv a_out: max over its GroupNorm group), 1-D leaves 1 − a_out of their channel.
    """
    groups = model.kwargs["groups"]
    out = {}
    for path, leaf in traverse_util.flatten_dict(backbone).items():
        layer = "/".join(path[:-1])
        if layer not in model.wiring:
            raise ValueError(f"HAT: no wiring for parameter layer {layer!r} of {model.name}.")
        unit, inputs = model.wiring[layer]
        a_out = previous[unit]
        if leaf.ndim == 1:
            out[path] = 1.0 - a_out
            continue
        if leaf.ndim == 4:  # A conv kernel feeding a GroupNorm.
            a_out = _group_max(a_out, groups)
        a_in = jnp.ones((leaf.shape[-2],), a_out.dtype)
        if inputs:
            a_in = jnp.max(jnp.stack([previous[k] for k in inputs]), axis=0)
        factor = 1.0 - jnp.minimum(a_in[:, None], a_out[None, :])
        out[path] = jnp.broadcast_to(factor, leaf.shape)
    return traverse_util.unflatten_dict(out)


def clip_embeddings(embeddings: dict, clip: float) -> dict:
    return jax.tree.map(lambda e: jnp.clip(e, -clip, clip), embeddings)


def gated_representation(model, backbone, embeddings, s, x) -> jax.Array:
    """[N, D] representation of `x` through the gates σ(s·e)."""
    return model.apply(backbone, x, masks=gates(embeddings, s)).representation


def make_hat(
    model: models.Model,
    learning_rate: float,
    s_max: float,
    reg: float,
    clip_embedding: float,
    anneal_steps: int,
    name: str = "hat",
) -> Method:
    """HAT on Task B (module docstring); `anneal_steps` is the Task-B run's length in steps."""
    if anneal_steps < 1:
        raise ValueError(f"make_hat: anneal_steps must be >= 1, got {anneal_steps!r}.")

    def init(network, data_a, key):
        del data_a
        hat = dict(network.get("hat", {}))
        if "emb_a" not in hat:
            raise ValueError(
                "HAT needs the Task-A embeddings in network['hat']['emb_a']: pre-train Task A "
                "with l2r.methods.hat.pretrain_hat and pass its 'emb_a' along."
            )
        if "emb_b" not in hat:
            hat["emb_b"] = init_embeddings(key, model)
        return HatState({**network, "hat": hat}, jnp.zeros((), jnp.int32))

    def loss_fn(trainable, previous, s, batch: Batch):
        masks = gates(trainable["emb_b"], s)
        rep = model.apply(trainable["backbone"], batch.x_b, masks=masks).representation
        ce = training.cross_entropy(models.apply_head(trainable["head_b"], rep), batch.y_b)
        penalty = attention_penalty(masks, previous)
        return ce + reg * penalty, (ce, penalty)

    def step(state: HatState, batch: Batch, key):
        del key
        network = state.network
        s = anneal(state.step % anneal_steps, anneal_steps, s_max)
        previous = gates(network["hat"]["emb_a"], s_max)
        trainable = {
            "backbone": network["backbone"],
            "head_b": network["head_b"],
            "emb_b": network["hat"]["emb_b"],
        }
        grads, (ce, penalty) = jax.grad(loss_fn, has_aux=True)(trainable, previous, s, batch)
        factors = conditioning(model, previous, grads["backbone"])
        grads["backbone"] = jax.tree.map(jnp.multiply, grads["backbone"], factors)
        grads["emb_b"] = compensate(grads["emb_b"], trainable["emb_b"], s, s_max)
        trainable = jax.tree.map(lambda p, g: p - learning_rate * g, trainable, grads)
        hat = {
            "emb_a": network["hat"]["emb_a"],
            "emb_b": clip_embeddings(trainable["emb_b"], clip_embedding),
        }
        network = {
            **network,
            "backbone": trainable["backbone"],
            "head_b": trainable["head_b"],
            "hat": hat,
        }
        return HatState(network, state.step + 1), {"loss": ce, "attention": penalty, "s": s}

    def represent(network, x, task):
        emb = network["hat"]["emb_a" if task == 0 else "emb_b"]
        return gated_representation(model, network["backbone"], emb, s_max, x)

    return Method(
        name=name,
        init=init,
        step=step,
        network=lambda state: state.network,
        represent=represent,
    )


# --- Task-A pre-training with HAT ------------------------------------------------------------


def fingerprint(config) -> str:
    """Hash of what HAT's Task-A pre-training depends on: plain pre-training's plus task_b.hat."""
    blob = {"pretrain": pretrain.fingerprint(config), "hat": config.task_b.hat.to_dict()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def _train_hat(config, model, task, seeds, ckpt_ids):
    """Trains len(seeds) HAT networks on Task A together; returns stacked params, accuracies."""
    cfg, hat = config.pretrain, config.task_b.hat
    s_max, reg, clip = float(hat.s_max), float(hat.reg), float(hat.clip_embedding)
    opt = pretrain.make_optimizer(cfg)
    n_train = task.train_labels.shape[0]
    num_classes = int(task.train_labels.max()) + 1
    input_shape = (1, *task.train_images.shape[1:])
    epoch = n_train // cfg.batch_size  # Batches per epoch, as in `stream.index_stream`.

    # Same init and batches as plain pre-training (same streams), plus Task-A embeddings.
    keys = jnp.stack([rng.key_for(config.seed, "pretrain_init", i) for i in ckpt_ids])
    emb_keys = jnp.stack([rng.key_for(config.seed, "hat_emb_a", i) for i in ckpt_ids])
    params = jax.vmap(
        lambda k, ke: {
            **pretrain.init_network(model, k, input_shape, num_classes),
            "emb_a": init_embeddings(ke, model),
        }
    )(keys, emb_keys)
    opt_state = jax.vmap(opt.init)(params)
    idx = stream.index_streams(n_train, cfg.batch_size, cfg.steps, seeds)  # [S, T, B]
    aug = (
        training.augment_streams(cfg.batch_size, cfg.steps, seeds) if config.data.augment else None
    )

    def loss_fn(p, x, y, s):
        masks = gates(p["emb_a"], s)
        rep = model.apply(p["backbone"], x, masks=masks).representation
        ce = training.cross_entropy(models.apply_head(p["head"], rep), y)
        return ce + reg * attention_penalty(masks), ce

    def step(carry, xs):
        p, opt_s, data = carry
        idx_B, aug_B, t = xs
        x, y = training.gather(data, idx_B, aug_B)
        s = anneal(t % epoch, epoch, s_max)
        grads, ce = jax.grad(loss_fn, has_aux=True)(p, x, y, s)
        grads["emb_a"] = compensate(grads["emb_a"], p["emb_a"], s, s_max)
        updates, opt_s = opt.update(grads, opt_s, p)
        p = optax.apply_updates(p, updates)
        p["emb_a"] = clip_embeddings(p["emb_a"], clip)
        return (p, opt_s, data), ce

    @jax.jit
    def run_chunk(p, opt_s, data, idx_chunk, aug_chunk, steps):
        def one_seed(p, opt_s, i, a):
            (p, opt_s, _), losses = jax.lax.scan(step, (p, opt_s, data), (i, a, steps))
            return p, opt_s, losses.mean()

        return training.map_seeds(one_seed, p, opt_s, idx_chunk, aug_chunk)

    progress = report.Progress(cfg.steps, f"pretrain HAT x{len(seeds)}")
    for start in range(0, cfg.steps, pretrain.CHUNK_STEPS):
        stop = min(start + pretrain.CHUNK_STEPS, cfg.steps)
        params, opt_state, loss = run_chunk(
            params,
            opt_state,
            task,
            idx[:, start:stop],
            training.slice_steps(aug, start, stop),
            jnp.arange(start, stop),
        )
        progress.update(stop, loss=float(loss.mean()))

    @jax.jit
    def evaluate(params, data):
        def one(p):
            apply = lambda b, x: models.Output(  # noqa: E731
                gated_representation(model, b, p["emb_a"], s_max, x), None
            )
            rep = training.features(apply, p["backbone"], data.test_images, data.mean, data.std)
            acc = training.accuracy(models.apply_head(p["head"], rep), data.test_labels)
            a = jnp.concatenate(list(gates(p["emb_a"], s_max).values()))
            return acc, (a > 0.5).mean()

        return jax.lax.map(one, params)

    accs, used = evaluate(params, task)
    return params, np.asarray(accs), np.asarray(used)


def pretrain_hat(config, model: models.Model, task_a: training.DeviceTask, workdir: str):
    """`pretrain.pretrained_networks` for HAT: Task-A networks with their Task-A embeddings.

    Hyper-parameters come from `config.pretrain` (steps, batch, optimiser) and
    `config.task_b.hat` (s_max, reg, clip_embedding). Checkpoints are cached like plain
    pre-training's, under <pretrain dir>/hat-<fingerprint>/ckpt_<i>.

    Returns:
      ({'backbone', 'head', 'emb_a'} stacked over checkpoints [n, ...], Task-A test accuracies
      through the Task-A gates at s_max [n], seconds spent training).
    """
    cfg = config.pretrain
    root = os.path.join(cfg.dir or os.path.join(workdir, "pretrain"), "hat-" + fingerprint(config))

    def train(ids):
        seeds = [rng.seed_for(config.seed, "pretrain_data", i) for i in ids]
        params, accs, used = _train_hat(config, model, task_a, seeds, ids)
        return [
            (jax.tree.map(lambda a, j=j: a[j], params),
             {"test_accuracy": float(accs[j]), "seed": seeds[j], "units_used": float(used[j])})
            for j in range(len(ids))
        ]  # fmt: skip

    return checkpoint.cached_networks(root, cfg.num_checkpoints, cfg.seeds_per_call, train, "HAT")
