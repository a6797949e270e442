"""The tasks an experiment's config names: Task A and Task B, the meta-training and meta-test
class pools, and the n-way tasks (Exps 2-4) or task pairs (Exp 5) drawn from them.

Exp 1 splits Task B's training examples into halves DB1 (meta-training) and DB2 (meta-test),
the test split shared; Exps 2-5 draw n-way tasks from a pool of meta-training classes and
meta-test on tasks from a disjoint pool (Exp 4: of another dataset). Every draw is a function of
`config.seed`, and the pools are checked disjoint from each other and from Task A.
"""

import os
from typing import NamedTuple

import ml_collections
import numpy as np
from absl import logging

from l2r import rng
from l2r.config_checks import ConfigError
from l2r.data import sources, tasks


def load_dataset(data: ml_collections.ConfigDict) -> sources.Dataset:
    """Loads the dataset a config names, extracting an offline archive first if asked."""
    if data.archive and data.root and not os.path.exists(data.root):
        from l2r.data import prepare

        if not os.path.exists(data.archive):
            raise sources.DataError(
                f"data.root={data.root} does not exist and the archive to extract it from, "
                f"data.archive={data.archive}, is missing. Point --config.data.root at an "
                "extracted copy or --config.data.archive at the .tar.gz, or build the folder "
                "from the official archive: python -m l2r.data.prepare "
                "--cifar10_python=cifar-10-python.tar.gz (or --tiny_imagenet_zip=...)."
            )
        prepare.ensure_extracted(data.archive, os.path.dirname(os.path.abspath(data.root)))
    kwargs = dict(
        name=data.name or None,
        root=data.root or None,
        image_size=data.image_size or None,
        data_dir=data.data_dir or None,
        download=data.download,
    )
    options = data.get(data.source)  # A source's own options: data.synthetic, data.<mine>.
    if isinstance(options, ml_collections.ConfigDict):
        kwargs.update(options.to_dict())
    return sources.load(data.source, **kwargs)


def load_data(config, data: ml_collections.ConfigDict | None = None) -> sources.Dataset:
    """The dataset `data` names (default `config.data`) as the experiment sees it: with
    `config.validation` > 0, its test split replaced by a validation split held out from its
    training split (`tasks.validation_split`; the same examples wherever the dataset is loaded),
    so that nothing of the run reads the real test split."""
    dataset = load_dataset(config.data if data is None else data)
    fraction = config.get("validation", 0.0)
    if not fraction:
        return dataset
    seed = rng.seed_for(config.seed, f"validation/{dataset.name}")
    return tasks.validation_split(dataset, fraction, seed)


def build_tasks(config):
    """Loads the data and returns (Task A, Task B, per-channel mean, std)."""
    dataset = load_data(config)
    task_a, task_b = tasks.split_task(dataset, config.data.classes_a, config.data.classes_b)
    mean, std = tasks.normalization_stats(dataset.train)
    logging.info(
        "Task A: %s (%d train / %d test); Task B: %s (%d / %d)",
        ", ".join(task_a.class_names),
        len(task_a.train.labels),
        len(task_a.test.labels),
        ", ".join(task_b.class_names),
        len(task_b.train.labels),
        len(task_b.test.labels),
    )
    return task_a, task_b, mean, std


class MetaPlan(NamedTuple):
    """Which data meta-training and meta-test see."""

    meta_train: tasks.Task  # Exp 1: DB1; Exps 2-4: the pool of meta-training classes
    class_table: np.ndarray | None  # int32 [T, n_way] episode tasks (pool labels), or None
    meta_test: list  # [tasks.Task]: Exp 1: [DB2]; Exps 2-4: the n-way meta-test tasks


def _load_pool(config, pool) -> tasks.Task:
    """The pool of classes `pool.classes` of the dataset `pool` names ("" = the Task-A data),
    labels 0..P-1 in the order of `pool.classes`."""
    dataset = load_data(config, pool if pool.source else config.data)
    return tasks.make_task(dataset, pool.classes, f"{dataset.name}-pool")


