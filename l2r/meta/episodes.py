"""The episodes of Algorithm 1 with two tasks (Exps 1-4), as a record of functions.

An episode starts teacher and student from a pre-trained network w0 with a fresh Task-B head; at
each inner step the teacher takes an SGD step on A ∪ B, the student a step on B through the
meta-learner. `Problem` bundles those per-episode functions with the host-side ones (batch
indices, thresholds) so that the window (`l2r.meta.window`) and the loop (`l2r.meta.loop`) take
it as an argument; `l2r.meta.three_tasks` builds Exp 5's episodes by wrapping these.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2r import metalearner, models, rng, training
from l2r.methods.base import Batch
from l2r.methods.learned import build_metalearner, student_step
from l2r.methods.sgd import make_teacher


class Episodes(NamedTuple):
    """E episodes in flight (leading axis E on every leaf)."""

    teacher: dict  # {'backbone', 'head_a', 'head_b', ...}
    student: dict  # the same heads as the teacher
    lstm: metalearner.State
    step: jax.Array  # int32 [E]: inner steps taken since the episode (or its phase) started
    id: jax.Array  # int32 [E]: global episode number (its w0 checkpoint and fresh heads)
    # The episode's task: two tasks, int32 [E, n_way] Task-B classes (data_b labels); any pytree
    # with a leading axis E for other problems (Exp 5: both later tasks and the phase).
    task: Any


class Inputs(NamedTuple):
    """Arrays the compiled window reads; passed as arguments (a closure would bake them into
    the program as constants)."""

    data_a: training.DeviceTask  # Task A
    data_b: training.DeviceTask  # Task B (meta-training part), or the pool of Task-B classes
    pretrained: dict  # stacked [n_ckpt, ...] {'backbone', 'head'}: the w0 of the episodes
    class_table: jax.Array  # int32 [T, ...]: episode i learns the task of row i % T


class Problem(NamedTuple):
    """One kind of episode. Device functions run inside the jitted window, per episode (no
    leading E axis unless said); host functions run in the loop on numpy arrays.

    `task` below is one episode's `Episodes.task`; `tasks` the host copy of all of them (None
    when `needs_tasks` is false).
    """

    inputs: Inputs
    ml: metalearner.MetaLearner  # the student's update rule
    learning_rate: float  # α of teacher and student (§3: 0.1)
    # (inp, ids int32 [E]) -> Episodes: fresh episodes starting from their w0.
    fresh: Callable
    # (inp, idx [Ba], task) -> (x [Ba, H, W, C], y [Ba]): the teacher's Task-A batch.
    gather_a: Callable
    # (inp, idx [Bb], task) -> (x [Bb, H, W, C], y [Bb]): a Task-B batch in the task's labels.
    gather_b: Callable
    # (network, x_a, y_a, x_b, y_b, task) -> network: one teacher step on A ∪ B.
    teacher_step: Callable
    # (theta, network, lstm, x_b, y_b, task) -> (network, lstm): one student step on B.
    student_step: Callable
    # (inp, episodes_started int32 [], carried Episodes [E], alive bool [E], diverged bool [E])
    #   -> (Episodes [E], done bool [E], restarted bool [E]): what becomes of each episode at a
    #   window's end (no gradient flows here); `done` ones are counted by the curriculum.
    window_end: Callable
    # host: (window, num_steps, tasks) -> (idx_a int32 [E, s, Ba], idx_b int32 [E, s, Bb]).
    batches: Callable
    # host: (curriculum threshold, tasks) -> float32 [] or [E]: each episode's loss threshold.
    thresholds: Callable
    # host: (tasks before the window, tasks after) -> {name: value}; None: no extra metrics.
    host_metrics: Callable | None
    history_metrics: tuple[str, ...]  # scalar `host_metrics` kept in the history, per window
    needs_tasks: bool  # whether the host functions read the episodes' tasks
    module: str  # the module that built the problem (its source is part of the cache key)


def make_metalearner(cfg: ml_collections.ConfigDict, model: models.Model, image_shape):
    """The meta-learner of `model`'s backbone configured by the `meta` group."""
    ml_cfg = metalearner.Config(
        hidden_kernel=cfg.hidden_kernel,
        hidden_vector=cfg.hidden_vector,
        clip=cfg.input_clip,
        first_order=cfg.first_order,
        gate=cfg.gate,
        log_range=cfg.get("log_range", 2.0),
        pull=cfg.get("pull", False),
        pull_max=cfg.get("pull_max", 0.05),
        history=cfg.get("history", False),
    )
    return build_metalearner(model, (1, *tuple(image_shape)[1:]), ml_cfg)


