"""HAT, hard attention to the task (Serrà et al., 2018), a §4 baseline: learnable per-task gates
on every unit layer, whose Task-A values shield the weights Task A uses from Task B's gradients.
`pretrain_hat` learns Task A with its gates, `make_hat` learns Task B; each says where it follows
or departs from the paper and the authors' code.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from l2r import checkpoint, console, keys, models, pretrain, rng, training
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
    """HAT eq. 1: {unit layer path: σ(s·e)}, flat (the `masks` of `Model.apply`).

    Every unit layer (each GroupNorm, and the dense `hidden` layer: `models.Model.units`) has an
    embedding e [C] per task; its gate multiplies the layer's output channels after the
    normalisation (HAT §2.2). Soft while s is small, almost binary at s = s_max.
    """
    flat = traverse_util.flatten_dict(embeddings, sep="/")
    return {k: jax.nn.sigmoid(s * e) for k, e in flat.items()}


def anneal(batch, num_batches: int, s_max: float):
    """s for 0-based `batch` of `num_batches` (HAT eq. 1 with b = batch + 1); s_max if B = 1:
    s = 1/s_max + (s_max − 1/s_max)·(b − 1)/(B − 1), from 1/s_max to s_max over B batches."""
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
    """HAT eq. 3: g · s_max·[cosh(clip(s·e, ±50)) + 1] / (s·[cosh(e) + 1]), leafwise.

    As in the authors' code, this turns the gradient through σ(s·e) into s_max·σ'(e)·∂L/∂a
    whatever s is; the denominator is cosh(e), not cosh(s·e).
    """

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

    `out` is the gate of the unit layer a weight writes to, `in` that of the units it reads (the
    max over the unit layers of a residual sum; 1 for the image). A conv kernel's `out` is the
    max over its output channel's GroupNorm group: GroupNorm's mean and variance couple the
    channels of a group, so a kernel feeding a channel A does not use still changes A's
    channels in the same group (with BatchNorm, as in HAT, this does not arise).
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
    head: str = "head_b",
) -> Method:
    """HAT on Task B; `anneal_steps` is the Task-B run's length in steps.

    With `head` a later task's head ('head_c': Task 3 of Exp 5) the method learns that task
    after the one before it, with its own embeddings 'emb_c' (drawn by `init` with the others;
    `switch` restarts the annealing of s): the gates of every earlier task combine by their maximum,
    a^{<t} = max over earlier tasks of σ(s_max·e) (HAT §2.3), and shield the weights those tasks
    use.

    The Task-A gates a^{<B} = σ(s_max·e_A) (kept at s_max as HAT does, not rounded to {0, 1}).
    Each step, with s annealed over `anneal_steps` steps (restarting after that many):
      * loss: cross-entropy of the Task-B head on the backbone gated by a_B = σ(s·e_B), plus
        λ·Σ a_B·(1 − a^{<B}) / Σ (1 − a^{<B}) (HAT eq. 5; 0 if A uses every unit);
      * weight gradients times 1 − min(a^{<B}_out, a^{<B}_in) (HAT eq. 2, `conditioning`);
      * the e_B gradient compensated (HAT eq. 3, `compensate`);
      * plain SGD (like the other Task-B methods) on the backbone, the Task-B head and e_B;
        then e_B is clipped to ±clip_embedding (the authors' code: 6).
    The Task-A head and e_A are never updated; e_B starts N(0, 1) (the authors'
    torch.nn.Embedding default), as does e_A. Not reproduced from the authors' code: its
    gradient-norm clipping at 10⁴ (never active at our scales) and its validation-based
    learning-rate decay.

    With binary Task-A gates (large s_max) every parameter that can change A's output through
    A's gates gets a zero gradient, so A's gated representation is exactly preserved
    (`hat_test.py`). With the paper's s_max = 3 the gates are σ(3·e) with |e| ≤ 6, so units A
    uses keep a fraction 1 − σ(3·e) of their gradient (5% at e = 1): protection is partial.

    Networks are the usual {'backbone', 'head_a', 'head_b'} plus 'hat': {'emb_a': {unit: [C]},
    'emb_b': {unit: [C]}}; `init` draws 'emb_b' when it is missing and raises without 'emb_a'.
    `represent(network, x, task)` is the backbone gated by the task's gates at s = s_max (task
    0 = A, 1 = B); `taps(network, x, task)` the same forward pass's layer taps.
    """
    if anneal_steps < 1:
        raise ValueError(f"make_hat: anneal_steps must be >= 1, got {anneal_steps!r}.")
    emb = "emb_" + head[-1]  # this task's embeddings
    earlier = [f"emb_{c}" for c in "abcdefgh" if c < head[-1]]

    def previous_gates(hat: dict) -> dict:
        """a^{<t}: the earlier tasks' gates at s_max, combined by their maximum."""
        out = gates(hat[earlier[0]], s_max)
        for e in earlier[1:]:
            out = jax.tree.map(jnp.maximum, out, gates(hat[e], s_max))
        return out

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
        # Later tasks' embeddings (a network with 'head_c', ...) are drawn now too, so the probe
        # reads every task through its own gates from the start, as for Task B.
        for i, c in enumerate("cdefgh", 1):
            if f"head_{c}" in network and f"emb_{c}" not in hat:
                hat[f"emb_{c}"] = init_embeddings(jax.random.fold_in(key, i), model)
        return HatState({**network, "hat": hat}, jnp.zeros((), jnp.int32))

    def loss_fn(trainable, previous, s, batch: Batch):
        masks = gates(trainable[emb], s)
        rep = model.apply(trainable["backbone"], batch.x_b, masks=masks).representation
        ce = training.cross_entropy(models.apply_head(trainable[head], rep), batch.y_b)
        penalty = attention_penalty(masks, previous)
        return ce + reg * penalty, (ce, penalty)

    def step(state: HatState, batch: Batch, key):
        del key
        network = state.network
        s = anneal(state.step % anneal_steps, anneal_steps, s_max)
        previous = previous_gates(network["hat"])
        trainable = {
            "backbone": network["backbone"],
            head: network[head],
            emb: network["hat"][emb],
        }
        grads, (ce, penalty) = jax.grad(loss_fn, has_aux=True)(trainable, previous, s, batch)
        factors = conditioning(model, previous, grads["backbone"])
        grads["backbone"] = jax.tree.map(jnp.multiply, grads["backbone"], factors)
        grads[emb] = compensate(grads[emb], trainable[emb], s, s_max)
        trainable = jax.tree.map(lambda p, g: p - learning_rate * g, trainable, grads)
        hat = {**network["hat"], emb: clip_embeddings(trainable[emb], clip_embedding)}
        network = {
            **network,
            "backbone": trainable["backbone"],
            head: trainable[head],
            "hat": hat,
        }
        return HatState(network, state.step + 1), {"loss": ce, "attention": penalty, "s": s}

    def represent(network, x, task):
        embeddings = network["hat"]["emb_" + "abcdefgh"[task]]
        return gated_representation(model, network["backbone"], embeddings, s_max, x)

    def taps(network, x, task):
        embeddings = network["hat"]["emb_" + "abcdefgh"[task]]
        masks = gates(embeddings, s_max)
        return model.apply(network["backbone"], x, taps=True, masks=masks).taps

    def switch(state: HatState, data_done, key):
        del data_done, key
        return HatState(state.network, jnp.zeros((), jnp.int32))

    return Method(
        name=name,
        init=init,
        step=step,
        network=lambda state: state.network,
        represent=represent,
        switch=switch if head != "head_b" else None,
        taps=taps,
    )


