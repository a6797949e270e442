"""The Exp-1 smoke problem that the multi-device tests' subprocesses share: config, tasks, model,
data on the device and the (cached) pre-trained networks. Import it after JAX's device count is
set: building it places arrays on the devices."""

from typing import Any, NamedTuple

from experiments.configs import exp1
from l2r import forgetting, pretrain, training


class Smoke(NamedTuple):
    config: Any
    task_a: Any
    task_b: Any
    mean: Any
    std: Any
    model: Any
    data_a: training.DeviceTask
    data_b: training.DeviceTask
    pretrained: Any


def exp1_smoke(work: str, num_episodes_parallel: int = 4) -> Smoke:
    """Exp 1 `smoke`, with episodes that never end within a test's windows; pre-training is
    cached in `work` (saved collectively when several processes run this)."""
    config = exp1.get_config("smoke")
    config.meta.episodes = 1000
    config.meta.num_episodes_parallel = num_episodes_parallel
    task_a, task_b, mean, std = forgetting.build_tasks(config)
    model = forgetting.make_model(config)
    data_a = training.to_device(task_a, mean, std)
    data_b = training.to_device(task_b, mean, std)
    pretrained, _, _ = pretrain.pretrained_networks(config, model, data_a, work)
    return Smoke(config, task_a, task_b, mean, std, model, data_a, data_b, pretrained)