def where_episodes(mask_E, new, old):
    """Per episode, the leaves of `new` where `mask_E` [E] is true, else those of `old`."""
    pick = lambda n, o: jnp.where(mask_E.reshape(mask_E.shape + (1,) * (o.ndim - 1)), n, o)  # noqa: E731
    return jax.tree.map(pick, new, old)


def network0(seed: int, model: models.Model, num_classes: int, pretrained, episode_id):
    """w0 of an episode: its pre-trained checkpoint (`episode_id` mod their number) and a fresh
    Task-B head of `num_classes` outputs."""
    n = jax.tree.leaves(pretrained)[0].shape[0]
    net = jax.tree.map(lambda a: a[episode_id % n], pretrained)
    key = jax.random.fold_in(rng.key_for(seed, "meta_head_b"), episode_id)
    head_b = models.init_head(key, model.representation_dim, num_classes)
    return {"backbone": net["backbone"], "head_a": net["head"], "head_b": head_b}


def gather_b(inp: Inputs, idx_B, classes):
    """A batch of data_b with labels mapped to the episode's 0..n_way-1 (`classes` [n_way])."""
    x, y = training.gather(inp.data_b, idx_B)
    return x, jnp.argmax(y[:, None] == classes[None, :], axis=1).astype(jnp.int32)


def episode_lengths(cfg: ml_collections.ConfigDict, seed: int, ids):
    """Inner steps each episode runs at most, int32 [E] for episode ids [E].

    `meta.inner_steps` for all; with `meta.inner_steps_min` > 0, each episode's own length,
    uniform on [inner_steps_min, inner_steps] and fixed by its id, so that meta-training sees
    students at every distance from w0 up to the horizon the rule is meant to hold for.
    """
    low = cfg.get("inner_steps_min", 0)
    if not low:
        return jnp.full(ids.shape, cfg.inner_steps, jnp.int32)
    key = rng.key_for(seed, "episode_length")
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), low, cfg.inner_steps + 1)  # noqa: E731
    return jax.vmap(draw)(ids)


def examples_by_class(labels) -> list[np.ndarray]:
    """Host-side: the indices of each class's examples in `labels` [N]."""
    labels = np.asarray(labels)
    return [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]


def next_ids(episodes_started, done_E, ids_E):
    """Episode ids after a window's end: the `done` ones take the next unused ids in order."""
    new_ids = episodes_started + jnp.cumsum(done_E.astype(jnp.int32)) - 1
    return jnp.where(done_E, new_ids, ids_E)


