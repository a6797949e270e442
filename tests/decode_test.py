"""Tests of l2r.data.decode: the .npz cache, worker processes, unreadable and mismatched images.

No network and no shared data: every test builds what it reads in tmp_path.
"""

import os

import chex
import numpy as np
import pytest
from sources_test import assert_same, image_folder, save_image

from l2r.data import decode, sources
from l2r.data.sources import DataError


def test_image_folder_second_load_hits_the_cache(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = sources.load("image_folder", root=str(root), cache_dir=str(cache))
    assert len(list((cache / "arrays").glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(decode, "_decode_all", no_decoding)
    second = sources.load("image_folder", root=str(root), cache_dir=str(cache))
    assert_same(first, second)
    # A changed file changes the key: it is decoded again.
    save_image(root / "test" / "ant" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(AssertionError, match="decoded again"):
        sources.load("image_folder", root=str(root), cache_dir=str(cache))


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "imgs")
    monkeypatch.setenv("L2R_CACHE", str(tmp_path / "envcache"))
    sources.load("image_folder", root=str(root))
    assert list((tmp_path / "envcache" / "arrays").glob("*.npz"))


def test_worker_processes_decode_like_one(tmp_path, monkeypatch, caplog):
    root = image_folder(tmp_path / "imgs", per_split=(5, 3))
    serial = sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(decode, "_MIN_PARALLEL_FILES", 1)
    parallel = sources.load(
        "image_folder", root=str(root), cache_dir=str(tmp_path / "b"), num_workers=2
    )
    assert_same(serial, parallel)
    assert "workers failed" not in caplog.text  # The workers ran, no fallback.
    (root / "test" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "b"), num_workers=2)


def test_corrupt_image_is_named(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "c"))


def test_mismatched_sizes_ask_for_image_size(tmp_path):
    root = image_folder(tmp_path / "imgs")
    save_image(root / "test" / "cat" / "big.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DataError, match="image_size"):
        sources.load("image_folder", root=str(root), cache_dir=str(tmp_path / "c"))
    d = sources.load("image_folder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    chex.assert_shape(d.test.images, (5, 8, 8, 3))


def test_load_files_lists_decodes_and_resizes(tmp_path):
    root = image_folder(tmp_path / "imgs", per_split=(2, 1))
    paths = decode.list_images(str(root / "train" / "ant"))  # notes.txt is not an image.
    assert [os.path.basename(p) for p in paths] == ["0.png", "1.jpg"]
    files = {"train": (paths, np.array([1, 0]))}
    arrays = decode.load_files("test", str(root), files, 4, cache_dir=str(tmp_path / "c"))
    images, labels = arrays["train"]
    chex.assert_shape(images, (2, 4, 4, 3))
    np.testing.assert_array_equal(labels, [1, 0])
    assert labels.dtype == np.int32
    assert decode.resize(images, 4) is images  # Already that size: as is.
    chex.assert_shape(decode.resize(images, 2), (2, 2, 2, 3))
