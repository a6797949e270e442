"""Algorithm 1 with three tasks (Exp 5, paper §5.6): the episodes of `SequentialTrainer`.

Phase 0: the student learns Task 2 through the meta-learner; the teacher learns D_A ∪ D_B with
D_A = Task 1, D_B = Task 2. Phase 1: the student learns Task 3 (its own fresh head) from where
phase 0 left it: student weights, LSTM state and teacher are all kept; D_A = Task 1 ∪ Task 2,
D_B = Task 3; the loss threshold is the curriculum's plus `meta.switch_threshold_step` (§5.6:
+5). An episode switches when its loss exceeds the threshold or after `meta.inner_steps` steps on
Task 2, and restarts when phase 1's loss exceeds its threshold, after `meta.inner_steps` steps on
Task 3, or when it diverges; both happen at window ends. Departures: the paper gives no step
limit for the phases (`meta.inner_steps` caps each); the teacher's A batch in phase 1 is half
Task 1, half Task 2 (Algorithm 1 says only D_1..k-1).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2r import distributed, meta_train, models, rng, training
from l2r.methods.multitask import swap_heads, teacher_step


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


# ----------------------------------------------------------------------------------------------
# Meta-training.


class SequentialTask(NamedTuple):
    """An episode's tasks (kept in `Episodes.classes`)."""

    classes: jax.Array  # int32 [2, n_way]: pool labels of Task 2 (row 0) and Task 3 (row 1)
    phase: jax.Array  # int32 []: 0 while learning Task 2, 1 while learning Task 3


class SequentialTrainer(meta_train.MetaTrainer):
    """Algorithm 1 with three tasks (see the module docstring)."""

    history_metrics = ("switches",)  # episodes that moved on to Task 3, per window

    def __init__(self, config, model, pretrained, data_1, pool, pair_table):
        """Args:
        data_1: Task 1 (labels 0..n1-1); pool: the meta-training classes, labels 0..P-1.
        pair_table: int [T, 2, n_way]; episode i learns Task 2 = pair_table[i % T, 0], then
          Task 3 = pair_table[i % T, 1], each relabelled 0..n_way-1 in row order.
        """
        pair_table = np.asarray(pair_table, np.int32)
        if pair_table.ndim != 3 or pair_table.shape[1] != 2:
            raise ValueError(f"pair_table must be [T, 2, n_way], got {pair_table.shape}.")
        super().__init__(config, model, pretrained, data_1, pool, pair_table[:, 0])
        inputs = self.inputs._replace(class_table=jnp.asarray(pair_table))
        self.inputs = self.place_inputs(inputs)
        self._whole_task = False
        self.num_classes_1 = int(np.max(np.asarray(data_1.train_labels))) + 1
        self.switch_step = float(config.meta.switch_threshold_step)

    def _network0(self, pretrained, episode_id):
        net = super()._network0(pretrained, episode_id)
        key = jax.random.fold_in(rng.key_for(self.seed, "meta_head_c"), episode_id)
        head_c = models.init_head(key, self.model.representation_dim, self.num_classes_b)
        return {**net, "head_c": head_c}

    def _fresh(self, inp, ids):
        eps = super()._fresh(inp, ids)  # classes: [E, 2, n_way] rows of the pair table
        return eps._replace(classes=SequentialTask(eps.classes, jnp.zeros_like(ids)))

    def _gather_b(self, inp, idx, task: SequentialTask):
        classes = jnp.where(task.phase == 1, task.classes[1], task.classes[0])
        return meta_train.MetaTrainer._gather_b(inp, idx, classes)

    def _gather_a(self, inp, idx, task: SequentialTask):
        """Indices below |Task 1| are Task-1 examples; the others (phase 1) index the pool,
        offset by |Task 1|: Task-2 examples, labelled n1 + their Task-2 label."""
        n_1 = inp.data_a.train_labels.shape[0]
        from_2 = idx >= n_1
        x_1, y_1 = training.gather(inp.data_a, jnp.where(from_2, 0, idx))
        x_2, y_2 = meta_train.MetaTrainer._gather_b(
            inp, jnp.where(from_2, idx - n_1, 0), task.classes[0]
        )
        x = jnp.where(from_2.reshape((-1,) + (1,) * (x_1.ndim - 1)), x_2, x_1)
        return x, jnp.where(from_2, self.num_classes_1 + y_2, y_1)

    def _teacher_step(self, network, x_a, y_a, x_b, y_b, task: SequentialTask):
        return teacher_step(self.model, self.lr, self.num_classes_1, network, x_a, y_a, x_b, y_b,
                            task.phase)[0]  # fmt: skip

    def _student_step(self, theta, network, lstm, x_b, y_b, task: SequentialTask):
        on_3 = task.phase == 1  # The student trains the current task's head: 'head_c' on Task 3.
        view = _where(on_3, swap_heads(network), network)
        view, lstm = super()._student_step(theta, view, lstm, x_b, y_b, task)
        return _where(on_3, swap_heads(view), view), lstm

    def _window_end(self, inp, state, carried, alive, diverged):
        task = carried.classes
        phase_over = (~alive) | (carried.step >= self.cfg.inner_steps)
        switch = phase_over & ~diverged & (task.phase == 0)  # on to Task 3, all state kept
        done = phase_over & ~switch
        new_ids = state.episodes_started + jnp.cumsum(done.astype(jnp.int32)) - 1
        ids = jnp.where(done, new_ids, carried.id)
        switched = carried._replace(
            step=jnp.where(switch, 0, carried.step),  # steps count per phase
            classes=task._replace(phase=jnp.where(switch, 1, task.phase)),
        )
        episodes = meta_train.where_episodes(done, self._fresh(inp, ids), switched)
        return episodes, done, done & ~alive

    def batches(self, window: int, num_steps: int, task: SequentialTask):
        """Host-made indices ([E, s, Ba], [E, s, Bb]) of a window, a function of the window
        index and the episodes' tasks and phases. B: the current task's examples; A: Task 1,
        and in phase 1 the last Ba // 2 of each batch from Task 2 (see `_gather_a`)."""
        gen = rng.numpy_rng(self.seed, "meta_batches", window)
        e, n_1 = self.cfg.num_episodes_parallel, self.inputs.data_a.train_labels.shape[0]
        idx_a = gen.integers(0, n_1, (e, num_steps, self.batch_a), dtype=np.int32)
        idx_b = np.empty((e, num_steps, self.batch_b), np.int32)
        half = self.batch_a // 2
        for i, (rows, phase) in enumerate(zip(task.classes, task.phase, strict=True)):
            pools = [np.concatenate([self._by_class[c] for c in row]) for row in rows]
            idx_b[i] = pools[phase][gen.integers(0, len(pools[phase]), (num_steps, self.batch_b))]
            if phase == 1:
                draw = gen.integers(0, len(pools[0]), (num_steps, half))
                idx_a[i, :, self.batch_a - half :] = n_1 + pools[0][draw]
        return idx_a, idx_b

    def run_window(self, state):
        threshold, s = meta_train.curriculum(self.cfg, int(state.episodes_done))
        task = distributed.gather(state.episodes.classes)
        thresholds = np.float32(threshold) + np.float32(self.switch_step) * task.phase
        idx_a, idx_b = self.batches(int(state.window), s, task)
        state, metrics = self.call_window(state, idx_a, idx_b, thresholds)
        # From the host copy: the state passed in may have been donated to the window.
        switched = (task.phase == 0) & (distributed.gather(state.episodes.classes.phase) == 1)
        metrics = {**metrics, "switched": switched, "switches": int(switched.sum())}
        return state, metrics, threshold, s
