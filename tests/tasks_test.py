"""Tests of l2r.data.tasks: class splits, n-way task pools, halves, unions, statistics."""

import chex
import numpy as np
import pytest
from sources_test import assert_same

from l2r.data import sources, tasks
from l2r.data.sources import DataError, Split

CIFAR10 = tasks.CIFAR10_5A + tasks.CIFAR10_5B


@pytest.fixture(scope="module")
def cifar_like():
    return sources.load(
        "synthetic", class_names=CIFAR10, image_size=4, train_per_class=6, test_per_class=3
    )


def test_split_5a_5b_by_names(cifar_like):
    a, b = tasks.split_task(cifar_like, tasks.CIFAR10_5A, tasks.CIFAR10_5B)
    assert a.class_names == tasks.CIFAR10_5A and b.class_names == tasks.CIFAR10_5B
    assert a.num_classes == b.num_classes == 5
    for task, offset in ((a, 0), (b, 5)):
        np.testing.assert_array_equal(np.bincount(task.train.labels), [6] * 5)
        original = cifar_like.train.images[cifar_like.train.labels == offset + 2]
        np.testing.assert_array_equal(task.train.images[task.train.labels == 2], original)
    # Order given = label order; indices work too.
    t = tasks.make_task(cifar_like, ["ship", 0], "t")
    assert t.class_names == ("ship", "airplane")
    np.testing.assert_array_equal(t.test.labels, [0, 0, 0, 1, 1, 1][::-1])


def test_class_errors(cifar_like):
    with pytest.raises(DataError, match="'cat'") as info:
        tasks.split_task(cifar_like, ["cat", "dog"], ["frog", "cat"])
    assert "share" in str(info.value)
    with pytest.raises(DataError, match="'airplane', 'automobile'"):
        tasks.resolve_classes(cifar_like, ["plane"])
    with pytest.raises(DataError, match="out of range"):
        tasks.resolve_classes(cifar_like, [10])
    with pytest.raises(DataError, match="more than once"):
        tasks.resolve_classes(cifar_like, ["cat", 3])


def test_nway_tasks_stay_in_their_pool(cifar_like):
    train_pool, test_pool = CIFAR10[:6], CIFAR10[6:]
    meta_train = tasks.sample_nway_tasks(cifar_like, train_pool, 3, 8, seed=0)
    meta_test = tasks.sample_nway_tasks(cifar_like, test_pool, 3, 4, seed=1)
    tasks.assert_disjoint(meta_train=meta_train, meta_test=meta_test)
    for t in meta_train + meta_test:
        assert len(set(t.class_names)) == 3
        np.testing.assert_array_equal(np.unique(t.train.labels), [0, 1, 2])
    assert all(set(t.class_names) <= set(train_pool) for t in meta_train)
    again = tasks.sample_nway_tasks(cifar_like, train_pool, 3, 8, seed=0)
    assert [t.class_names for t in again] == [t.class_names for t in meta_train]
    assert len({t.class_names for t in meta_train}) > 1
    with pytest.raises(DataError, match="n_way=5"):
        tasks.sample_nway_tasks(cifar_like, test_pool, 5, 1, seed=0)


def test_assert_disjoint_names_the_leak(cifar_like):
    with pytest.raises(DataError, match=r"pool_a and pool_b share \['dog'\]"):
        tasks.assert_disjoint(pool_a=["cat", "dog"], pool_b=["dog", "frog"], other=["ship"])
    tasks.assert_disjoint(a=tasks.make_task(cifar_like, [0, 1], "a"), b=["cat"])


def test_halves_are_disjoint_and_cover_train(cifar_like):
    task = tasks.make_task(cifar_like, tasks.CIFAR10_5B, "B")
    db1, db2 = tasks.halves(task, seed=0)
    np.testing.assert_array_equal(np.bincount(db1.train.labels), [3] * 5)
    np.testing.assert_array_equal(np.bincount(db2.train.labels), [3] * 5)
    assert db1.test is task.test and db2.test is task.test
    rows = lambda images: {im.tobytes() for im in images}  # Synthetic images are all distinct.
    assert not rows(db1.train.images) & rows(db2.train.images)
    assert rows(db1.train.images) | rows(db2.train.images) == rows(task.train.images)
    for x, y in zip(tasks.halves(task, seed=0), (db1, db2), strict=True):
        assert_same(x, y)


def test_union_offsets_b_labels(cifar_like):
    a, b = tasks.split_task(cifar_like, ["cat", "dog"], ["ship", "frog", "horse"])
    ab = tasks.union(a, b)
    assert ab.class_names == ("cat", "dog", "ship", "frog", "horse")
    np.testing.assert_array_equal(
        ab.train.labels, np.concatenate([a.train.labels, b.train.labels + 2])
    )
    np.testing.assert_array_equal(ab.test.images[len(a.test.labels) :], b.test.images)


def test_normalization_stats_and_subsample():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(5), 10).astype(np.int32)
    split = Split(images, labels)
    mean, std = tasks.normalization_stats(split, chunk=7)
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-5)
    assert mean.dtype == std.dtype == np.float32
    sub = tasks.subsample(split, 20, seed=0)
    np.testing.assert_array_equal(np.bincount(sub.labels), [4] * 5)
    chex.assert_trees_all_equal(sub, tasks.subsample(split, 20, seed=0))
    assert tasks.subsample(split, 50, seed=0) is split
    assert len(tasks.subsample(split, 13, seed=1).labels) == 13