def transfer_plan(config, task_a: tasks.Task, task_b: tasks.Task) -> MetaPlan:
    """Exp 1: DB1 / DB2 halves of Task B; with `pools`: the two pools and their n-way tasks."""
    if "pools" not in config:
        db1, db2 = tasks.halves(task_b, rng.seed_for(config.seed, "halves"))
        return MetaPlan(db1, None, [db2])
    p = config.pools
    train_pool, test_pool = load_pools(config, task_a)
    num_tasks = p.meta_train_tasks or config.meta.episodes
    seed_train = rng.seed_for(config.seed, "meta_train_tasks")
    seed_test = rng.seed_for(config.seed, "meta_test_tasks")
    table = tasks.sample_nway_classes(
        train_pool, range(train_pool.num_classes), p.n_way, num_tasks, seed_train
    )
    test = tasks.sample_nway_tasks(
        test_pool, range(test_pool.num_classes), p.n_way, p.meta_test_tasks, seed_test
    )
    return MetaPlan(train_pool, table, test)


def load_pools(config, task_a: tasks.Task) -> tuple[tasks.Task, tasks.Task]:
    """The meta-training and meta-test pools of `config.pools`, checked disjoint from each other
    (when drawn from one dataset) and from Task A, with Task A's image shape."""
    p = config.pools
    train_pool = _load_pool(config, p.meta_train)
    test_pool = _load_pool(config, p.meta_test)
    same = lambda a, b: (a.source or config.data.source) == (b.source or config.data.source)  # noqa: E731
    if same(p.meta_train, p.meta_test):
        tasks.assert_disjoint(meta_train_pool=train_pool, meta_test_pool=test_pool)
    for name, pool, loaded in (("meta_train", p.meta_train, train_pool),
                               ("meta_test", p.meta_test, test_pool)):  # fmt: skip
        if not pool.source or pool.source == config.data.source:
            tasks.assert_disjoint(**{"task_A": task_a, f"{name}_pool": loaded})
        shape_a, shape_p = task_a.train.images.shape[1:], loaded.train.images.shape[1:]
        if shape_a != shape_p:
            raise ConfigError(
                f"pools.{name} images are {shape_p} but Task A's are {shape_a}; set "
                f"pools.{name}.image_size (and matching channels) so the network sees one shape."
            )
    return train_pool, test_pool


class SequencePlan(NamedTuple):
    """Exp 5's tasks: Task 1, the meta-training pool and its task pairs, the meta-test pairs."""

    task_1: tasks.Task
    meta_train: tasks.Task  # the pool of meta-training classes, labels 0..P-1
    pair_table: np.ndarray  # int32 [T, 2, n_way]: episode tasks (pool labels)
    meta_test: list  # [(Task 2, Task 3)] from the meta-test pool


def sample_task_pairs(num_classes: int, n_way: int, num: int, seed: int, disjoint: bool):
    """`num` (Task 2, Task 3) pairs of n-way tasks from classes 0..num_classes-1: int32
    [num, 2, n_way]. Disjoint: 2·n_way distinct classes; otherwise two different class sets.
    Deterministic in `seed`."""
    gen, rows = np.random.default_rng(seed), []
    for _ in range(num):
        if disjoint:
            rows.append(gen.choice(num_classes, 2 * n_way, replace=False).reshape(2, n_way))
            continue
        while True:
            pair = np.stack([gen.choice(num_classes, n_way, replace=False) for _ in range(2)])
            if set(pair[0]) != set(pair[1]):
                break
        rows.append(pair)
    return np.asarray(rows, np.int32).reshape(num, 2, n_way)


def sequence_plan(config) -> SequencePlan:
    """Task 1, the pools (checked disjoint), the episodes' task pairs and the meta-test pairs."""
    dataset = load_data(config)
    task_1 = tasks.make_task(dataset, config.data.classes_a, "1")
    train_pool, test_pool = load_pools(config, task_1)
    p = config.pools
    num = p.meta_train_tasks or config.meta.episodes
    seed_train = rng.seed_for(config.seed, "meta_train_pairs")
    seed_test = rng.seed_for(config.seed, "meta_test_pairs")
    table = sample_task_pairs(train_pool.num_classes, p.n_way, num, seed_train, p.disjoint_tasks)
    test = sample_task_pairs(test_pool.num_classes, p.n_way, p.meta_test_tasks, seed_test,
                             p.disjoint_tasks)  # fmt: skip
    meta_test = [
        tuple(tasks.make_task(test_pool, row.tolist(), f"{test_pool.name}/task{k}-{i}")
              for k, row in zip((2, 3), pair, strict=True))
        for i, pair in enumerate(test)
    ]  # fmt: skip
    return SequencePlan(task_1, train_pool, table, meta_test)