# --- Task-A pre-training with HAT ------------------------------------------------------------


def fingerprint(config, task: training.DeviceTask) -> str:
    """The key of HAT's Task-A pre-training: pre-training's `recipe` plus `task_b.hat`, the
    content of `task` and the source this module executes."""
    return keys.stage_key(
        **pretrain.recipe(config),
        hat=config.task_b.hat.to_dict(),
        data=checkpoint.digest(task),
        code=keys.source_digest(__name__),
    )


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
    def run_chunk(carry, data, xs):
        idx_chunk, aug_chunk, steps = xs  # Step numbers [T], shared by the seeds.

        def one_seed(p, opt_s, i, a):
            (p, opt_s, _), losses = jax.lax.scan(step, (p, opt_s, data), (i, a, steps))
            return (p, opt_s), losses.mean()

        return training.map_seeds(one_seed, *carry, idx_chunk, aug_chunk)

    (params, _), _ = training.run_chunked(
        lambda carry, xs: run_chunk(carry, task, xs),
        (params, opt_state),
        cfg.steps,
        training.CHUNK_STEPS,
        lambda start, stop: (
            idx[:, start:stop],
            training.slice_steps(aug, start, stop),
            jnp.arange(start, stop),
        ),
        progress=console.Progress(cfg.steps, f"pretrain HAT x{len(seeds)}"),
        on_chunk=lambda stop, carry, loss: {"loss": float(loss.mean())},
    )

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

    The backbone, the Task-A head and e_A train together with the gates in the forward pass.
    An epoch is B = floor(n_train / batch_size) batches, the epochs of
    `l2r.data.stream.index_stream`, and s restarts at 1/s_max every epoch. Loss: cross-entropy
    + λ·Σ_l Σ a_A,l / Σ_l C_l (HAT eq. 5 with no task before A: the mean gate). Optimiser: the
    pre-training one (`pretrain.make_optimizer`: decay on kernels only, so never on
    embeddings), from the same init and batches as plain pre-training (same random streams), so
    HAT's Task-A network differs from the plain one only by HAT.

    Hyper-parameters come from `config.pretrain` (steps, batch, optimiser) and
    `config.task_b.hat` (s_max, reg, clip_embedding). Checkpoints are cached like plain
    pre-training's, under <pretrain dir>/hat-<fingerprint>/ckpt_<i>.

    Returns:
      ({'backbone', 'head', 'emb_a'} stacked over checkpoints [n, ...], Task-A test accuracies
      through the Task-A gates at s_max [n], seconds spent training).
    """
    cfg = config.pretrain
    root = os.path.join(
        cfg.dir or os.path.join(workdir, "pretrain"), "hat-" + fingerprint(config, task_a)
    )

    def train(ids):
        seeds = [rng.seed_for(config.seed, "pretrain_data", i) for i in ids]
        params, accs, used = _train_hat(config, model, task_a, seeds, ids)
        return [
            (jax.tree.map(lambda a, j=j: a[j], params),
             {"test_accuracy": float(accs[j]), "seed": seeds[j], "units_used": float(used[j])})
            for j in range(len(ids))
        ]  # fmt: skip

    return checkpoint.cached_networks(root, cfg.num_checkpoints, cfg.seeds_per_call, train, "HAT")
