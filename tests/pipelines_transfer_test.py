"""Exps 1-4 (`l2r.pipelines.transfer`, `l2r.data.plan`): which data meta-training and meta-test
see, the checks that run before any training, and baselines without meta-training. The smoke
presets end to end, every method included: e2e_test."""

import os

import numpy as np
import pytest

from l2r import workdir as workdir_lib
from l2r.config_checks import ConfigError
from l2r.configs import exp2, exp3, exp4
from l2r.data import plan as plan_lib
from l2r.data.sources import DataError
from l2r.pipelines import transfer


def plan(config):
    task_a, task_b, _, _ = plan_lib.build_tasks(config)
    return task_a, plan_lib.transfer_plan(config, task_a, task_b)


def test_exp2_pools_are_disjoint_n_way_tasks():
    config = exp2.get_config("smoke")
    config.pools.meta_test_tasks = 3
    task_a, p = plan(config)
    assert p.meta_train.class_names == ("3", "4", "5")
    assert p.class_table.shape == (config.meta.episodes, 2)
    assert p.class_table.min() >= 0 and p.class_table.max() < 3  # pool labels 0..2
    assert all(len(set(row)) == 2 for row in p.class_table.tolist())
    assert len(p.meta_test) == 3
    test_classes = {c for t in p.meta_test for c in t.class_names}
    assert not test_classes & set(p.meta_train.class_names)
    assert not test_classes & set(task_a.class_names)
    for t in p.meta_test:
        assert t.num_classes == 2 and set(np.unique(t.train.labels)) == {0, 1}
    # Deterministic in the seed.
    _, again = plan(config)
    np.testing.assert_array_equal(again.class_table, p.class_table)


def test_exp4_meta_test_comes_from_another_dataset():
    task_a, p = plan(exp4.get_config("smoke"))
    assert p.meta_test[0].train.images.shape[1:] == task_a.train.images.shape[1:]
    assert p.meta_test[0].name.startswith("digits")
    assert p.class_table.shape[1] == 3


def test_overlapping_pools_and_mismatched_shapes_fail_before_training():
    config = exp2.get_config("smoke")
    config.pools.meta_test.classes = (5, 6)  # 5 is also a meta-training class
    with pytest.raises(DataError, match="share"):
        plan(config)
    config = exp2.get_config("smoke")
    config.pools.meta_train.classes = (2, 3, 4)  # 2 is a Task-A class
    with pytest.raises(DataError, match="task_A"):
        plan(config)
    config = exp4.get_config("smoke")
    config.pools.meta_test.image_size = 8
    with pytest.raises(ConfigError, match="image_size"):
        plan(config)
    config = exp3.get_config("smoke")
    config.meta.train_checkpoints = config.pretrain.num_checkpoints
    with pytest.raises(ConfigError, match="train_checkpoints"):
        transfer.check_config(config)


def test_baselines_alone_skip_meta_training(tmp_path):
    config = exp2.get_config("smoke")
    config.task_b.methods = ("sgd", "sgd_kernels_x0.1")
    with workdir_lib.locked(str(tmp_path)):
        results = transfer.run(config, str(tmp_path))
    assert results["meta"] == {} and not os.path.exists(tmp_path / "meta")
    assert not os.path.exists(tmp_path / "fig6_curriculum.png")
    assert set(results["methods"]) == {"sgd", "sgd_kernels_x0.1"}
