"""Algorithm 1 (paper §4): meta-train the update rule to follow a multi-task teacher.

Every episode starts teacher and student from the same pre-trained network w0 (with a fresh
Task-B head). At each inner step the teacher takes an SGD step on x_a ∪ x_b, the student a step
on x_b through the meta-learner, and the meta-loss is `c · Huber(h, ĥ)` between their
penultimate representations on x_a ∪ x_b; θ takes an Adam step **every inner step**, with the
gradient back-propagated through the steps since the last truncation boundary (T-BPTT).

How the loop is laid out (one compiled call per truncation window of s steps, E episodes):
  1. the teacher's s steps and representations are computed first (they do not depend on θ);
  2. for k = 1..s (a `lax.scan`): the student is re-run from the window's start for k steps
     (a `lax.scan` whose body is under `jax.checkpoint`; steps past k are skipped by `lax.cond`),
     L_k is computed and θ takes one Adam step. Re-running from the boundary makes every
     meta-gradient exactly "back-propagate through the last k steps" with the current θ,
     at (s + 1) / 2 student steps per inner step on average. `meta.update_every_step=False`
     instead takes one step per window on the mean of L_1..L_s (classic T-BPTT, s times fewer
     meta-steps, one student pass per inner step);
  3. the window's last state is carried on, cut from the graph (truncation).
Episodes are a leading axis (`training.map_seeds`: sequential on CPU, vmapped elsewhere); the
meta-gradient is the mean over episodes alive at that step.

Restarts (Algorithm 1, line 25): an episode whose loss exceeds the curriculum threshold stops
contributing for the rest of the window and restarts from w0 at the window's end (at most s − 1
steps later than the paper's immediate restart), as does one that reached `meta.inner_steps`.
A non-finite loss or meta-gradient never reaches θ: the Adam step is skipped, counted, and the
offending episodes restart.

Subclasses change the episodes' tasks through a few small methods: `_gather_a`, `_gather_b`,
`_teacher_step`, `_student_step` (per-episode data and updates, given the episode's `classes`,
which may be any pytree with a leading episode axis) and `_window_end` (what happens to an
episode at a window's end); `l2r.sequential` uses them for Exp 5's three tasks.
"""

import collections
import functools
import os
import time
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from l2r import metalearner, models, report, rng, training
from l2r.methods import Batch, make_teacher
from l2r.methods.learned import build_metalearner, student_step


class Episodes(NamedTuple):
    """E episodes in flight (leading axis E on every leaf)."""

    teacher: dict  # {'backbone', 'head_a', 'head_b'}
    student: dict  # {'backbone', 'head_a', 'head_b'}
    lstm: metalearner.State
    step: jax.Array  # int32 [E]: inner steps taken since the episode (re)started
    id: jax.Array  # int32 [E]: global episode number (its w0 checkpoint and Task-B head)
    # int32 [E, n_way]: the episode's Task-B classes (data_b labels); a subclass may keep any
    # pytree with a leading axis E here (Exp 5: both later tasks and the current phase).
    classes: jax.Array


class Inputs(NamedTuple):
    """Arrays the compiled window reads; passed as arguments (a closure would bake them into
    the program as constants)."""

    data_a: training.DeviceTask  # Task A
    data_b: training.DeviceTask  # Task B (meta-training part), or the pool of Task-B classes
    pretrained: dict  # stacked [n_ckpt, ...] {'backbone', 'head'}: the w0 of the episodes
    class_table: jax.Array  # int32 [T, n_way]: episode i learns classes class_table[i % T]


class MetaState(NamedTuple):
    """Everything a resumed run needs; saved by Orbax as one pytree."""

    theta: dict
    opt_state: optax.OptState
    episodes: Episodes
    window: jax.Array  # int32: windows done (the data stream position)
    episodes_started: jax.Array  # int32: next episode id
    episodes_done: jax.Array  # int32: episodes finished (restarted or complete): curriculum i
    skipped: jax.Array  # int32: meta-steps skipped for non-finite values
    restarts: jax.Array  # int32: episodes restarted for exceeding the threshold


