"""One truncation window of Algorithm 1 (paper §4) as a pure, jittable function.

In a window of s inner steps, E episodes in flight: the teacher's s steps and representations
come first (they do not depend on θ); then the meta-loss `c · Huber(h, ĥ)` between teacher and
student representations on x_a ∪ x_b drives θ through T-BPTT, in one of two modes:
  `meta.update_every_step` (Algorithm 1): for k = 1..s the student is re-run from the window's
    start for k steps (a `lax.scan` under `jax.checkpoint`, steps past k skipped by
    `lax.cond`), L_k is computed and θ takes an Adam step, so every meta-gradient is "through
    the last k steps" with the current θ;
  otherwise: one Adam step per window on the mean of L_1..L_s of a single unroll.
The window's last state is carried on, cut from the graph (truncation). The meta-gradient is the
mean over the episodes alive at that step; a non-finite loss or meta-gradient never reaches θ
(the step is skipped and counted). What happens to an episode at the window's end is the
episodes problem's business (`Problem.window_end`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from l2r import models, training
from l2r.meta.episodes import Episodes, Inputs, Problem


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


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The meta-optimiser of θ (§3: Adam), after a global-norm clip of the meta-gradient.

    It runs on θ flattened into one vector (`optax.flatten`): the same arithmetic per entry,
    in a few large ops rather than ~10 per leaf of θ (132 leaves for the `cpu` convnet, ~1200
    for ResNet-32); the `cpu` window lost a quarter of its compiled instructions.
    """
    clipped_adam = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm),
                               optax.adam(cfg.learning_rate))  # fmt: skip
    return optax.flatten(clipped_adam)


def teacher_window(problem: Problem, model, inp: Inputs, teacher, idx_a, idx_b, task):
    """One episode's teacher through the window: its s SGD steps on A ∪ B (`idx_a` [s, Ba],
    `idx_b` [s, Bb]) and its representations after each, [s, Ba + Bb, D]."""

    def body(network, idx):
        x_a, y_a = problem.gather_a(inp, idx[0], task)
        x_b, y_b = problem.gather_b(inp, idx[1], task)
        network = problem.teacher_step(network, x_a, y_a, x_b, y_b, task)
        x_ab = jnp.concatenate([x_a, x_b])
        return network, model.apply(network["backbone"], x_ab).representation

    return jax.lax.scan(body, teacher, (idx_a, idx_b))


def student_loss(problem, model, cfg, inp, theta, student, lstm, idx_a, idx_b, task, h_teacher,
                 k, num_steps):  # fmt: skip
    """L_k of one episode, the student re-run k steps from the window's start: (loss, (network,
    lstm) after k steps). `h_teacher` [s, Ba + Bb, D]; `k` may be traced, `num_steps` not."""

    def body(carry, xs):
        j, ib = xs

        def advance(c):
            x_b, y_b = problem.gather_b(inp, ib, task)
            return problem.student_step(theta, *c, x_b, y_b, task)

        return jax.lax.cond(j < k, advance, lambda c: c, carry), None

    body = jax.checkpoint(body)
    steps = jnp.arange(num_steps)
    (net, mem), _ = jax.lax.scan(body, (student, lstm), (steps, idx_b))
    x_a, _ = problem.gather_a(inp, idx_a[k - 1], task)
    x_b, _ = problem.gather_b(inp, idx_b[k - 1], task)
    h_student = model.apply(net["backbone"], jnp.concatenate([x_a, x_b])).representation
    return rep_loss(h_teacher[k - 1], h_student, cfg), (net, mem)


def unroll_losses(problem, model, cfg, inp, theta, student, lstm, idx_a, idx_b, task, h_teacher):
    """L_1..L_s of one episode from a single unroll of the student: (losses [s], (network,
    lstm) at the window's end)."""

    def body(carry, xs):
        net, mem = carry
        ia, ib, h_t = xs
        x_b, y_b = problem.gather_b(inp, ib, task)
        net, mem = problem.student_step(theta, net, mem, x_b, y_b, task)
        x_a, _ = problem.gather_a(inp, ia, task)
        h_s = model.apply(net["backbone"], jnp.concatenate([x_a, x_b])).representation
        return (net, mem), rep_loss(h_t, h_s, cfg)

    (net, mem), ls = jax.lax.scan(jax.checkpoint(body), (student, lstm), (idx_a, idx_b, h_teacher))
    return ls, (net, mem)


def _finite(tree) -> jax.Array:
    """Whether every entry of `tree` is finite, as one reduction over all leaves at once.

    A per-leaf test joined by `and`s is a chain of cheap scalar ops that XLA fuses anew into
    each of the ~400 selects reading it (one per leaf of θ and of its optimiser state): that
    was a third of the window's compiled instructions (docs/benchmarks.md, 2026-12-05).
    """
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
    return jnp.all(jnp.isfinite(flat))


