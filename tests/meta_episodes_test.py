"""The two-task episodes (Exps 1-4): w0, the student at the initial θ, n-way tasks and their
batches, and what becomes of an episode at a window's end."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import tiny

from l2r import training
from l2r.meta import episodes
from l2r.methods import Batch, make_sgd


@pytest.fixture(scope="module")
def setup():
    config, model, pretrained, data_a, data_b = tiny()
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b)
    return config, model, pretrained, data_a, data_b, problem


def test_fresh_episodes_start_from_their_checkpoint_with_a_new_head(setup):
    _, _, pretrained, _, _, problem = setup
    eps = jax.jit(problem.fresh)(problem.inputs, jnp.arange(3, dtype=jnp.int32))
    chex.assert_trees_all_equal(eps.teacher, eps.student)
    np.testing.assert_array_equal(eps.step, 0)
    pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    for i, n in enumerate((0, 1, 0)):  # two checkpoints: episode i starts from i % 2
        backbone = pick(eps.student, i)["backbone"]
        chex.assert_trees_all_equal(backbone, pick(pretrained["backbone"], n))
    head = eps.student["head_b"]["kernel"]
    assert head.shape[-1] == 3 and not np.allclose(head[0], head[2])  # fresh per episode


def test_student_at_initial_theta_is_sgd(setup):
    """With θ at its initialisation (δ ≡ 1) the student's step is plain SGD on B."""
    config, model, _, _, data_b, problem = setup
    theta = problem.ml.init(jax.random.key(0))
    ep = jax.tree.map(lambda a: a[0], problem.fresh(problem.inputs, jnp.zeros(1, jnp.int32)))
    _, idx_b = problem.batches(0, 3)
    step = jax.jit(problem.student_step)
    sgd = make_sgd(model, config.task_b.learning_rate)
    student, mem, network = ep.student, ep.lstm, ep.student
    for t in range(3):
        x_b, y_b = problem.gather_b(problem.inputs, idx_b[0, t], ep.task)
        student, mem = step(theta, student, mem, x_b, y_b, ep.task)
        network, _ = sgd.step(network, Batch(*training.gather(data_b, idx_b[0, t])), None)
    chex.assert_trees_all_close(student, network, rtol=1e-5, atol=1e-6)


def test_batches_are_a_function_of_the_window_index(setup):
    _, _, _, _, _, problem = setup
    first, again, second = problem.batches(0, 3), problem.batches(0, 3), problem.batches(1, 3)
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first[1], second[1])
    assert first[0].shape == (2, 3, 4) and first[1].shape == (2, 3, 4)


def test_n_way_episodes_learn_their_own_classes(setup):
    """Exps 2-4: episode i learns the classes of row i % T of the class table; its batches hold
    only those classes, relabelled 0..n_way-1 in row order."""
    config, model, pretrained, data_a, data_b, _ = setup
    table = np.array([[2, 0], [1, 2]], np.int32)  # two 2-way tasks of data_b's 3 classes
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b, table)
    assert problem.needs_tasks
    eps = problem.fresh(problem.inputs, jnp.arange(2, dtype=jnp.int32))
    np.testing.assert_array_equal(eps.task, table)
    assert eps.student["head_b"]["kernel"].shape[-1] == 2
    _, idx_b = problem.batches(0, 3, np.asarray(eps.task))
    labels = np.asarray(data_b.train_labels)
    for e, row in enumerate(table):
        assert set(np.unique(labels[idx_b[e]])) <= set(row.tolist())
        _, y = problem.gather_b(problem.inputs, idx_b[e, 0], jnp.asarray(row))
        expected = np.argmax(labels[idx_b[e, 0]][:, None] == row, axis=1)
        np.testing.assert_array_equal(np.asarray(y), expected)


def test_window_end_follows_algorithm_1(setup):
    """Not alive (over the threshold or diverged): a restart from w0 with the next free id;
    at `meta.inner_steps`: done without counting as a restart; the others carry on."""
    config, _, _, _, _, problem = setup
    eps = problem.fresh(problem.inputs, jnp.arange(2, dtype=jnp.int32))
    moved = jax.tree.map(lambda a: a + 1.0, eps.student)
    carried = eps._replace(student=moved, step=jnp.array([3, config.meta.inner_steps], jnp.int32))
    end = jax.jit(problem.window_end)
    no = jnp.zeros(2, bool)
    new, done, restarted = end(problem.inputs, jnp.int32(2), carried, jnp.array([False, True]), no)
    np.testing.assert_array_equal(done, [True, True])
    np.testing.assert_array_equal(restarted, [True, False])
    np.testing.assert_array_equal(new.id, [2, 3])
    chex.assert_trees_all_equal(new, problem.fresh(problem.inputs, jnp.array([2, 3], jnp.int32)))
    carried = carried._replace(step=jnp.array([3, 3], jnp.int32))
    new, done, restarted = end(problem.inputs, jnp.int32(2), carried, jnp.ones(2, bool), no)
    assert not np.any(done) and not np.any(restarted)
    chex.assert_trees_all_equal(new, carried)


def test_episode_lengths_fixed_or_drawn_per_episode(setup):
    """`meta.inner_steps_min` = 0: every episode runs `meta.inner_steps`; > 0: a length per
    episode id, uniform on [inner_steps_min, inner_steps], the same however often it is asked."""
    config, *_ = setup
    cfg = config.meta.copy_and_resolve_references()
    ids = jnp.arange(400, dtype=jnp.int32)
    np.testing.assert_array_equal(episodes.episode_lengths(cfg, 0, ids), cfg.inner_steps)
    cfg.inner_steps, cfg.inner_steps_min = 20, 5
    lengths = np.asarray(episodes.episode_lengths(cfg, 0, ids))
    assert lengths.min() == 5 and lengths.max() == 20  # both ends reached in 400 draws
    counts = np.bincount(lengths, minlength=21)[5:]
    assert counts.min() > 5, counts  # every length drawn (expected 25 each)
    again = episodes.episode_lengths(cfg, 0, ids[::-1])
    np.testing.assert_array_equal(np.asarray(again)[::-1], lengths)  # a function of the id
    other = np.asarray(episodes.episode_lengths(cfg, 1, ids))
    assert not np.array_equal(other, lengths)  # and of the seed


def test_window_end_with_random_lengths_ends_each_episode_at_its_own(setup):
    """An alive episode is done exactly when its step count reaches its own length."""
    config, model, pretrained, data_a, data_b, _ = setup
    config = config.copy_and_resolve_references()
    config.meta.inner_steps, config.meta.inner_steps_min = 30, 2
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b)
    ids = jnp.arange(6, dtype=jnp.int32)
    lengths = np.asarray(episodes.episode_lengths(config.meta, config.seed, ids))
    assert len(set(lengths.tolist())) > 1, lengths
    eps = problem.fresh(problem.inputs, ids)
    alive, no = jnp.ones(6, bool), jnp.zeros(6, bool)
    for offset in (-1, 0):
        carried = eps._replace(step=jnp.asarray(lengths + offset, jnp.int32))
        _, done, restarted = problem.window_end(problem.inputs, jnp.int32(6), carried, alive, no)
        np.testing.assert_array_equal(done, offset == 0)
        assert not np.any(restarted)
