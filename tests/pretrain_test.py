"""Task-A pre-training: a checkpoint is a function of its index only, whichever checkpoints
train beside it in one compiled call, and it is cached."""

import chex
import numpy as np
import pytest

from l2r import pretrain, training
from l2r.configs import fig1
from l2r.data import plan
from l2r.models import registry as model_registry


def _setup(seeds_per_call):
    config = fig1.get_config("smoke")
    config.pretrain.num_checkpoints = 3
    config.pretrain.seeds_per_call = seeds_per_call
    task_a, _, mean, std = plan.build_tasks(config)
    model = model_registry.from_config(config.model)
    return config, model, training.to_device(task_a, mean, std)


def test_a_checkpoint_does_not_depend_on_its_group_and_is_cached(tmp_path, monkeypatch):
    config, model, data_a = _setup(seeds_per_call=3)
    together, accs, _ = pretrain.pretrained_networks(config, model, data_a, str(tmp_path / "a"))
    config, model, data_a = _setup(seeds_per_call=1)
    alone, accs1, _ = pretrain.pretrained_networks(config, model, data_a, str(tmp_path / "b"))
    chex.assert_trees_all_close(together, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accs, accs1, rtol=1e-6)
    kernels = np.asarray(together["head"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])  # Different indices, different networks.
    # A second call reads every checkpoint from the cache and trains nothing.
    monkeypatch.setattr(pretrain, "_train", lambda *a: pytest.fail("retrained"))
    again, accs2, _ = pretrain.pretrained_networks(config, model, data_a, str(tmp_path / "b"))
    chex.assert_trees_all_equal(again, alone)
    np.testing.assert_array_equal(accs2, accs1)
