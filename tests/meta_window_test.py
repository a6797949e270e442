"""The T-BPTT window called directly: equal to a Python-loop reference in both meta-update
modes, the restart rule at its end, and non-finite losses kept away from θ."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from smoke_setup import tiny

from l2r.meta import episodes, window
from l2r.meta.window import MetaState


def _start(**meta):
    """(config, model, problem, the state before the first window, its batches, the window)."""
    config, model, pretrained, data_a, data_b = tiny(**meta)
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b)
    e = config.meta.num_episodes_parallel
    theta = problem.ml.init(jax.random.key(1))
    opt = window.make_optimizer(config.meta)
    eps = problem.fresh(problem.inputs, jnp.arange(e, dtype=jnp.int32))
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    state = MetaState(theta, opt.init(theta), eps, i32(0), i32(e), i32(0), i32(0), i32(0))
    fn = jax.jit(window.make_window(problem, model, config.meta))
    return config, model, problem, state, problem.batches(0, config.meta.tbptt), fn


@pytest.fixture(scope="module")
def every_step():
    return _start(update_every_step=True)


def _reference(config, model, problem, state, batches):
    """Algorithm 1 by hand: the teacher's steps, then for k = 1..s each episode's student re-run
    k steps from the window start (plain Python loops), L_k, and Adam on θ (every step), or
    one Adam step on the mean of all L_k (per window). Returns (θ, losses [E, s])."""
    cfg, inp = config.meta, problem.inputs
    idx_a, idx_b = (np.asarray(b) for b in batches)
    e, s = idx_a.shape[:2]
    eps = [jax.tree.map(lambda a, i=i: a[i], state.episodes) for i in range(e)]
    h_teacher = []  # [E][s]: the teacher's representations after each of its steps
    for ep, ia, ib in zip(eps, idx_a, idx_b, strict=True):
        net, hs = ep.teacher, []
        for t in range(s):
            x_a, y_a = problem.gather_a(inp, ia[t], ep.task)
            x_b, y_b = problem.gather_b(inp, ib[t], ep.task)
            net = problem.teacher_step(net, x_a, y_a, x_b, y_b, ep.task)
            hs.append(model.apply(net["backbone"], jnp.concatenate([x_a, x_b])).representation)
        h_teacher.append(hs)

    def loss_k(theta, ep, ia, ib, k, h_k):
        net, mem = ep.student, ep.lstm
        for t in range(k):
            x_b, y_b = problem.gather_b(inp, ib[t], ep.task)
            net, mem = problem.student_step(theta, net, mem, x_b, y_b, ep.task)
        x_a, _ = problem.gather_a(inp, ia[k - 1], ep.task)
        x_b, _ = problem.gather_b(inp, ib[k - 1], ep.task)
        h = model.apply(net["backbone"], jnp.concatenate([x_a, x_b])).representation
        return window.rep_loss(h_k, h, cfg)

    value_and_grad = jax.jit(jax.value_and_grad(loss_k), static_argnums=4)
    args = lambda i, k: (eps[i], idx_a[i], idx_b[i], k, h_teacher[i][k - 1])  # noqa: E731
    opt = window.make_optimizer(cfg)
    theta, opt_state = state.theta, state.opt_state
    losses = np.zeros((e, s), np.float32)
    mean = lambda trees, n: jax.tree.map(lambda *g: sum(g) / n, *trees)  # noqa: E731
    if cfg.update_every_step:
        for k in range(1, s + 1):
            grads = []
            for i in range(e):
                losses[i, k - 1], g = value_and_grad(theta, *args(i, k))
                grads.append(g)
            updates, opt_state = opt.update(mean(grads, e), opt_state, theta)
            theta = optax.apply_updates(theta, updates)
    else:
        grads = []
        for i in range(e):
            for k in range(1, s + 1):
                losses[i, k - 1], g = value_and_grad(theta, *args(i, k))
                grads.append(g)
        updates, opt_state = opt.update(mean(grads, e * s), opt_state, theta)
        theta = optax.apply_updates(theta, updates)
    return theta, losses


@pytest.mark.parametrize("mode", ["every_step", "per_window"])
def test_window_equals_a_python_loop_reference(mode, every_step):
    start = every_step if mode == "every_step" else _start(update_every_step=False)
    config, model, problem, state, batches, fn = start
    new, metrics = fn(state, problem.inputs, batches, jnp.float32(1e9))
    theta, losses = _reference(config, model, problem, state, batches)
    chex.assert_trees_all_close(metrics["losses"], losses, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(new.theta, theta, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), losses.mean(), rtol=1e-5)
    pairs = zip(jax.tree.leaves(theta), jax.tree.leaves(state.theta), strict=True)
    assert any(not np.allclose(a, b) for a, b in pairs)  # θ moved
    assert int(new.window) == 1 and int(new.skipped) == 0
    np.testing.assert_array_equal(new.episodes.step, [config.meta.tbptt] * 2)


def test_window_end_restarts_episodes_over_the_threshold(every_step):
    """An episode whose loss exceeds the threshold restarts from w0 (a fresh id, its LSTM state
    zeroed) at the window's end and counts as a restart; the others carry on. (The end of an
    episode at `meta.inner_steps`: meta_episodes_test.)"""
    config, _, problem, state, batches, fn = every_step
    e, s = config.meta.num_episodes_parallel, config.meta.tbptt
    new, metrics = fn(state, problem.inputs, batches, jnp.float32(0.0))  # everything exceeds 0
    assert np.all(np.asarray(metrics["restarted"]))
    assert int(new.restarts) == e and int(new.episodes_done) == e
    np.testing.assert_array_equal(new.episodes.id, np.arange(e, 2 * e))
    fresh = jax.jit(problem.fresh)(problem.inputs, new.episodes.id)
    chex.assert_trees_all_equal(new.episodes, fresh)
    kept, metrics = fn(state, problem.inputs, batches, jnp.float32(1e9))
    assert not np.any(np.asarray(metrics["restarted"])) and int(kept.restarts) == 0
    np.testing.assert_array_equal(kept.episodes.step, np.full(e, s))
    np.testing.assert_array_equal(kept.episodes.id, state.episodes.id)


def test_non_finite_loss_never_reaches_theta(every_step):
    config, _, problem, state, batches, fn = every_step
    # Episode 0's student is broken: its loss is NaN from the first step.
    broken = jax.tree.map(lambda a: a.at[0].set(jnp.nan), state.episodes.student["backbone"])
    student = {**state.episodes.student, "backbone": broken}
    state = state._replace(episodes=state.episodes._replace(student=student))
    new, metrics = fn(state, problem.inputs, batches, jnp.float32(1e9))
    assert int(new.skipped) == 1  # only k = 1; from k = 2 the episode is masked
    assert bool(metrics["restarted"][0]) and not bool(metrics["restarted"][1])
    for leaf in jax.tree.leaves(new.theta):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.isfinite(float(metrics["loss"]))  # the NaN episode is left out of the mean
    # The broken episode was replaced by a fresh one (a new id, finite weights).
    assert int(new.episodes.id[0]) == config.meta.num_episodes_parallel
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(new.episodes.student)[0][0])))
