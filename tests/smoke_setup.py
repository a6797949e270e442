"""Problems the meta-training tests share. `exp1_smoke`: the Exp-1 smoke problem that the
multi-device tests' subprocesses run (import it after JAX's device count is set: building it
places arrays on the devices). `tiny`: a generated problem small enough to compile in seconds."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2r import models, pretrain, training
from l2r.configs import exp1
from l2r.data import plan


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


def make_model(config) -> models.Model:
    """The backbone of `config.model` (a convnet in every test config)."""
    m = config.model
    return models.make_model("convnet", widths=tuple(m.widths), groups=m.groups,
                             hidden=m.hidden or None)  # fmt: skip


def exp1_smoke(work: str, num_episodes_parallel: int = 4) -> Smoke:
    """Exp 1 `smoke`, with episodes that never end within a test's windows; pre-training is
    cached in `work` (saved collectively when several processes run this)."""
    config = exp1.get_config("smoke")
    config.meta.episodes = 1000
    config.meta.num_episodes_parallel = num_episodes_parallel
    task_a, task_b, mean, std = plan.build_tasks(config)
    model = make_model(config)
    data_a = training.to_device(task_a, mean, std)
    data_b = training.to_device(task_b, mean, std)
    pretrained, _, _ = pretrain.pretrained_networks(config, model, data_a, work)
    return Smoke(config, task_a, task_b, mean, std, model, data_a, data_b, pretrained)


def random_task(gen, n: int, num_classes: int, image_shape=(8, 8, 1)) -> training.DeviceTask:
    """Random uint8 images with balanced labels 0..num_classes-1 (train and test alike)."""
    images = gen.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    c = image_shape[-1]
    mean, std = np.full(c, 0.5, np.float32), np.full(c, 0.25, np.float32)
    return training.DeviceTask(*map(jnp.asarray, (images, labels, images, labels, mean, std)))


def tiny(**meta):
    """A generated two-task problem: (config, model, pretrained, data_a, data_b).

    Exp 1's smoke config with a 4-channel convnet on 8x8 images, batches of 4, 2 episodes of
    T-BPTT 3 that never end by themselves, a small meta-learner; `meta` overrides the `meta`
    group. Untrained networks stand in for pre-trained ones (two, so episodes differ)."""
    config = exp1.get_config("smoke")
    config.model.widths, config.model.groups = (4, 4), 2
    config.task_b.batch_size = config.task_b.teacher_batch_a = 4
    m = config.meta
    m.num_episodes_parallel, m.tbptt, m.tbptt_max = 2, 3, 3
    m.episodes, m.inner_steps, m.max_windows = 1000, 1000, 2
    m.hidden_kernel = m.hidden_vector = 4
    m.update(meta)
    model = make_model(config)
    gen = np.random.default_rng(0)
    data_a, data_b = random_task(gen, 32, 3), random_task(gen, 32, 3)
    keys = jax.random.split(jax.random.key(0), 2)
    nets = [pretrain.init_network(model, k, (1, 8, 8, 1), 3) for k in keys]
    pretrained = jax.tree.map(lambda *a: jnp.stack(a), *nets)
    return config, model, pretrained, data_a, data_b
