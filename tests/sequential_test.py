"""Exp 5 (`l2r.sequential`): the switch from Task 2 to Task 3 at a window end, what the teacher
and the student learn in each phase, task sampling, config checks before training, determinism
and resume of meta-training, and the smoke pipeline end to end (generated data)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import exp5
from l2r import (
    cl_metrics,
    forgetting,
    meta_train,
    pretrain,
    rng,
    run_sequence,
    sequential,
    training,
)
from l2r import workdir as workdir_lib
from l2r.experiment import ConfigError
from l2r.meta import three_tasks
from l2r.methods import Batch, make_teacher
from l2r.methods.learned import student_step
from l2r.methods.multitask import HEADS, swap_heads


@pytest.fixture(scope="module")
def setup():
    config = exp5.get_config("smoke")
    config.meta.num_episodes_parallel = 2  # The cases below are written for two episodes.
    plan = sequential.plan_tasks(config)
    mean, std = np.full(1, 0.5, np.float32), np.full(1, 0.25, np.float32)
    data_1 = training.to_device(plan.task_1, mean, std)
    pool = training.to_device(plan.meta_train, mean, std)
    model = forgetting.make_model(config)
    # Untrained networks stand in for pre-trained ones: nothing here depends on their quality.
    net = pretrain.init_network(model, jax.random.key(0), (1, *data_1.train_images.shape[1:]),
                                plan.task_1.num_classes)  # fmt: skip
    pretrained = jax.tree.map(lambda a: a[None], net)
    trainer = three_tasks.SequentialTrainer(config, model, pretrained, data_1, pool,
                                            plan.pair_table)  # fmt: skip
    return config, plan, model, pretrained, data_1, pool, trainer


def _bump(tree):
    return jax.tree.map(lambda a: a + 1.0, tree)


def _episode(eps, e):
    return jax.tree.map(lambda a: a[e], eps)


def test_window_end_switches_to_task_3_keeping_every_state(setup):
    """Phase 0 over its threshold: same episode, student, LSTM and teacher, now on Task 3 with
    step 0; phase 1 over its threshold: a fresh episode (new id, w0, phase 0)."""
    config, plan, _, _, data_1, pool, trainer = setup
    state = trainer.init()
    eps = state.episodes
    carried = eps._replace(
        student=_bump(eps.student), teacher=_bump(eps.teacher), lstm=_bump(eps.lstm),
        step=eps.step + 2, classes=eps.classes._replace(phase=jnp.array([0, 1], jnp.int32)),
    )  # fmt: skip
    end = jax.jit(trainer._window_end)
    over = jnp.array([False, False])  # both exceeded their thresholds (not alive), finite
    new, done, restarted = end(trainer.inputs, state, carried, over, jnp.array([False, False]))
    np.testing.assert_array_equal(done, [False, True])
    np.testing.assert_array_equal(restarted, [False, True])
    switched, fresh = _episode(new, 0), _episode(new, 1)
    kept = _episode(carried, 0)
    chex.assert_trees_all_equal(switched.student, kept.student)
    chex.assert_trees_all_equal(switched.teacher, kept.teacher)
    chex.assert_trees_all_equal(switched.lstm, kept.lstm)
    assert int(switched.id) == 0 and int(switched.step) == 0 and int(switched.classes.phase) == 1
    np.testing.assert_array_equal(switched.classes.classes, plan.pair_table[0])
    assert int(fresh.id) == int(state.episodes_started) and int(fresh.classes.phase) == 0
    w0 = _episode(jax.jit(trainer._fresh)(trainer.inputs, fresh.id[None]), 0)
    chex.assert_trees_all_equal(fresh.student, w0.student)
    np.testing.assert_array_equal(fresh.classes.classes, plan.pair_table[int(fresh.id)])

    # Phase 0 diverged: restart, not switch. Phase 0 at meta.inner_steps: switch.
    phase_0 = carried.classes._replace(phase=jnp.zeros(2, jnp.int32))
    steps = jnp.array([2, config.meta.inner_steps], jnp.int32)
    carried = carried._replace(step=steps, classes=phase_0)
    alive = jnp.array([False, True])
    new, done, _ = end(trainer.inputs, state, carried, alive, jnp.array([True, False]))
    np.testing.assert_array_equal(done, [True, False])
    np.testing.assert_array_equal(new.classes.phase, [0, 1])

    # After the switch the episode's batches are Task 3's; the teacher's A holds Task 2.
    task = jax.device_get(new.classes)
    idx_a, idx_b = trainer.batches(0, 3, task)
    labels = np.asarray(pool.train_labels)
    task_2, task_3 = task.classes[1]
    assert set(labels[idx_b[1]].ravel()) <= set(task_3.tolist())
    n_1, half = len(data_1.train_labels), trainer.batch_a // 2
    assert np.all(idx_a[1, :, :-half] < n_1) and np.all(idx_a[1, :, -half:] >= n_1)
    assert set(labels[idx_a[1, :, -half:] - n_1].ravel()) <= set(task_2.tolist())
    assert np.all(idx_a[0] < n_1)  # the restarted episode is on Task 2: A is Task 1 only
    _, y_b = trainer._gather_b(trainer.inputs, idx_b[1, 0], _episode(new.classes, 1))
    expected = np.argmax(labels[idx_b[1, 0]][:, None] == task_3[None], axis=1)
    np.testing.assert_array_equal(y_b, expected)


def test_teacher_rehearses_task_1_and_task_2_while_learning_task_3(setup):
    """Phase 1: the A batch is half Task 1, half Task 2 (labels offset by |Task 1 classes|) and
    every head learns; phase 0 is exactly the two-task teacher of Exps 1-4."""
    _, _, model, _, data_1, pool, trainer = setup
    state = trainer.init()
    both = jax.device_get(state.episodes.classes._replace(phase=jnp.ones(2, jnp.int32)))
    idx_a, idx_b = trainer.batches(0, 1, both)
    task = _episode(both, 0)
    gather_a = jax.jit(trainer._gather_a)
    x_a, y_a = gather_a(trainer.inputs, idx_a[0, 0], task)
    n_1, half, n1_classes = len(data_1.train_labels), trainer.batch_a // 2, trainer.num_classes_1
    x_1, y_1 = training.gather(data_1, idx_a[0, 0, :-half])
    x_2, y_2 = training.gather(pool, idx_a[0, 0, -half:] - n_1)
    np.testing.assert_allclose(x_a[:-half], x_1, atol=1e-6)
    np.testing.assert_array_equal(y_a[:-half], y_1)
    np.testing.assert_allclose(x_a[-half:], x_2, atol=1e-6)
    classes_2 = np.asarray(task.classes[0])
    np.testing.assert_array_equal(y_a[-half:], n1_classes + np.argmax(y_2[:, None] == classes_2, 1))

    network = _episode(state.episodes.teacher, 0)
    x_b, y_b = trainer._gather_b(trainer.inputs, idx_b[0, 0], task)
    new = jax.jit(trainer._teacher_step)(network, x_a, y_a, x_b, y_b, task)
    for head in HEADS:
        assert not np.allclose(new[head]["kernel"], network[head]["kernel"]), head

    # Phase 0: A = Task 1 only, B = Task 2 through head_b; head_c untouched.
    task0 = task._replace(phase=jnp.int32(0))
    idx_a, idx_b = trainer.batches(0, 1, jax.device_get(state.episodes.classes))
    x_a, y_a = training.gather(data_1, idx_a[0, 0])
    x_b, y_b = trainer._gather_b(trainer.inputs, idx_b[0, 0], task0)
    new = jax.jit(trainer._teacher_step)(network, x_a, y_a, x_b, y_b, task0)
    two_task = make_teacher(model, trainer.lr)
    expected, _ = jax.jit(two_task.step)(
        {k: network[k] for k in ("backbone", "head_a", "head_b")}, Batch(x_b, y_b, x_a, y_a), None
    )
    chex.assert_trees_all_close(
        {k: new[k] for k in expected}, expected, rtol=1e-5, atol=1e-6
    )  # fmt: skip
    chex.assert_trees_all_equal(new["head_c"], network["head_c"])


def test_student_learns_task_3_through_its_own_head(setup):
    """Phase 1: the student step is the Exps 1-4 step with 'head_c' in the place of 'head_b';
    Task 2's head is left as it was."""
    _, _, model, _, _, _, trainer = setup
    state = trainer.init()
    eps = _episode(state.episodes, 0)
    task = eps.classes._replace(phase=jnp.int32(1))
    both = state.episodes.classes._replace(phase=jnp.ones(2, jnp.int32))
    _, idx_b = trainer.batches(0, 1, jax.device_get(both))
    x_b, y_b = trainer._gather_b(trainer.inputs, idx_b[0, 0], task)
    net, _ = jax.jit(trainer._student_step)(state.theta, eps.student, eps.lstm, x_b, y_b, task)
    view = swap_heads(eps.student)
    ref, _, _, _ = student_step(
        model, trainer.ml, state.theta, trainer.lr, view, eps.lstm, x_b, y_b
    )
    chex.assert_trees_all_close(net, swap_heads(ref), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(net["head_b"], eps.student["head_b"])
    assert not np.allclose(net["head_c"]["kernel"], eps.student["head_c"]["kernel"])


def test_task_pairs_are_drawn_from_disjoint_pools_deterministically():
    config = exp5.get_config("smoke")
    plan = sequential.plan_tasks(config)
    assert plan.pair_table.shape == (config.meta.episodes, 2, 2)
    for pair in plan.pair_table:  # disjoint_tasks: four distinct pool classes per episode
        assert len(set(pair.ravel().tolist())) == 4
    test_classes = {c for pair in plan.meta_test for t in pair for c in t.class_names}
    assert not test_classes & set(plan.meta_train.class_names)
    assert not test_classes & set(plan.task_1.class_names)
    for task_2, task_3 in plan.meta_test:
        assert not set(task_2.class_names) & set(task_3.class_names)
    again = sequential.plan_tasks(config)
    np.testing.assert_array_equal(again.pair_table, plan.pair_table)
    # cpu preset: 3-class pools, tasks of different (overlapping) class sets.
    pairs = sequential.sample_task_pairs(3, 2, 20, seed=1, disjoint=False)
    assert all(set(a) != set(b) for a, b in pairs.tolist())


def test_bad_configs_fail_before_training(tmp_path):
    config = exp5.get_config("smoke")
    config.pools.meta_train.classes = (3, 4, 5)  # two disjoint 2-way tasks need 4 classes
    with pytest.raises(ConfigError, match="pools.meta_train.classes has 3 classes"):
        sequential.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing was written
    config.pools.disjoint_tasks = False
    sequential.check_config(config)  # 3 classes hold two different 2-way tasks
    config = exp5.get_config("smoke")
    config.task_b.methods = ("sgd", "ewc")
    with pytest.raises(ConfigError, match="Exp 5 runs sgd"):
        sequential.check_config(config)
    config = exp5.get_config("smoke")
    config.task_b.steps_3 = 7
    with pytest.raises(ConfigError, match="task_b.steps_3=7"):
        sequential.check_config(config)


def test_meta_training_is_deterministic_and_resumes(setup, tmp_path):
    """Four windows twice from scratch give the same θ; so do two, a restart, and two more.
    With `inner_steps` = 2 windows, episodes switch to Task 3 within those four windows."""
    config, _, model, pretrained, data_1, pool, trainer = setup
    config = config.copy_and_resolve_references()
    config.meta.episodes = 1000

    def run(windows, ckpt):
        config.meta.max_windows = windows
        return meta_train.meta_train(config, model, pretrained, data_1, pool, str(ckpt), trainer)

    _, straight, history = run(4, tmp_path / "a")
    _, again, _ = run(4, tmp_path / "b")
    chex.assert_trees_all_equal(again.theta, straight.theta)
    assert sum(history["switches"]) >= 1
    assert len(history["switches"]) == 4
    run(2, tmp_path / "c")
    _, resumed, resumed_history = run(4, tmp_path / "c")
    chex.assert_trees_all_close(resumed.theta, straight.theta, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(resumed.episodes.classes, straight.episodes.classes)
    assert resumed_history["switches"] == history["switches"]


@pytest.mark.slow
def test_exp5_smoke_pipeline_writes_three_task_curves(tmp_path):
    config = exp5.get_config("smoke")
    with workdir_lib.locked(str(tmp_path)):
        results = sequential.run(config, str(tmp_path))
    for name in ("config.json", "results.json", "results.md", "exp5_tasks.png",
                 "fig6_curriculum.png", "fig7_delta.png"):  # fmt: skip
        assert os.path.getsize(tmp_path / name) > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == list(config.task_b.methods)
    b = config.task_b
    assert saved["steps"][-1] == b.steps_2 + b.steps_3
    shape = (config.num_seeds, (b.steps_2 + b.steps_3) // b.probe_every + 1)
    for name, hist in saved["methods"].items():
        for metric in run_sequence.READOUT:
            acc = np.asarray(hist[metric], float)
            assert acc.shape == shape and np.all(np.isfinite(acc)), (name, metric)
    # Every method starts from the same networks: one step-0 probe.
    for metric in run_sequence.READOUT:
        np.testing.assert_allclose(saved["methods"]["sgd"][metric][0][0],
                                   saved["methods"]["learned"][metric][0][0])  # fmt: skip
    stats = cl_metrics.summarize(saved, run_sequence.READOUT, saved["task_ends"])
    assert set(stats["learned"]) >= {"avg_acc", "bwt", "forgetting_readout_1"}
    assert saved["task_ends"] == [0, b.steps_2 // b.probe_every, shape[1] - 1]
    assert "avg acc" in (tmp_path / "results.md").read_text()
    assert len(saved["meta"]["switches"]) == config.meta.max_windows
    assert results["switch_step"] == b.steps_2


def test_meta_test_streams_balance_the_teachers_earlier_tasks():
    config = exp5.get_config("smoke")
    streams = run_sequence.make_streams(config, 40, (100, 30), 6, task=3)
    b = config.task_b
    assert streams.idx_b.shape == (config.num_seeds, 6, b.batch_size)
    first = b.teacher_batch_a - b.teacher_batch_a // 2
    assert np.all(streams.idx_a[..., :first] < 100)
    assert np.all((streams.idx_a[..., first:] >= 100) & (streams.idx_a[..., first:] < 130))
    again = run_sequence.make_streams(config, 40, (100, 30), 6, task=3)
    np.testing.assert_array_equal(again.idx_a, streams.idx_a)
    assert rng.seed_for(0, "task_3_data", 0) != rng.seed_for(0, "task_2_data", 0)
