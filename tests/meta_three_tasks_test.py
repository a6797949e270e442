"""Exp 5's episodes (`l2r.meta.three_tasks`): the switch from Task 2 to Task 3 at a window end,
what the teacher and the student learn in each phase, and meta-training that is deterministic
and resumes (generated data, untrained networks)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import make_model

from l2r import pretrain, training
from l2r.configs import exp5
from l2r.data import plan
from l2r.meta import episodes, loop, three_tasks
from l2r.methods import Batch, make_teacher
from l2r.methods.learned import student_step
from l2r.methods.multitask import HEADS, swap_heads


@pytest.fixture(scope="module")
def setup():
    config = exp5.get_config("smoke")
    config.meta.num_episodes_parallel = 2  # The cases below are written for two episodes.
    seq = plan.sequence_plan(config)
    mean, std = np.full(1, 0.5, np.float32), np.full(1, 0.25, np.float32)
    data_1 = training.to_device(seq.task_1, mean, std)
    pool = training.to_device(seq.meta_train, mean, std)
    model = make_model(config)
    # Untrained networks stand in for pre-trained ones: nothing here depends on their quality.
    net = pretrain.init_network(model, jax.random.key(0), (1, *data_1.train_images.shape[1:]),
                                seq.task_1.num_classes)  # fmt: skip
    pretrained = jax.tree.map(lambda a: a[None], net)
    problem = three_tasks.three_tasks(config, model, pretrained, data_1, pool, seq.pair_table)
    return config, seq, model, data_1, pool, problem


def _bump(tree):
    return jax.tree.map(lambda a: a + 1.0, tree)


def _episode(eps, e):
    return jax.tree.map(lambda a: a[e], eps)


def _fresh(problem, n=2):
    return problem.fresh(problem.inputs, jnp.arange(n, dtype=jnp.int32))


def test_pair_table_must_hold_pairs(setup):
    config, seq, model, data_1, pool, problem = setup
    with pytest.raises(ValueError, match=r"pair_table must be \[T, 2, n_way\]"):
        three_tasks.three_tasks(config, model, problem.inputs.pretrained, data_1, pool,
                                seq.pair_table[:, 0])  # fmt: skip


def test_window_end_switches_to_task_3_keeping_every_state(setup):
    """Phase 0 over its threshold: same episode, student, LSTM and teacher, now on Task 3 with
    step 0; phase 1 over its threshold: a fresh episode (new id, w0, phase 0)."""
    config, seq, _, data_1, pool, problem = setup
    eps = _fresh(problem)
    carried = eps._replace(
        student=_bump(eps.student), teacher=_bump(eps.teacher), lstm=_bump(eps.lstm),
        step=eps.step + 2, task=eps.task._replace(phase=jnp.array([0, 1], jnp.int32)),
    )  # fmt: skip
    end = jax.jit(problem.window_end)
    started = jnp.int32(2)
    over = jnp.array([False, False])  # both exceeded their thresholds (not alive), finite
    new, done, restarted = end(problem.inputs, started, carried, over, jnp.array([False, False]))
    np.testing.assert_array_equal(done, [False, True])
    np.testing.assert_array_equal(restarted, [False, True])
    switched, fresh = _episode(new, 0), _episode(new, 1)
    kept = _episode(carried, 0)
    chex.assert_trees_all_equal(switched.student, kept.student)
    chex.assert_trees_all_equal(switched.teacher, kept.teacher)
    chex.assert_trees_all_equal(switched.lstm, kept.lstm)
    assert int(switched.id) == 0 and int(switched.step) == 0 and int(switched.task.phase) == 1
    np.testing.assert_array_equal(switched.task.classes, seq.pair_table[0])
    assert int(fresh.id) == 2 and int(fresh.task.phase) == 0
    w0 = _episode(jax.jit(problem.fresh)(problem.inputs, fresh.id[None]), 0)
    chex.assert_trees_all_equal(fresh.student, w0.student)
    np.testing.assert_array_equal(fresh.task.classes, seq.pair_table[int(fresh.id)])

    # Phase 0 diverged: restart, not switch. Phase 0 at meta.inner_steps: switch.
    phase_0 = carried.task._replace(phase=jnp.zeros(2, jnp.int32))
    steps = jnp.array([2, config.meta.inner_steps], jnp.int32)
    carried = carried._replace(step=steps, task=phase_0)
    alive = jnp.array([False, True])
    new, done, _ = end(problem.inputs, started, carried, alive, jnp.array([True, False]))
    np.testing.assert_array_equal(done, [True, False])
    np.testing.assert_array_equal(new.task.phase, [0, 1])

    # After the switch the episode's batches are Task 3's; the teacher's A holds Task 2.
    task = jax.device_get(new.task)
    idx_a, idx_b = problem.batches(0, 3, task)
    labels = np.asarray(pool.train_labels)
    task_2, task_3 = task.classes[1]
    assert set(labels[idx_b[1]].ravel()) <= set(task_3.tolist())
    n_1, half = len(data_1.train_labels), config.task_b.teacher_batch_a // 2
    assert np.all(idx_a[1, :, :-half] < n_1) and np.all(idx_a[1, :, -half:] >= n_1)
    assert set(labels[idx_a[1, :, -half:] - n_1].ravel()) <= set(task_2.tolist())
    assert np.all(idx_a[0] < n_1)  # the restarted episode is on Task 2: A is Task 1 only
    _, y_b = problem.gather_b(problem.inputs, idx_b[1, 0], _episode(new.task, 1))
    expected = np.argmax(labels[idx_b[1, 0]][:, None] == task_3[None], axis=1)
    np.testing.assert_array_equal(y_b, expected)
    # Phase 1's loss threshold is the curriculum's plus `meta.switch_threshold_step`.
    np.testing.assert_allclose(problem.thresholds(20.0, task), [20.0, 25.0])


def test_teacher_rehearses_task_1_and_task_2_while_learning_task_3(setup):
    """Phase 1: the A batch is half Task 1, half Task 2 (labels offset by |Task 1 classes|) and
    every head learns; phase 0 is exactly the two-task teacher of Exps 1-4."""
    config, seq, model, data_1, pool, problem = setup
    eps = _fresh(problem)
    both = jax.device_get(eps.task._replace(phase=jnp.ones(2, jnp.int32)))
    idx_a, idx_b = problem.batches(0, 1, both)
    task = _episode(both, 0)
    x_a, y_a = jax.jit(problem.gather_a)(problem.inputs, idx_a[0, 0], task)
    n_1, half = len(data_1.train_labels), config.task_b.teacher_batch_a // 2
    x_1, y_1 = training.gather(data_1, idx_a[0, 0, :-half])
    x_2, y_2 = training.gather(pool, idx_a[0, 0, -half:] - n_1)
    np.testing.assert_allclose(x_a[:-half], x_1, atol=1e-6)
    np.testing.assert_array_equal(y_a[:-half], y_1)
    np.testing.assert_allclose(x_a[-half:], x_2, atol=1e-6)
    classes_2 = np.asarray(task.classes[0])
    n1_classes = seq.task_1.num_classes
    np.testing.assert_array_equal(y_a[-half:], n1_classes + np.argmax(y_2[:, None] == classes_2, 1))

    network = _episode(eps.teacher, 0)
    teacher_step = jax.jit(problem.teacher_step)
    x_b, y_b = problem.gather_b(problem.inputs, idx_b[0, 0], task)
    new = teacher_step(network, x_a, y_a, x_b, y_b, task)
    for head in HEADS:
        assert not np.allclose(new[head]["kernel"], network[head]["kernel"]), head

    # Phase 0: A = Task 1 only, B = Task 2 through head_b; head_c untouched.
    task0 = task._replace(phase=jnp.int32(0))
    idx_a, idx_b = problem.batches(0, 1, jax.device_get(eps.task))
    x_a, y_a = training.gather(data_1, idx_a[0, 0])
    x_b, y_b = problem.gather_b(problem.inputs, idx_b[0, 0], task0)
    new = teacher_step(network, x_a, y_a, x_b, y_b, task0)
    two_task = make_teacher(model, problem.learning_rate)
    expected, _ = jax.jit(two_task.step)(
        {k: network[k] for k in ("backbone", "head_a", "head_b")}, Batch(x_b, y_b, x_a, y_a), None
    )
    chex.assert_trees_all_close({k: new[k] for k in expected}, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(new["head_c"], network["head_c"])


def test_student_learns_task_3_through_its_own_head(setup):
    """Phase 1: the student step is the Exps 1-4 step with 'head_c' in the place of 'head_b';
    Task 2's head is left as it was."""
    _, _, model, _, _, problem = setup
    theta = problem.ml.init(jax.random.key(0))
    eps = _fresh(problem)
    ep = _episode(eps, 0)
    task = ep.task._replace(phase=jnp.int32(1))
    _, idx_b = problem.batches(0, 1, jax.device_get(eps.task._replace(phase=jnp.ones(2, int))))
    x_b, y_b = problem.gather_b(problem.inputs, idx_b[0, 0], task)
    net, _ = jax.jit(problem.student_step)(theta, ep.student, ep.lstm, x_b, y_b, task)
    view = swap_heads(ep.student)
    ref, _, _, _ = student_step(model, problem.ml, theta, problem.learning_rate, view, ep.lstm,
                                x_b, y_b)  # fmt: skip
    chex.assert_trees_all_close(net, swap_heads(ref), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(net["head_b"], ep.student["head_b"])
    assert not np.allclose(net["head_c"]["kernel"], ep.student["head_c"]["kernel"])


def test_meta_training_is_deterministic_and_resumes(setup, tmp_path):
    """Four windows twice from scratch give the same θ; so do two, a restart, and two more.
    With `inner_steps` = 2 windows, episodes switch to Task 3 within those four windows."""
    config, _, model, _, _, problem = setup
    config = config.copy_and_resolve_references()
    config.meta.episodes = 1000
    run = loop.MetaRun(config, model, problem)

    def train(windows, where):
        config.meta.max_windows = windows
        return loop.meta_train(config, model, None, None, None, str(tmp_path / where), run=run)

    _, straight, history = train(4, "a")
    _, again, _ = train(4, "b")
    chex.assert_trees_all_equal(again.theta, straight.theta)
    assert sum(history["switches"]) >= 1
    assert len(history["switches"]) == 4
    train(2, "c")
    _, resumed, resumed_history = train(4, "c")
    chex.assert_trees_all_close(resumed.theta, straight.theta, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(resumed.episodes.task, straight.episodes.task)
    assert resumed_history["switches"] == history["switches"]


def test_random_lengths_switch_each_episode_at_its_own(setup):
    """With `meta.inner_steps_min`, an alive episode switches to Task 3 exactly when its steps
    on Task 2 reach its own length (`episodes.episode_lengths`)."""
    config, seq, model, data_1, pool, problem = setup
    config = config.copy_and_resolve_references()
    config.meta.num_episodes_parallel = 4
    config.meta.inner_steps, config.meta.inner_steps_min = 40, 2
    problem = three_tasks.three_tasks(config, model, problem.inputs.pretrained, data_1, pool,
                                      seq.pair_table)  # fmt: skip
    eps = _fresh(problem, 4)
    lengths = np.asarray(episodes.episode_lengths(config.meta, config.seed, eps.id))
    assert len(set(lengths.tolist())) > 1, lengths
    alive, no = jnp.ones(4, bool), jnp.zeros(4, bool)
    for offset in (-1, 0):
        carried = eps._replace(step=jnp.asarray(lengths + offset, jnp.int32))
        new, done, _ = problem.window_end(problem.inputs, jnp.int32(4), carried, alive, no)
        assert not np.any(done)
        np.testing.assert_array_equal(new.task.phase, int(offset == 0))
