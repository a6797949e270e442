"""Exp 5 (`l2r.pipelines.three_tasks`): task sampling, config checks before training and the
meta-test's streams. Its meta-training episodes: meta_three_tasks_test; the smoke preset end to
end with every method: e2e_test."""

import os

import numpy as np
import pytest

from l2r import rng, task_b
from l2r.config_checks import ConfigError
from l2r.configs import exp5
from l2r.data import plan as plan_lib
from l2r.methods import registry
from l2r.pipelines import three_tasks


def test_task_pairs_are_drawn_from_disjoint_pools_deterministically():
    config = exp5.get_config("smoke")
    plan = plan_lib.sequence_plan(config)
    assert plan.pair_table.shape == (config.meta.episodes, 2, 2)
    for pair in plan.pair_table:  # disjoint_tasks: four distinct pool classes per episode
        assert len(set(pair.ravel().tolist())) == 4
    test_classes = {c for pair in plan.meta_test for t in pair for c in t.class_names}
    assert not test_classes & set(plan.meta_train.class_names)
    assert not test_classes & set(plan.task_1.class_names)
    for task_2, task_3 in plan.meta_test:
        assert not set(task_2.class_names) & set(task_3.class_names)
    again = plan_lib.sequence_plan(config)
    np.testing.assert_array_equal(again.pair_table, plan.pair_table)
    # cpu preset: 3-class pools, tasks of different (overlapping) class sets.
    pairs = plan_lib.sample_task_pairs(3, 2, 20, seed=1, disjoint=False)
    assert all(set(a) != set(b) for a, b in pairs.tolist())


def test_bad_configs_fail_before_training(tmp_path):
    config = exp5.get_config("smoke")
    config.pools.meta_train.classes = (3, 4, 5)  # two disjoint 2-way tasks need 4 classes
    with pytest.raises(ConfigError, match="pools.meta_train.classes has 3 classes"):
        three_tasks.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing was written
    config.pools.disjoint_tasks = False
    three_tasks.check_config(config)  # 3 classes hold two different 2-way tasks
    config = exp5.get_config("smoke")
    registry.register("one_task_only", sequence=None)(registry.entry("sgd").build)
    config.task_b.methods = ("sgd", "one_task_only")
    with pytest.raises(ConfigError, match="one_task_only.*learns one task after Task A only"):
        three_tasks.check_config(config)
    config = exp5.get_config("smoke")
    config.task_b.steps_3 = 7
    with pytest.raises(ConfigError, match="task_b.steps_3=7"):
        three_tasks.check_config(config)


def test_meta_test_streams_balance_the_teachers_earlier_tasks():
    config = exp5.get_config("smoke")
    streams = task_b.sequence_streams(config, 40, (100, 30), 6, task=3)
    b = config.task_b
    assert streams.idx_b.shape == (config.num_seeds, 6, b.batch_size)
    first = b.teacher_batch_a - b.teacher_batch_a // 2
    assert np.all(streams.idx_a[..., :first] < 100)
    assert np.all((streams.idx_a[..., first:] >= 100) & (streams.idx_a[..., first:] < 130))
    again = task_b.sequence_streams(config, 40, (100, 30), 6, task=3)
    np.testing.assert_array_equal(again.idx_a, streams.idx_a)
    assert rng.seed_for(0, "task_3_data", 0) != rng.seed_for(0, "task_2_data", 0)
