"""Data: whole splits as host numpy arrays (`sources`, reading image files through `decode`),
class-split tasks (`tasks`), seeded index and augmentation streams plus on-device
normalisation/augmentation (`stream`), and extraction of the offline archives (`prepare`)."""

from l2r.data.sources import SOURCES, DataError, Dataset, Split, load
from l2r.data.tasks import (
    CIFAR10_5A,
    CIFAR10_5B,
    Task,
    assert_disjoint,
    halves,
    make_task,
    normalization_stats,
    resolve_classes,
    sample_nway_classes,
    sample_nway_tasks,
    split_task,
    subsample,
    union,
)

__all__ = [
    "SOURCES", "DataError", "Dataset", "Split", "load", "CIFAR10_5A", "CIFAR10_5B", "Task",
    "assert_disjoint", "halves", "make_task", "normalization_stats", "resolve_classes",
    "sample_nway_classes", "sample_nway_tasks", "split_task", "subsample", "union",
]  # fmt: skip
