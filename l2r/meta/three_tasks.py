"""Algorithm 1 with three tasks (Exp 5, paper §5.6): the episodes, built around the two-task ones.

Phase 0: the student learns Task 2 through the meta-learner; the teacher learns D_A ∪ D_B with D_A
= Task 1, D_B = Task 2. Phase 1: the student learns Task 3 (its own fresh head) from where phase 0
left it: student weights, LSTM state and teacher are all kept; D_A = Task 1 ∪ Task 2, D_B = Task 3;
the loss threshold is the curriculum's plus `meta.switch_threshold_step` (§5.6: +5). An episode
switches when its loss exceeds the threshold or after `meta.inner_steps` steps on Task 2 (or its
own length, `meta.inner_steps_min`), and restarts when phase 1's loss exceeds its threshold, after
as many steps on Task 3, or when it diverges; both happen at window ends. Departures: the paper
gives no step limit for the phases (`meta.inner_steps` caps each); the teacher's A batch in phase 1
is half Task 1, half Task 2 (Algorithm 1 says only D_1..k-1).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2r import models, rng, training
from l2r.meta import episodes
from l2r.methods.multitask import swap_heads, teacher_step


class SequentialTask(NamedTuple):
    """An episode's tasks (kept in `Episodes.task`)."""

    classes: jax.Array  # int32 [2, n_way]: pool labels of Task 2 (row 0) and Task 3 (row 1)
    phase: jax.Array  # int32 []: 0 while learning Task 2, 1 while learning Task 3


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def three_tasks(config, model: models.Model, pretrained, data_1, pool, pair_table):
    """The episodes of Exp 5 (see the module docstring), a `episodes.Problem`.

    Args:
      config: the experiment config (`meta`, `task_b`, `seed`).
      pretrained: stacked [n, ...] {'backbone', 'head'}; episode i starts from i % n.
      data_1: Task 1 (labels 0..n1-1); pool: the meta-training classes, labels 0..P-1.
      pair_table: int [T, 2, n_way]; episode i learns Task 2 = pair_table[i % T, 0], then
        Task 3 = pair_table[i % T, 1], each relabelled 0..n_way-1 in row order.
    """
    pair_table = np.asarray(pair_table, np.int32)
    if pair_table.ndim != 3 or pair_table.shape[1] != 2:
        raise ValueError(f"pair_table must be [T, 2, n_way], got {pair_table.shape}.")
    base = episodes.two_tasks(config, model, pretrained, data_1, pool, pair_table[:, 0])
    cfg, seed, lr = config.meta, config.seed, base.learning_rate
    inputs = base.inputs._replace(class_table=jnp.asarray(pair_table))
    by_class = episodes.examples_by_class(pool.train_labels)
    num_classes_1 = int(np.max(np.asarray(data_1.train_labels))) + 1
    n_way = pair_table.shape[2]
    batch_a, batch_b = config.task_b.teacher_batch_a, config.task_b.batch_size
    switch_step = float(cfg.switch_threshold_step)

    def head_c(episode_id):
        key = jax.random.fold_in(rng.key_for(seed, "meta_head_c"), episode_id)
        return models.init_head(key, model.representation_dim, n_way)

    def fresh(inp, ids):
        eps = base.fresh(inp, ids)  # task: [E, 2, n_way] rows of the pair table
        heads = jax.vmap(head_c)(ids)
        teacher, student = ({**net, "head_c": heads} for net in (eps.teacher, eps.student))
        task = SequentialTask(eps.task, jnp.zeros_like(ids))
        return eps._replace(teacher=teacher, student=student, task=task)

    def gather_b(inp, idx, task: SequentialTask):
        classes = jnp.where(task.phase == 1, task.classes[1], task.classes[0])
        return episodes.gather_b(inp, idx, classes)

    def gather_a(inp, idx, task: SequentialTask):
        # Indices below |Task 1| are Task-1 examples; the others (phase 1) index the pool,
        # offset by |Task 1|: Task-2 examples, labelled n1 + their Task-2 label.
        n_1 = inp.data_a.train_labels.shape[0]
        from_2 = idx >= n_1
        x_1, y_1 = training.gather(inp.data_a, jnp.where(from_2, 0, idx))
        x_2, y_2 = episodes.gather_b(inp, jnp.where(from_2, idx - n_1, 0), task.classes[0])
        x = jnp.where(from_2.reshape((-1,) + (1,) * (x_1.ndim - 1)), x_2, x_1)
        return x, jnp.where(from_2, num_classes_1 + y_2, y_1)

    def teacher(network, x_a, y_a, x_b, y_b, task: SequentialTask):
        return teacher_step(model, lr, num_classes_1, network, x_a, y_a, x_b, y_b, task.phase)[0]

    def student(theta, network, lstm, x_b, y_b, task: SequentialTask):
        on_3 = task.phase == 1  # The student trains the current task's head: 'head_c' on Task 3.
        view = _where(on_3, swap_heads(network), network)
        view, lstm = base.student_step(theta, view, lstm, x_b, y_b, task)
        return _where(on_3, swap_heads(view), view), lstm

    def window_end(inp, episodes_started, carried: episodes.Episodes, alive, diverged):
        task = carried.task
        phase_over = (~alive) | (carried.step >= episodes.episode_lengths(cfg, seed, carried.id))
        switch = phase_over & ~diverged & (task.phase == 0)  # on to Task 3, all state kept
        done = phase_over & ~switch
        ids = episodes.next_ids(episodes_started, done, carried.id)
        switched = carried._replace(
            step=jnp.where(switch, 0, carried.step),  # steps count per phase
            task=task._replace(phase=jnp.where(switch, 1, task.phase)),
        )
        return episodes.where_episodes(done, fresh(inp, ids), switched), done, done & ~alive

    def batches(window: int, num_steps: int, tasks: SequentialTask):
        # B: the current task's examples; A: Task 1, and in phase 1 the last Ba // 2 of each
        # batch from Task 2 (see `gather_a`).
        gen = rng.numpy_rng(seed, "meta_batches", window)
        e, n_1 = cfg.num_episodes_parallel, inputs.data_a.train_labels.shape[0]
        idx_a = gen.integers(0, n_1, (e, num_steps, batch_a), dtype=np.int32)
        idx_b = np.empty((e, num_steps, batch_b), np.int32)
        half = batch_a // 2
        for i, (rows, phase) in enumerate(zip(tasks.classes, tasks.phase, strict=True)):
            pools = [np.concatenate([by_class[c] for c in row]) for row in rows]
            idx_b[i] = pools[phase][gen.integers(0, len(pools[phase]), (num_steps, batch_b))]
            if phase == 1:
                draw = gen.integers(0, len(pools[0]), (num_steps, half))
                idx_a[i, :, batch_a - half :] = n_1 + pools[0][draw]
        return idx_a, idx_b

    def thresholds(threshold: float, tasks: SequentialTask):
        return np.float32(threshold) + np.float32(switch_step) * tasks.phase

    def host_metrics(before: SequentialTask, after: SequentialTask):
        switched = (before.phase == 0) & (after.phase == 1)
        return {"switched": switched, "switches": int(switched.sum())}

    return base._replace(
        inputs=inputs, fresh=fresh, gather_a=gather_a, gather_b=gather_b, teacher_step=teacher,
        student_step=student, window_end=window_end, batches=batches, thresholds=thresholds,
        host_metrics=host_metrics, history_metrics=("switches",), needs_tasks=True,
        module=__name__,
    )  # fmt: skip