def curriculum(cfg: ml_collections.ConfigDict, episodes_done: int) -> tuple[float, int]:
    """(loss threshold, T-BPTT steps) after `episodes_done` episodes (§5: +5 / +2 every 300)."""
    stage = episodes_done // cfg.curriculum_every
    threshold = min(cfg.threshold + stage * cfg.threshold_step, cfg.threshold_max)
    tbptt = min(cfg.tbptt + stage * cfg.tbptt_step, cfg.tbptt_max)
    return float(threshold), int(tbptt)


REP_LOSSES = ("huber", "standardized", "normalized")


def rep_loss(h_teacher, h_student, cfg) -> jax.Array:
    """c · Huber(h, ĥ) between [N, D] representations, mean over examples and units (§4).

    Two departures from the paper, both against the failure where the student lowers a raw
    distance by shrinking its representation (the best response to features it cannot align):
      standardized: both divided by the teacher's per-unit std over the batch (stop-gradient),
        floored at a tenth of its mean so that dead units do not blow the loss up;
      normalized: each example's representation, student and teacher alike, divided by its
        own RMS over units (a cosine distance in Huber form): scale cannot lower the loss.
    """
    if cfg.rep_loss == "standardized":
        std = jnp.std(h_teacher, axis=0)
        scale = jax.lax.stop_gradient(jnp.maximum(std, 0.1 * jnp.mean(std)) + 1e-6)
        h_teacher, h_student = h_teacher / scale, h_student / scale
    elif cfg.rep_loss == "normalized":
        rms = lambda h: jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-12)  # noqa: E731
        h_teacher, h_student = h_teacher / rms(h_teacher), h_student / rms(h_student)
    return cfg.loss_scale * jnp.mean(optax.huber_loss(h_student, h_teacher, delta=1.0))


def make_optimizer(cfg) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), optax.adam(cfg.learning_rate))


def where_episodes(mask_E, new, old):
    """Per episode, the leaves of `new` where `mask_E` [E] is true, else those of `old`."""
    pick = lambda n, o: jnp.where(mask_E.reshape(mask_E.shape + (1,) * (o.ndim - 1)), n, o)  # noqa: E731
    return jax.tree.map(pick, new, old)