def two_tasks(config, model: models.Model, pretrained, data_a, data_b, class_table=None):
    """The episodes of Exps 1-4: learn Task B (or an n-way task of a pool) after Task A.

    Args:
      config: the experiment config (`meta`, `task_b`, `seed`).
      pretrained: stacked [n, ...] {'backbone', 'head'}; episode i starts from i % n.
      data_a: Task A; data_b: Task B (Exp 1) or a pool of classes (Exps 2-4), labels 0..P-1.
      class_table: int [T, n_way] n-way tasks of data_b's labels; episode i learns task
        i % T, its labels mapped to 0..n_way-1 in row order. None: one task of all labels.

    Returns:
      A `Problem`.
    """
    cfg, seed = config.meta, config.seed
    labels_b = np.asarray(data_b.train_labels)
    if class_table is None:
        class_table = np.arange(labels_b.max() + 1)[None]
    class_table = np.asarray(class_table, np.int32)
    inputs = Inputs(data_a, data_b, pretrained, jnp.asarray(class_table))
    by_class = examples_by_class(labels_b)  # host-side, for the batches of n-way episodes
    whole_task = class_table.shape[0] == 1 and np.array_equal(
        np.sort(class_table[0]), np.arange(labels_b.max() + 1)
    )
    lr = config.task_b.learning_rate  # §3: α = 0.1 for teacher and student
    # §3: teacher batch 128 (64 A + 64 B), student batch 64 (B only).
    batch_a, batch_b = config.task_b.teacher_batch_a, config.task_b.batch_size
    ml = make_metalearner(cfg, model, data_b.train_images.shape)
    teacher = make_teacher(model, lr)
    w0 = functools.partial(network0, seed, model, class_table.shape[1])

    def fresh(inp: Inputs, ids):
        nets = jax.vmap(w0, (None, 0))(inp.pretrained, ids)
        lstm = jax.vmap(lambda net: ml.start(net["backbone"]))(nets)
        classes = inp.class_table[ids % inp.class_table.shape[0]]
        return Episodes(nets, nets, lstm, jnp.zeros_like(ids), ids, classes)

    def gather_a(inp: Inputs, idx, classes):
        del classes
        return training.gather(inp.data_a, idx)

    def teacher_step(network, x_a, y_a, x_b, y_b, classes):
        del classes
        return teacher.step(network, Batch(x_b, y_b, x_a, y_a), None)[0]

    def student(theta, network, lstm, x_b, y_b, classes):
        del classes
        return student_step(model, ml, theta, lr, network, lstm, x_b, y_b)[:2]

    def window_end(inp: Inputs, episodes_started, carried: Episodes, alive, diverged):
        # Algorithm 1, line 25: an episode over the threshold restarts from w0, as does one that
        # reached its length (`episode_lengths`); a diverged one restarts like any other that is
        # not alive.
        del diverged
        done = (~alive) | (carried.step >= episode_lengths(cfg, seed, carried.id))
        ids = next_ids(episodes_started, done, carried.id)
        return where_episodes(done, fresh(inp, ids), carried), done, ~alive

    def batches(window: int, num_steps: int, tasks=None):
        # An n-way episode's examples are drawn uniformly from the union of its classes'.
        gen = rng.numpy_rng(seed, "meta_batches", window)
        e = cfg.num_episodes_parallel
        n_a = inputs.data_a.train_labels.shape[0]
        idx_a = gen.integers(0, n_a, (e, num_steps, batch_a), dtype=np.int32)
        if whole_task:
            n_b = inputs.data_b.train_labels.shape[0]
            idx_b = gen.integers(0, n_b, (e, num_steps, batch_b), dtype=np.int32)
            return idx_a, idx_b
        idx_b = np.empty((e, num_steps, batch_b), np.int32)
        for i, row in enumerate(np.asarray(tasks)):
            pool = np.concatenate([by_class[c] for c in row])
            idx_b[i] = pool[gen.integers(0, len(pool), (num_steps, batch_b))]
        return idx_a, idx_b

    def thresholds(threshold: float, tasks=None):
        del tasks
        return np.asarray(threshold, np.float32)

    return Problem(
        inputs=inputs, ml=ml, learning_rate=lr, fresh=fresh, gather_a=gather_a,
        gather_b=gather_b, teacher_step=teacher_step, student_step=student,
        window_end=window_end, batches=batches, thresholds=thresholds, host_metrics=None,
        history_metrics=(), needs_tasks=not whole_task, module=__name__,
    )  # fmt: skip
