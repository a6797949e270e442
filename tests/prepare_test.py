"""Tests of l2r.data.prepare: archive extraction, the TFDS preparing CLI, reachability probes.

No network and no shared data: every test builds what it reads in tmp_path.
"""

import io
import os
import socket
import tarfile
import time

import chex
import numpy as np
import pytest
from PIL import Image

from l2r.data import prepare, sources, tfds_prep
from l2r.data.sources import DataError


def test_prepare_cli_tfds_without_tensorflow(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tfds_prep, "tensorflow_available", lambda: False)
    assert prepare.main(["--tfds=cifar10", f"--data_dir={tmp_path}"]) == 1
    assert "l2r[tfds]" in capsys.readouterr().err
    # A name TFDS does not know is found once it could be prepared (TFDS itself knows names).
    monkeypatch.setattr(tfds_prep, "tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds_prep, "_host_reachable", lambda host: True)
    with pytest.raises(DataError, match="check the name"):
        sources.load("tfds", name="no_such_dataset_l2r", data_dir=str(tmp_path))


def test_reachability_gives_up_quickly(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not tfds_prep._host_reachable("example.org")

    def hang(*args, **kwargs):
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert not tfds_prep._host_reachable("example.org", timeout=0.2)
    assert time.perf_counter() - start < 1


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
