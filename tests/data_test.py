"""Tests of l2r.data: loaders on tiny self-made files, tasks, streams, augmentation, prepare.

No network and no shared data: every test builds what it reads in tmp_path.
"""

import gzip
import io
import os
import socket
import struct
import tarfile
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from l2r.data import prepare, sources, stream, tasks
from l2r.data.sources import DataError, Split

CIFAR10 = tasks.CIFAR10_5A + tasks.CIFAR10_5B


def _assert_same(a, b):
    """Datasets/Tasks (not pytrees) with equal names and arrays."""
    assert (a.name, a.class_names) == (b.name, b.class_names)
    chex.assert_trees_all_equal((a.train, a.test), (b.train, b.test))


def _save(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _pixel(split_i, class_i, i):
    return 10 + 40 * class_i + 7 * i + split_i


def _image_folder(root, classes=("cat", "ant"), per_split=(3, 2), size=8, test_name="test"):
    """root/{train,test}/<class>/ with PNG, JPG and upper-case JPEG files of constant colour."""
    exts = (".png", ".jpg", ".JPEG")
    for split_i, (split, n) in enumerate(zip(("train", test_name), per_split, strict=True)):
        for class_i, c in enumerate(sorted(classes)):
            for i in range(n):
                value = _pixel(split_i, class_i, i)
                ext = exts[i % 3]
                fmt = "PNG" if ext == ".png" else "JPEG"
                _save(
                    root / split / c / f"{i}{ext}", np.full((size, size, 3), value, np.uint8), fmt
                )
    (root / "train" / sorted(classes)[0] / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_loads_shapes_labels_and_names(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    d = sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert d.class_names == ("ant", "cat")  # Sorted folder names.
    assert d.name == "imgs"
    chex.assert_shape(d.train.images, (6, 8, 8, 3))
    chex.assert_shape(d.test.images, (4, 8, 8, 3))
    assert d.train.images.dtype == np.uint8 and d.train.labels.dtype == np.int32
    np.testing.assert_array_equal(d.train.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(d.test.labels, [0, 0, 1, 1])
    # Files sort as 0.png, 1.jpg, 2.JPEG; PNG is lossless, JPEG close.
    assert (d.train.images[0] == _pixel(0, 0, 0)).all()
    np.testing.assert_allclose(d.train.images[4].mean(), _pixel(0, 1, 1), atol=3)


def test_image_folder_resizes_and_accepts_val(tmp_path):
    root = _image_folder(tmp_path / "imgs", test_name="val")
    d = sources.load("image_folder", root=str(root), image_size=4, cache_dir=str(tmp_path / "c"))
    chex.assert_shape(d.train.images, (6, 4, 4, 3))
    chex.assert_shape(d.test.images, (4, 4, 4, 3))


def test_image_folder_second_load_hits_the_cache(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = sources.load("image_folder", root=str(root), cache_dir=str(cache))
    assert len(list((cache / "arrays").glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources, "_decode_all", no_decoding)
    second = sources.load("image_folder", root=str(root), cache_dir=str(cache))
    _assert_same(first, second)
    # A changed file changes the key: it is decoded again.
    _save(root / "test" / "ant" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(AssertionError, match="decoded again"):
        sources.load("image_folder", root=str(root), cache_dir=str(cache))


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    monkeypatch.setenv("L2R_CACHE", str(tmp_path / "envcache"))
    sources.load("image_folder", root=str(root))
    assert list((tmp_path / "envcache" / "arrays").glob("*.npz"))


def test_worker_processes_decode_like_one(tmp_path, monkeypatch, caplog):
    root = _image_folder(tmp_path / "imgs", per_split=(5, 3))
    serial = sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(sources, "_MIN_PARALLEL_FILES", 1)
    parallel = sources.load(
        "image_folder", root=str(root), cache_dir=str(tmp_path / "b"), num_workers=2
    )
    _assert_same(serial, parallel)
    assert "workers failed" not in caplog.text  # The workers ran, no fallback.
    (root / "test" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "b"), num_workers=2)


def test_corrupt_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "c"))


def test_mismatched_sizes_ask_for_image_size(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    _save(root / "test" / "cat" / "big.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DataError, match="image_size"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "c"))
    d = sources.load("image_folder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    chex.assert_shape(d.test.images, (5, 8, 8, 3))


def test_image_folder_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="/nonexistent/l2r"):
        sources.load("image_folder", root="/nonexistent/l2r")
    with pytest.raises(DataError, match="root=PATH"):
        sources.load("image_folder")
    root = _image_folder(tmp_path / "imgs")
    os.makedirs(root / "test" / "bee")
    with pytest.raises(DataError, match="bee"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------------
# tiny_imagenet


def _tiny_imagenet(root, wnids=("n02", "n01", "n03")):
    os.makedirs(root / "val" / "images")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n00\tentity\nn01\tgoldfish, carp\nn02\tsalamander\n")
    for k, w in enumerate(wnids):
        for i in range(2):
            _save(
                root / "train" / w / "images" / f"{w}_{i}.JPEG",
                np.full((8, 8, 3), 50 * k, np.uint8),
            )
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    rows = [
        ("val_0.JPEG", "n03"),
        ("val_1.JPEG", "n02"),
        ("val_2.JPEG", "n99"),
        ("val_3.JPEG", "n03"),
    ]
    for i, (f, _) in enumerate(rows):
        _save(root / "val" / "images" / f, np.full((8, 8, 3), 30 * i, np.uint8))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{f}\t{w}\t0\t0\t7\t7\n" for f, w in rows)
    )
    return root


def test_tiny_imagenet_official_layout(tmp_path):
    root = _tiny_imagenet(tmp_path / "tiny-imagenet-200")
    d = sources.load("tiny_imagenet", root=str(root), cache_dir=str(tmp_path / "c"))
    assert d.class_names == ("n02", "n01", "n03")  # wnids.txt order, not sorted.
    assert d.descriptions == ("salamander", "goldfish, carp", "n03")
    np.testing.assert_array_equal(d.train.labels, [0, 0, 1, 1, 2, 2])
    # val_2 belongs to a wnid outside wnids.txt: skipped. Labels from val_annotations.txt.
    np.testing.assert_array_equal(d.test.labels, [2, 0, 2])
    chex.assert_shape(d.test.images, (3, 8, 8, 3))
    small = sources.load(
        "tiny_imagenet", root=str(root), image_size=4, cache_dir=str(tmp_path / "c")
    )
    chex.assert_shape(small.train.images, (6, 4, 4, 3))


def test_tiny_imagenet_missing_wnid_folder(tmp_path):
    root = _tiny_imagenet(tmp_path / "tiny")
    (root / "wnids.txt").write_text("n01\nn02\nn07\n")
    with pytest.raises(DataError, match="n07"):
        sources.load("tiny_imagenet", root=str(root), cache_dir=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------------
# fashion_mnist


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    d = sources.load("fashion_mnist", root=str(tmp_path))
    chex.assert_shape(d.train.images, (5, 28, 28, 1))
    chex.assert_shape(d.test.images, (3, 28, 28, 1))
    np.testing.assert_array_equal(d.test.labels, [0, 1, 2])
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    assert sources.load("fashion_mnist", root=str(tmp_path), image_size=32).train.images.shape == (
        5, 32, 32, 1,
    )  # fmt: skip


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        sources.load("fashion_mnist", root=str(tmp_path / "missing"))
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01")
    with pytest.raises(DataError, match="unsigned bytes"):
        sources.read_idx(str(tmp_path / "bad.gz"))
    _write_idx(tmp_path / "short.gz", np.zeros((2, 3)))
    data = gzip.open(tmp_path / "short.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(data[:-1])
    with pytest.raises(DataError, match="truncated"):
        sources.read_idx(str(tmp_path / "short.gz"))


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="package not installed")
def test_fashion_mnist_real_files():
    d = sources.load("fashion_mnist")
    chex.assert_shape(d.train.images, (60000, 28, 28, 1))
    chex.assert_shape(d.test.images, (10000, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(d.test.labels), [1000] * 10)


# ------------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_split_is_deterministic_and_stratified():
    d = sources.load("digits")
    chex.assert_shape(d.train.images, (None, 8, 8, 1))
    assert len(d.train.labels) + len(d.test.labels) == 1797
    assert d.train.images.max() == 255 and d.class_names == tuple("0123456789")
    fraction = np.bincount(d.test.labels) / (
        np.bincount(d.test.labels) + np.bincount(d.train.labels)
    )
    np.testing.assert_allclose(fraction, 0.2, atol=0.01)
    _assert_same(d, sources.load("digits"))
    other = sources.load("digits", seed=1)
    assert not np.array_equal(other.test.labels, d.test.labels) or not np.array_equal(
        other.test.images, d.test.images
    )


def test_synthetic_is_fast_deterministic_and_shaped():
    start = time.perf_counter()
    d = sources.load("synthetic", num_classes=10, image_size=16, train_per_class=200)
    assert time.perf_counter() - start < 0.5
    chex.assert_shape(d.train.images, (2000, 16, 16, 1))
    assert d.train.images.dtype == np.uint8 and d.class_names == tuple("0123456789")
    np.testing.assert_array_equal(np.bincount(d.test.labels), [50] * 10)
    _assert_same(d, sources.load("synthetic", train_per_class=200))
    assert not np.array_equal(d.train.images, sources.load("synthetic", seed=1).train.images)
    rgb = sources.load("synthetic", channels=3, image_size=8, class_names=("x", "y"), seed=3)
    chex.assert_shape(rgb.train.images, (400, 8, 8, 3))
    assert rgb.class_names == ("x", "y")
    # Class structure: class means differ more between classes than noise within a class.
    x = d.train.images.reshape(2000, -1).astype(np.float32)
    means = np.stack([x[d.train.labels == c].mean(0) for c in range(10)])
    assert np.std(means, 0).mean() > 5


def test_load_rejects_bad_arguments():
    with pytest.raises(DataError, match="image_folder"):
        sources.load("cifar")
    with pytest.raises(DataError, match="num_classes"):
        sources.load("digits", num_classes=3)
    with pytest.raises(DataError, match="root"):
        sources.load("synthetic", root="/tmp")
    with pytest.raises(DataError, match="image_size"):
        sources.load("synthetic", image_size=0)


# ------------------------------------------------------------------------------------------------
# tfds


def _no_preparing(*args, **kwargs):
    raise AssertionError("tried to download and prepare")


def test_tfds_without_tensorflow_fails_fast(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(sources, "_tensorflow_available", lambda: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_preparing)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r'pip install "l2r\[tfds\]"') as info:
        sources.load("tfds", name="cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert str(tmp_path) in str(info.value)


def test_prepare_cli_tfds_without_tensorflow(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "_tensorflow_available", lambda: False)
    assert prepare.main(["--tfds=cifar10", f"--data_dir={tmp_path}"]) == 1
    assert "l2r[tfds]" in capsys.readouterr().err
    with pytest.raises(DataError, match="check the name"):
        sources.load("tfds", name="no_such_dataset_l2r", data_dir=str(tmp_path))


def test_tfds_offline_fails_fast_with_the_fixes(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    probed = []
    monkeypatch.setattr(sources, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(sources, "_host_reachable", lambda host, **kw: probed.append(host))
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_preparing)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        sources.load("tfds", name="cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert probed == ["www.cs.toronto.edu"]
    for words in (str(tmp_path), "no network", "l2r.data.prepare", "source=image_folder"):
        assert words in message
    with pytest.raises(DataError, match="download=False"):
        sources.load("tfds", name="cifar10", data_dir=str(tmp_path), download=False)


def test_reachability_gives_up_quickly(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not sources._host_reachable("example.org")

    def hang(*args, **kwargs):
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert not sources._host_reachable("example.org", timeout=0.2)
    assert time.perf_counter() - start < 1


def test_tfds_pipeline_on_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    # mock_data fakes tfds.data_source but not builder.is_prepared(), hence the patch.
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=7):
        d = sources.load("tfds", name="cifar10", data_dir=str(tmp_path))
        small = sources.load("tfds", name="cifar10", data_dir=str(tmp_path), image_size=16)
    chex.assert_shape(d.train.images, (7, 32, 32, 3))
    chex.assert_shape(d.test.images, (7, 32, 32, 3))
    chex.assert_shape(small.train.images, (7, 16, 16, 3))
    assert d.train.images.dtype == np.uint8 and d.train.labels.dtype == np.int32
    assert len(d.class_names) == 10 and d.train.labels.max() < 10 and d.name == "cifar10"


# ------------------------------------------------------------------------------------------------
# tasks


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
        _assert_same(x, y)


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


# ------------------------------------------------------------------------------------------------
# streams and augmentation


def test_index_stream_is_epochwise_permutation():
    idx = stream.index_stream(12, 4, 7, seed=0)
    chex.assert_shape(idx, (7, 4))
    assert idx.dtype == np.int32
    for epoch in (idx[0:3], idx[3:6]):
        np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(12))
    assert not np.array_equal(idx[0:3], idx[3:6])
    # Not divisible: each epoch's batches hold distinct examples.
    ragged = stream.index_stream(10, 4, 9, seed=0)
    for e in range(4):
        epoch = ragged[2 * e : 2 * e + 2].ravel()
        assert len(set(epoch.tolist())) == 8 and epoch.max() < 10


def test_streams_are_deterministic_in_seed():
    a = stream.index_streams(100, 8, 20, seeds=[1, 2])
    chex.assert_shape(a, (2, 20, 8))
    np.testing.assert_array_equal(a, stream.index_streams(100, 8, 20, seeds=[1, 2]))
    assert not np.array_equal(a[0], a[1])
    aug = stream.augment_stream(8, 20, seed=3, pad=2)
    chex.assert_trees_all_equal(aug, stream.augment_stream(8, 20, seed=3, pad=2))
    assert set(np.unique(aug["dy"])) == set(range(5)) and set(np.unique(aug["flip"])) == {0, 1}
    assert all(v.shape == (20, 8) and v.dtype == np.int32 for v in aug.values())
    assert not np.array_equal(aug["dy"], stream.augment_stream(8, 20, seed=4, pad=2)["dy"])


def test_batch_larger_than_data_is_refused():
    with pytest.raises(DataError, match="batch_size=64.*30 examples"):
        stream.index_stream(30, 64, 5, seed=0)


def test_augment_identity_flip_and_shift():
    x = jax.random.normal(jax.random.key(0), (3, 6, 5, 2))
    pad = 2
    zeros = jnp.zeros(3, jnp.int32)
    augment = jax.jit(stream.augment, static_argnames="pad")
    centre = jnp.full(3, pad, jnp.int32)
    chex.assert_trees_all_equal(augment(x, centre, centre, zeros, pad=pad), x)
    ones = jnp.ones(3, jnp.int32)
    once = augment(x, centre, centre, ones, pad=pad)
    chex.assert_trees_all_equal(once, x[:, :, ::-1])
    chex.assert_trees_all_equal(augment(once, centre, centre, ones, pad=pad), x)
    # Crop one row lower: row i shows input row i+1; the last row is padding.
    down = augment(x, centre + 1, centre, zeros, pad=pad)
    chex.assert_trees_all_equal(down[:, :-1], x[:, 1:])
    chex.assert_trees_all_equal(down[:, -1], jnp.zeros_like(x[:, -1]))
    # Two columns left of centre: column j shows input column j-2.
    left = augment(x, centre, centre - 2, zeros, pad=pad)
    chex.assert_trees_all_equal(left[:, :, 2:], x[:, :, :-2])


def test_to_float_normalises():
    images = np.array([[[[0, 255]]]], np.uint8)
    out = jax.jit(stream.to_float)(images, np.array([0.5, 0.5]), np.array([0.5, 0.25]))
    np.testing.assert_allclose(out, [[[[-1.0, 2.0]]]], rtol=1e-6)
    assert out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# prepare


def _archive(path, top="mydata"):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with tarfile.open(path, "w:gz") as tar:
        for name in (f"{top}/train/a/0.png", f"{top}/test/a/0.png"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_ensure_extracted_is_idempotent_and_verifies(tmp_path, monkeypatch, capsys):
    archive = _archive(tmp_path / "mydata.tar.gz")
    digest = prepare.sha256_of(str(archive))
    dest = tmp_path / "dest"
    root = prepare.ensure_extracted(str(archive), str(dest), sha256=digest)
    assert root == str(dest / "mydata") and os.path.isfile(dest / "mydata/train/a/0.png")
    assert not [p for p in os.listdir(dest) if p.startswith(".extract-")]

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    assert prepare.ensure_extracted(str(archive), str(dest), sha256=digest) == root
    monkeypatch.undo()
    with pytest.raises(DataError, match="sha256"):
        prepare.ensure_extracted(str(archive), str(tmp_path / "d2"), sha256="0" * 64)
    known = _archive(tmp_path / "cifar10-jpeg.tar.gz")  # Known name, wrong content.
    with pytest.raises(DataError, match="4f58dec8"):
        prepare.ensure_extracted(str(known), str(tmp_path / "d3"))
    with pytest.raises(DataError, match="does not exist"):
        prepare.ensure_extracted(str(tmp_path / "none.tar.gz"), str(dest))
    d = sources.load("image_folder", root=root, cache_dir=str(tmp_path / "c"))
    chex.assert_shape(d.train.images, (1, 4, 4, 3))
    assert prepare.main(["--cifar10_archive", str(known), "--dest", str(tmp_path / "d4")]) == 1
    assert "sha256" in capsys.readouterr().err