def make_window(problem: Problem, model: models.Model, cfg: ml_collections.ConfigDict,
                chunk: int | None = None, on_trace=None):  # fmt: skip
    """The window function of `problem`'s episodes, `model` and the `meta` config group.

    Args:
      chunk: episodes mapped together (`training.map_seeds`; None: the backend's default).
      on_trace: called with the window length each time the window is traced (Python runs
        the body only then), to catch recompiles; None: nothing.

    Returns:
      window(state, inputs, batches, threshold) -> (state, metrics), pure and jittable:
        state: `MetaState` with E episodes in flight;
        inputs: `problem.inputs` (possibly placed on devices);
        batches: (idx_a int32 [E, s, Ba], idx_b int32 [E, s, Bb]), the window's batch indices
          (s, the T-BPTT length, is static);
        threshold: float32 [] or [E], the loss above which an episode stops contributing and
          ends at the window's end;
        metrics: {'loss': [] mean finite meta-loss, 'losses': [E, s] L_k per episode,
          'restarted': bool [E]}.
    """
    opt = make_optimizer(cfg)
    loss_of = functools.partial(student_loss, problem, model, cfg)
    unroll_of = functools.partial(unroll_losses, problem, model, cfg)

    def meta_update(theta, opt_state, grads, ok):
        updates, new_opt = opt.update(grads, opt_state, theta)
        new_theta = optax.apply_updates(theta, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        return keep(new_theta, theta), keep(new_opt, opt_state)

    def every_step(state, inp, idx_a, idx_b, h_teacher, threshold):
        """Algorithm 1: an Adam step after each inner step k, L_k re-run from the start."""
        eps, num_steps = state.episodes, idx_a.shape[1]

        def mean_loss(theta, k, alive):
            def one(st, mem, ia, ib, task, h, alive_e):
                # A dead (restarting) episode sees a constant θ: masking its loss alone would
                # still send 0 · NaN = NaN back from a diverged student into the meta-gradient.
                theta_e = jax.tree.map(
                    lambda t: jnp.where(alive_e, t, jax.lax.stop_gradient(t)), theta
                )
                return loss_of(inp, theta_e, st, mem, ia, ib, task, h, k, num_steps)

            per_episode, aux = training.map_seeds(
                one, eps.student, eps.lstm, idx_a, idx_b, eps.task, h_teacher, alive,
                chunk=chunk,
            )  # fmt: skip
            w = alive.astype(jnp.float32)
            total = jnp.sum(jnp.where(alive, per_episode, 0.0)) / jnp.maximum(w.sum(), 1.0)
            return total, (per_episode, aux)

        def step_k(carry, k):
            theta, opt_state, alive, skipped, _ = carry
            (m, (per_ep, aux)), g = jax.value_and_grad(mean_loss, has_aux=True)(theta, k, alive)
            ok = _finite(m) & _finite(g)
            theta, opt_state = meta_update(theta, opt_state, g, ok)
            new_alive = alive & jnp.isfinite(per_ep) & (per_ep <= threshold)
            carry = (theta, opt_state, new_alive, skipped + (~ok).astype(jnp.int32), aux)
            return carry, per_ep

        carry0 = (state.theta, state.opt_state, jnp.ones(eps.step.shape[0], bool), state.skipped,
                  (eps.student, eps.lstm))  # fmt: skip
        ks = jnp.arange(1, num_steps + 1)
        (theta, opt_state, alive, skipped, students), loss_k = jax.lax.scan(step_k, carry0, ks)
        return theta, opt_state, alive, skipped, students, loss_k  # loss_k: [s, E]

    def per_window(state, inp, idx_a, idx_b, h_teacher, threshold):
        """Classic T-BPTT: one Adam step on the mean of L_1..L_s of one unroll."""
        eps = state.episodes

        def window_loss(theta):
            one = lambda st, mem, ia, ib, task, h: unroll_of(inp, theta, st, mem, ia, ib, task, h)  # noqa: E731
            ls, aux = training.map_seeds(one, eps.student, eps.lstm, idx_a, idx_b, eps.task,
                                         h_teacher, chunk=chunk)  # fmt: skip
            return jnp.mean(ls), (ls, aux)

        (m, (ls, students)), g = jax.value_and_grad(window_loss, has_aux=True)(state.theta)
        ok = _finite(m) & _finite(g)
        theta, opt_state = meta_update(state.theta, state.opt_state, g, ok)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        alive = jnp.all(jnp.isfinite(ls) & (ls <= threshold[:, None]), axis=1)
        return theta, opt_state, alive, skipped, students, ls.T  # loss_k: [s, E]

    def window(state: MetaState, inputs: Inputs, batches, threshold):
        idx_a, idx_b = batches
        eps, num_steps = state.episodes, idx_a.shape[1]
        if on_trace is not None:
            on_trace(num_steps)
        threshold = jnp.broadcast_to(threshold, eps.step.shape)  # a scalar or one per episode
        teacher_fn = functools.partial(teacher_window, problem, model, inputs)
        teachers, h_teacher = training.map_seeds(teacher_fn, eps.teacher, idx_a, idx_b, eps.task,
                                                 chunk=chunk)  # fmt: skip
        mode = every_step if cfg.update_every_step else per_window
        theta, opt_state, alive, skipped, (students, lstms), loss_k = mode(
            state, inputs, idx_a, idx_b, h_teacher, threshold
        )
        # Window end: carry the states on (truncation: nothing here is differentiated).
        carried = Episodes(teachers, students, lstms, eps.step + num_steps, eps.id, eps.task)
        diverged = ~jnp.all(jnp.isfinite(loss_k), axis=0)
        episodes, done, restarted = problem.window_end(inputs, state.episodes_started, carried,
                                                       alive, diverged)  # fmt: skip
        n_done = jnp.sum(done.astype(jnp.int32))
        new_state = MetaState(
            theta, opt_state, episodes, state.window + 1, state.episodes_started + n_done,
            state.episodes_done + n_done, skipped,
            state.restarts + jnp.sum(restarted.astype(jnp.int32)),
        )  # fmt: skip
        # nanmean: a diverged episode's NaN is left out of the logged loss.
        metrics = {"loss": jnp.nanmean(loss_k), "losses": loss_k.T, "restarted": restarted}
        return new_state, metrics

    return window
