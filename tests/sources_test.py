"""Tests of l2r.data.sources: every loader on tiny self-made files, argument checks, registry.

No network and no shared data: every test builds what it reads in tmp_path.
"""

import gzip
import os
import struct
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from PIL import Image

from l2r.data import sources, tfds_prep
from l2r.data.sources import DataError


def assert_same(a, b):
    """Datasets/Tasks (not pytrees) with equal names and arrays."""
    assert (a.name, a.class_names) == (b.name, b.class_names)
    chex.assert_trees_all_equal((a.train, a.test), (b.train, b.test))


def save_image(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _pixel(split_i, class_i, i):
    return 10 + 40 * class_i + 7 * i + split_i


def image_folder(root, classes=("cat", "ant"), per_split=(3, 2), size=8, test_name="test"):
    """root/{train,test}/<class>/ with PNG, JPG and upper-case JPEG files of constant colour."""
    exts = (".png", ".jpg", ".JPEG")
    for split_i, (split, n) in enumerate(zip(("train", test_name), per_split, strict=True)):
        for class_i, c in enumerate(sorted(classes)):
            for i in range(n):
                value = _pixel(split_i, class_i, i)
                ext = exts[i % 3]
                fmt = "PNG" if ext == ".png" else "JPEG"
                save_image(
                    root / split / c / f"{i}{ext}", np.full((size, size, 3), value, np.uint8), fmt
                )
    (root / "train" / sorted(classes)[0] / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_loads_shapes_labels_and_names(tmp_path):
    root = image_folder(tmp_path / "imgs")
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
    root = image_folder(tmp_path / "imgs", test_name="val")
    d = sources.load("image_folder", root=str(root), image_size=4, cache_dir=str(tmp_path / "c"))
    chex.assert_shape(d.train.images, (6, 4, 4, 3))
    chex.assert_shape(d.test.images, (4, 4, 4, 3))


def test_image_folder_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="/nonexistent/l2r"):
        sources.load("image_folder", root="/nonexistent/l2r")
    with pytest.raises(DataError, match="root=PATH"):
        sources.load("image_folder")
    root = image_folder(tmp_path / "imgs")
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
            save_image(
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
        save_image(root / "val" / "images" / f, np.full((8, 8, 3), 30 * i, np.uint8))
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
    assert_same(d, sources.load("digits"))
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
    assert_same(d, sources.load("synthetic", train_per_class=200))
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

    monkeypatch.setattr(tfds_prep, "tensorflow_available", lambda: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_preparing)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r'pip install "l2r\[tfds\]"') as info:
        sources.load("tfds", name="cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert str(tmp_path) in str(info.value)


def test_tfds_offline_fails_fast_with_the_fixes(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    probed = []
    monkeypatch.setattr(tfds_prep, "tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds_prep, "_host_reachable", lambda host, **kw: probed.append(host))
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


def test_tfds_missing_fails_before_importing_tfds(tmp_path):
    """The offline error comes as fast as any config error: TFDS (seconds to import) is not
    loaded to find that a dataset is neither prepared nor downloadable."""
    code = (
        "import sys\n"
        "from l2r.data import sources\n"
        "from l2r.data.decode import DataError\n"
        "try:\n"
        f"    sources.load('tfds', name='cifar10', data_dir={str(tmp_path)!r}, download=False)\n"
        "except DataError as e:\n"
        "    print('DataError', e)\n"
        "print('tfds imported:', 'tensorflow_datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "DataError TFDS dataset 'cifar10' is not prepared" in out.stdout, out.stdout
    assert "tfds imported: False" in out.stdout
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    assert tfds_prep.tfds_maybe_prepared("cifar10/plain:3.0.2", str(tmp_path))
    assert not tfds_prep.tfds_maybe_prepared("cifar100", str(tmp_path))


def test_tfds_pipeline_on_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    # mock_data fakes tfds.data_source but not builder.is_prepared(), hence the patch.
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda builder: True)
    monkeypatch.setattr(tfds_prep, "tfds_maybe_prepared", lambda name, data_dir: True)
    with tfds.testing.mock_data(num_examples=7):
        d = sources.load("tfds", name="cifar10", data_dir=str(tmp_path))
        small = sources.load("tfds", name="cifar10", data_dir=str(tmp_path), image_size=16)
    chex.assert_shape(d.train.images, (7, 32, 32, 3))
    chex.assert_shape(d.test.images, (7, 32, 32, 3))
    chex.assert_shape(small.train.images, (7, 16, 16, 3))
    assert d.train.images.dtype == np.uint8 and d.train.labels.dtype == np.int32
    assert len(d.class_names) == 10 and d.train.labels.max() < 10 and d.name == "cifar10"


# ------------------------------------------------------------------------------------------------
# registry


@sources.register("test_squares")
def load_squares(image_size, side: int = 2, name: str = "squares") -> sources.Dataset:
    """A user's source, as in their own file: `side` classes of three constant images each."""
    labels = np.repeat(np.arange(side, dtype=np.int32), 3)
    size = image_size or 4
    images = np.broadcast_to(
        labels.astype(np.uint8)[:, None, None, None], (3 * side, size, size, 1)
    )
    split = sources.Split(images, labels)
    return sources.Dataset(name, split, split, tuple(str(c) for c in range(side)))


def test_a_registered_source_loads_like_a_built_in():
    assert "test_squares" in sources.SOURCES and "synthetic" in sources.SOURCES
    d = sources.load("test_squares", image_size=5, side=3, name="mine")
    assert d.name == "mine" and d.class_names == ("0", "1", "2")  # `name` reaches the loader.
    chex.assert_shape(d.train.images, (9, 5, 5, 1))
    with pytest.raises(DataError, match="does not take colour; it accepts side"):
        sources.load("test_squares", colour=1)
    with pytest.raises(DataError, match="does not use root"):
        sources.load("test_squares", root="/tmp")
    with pytest.raises(DataError, match="test_squares"):
        sources.load("no_such_source")
    # A built-in that does not take `name` is renamed by `load`.
    assert sources.load("digits", name="my_digits").name == "my_digits"


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered to .*_load_synthetic"):
        sources.register("synthetic")(load_squares)
    assert sources.register("test_squares")(load_squares) is load_squares  # Same one: a re-run.