class MetaTrainer:
    """Compiled pieces of Algorithm 1 for one model, task pair and config."""

    def __init__(self, config, model: models.Model, pretrained, data_a, data_b, class_table=None):
        """Args:
        pretrained: stacked [n, ...] {'backbone', 'head'}; episode i starts from i % n.
        data_b: Task B (Exp 1) or a pool of classes (Exps 2-4), labels 0..P-1.
        class_table: int [T, n_way] n-way tasks of data_b's labels; episode i learns task
          i % T, its labels mapped to 0..n_way-1 in row order. None: one task of all labels.
        """
        self.cfg = config.meta
        self.seed = config.seed
        self.model = model
        labels_b = np.asarray(data_b.train_labels)
        if class_table is None:
            class_table = np.arange(labels_b.max() + 1)[None]
        class_table = np.asarray(class_table, np.int32)
        self.inputs = Inputs(data_a, data_b, pretrained, jnp.asarray(class_table))
        # Host-side: each class's training examples, for the batches of n-way episodes.
        self._by_class = [np.flatnonzero(labels_b == c) for c in range(labels_b.max() + 1)]
        self._whole_task = class_table.shape[0] == 1 and np.array_equal(
            np.sort(class_table[0]), np.arange(labels_b.max() + 1)
        )
        self.lr = config.task_b.learning_rate  # §3: α = 0.1 for teacher and student
        # §3: teacher batch 128 (64 A + 64 B), student batch 64 (B only).
        self.batch_a, self.batch_b = config.task_b.teacher_batch_a, config.task_b.batch_size
        self.num_classes_b = class_table.shape[1]
        shape = (1, *data_b.train_images.shape[1:])
        ml_cfg = metalearner.Config(
            hidden_kernel=self.cfg.hidden_kernel,
            hidden_vector=self.cfg.hidden_vector,
            clip=self.cfg.input_clip,
            first_order=self.cfg.first_order,
            gate=self.cfg.gate,
        )
        self.ml = build_metalearner(model, shape, ml_cfg)
        self.opt = make_optimizer(self.cfg)
        # Episodes split over the devices; on each, its share is vmapped (GSPMD partitions the
        # vmapped axis), and the mean meta-gradient becomes an all-reduce.
        self.episodes = training.RunAxis(
            self.cfg.num_episodes_parallel,
            "parallel episodes (meta.num_episodes_parallel)",
            enabled=self.cfg.get("shard_episodes", True),
            strict=True,
        )
        self.mesh = self.episodes.mesh
        # Episodes mapped together: a device's whole share on a mesh; else `episode_chunk`
        # (0: the backend's default).
        self.chunk = self.episodes.chunk or self.cfg.get("episode_chunk", 0) or None
        self.inputs = self.place_inputs(self.inputs)
        self.teacher = make_teacher(model, self.lr)
        self._windows = {}
        self.traces = collections.Counter()  # T-BPTT length -> times its window was traced
        # When set, a window traced more than this many times raises (`chex.assert_max_traces`)
        # instead of warning: tests set 1 to prove that nothing recompiles after the first.
        # chex counts traces per call site, across trainers: set it on one trainer a process.
        self.max_traces: int | None = None

    def place_inputs(self, inputs: Inputs) -> Inputs:
        """`inputs` replicated on every device of the mesh, once: left uncommitted, they would
        be copied to every device at every window. Every process passes the same inputs."""
        return self.episodes.replicate(inputs)

    # -- episodes ---------------------------------------------------------------------------

    def _network0(self, pretrained, episode_id):
        """w0 of an episode: its pre-trained checkpoint and a fresh Task-B head."""
        n = jax.tree.leaves(pretrained)[0].shape[0]
        net = jax.tree.map(lambda a: a[episode_id % n], pretrained)
        key = jax.random.fold_in(rng.key_for(self.seed, "meta_head_b"), episode_id)
        head_b = models.init_head(key, self.model.representation_dim, self.num_classes_b)
        return {"backbone": net["backbone"], "head_a": net["head"], "head_b": head_b}

    def _fresh(self, inp: Inputs, ids):
        nets = jax.vmap(self._network0, (None, 0))(inp.pretrained, ids)
        lstm = jax.vmap(lambda _: self.ml.init_state())(ids)
        classes = inp.class_table[ids % inp.class_table.shape[0]]
        return Episodes(nets, nets, lstm, jnp.zeros_like(ids), ids, classes)

    @staticmethod
    def _gather_b(inp: Inputs, idx, classes):
        """A Task-B batch with labels mapped to the episode's 0..n_way-1."""
        x, y = training.gather(inp.data_b, idx)
        return x, jnp.argmax(y[:, None] == classes[None, :], axis=1).astype(jnp.int32)

    def _gather_a(self, inp: Inputs, idx, classes):
        """The teacher's Task-A batch (subclasses: the union of the earlier tasks)."""
        del classes
        return training.gather(inp.data_a, idx)

    def _teacher_step(self, network, x_a, y_a, x_b, y_b, classes):
        """One teacher SGD step on A∪B."""
        del classes
        return self.teacher.step(network, Batch(x_b, y_b, x_a, y_a), None)[0]

    def _student_step(self, theta, network, lstm, x_b, y_b, classes):
        """One student step on a B batch through the meta-learner: (network, lstm)."""
        del classes
        return student_step(self.model, self.ml, theta, self.lr, network, lstm, x_b, y_b)[:2]

    def _window_end(self, inp: Inputs, state, carried: Episodes, alive, diverged):
        """What becomes of each episode at a window's end (no gradient flows here).

        Args:
          carried: the episodes after the window (`step` already advanced).
          alive: bool [E], the loss stayed finite and within the threshold all window.
          diverged: bool [E], a loss of the window was not finite.

        Returns:
          (episodes, done [E]: finished, counted by the curriculum, replaced by fresh ones,
           restarted [E]: ended early by the threshold or divergence).
        """
        del diverged  # Two tasks: a diverged episode restarts like any other that is not alive.
        done = (~alive) | (carried.step >= self.cfg.inner_steps)
        new_ids = state.episodes_started + jnp.cumsum(done.astype(jnp.int32)) - 1
        ids = jnp.where(done, new_ids, carried.id)
        return where_episodes(done, self._fresh(inp, ids), carried), done, ~alive

    def init(self) -> MetaState:
        """The state before the first window, laid out as the window's outputs are (otherwise
        the second window compiles again): on a mesh, built by one program whose outputs are
        already global arrays, so that it works the same with one process or many."""
        e = self.cfg.num_episodes_parallel
        theta = self.episodes.replicate(self.ml.init(rng.key_for(self.seed, "theta")))

        def build(theta, inputs):
            i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
            episodes = self._fresh(inputs, jnp.arange(e, dtype=jnp.int32))
            return MetaState(theta, self.opt.init(theta), episodes, i32(0), i32(e), i32(0),
                             i32(0), i32(0))  # fmt: skip

        return jax.jit(build, out_shardings=self.state_sharding())(theta, self.inputs)

    def state_sharding(self):
        """θ, its optimiser state and the counters replicated, the episodes split over the
        mesh's 'data' axis (a pytree prefix of `MetaState`); one device without a mesh."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        rep, split = training.replicated(self.mesh), training.split(self.mesh)
        return MetaState(rep, rep, split, rep, rep, rep, rep, rep)

    # -- one truncation window ----------------------------------------------------------------

    def _teacher_window(self, inp: Inputs, teacher, idx_a, idx_b, classes):
        """The teacher's s SGD steps on A∪B and its representations after each: [s, Ba+Bb, D]."""

        def body(network, idx):
            x_a, y_a = self._gather_a(inp, idx[0], classes)
            x_b, y_b = self._gather_b(inp, idx[1], classes)
            network = self._teacher_step(network, x_a, y_a, x_b, y_b, classes)
            x_ab = jnp.concatenate([x_a, x_b])
            return network, self.model.apply(network["backbone"], x_ab).representation

        return jax.lax.scan(body, teacher, (idx_a, idx_b))

    def _student_loss(
        self, inp, theta, student, lstm, idx_a, idx_b, classes, h_teacher, k, num_steps
    ):
        """L_k of one episode: the student re-run k steps from the window start."""

        def body(carry, xs):
            j, ib = xs

            def advance(c):
                x_b, y_b = self._gather_b(inp, ib, classes)
                return self._student_step(theta, *c, x_b, y_b, classes)

            return jax.lax.cond(j < k, advance, lambda c: c, carry), None

        body = jax.checkpoint(body)
        steps = jnp.arange(num_steps)
        (net, mem), _ = jax.lax.scan(body, (student, lstm), (steps, idx_b))
        x_a, _ = self._gather_a(inp, idx_a[k - 1], classes)
        x_b, _ = self._gather_b(inp, idx_b[k - 1], classes)
        h_student = self.model.apply(net["backbone"], jnp.concatenate([x_a, x_b])).representation
        return rep_loss(h_teacher[k - 1], h_student, self.cfg), (net, mem)

    def _window_fn(self, num_steps: int):
        """Jitted (state, idx_a [E,s,Ba], idx_b [E,s,Bb], threshold) -> (state, metrics)."""
        if num_steps in self._windows:
            return self._windows[num_steps]
        cfg, opt = self.cfg, self.opt

        def losses(inp, theta, eps, idx_a, idx_b, h_teacher, k, alive):
            def fn(st, mem, ia, ib, cl, h, alive_e):
                # A dead (restarting) episode sees a constant θ: masking its loss alone would
                # still send 0 · NaN = NaN back from a diverged student into the meta-gradient.
                theta_e = jax.tree.map(
                    lambda t: jnp.where(alive_e, t, jax.lax.stop_gradient(t)), theta
                )
                return self._student_loss(inp, theta_e, st, mem, ia, ib, cl, h, k, num_steps)

            return training.map_seeds(
                fn, eps.student, eps.lstm, idx_a, idx_b, eps.classes, h_teacher, alive,
                chunk=self.chunk,
            )  # fmt: skip

        def meta_update(theta, opt_state, grads, ok):
            updates, new_opt = opt.update(grads, opt_state, theta)
            new_theta = optax.apply_updates(theta, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            return keep(new_theta, theta), keep(new_opt, opt_state)

        def window(state: MetaState, inp: Inputs, idx_a, idx_b, threshold):
            self.traces[num_steps] += 1  # Python runs here only when jit (re)traces.
            if self.traces[num_steps] > 1:
                logging.warning("The %d-step meta-training window was traced again (%d times): "
                                "argument shapes or shardings changed between windows.",
                                num_steps, self.traces[num_steps])  # fmt: skip
            eps = state.episodes
            threshold = jnp.broadcast_to(threshold, eps.step.shape)  # a scalar or one per episode
            teacher_fn = functools.partial(self._teacher_window, inp)
            teachers, h_teacher = training.map_seeds(teacher_fn, eps.teacher, idx_a, idx_b,
                                                     eps.classes, chunk=self.chunk)  # fmt: skip
            e = eps.step.shape[0]

            def mean_loss(theta, k, alive):
                per_episode, aux = losses(inp, theta, eps, idx_a, idx_b, h_teacher, k, alive)
                w = alive.astype(jnp.float32)
                total = jnp.sum(jnp.where(alive, per_episode, 0.0)) / jnp.maximum(w.sum(), 1.0)
                return total, (per_episode, aux)

            def finite(tree):
                return functools.reduce(
                    jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
                )

            if cfg.update_every_step:

                def step_k(carry, k):
                    theta, opt_state, alive, skipped, _ = carry
                    (m, (per_ep, aux)), g = jax.value_and_grad(mean_loss, has_aux=True)(
                        theta, k, alive
                    )
                    ok = finite(m) & finite(g)
                    theta, opt_state = meta_update(theta, opt_state, g, ok)
                    new_alive = alive & jnp.isfinite(per_ep) & (per_ep <= threshold)
                    carry = (theta, opt_state, new_alive, skipped + (~ok).astype(jnp.int32), aux)
                    return carry, per_ep

                carry0 = (state.theta, state.opt_state, jnp.ones(e, bool), state.skipped,
                          (eps.student, eps.lstm))  # fmt: skip
                ks = jnp.arange(1, num_steps + 1)
                (theta, opt_state, alive, skipped, (students, lstms)), loss_k = jax.lax.scan(
                    step_k, carry0, ks
                )  # loss_k: [s, E]
            else:

                def window_loss(theta):
                    # One pass over the window: L_1..L_s from the states along the way.
                    def body(carry, xs, classes):
                        net, mem = carry
                        ia, ib, h_t = xs
                        x_b, y_b = self._gather_b(inp, ib, classes)
                        net, mem = self._student_step(theta, net, mem, x_b, y_b, classes)
                        x_a, _ = self._gather_a(inp, ia, classes)
                        h_s = self.model.apply(
                            net["backbone"], jnp.concatenate([x_a, x_b])
                        ).representation
                        return (net, mem), rep_loss(h_t, h_s, cfg)

                    def one(st, mem, ia, ib, cl, h):
                        step = jax.checkpoint(functools.partial(body, classes=cl))
                        (net, mem), ls = jax.lax.scan(step, (st, mem), (ia, ib, h))
                        return ls, (net, mem)

                    ls, aux = training.map_seeds(one, eps.student, eps.lstm, idx_a, idx_b,
                                                 eps.classes, h_teacher,
                                                 chunk=self.chunk)  # fmt: skip
                    return jnp.mean(ls), (ls, aux)

                (m, (ls, (students, lstms))), g = jax.value_and_grad(window_loss, has_aux=True)(
                    state.theta
                )
                ok = finite(m) & finite(g)
                theta, opt_state = meta_update(state.theta, state.opt_state, g, ok)
                skipped = state.skipped + (~ok).astype(jnp.int32)
                loss_k = ls.T  # [s, E]
                alive = jnp.all(jnp.isfinite(ls) & (ls <= threshold[:, None]), axis=1)

            # Window end: carry the states on (truncation: nothing here is differentiated),
            # restart episodes that exceeded the threshold or finished.
            carried = Episodes(teachers, students, lstms, eps.step + num_steps, eps.id,
                               eps.classes)  # fmt: skip
            diverged = ~jnp.all(jnp.isfinite(loss_k), axis=0)
            episodes, done, restarted = self._window_end(inp, state, carried, alive, diverged)
            n_done = jnp.sum(done.astype(jnp.int32))
            new_state = MetaState(
                theta, opt_state, episodes, state.window + 1, state.episodes_started + n_done,
                state.episodes_done + n_done, skipped,
                state.restarts + jnp.sum(restarted.astype(jnp.int32)),
            )  # fmt: skip
            # nanmean: a diverged episode's NaN is left out of the logged loss.
            metrics = {"loss": jnp.nanmean(loss_k), "restarted": restarted}
            return new_state, metrics

        # The window's state is donated (updated in place) on accelerators, where memory is
        # short; not on CPU, where tests and callers reuse a state after a window.
        donate = (0,) if jax.default_backend() != "cpu" else ()
        if self.max_traces:
            window = chex.assert_max_traces(window, n=self.max_traces)
        if self.mesh is None:
            fn = jax.jit(window, donate_argnums=donate)
        else:
            rep, split = training.replicated(self.mesh), training.split(self.mesh)
            state_sh = self.state_sharding()
            fn = jax.jit(
                window,
                in_shardings=(state_sh, rep, split, split, rep),
                out_shardings=(state_sh, {"loss": rep, "restarted": split}),
                donate_argnums=donate,
            )
        self._windows[num_steps] = fn
        return fn

    def batches(self, window: int, num_steps: int, classes=None):
        """Host-made batch indices of a window: ([E, s, Ba], [E, s, Bb]), a function of the
        window index (and the episodes' classes [E, n_way], needed for n-way episodes) alone,
        so a resumed run sees exactly the batches it would have. An n-way episode's examples
        are drawn uniformly from the union of its classes' training examples."""
        cfg = self.cfg
        gen = rng.numpy_rng(self.seed, "meta_batches", window)
        e = cfg.num_episodes_parallel
        n_a = self.inputs.data_a.train_labels.shape[0]
        idx_a = gen.integers(0, n_a, (e, num_steps, self.batch_a), dtype=np.int32)
        if self._whole_task:
            n_b = self.inputs.data_b.train_labels.shape[0]
            idx_b = gen.integers(0, n_b, (e, num_steps, self.batch_b), dtype=np.int32)
            return idx_a, idx_b
        idx_b = np.empty((e, num_steps, self.batch_b), np.int32)
        for i, row in enumerate(np.asarray(classes)):
            pool = np.concatenate([self._by_class[c] for c in row])
            idx_b[i] = pool[gen.integers(0, len(pool), (num_steps, self.batch_b))]
        return idx_a, idx_b

    def call_window(self, state: MetaState, idx_a, idx_b, threshold):
        """Runs the compiled window of `idx_a.shape[1]` steps on host-made batch indices.

        On a mesh each process places only its own episodes' rows of the indices (every
        process draws them whole: a few hundred kB of integers, so that the data stream does
        not depend on the number of processes) and `jax.make_array_from_process_local_data`
        assembles the global arrays.
        """
        window = self._window_fn(idx_a.shape[1])
        idx_a, idx_b = self.episodes.split((idx_a, idx_b))
        threshold = self.episodes.replicate(np.asarray(threshold, np.float32))
        return window(state, self.inputs, idx_a, idx_b, threshold)

    def run_window(self, state: MetaState):
        threshold, s = curriculum(self.cfg, int(state.episodes_done))
        classes = None if self._whole_task else self.episodes.host(state.episodes.classes)
        idx_a, idx_b = self.batches(int(state.window), s, classes)
        state, metrics = self.call_window(state, idx_a, idx_b, threshold)
        return state, metrics, threshold, s


# ----------------------------------------------------------------------------------------------
# The host loop: curriculum, logging, checkpoints and resume.


def _finished(cfg, state: MetaState, seconds) -> bool:
    if cfg.max_windows and int(state.window) >= cfg.max_windows:
        return True
    if cfg.max_minutes and sum(seconds) >= 60 * cfg.max_minutes:
        return True
    return int(state.episodes_done) >= cfg.episodes


def meta_train(
    config, model, pretrained, data_a, data_b, ckpt_dir: str, trainer=None, class_table=None
):
    """Runs Algorithm 1 until `meta.episodes` episodes have finished (or `meta.max_windows`
    windows, or `meta.max_minutes` of window time, compilation included: a wall-clock budget,
    so the number of windows it allows depends on the machine), resuming from the latest
    checkpoint in `ckpt_dir`.

    Args:
      trainer: a `MetaTrainer` built for the same arguments, to reuse its compiled windows.
      class_table: the episodes' n-way tasks (see `MetaTrainer`); None: all of data_b.

    Returns:
      (trainer, final MetaState, history {name: list} per window; besides the fixed entries,
      one per scalar window metric the trainer names in `history_metrics`).
    """
    cfg = config.meta
    trainer = trainer or MetaTrainer(config, model, pretrained, data_a, data_b, class_table)
    extra = tuple(getattr(trainer, "history_metrics", ()))
    state = trainer.init()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options) as manager:
        history = {k: [] for k in ("window", "episodes_done", "threshold", "tbptt", "loss",
                                   "restarts", "skipped", "seconds", *extra)}  # fmt: skip
        latest = manager.latest_step()
        if latest is not None:
            restored = manager.restore(
                latest,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state), history=ocp.args.JsonRestore()
                ),
            )
            state, history = restored.state, restored.history
            logging.info("Resumed meta-training at window %d (%d episodes done).",
                         int(state.window), int(state.episodes_done))  # fmt: skip
        progress = report.Progress(cfg.episodes, "meta-train", unit="episodes",
                                   start=int(state.episodes_done))  # fmt: skip
        last_save = time.monotonic()

        def save(state):
            manager.save(
                int(state.window),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
                ),
            )

        while not _finished(cfg, state, history["seconds"]):
            t0 = time.monotonic()
            state, metrics, threshold, s = trainer.run_window(state)
            loss = float(metrics["loss"])
            for k, v in (("window", int(state.window)), ("episodes_done", int(state.episodes_done)),
                         ("threshold", threshold), ("tbptt", s), ("loss", loss),
                         ("restarts", int(state.restarts)), ("skipped", int(state.skipped)),
                         ("seconds", time.monotonic() - t0),
                         *((name, float(metrics[name])) for name in extra)):  # fmt: skip
                history[k].append(v)
            progress.update(int(state.episodes_done), window=int(state.window), loss=loss,
                            threshold=threshold, tbptt=s, restarts=int(state.restarts),
                            skipped=int(state.skipped))  # fmt: skip
            if time.monotonic() - last_save > 60 * cfg.checkpoint_minutes:
                save(state)
                last_save = time.monotonic()
        if manager.latest_step() != int(state.window):
            save(state)
        manager.wait_until_finished()
    return trainer, state, history
