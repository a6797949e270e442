"""Tests of the data recipes: the CIFAR-10 image folder built from the official pickled batches,
Tiny-ImageNet extracted from the official zip, digest checks, and the presets' data paths.

No network and no shared data: every archive is a tiny fake with the official layout, built in
tmp_path; the official digests are then either switched off or replaced by the fake's.
"""

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from l2r.data import prepare, sources
from l2r.data.sources import DataError

# Not in alphabetical order, so the test sees labels follow the class names, not the positions.
NAMES = ("truck", "airplane", "cat")


def _pickle_batch(batch: dict) -> bytes:
    # Protocol 2 with bytes keys, like the official batches (pickled by Python 2 and numpy 1,
    # whose arrays name numpy.core).
    raw = pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=2)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _fake_cifar10_python(path, batches=None, per_class=1, seed=0):
    """A cifar-10-python.tar.gz with NAMES and `per_class` images of each class in every batch;
    returns {batch name: (images [N, 32, 32, 3], labels [N])}. `batches` overrides members."""
    rng = np.random.default_rng(seed)
    members = {"batches.meta": _pickle_batch({"label_names": [n.encode() for n in NAMES]})}
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for _ in range(per_class) for c in range(len(NAMES))]
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        arrays[name] = (images, np.asarray(labels))
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)  # R, G, B planes per row.
        members[name] = _pickle_batch({"data": data, "labels": labels, "batch_label": b"x"})
    members.update(batches or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return arrays


def _jpeg(seed, size=8) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    return buf.getvalue()


def _fake_tiny_imagenet_zip(path, wnids=("n01", "n02"), skip=()):
    """A tiny-imagenet-200.zip with the official layout: 2 train images per class, one val image
    per class labelled in val_annotations.txt, an unlabelled test image; `skip` drops members."""
    top = "tiny-imagenet-200"
    files = {
        f"{top}/wnids.txt": "\n".join(wnids) + "\n",
        f"{top}/words.txt": "".join(f"{w}\tthing {w}\n" for w in wnids) + "n99\tunused\n",
        f"{top}/val/val_annotations.txt": "".join(
            f"val_{i}.JPEG\t{w}\t0\t0\t7\t7\n" for i, w in enumerate(reversed(wnids))
        ),
        f"{top}/test/images/test_0.JPEG": _jpeg(99),
    }
    for k, w in enumerate(wnids):
        files[f"{top}/train/{w}/{w}_boxes.txt"] = ""
        for j in range(2):
            files[f"{top}/train/{w}/images/{w}_{j}.JPEG"] = _jpeg(10 * k + j)
        files[f"{top}/val/images/val_{k}.JPEG"] = _jpeg(50 + k)
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            if name.rsplit("/", 1)[-1] not in skip:
                z.writestr(name, content)


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_cifar10_python_becomes_an_image_folder_pixel_for_pixel(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    arrays = _fake_cifar10_python(archive, per_class=2)
    dest = tmp_path / "dest"
    root = prepare.build_cifar10(str(archive), str(dest), verify=False)
    assert root == str(dest / "cifar10")
    assert sorted(os.listdir(dest / "cifar10")) == ["test", "train"]
    assert os.stat(root).st_mode & 0o777 == 0o755  # Not the private mode of a temp dir.
    assert not [p for p in os.listdir(dest) if p.startswith(".build-")]

    d = sources.load("image_folder", root=root, cache_dir=str(tmp_path / "cache"))
    assert d.name == "cifar10" and d.class_names == tuple(sorted(NAMES))
    assert d.train.images.shape == (5 * 6, 32, 32, 3) and d.test.images.shape == (6, 32, 32, 3)
    for split, batches in (
        (d.train, [f"data_batch_{i}" for i in range(1, 6)]),
        (d.test, ["test_batch"]),
    ):
        images = np.concatenate([arrays[b][0] for b in batches])
        labels = np.concatenate([arrays[b][1] for b in batches])
        for label, name in enumerate(d.class_names):
            # PNG is lossless, and each class keeps the order of the batches.
            expected = images[labels == NAMES.index(name)]
            np.testing.assert_array_equal(split.images[split.labels == label], expected)


def test_build_cifar10_is_idempotent_and_refuses_foreign_folders(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar10_python(archive)
    dest = tmp_path / "dest"
    root = prepare.build_cifar10(str(archive), str(dest), verify=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("read the archive again")

    monkeypatch.setattr(tarfile, "open", no_reading)
    assert prepare.build_cifar10(str(archive), str(dest), verify=False) == root
    monkeypatch.undo()
    other = tmp_path / "other" / "cifar-10-python.tar.gz"
    other.parent.mkdir()
    _fake_cifar10_python(other, seed=1)
    os.utime(other, ns=(1, 1))  # Another file: its stamp differs from the marker's.
    with pytest.raises(DataError, match="already exists and was not made from") as e:
        prepare.build_cifar10(str(other), str(dest), verify=False)
    assert "--dest" in str(e.value)


def test_official_digests_checked_with_what_to_do(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar10_python(archive)
    with pytest.raises(DataError) as e:
        prepare.build_cifar10(str(archive), str(tmp_path / "d1"))
    message = str(e.value)
    for part in (
        str(archive),
        "c58f30108f718f92721af3b95e74349a",  # expected
        _md5(archive),  # found
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "--no_verify",
    ):
        assert part in message
    assert not (tmp_path / "d1" / "cifar10").exists()
    # The CLI says the same in one line, and --no_verify builds it.
    assert prepare.main(["--cifar10_python", str(archive), "--dest", str(tmp_path / "d2")]) == 1
    assert "not the official cifar-10-python.tar.gz" in capsys.readouterr().err
    argv = ["--cifar10_python", str(archive), "--dest", str(tmp_path / "d2"), "--no_verify"]
    assert prepare.main(argv) == 0
    assert f"--config.data.root={tmp_path / 'd2' / 'cifar10'}" in capsys.readouterr().out
    # With the fake's digests as the official ones, verification passes.
    filename, url, _ = prepare.OFFICIAL_ARCHIVES["cifar10"]
    digests = prepare.digests_of(str(archive), ("md5", "sha256"))
    monkeypatch.setitem(prepare.OFFICIAL_ARCHIVES, "cifar10", (filename, url, digests))
    assert prepare.build_cifar10(str(archive), str(tmp_path / "d3")).endswith("cifar10")


def test_cifar10_python_that_is_not_the_official_layout(tmp_path):
    no_test = tmp_path / "a" / "cifar-10-python.tar.gz"
    no_test.parent.mkdir()
    _fake_cifar10_python(no_test)
    with tarfile.open(no_test) as tar:  # Drop test_batch.
        kept = [(m, tar.extractfile(m).read()) for m in tar if not m.name.endswith("test_batch")]
    with tarfile.open(no_test, "w:gz") as tar:
        for member, raw in kept:
            tar.addfile(member, io.BytesIO(raw))
    with pytest.raises(DataError, match="has no cifar-10-batches-py/test_batch"):
        prepare.build_cifar10(str(no_test), str(tmp_path / "d"), verify=False)
    # A pickle that would run code is refused, not run.
    evil = tmp_path / "b" / "cifar-10-python.tar.gz"
    evil.parent.mkdir()
    _fake_cifar10_python(evil, batches={"test_batch": pickle.dumps(os.system, protocol=2)})
    with pytest.raises(DataError, match="refusing to load"):
        prepare.build_cifar10(str(evil), str(tmp_path / "d"), verify=False)
    assert not (tmp_path / "d" / "cifar10").exists()
    # The official archive given where an image-folder copy is expected: the right command.
    with pytest.raises(DataError, match="--cifar10_python="):
        prepare.ensure_extracted(str(evil), str(tmp_path / "d"))


def test_tiny_imagenet_zip_extracts_to_what_the_source_reads(tmp_path, monkeypatch):
    archive = tmp_path / "tiny-imagenet-200.zip"
    _fake_tiny_imagenet_zip(archive)
    dest = tmp_path / "dest"
    root = prepare.extract_tiny_imagenet(str(archive), str(dest), verify=False)
    assert root == str(dest / "tiny-imagenet-200")
    assert not [p for p in os.listdir(dest) if p.startswith(".extract-")]
    d = sources.load("tiny_imagenet", root=root, cache_dir=str(tmp_path / "cache"))
    assert d.class_names == ("n01", "n02") and d.descriptions == ("thing n01", "thing n02")
    assert d.train.images.shape == (4, 8, 8, 3) and d.train.labels.tolist() == [0, 0, 1, 1]
    # val_0 is labelled n02, val_1 n01 (val_annotations.txt lists them in reverse).
    assert d.test.images.shape == (2, 8, 8, 3) and d.test.labels.tolist() == [1, 0]

    def no_reading(*args, **kwargs):
        raise AssertionError("read the archive again")

    monkeypatch.setattr(zipfile, "ZipFile", no_reading)
    assert prepare.extract_tiny_imagenet(str(archive), str(dest), verify=False) == root
    monkeypatch.undo()

    with pytest.raises(DataError) as e:
        prepare.extract_tiny_imagenet(str(archive), str(tmp_path / "d2"))
    for part in ("90528d7ca1a48142e341f4ef8d21d0de", _md5(archive), "cs231n", "--no_verify"):
        assert part in str(e.value)
    filename, url, _ = prepare.OFFICIAL_ARCHIVES["tiny_imagenet"]
    digest = {"md5": _md5(archive)}
    monkeypatch.setitem(prepare.OFFICIAL_ARCHIVES, "tiny_imagenet", (filename, url, digest))
    assert os.path.isdir(prepare.extract_tiny_imagenet(str(archive), str(tmp_path / "d2")))

    incomplete = tmp_path / "x" / "tiny-imagenet-200.zip"
    incomplete.parent.mkdir()
    _fake_tiny_imagenet_zip(incomplete, skip=("val_annotations.txt",))
    with pytest.raises(DataError, match="has no tiny-imagenet-200/val/val_annotations.txt"):
        prepare.extract_tiny_imagenet(str(incomplete), str(tmp_path / "d3"), verify=False)
    assert not (tmp_path / "d3" / "tiny-imagenet-200").exists()
    with pytest.raises(DataError, match="--tiny_imagenet_zip="):
        prepare.ensure_extracted(str(archive), str(tmp_path / "d4"))


def _image_folder_tar(path, top):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with tarfile.open(path, "w:gz") as tar:
        for name in (f"{top}/train/a/0.png", f"{top}/test/a/0.png"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_a_self_built_project_archive_is_not_called_damaged(tmp_path, caplog):
    own = tmp_path / "own" / "cifar10-jpeg.tar.gz"
    own.parent.mkdir()
    _image_folder_tar(own, "cifar10")  # The project archive's layout, other content.
    with caplog.at_level(logging.WARNING):
        root = prepare.ensure_extracted(str(own), str(tmp_path / "d1"))
    assert root == str(tmp_path / "d1" / "cifar10")
    assert "not the project's cifar10-jpeg.tar.gz" in caplog.text
    assert sources.load("image_folder", root=root, cache_dir=str(tmp_path / "c")).class_names == (
        "a",
    )
    odd = tmp_path / "odd" / "cifar10-jpeg.tar.gz"
    odd.parent.mkdir()
    _image_folder_tar(odd, "images")  # Not the layout the presets read.
    with pytest.raises(DataError) as e:
        prepare.ensure_extracted(str(odd), str(tmp_path / "d2"))
    message = str(e.value)
    assert "not the project's" in message and "damaged" not in message
    assert prepare.KNOWN_ARCHIVES["cifar10-jpeg.tar.gz"] in message
    assert "--cifar10_python=" in message and "has no cifar10/train/" in message
    # --no_verify extracts it as it is.
    assert prepare.ensure_extracted(str(odd), str(tmp_path / "d2"), verify=False).endswith("images")


def test_missing_image_folder_names_the_recipe(tmp_path):
    with pytest.raises(DataError, match="--cifar10_python=PATH/cifar-10-python.tar.gz"):
        sources.load("image_folder", root=str(tmp_path / "cifar10"))
    with pytest.raises(DataError, match="--tiny_imagenet_zip=PATH/tiny-imagenet-200.zip"):
        sources.load("tiny_imagenet", root=str(tmp_path / "tiny-imagenet-200"))


_PRESET_PATHS = """
import json
from l2r.configs import exp2, exp4, exp5, fig1
out = {}
for module in (fig1, exp2, exp4, exp5):
    c = module.get_config("cifar_offline")
    for group in [c.data] + ([c.pools.meta_train, c.pools.meta_test] if "pools" in c else []):
        if group.source:  # A pool of source "" reads config.data.
            out[f"{module.__name__}:{group.source}"] = [group.root, group.archive]
print(json.dumps(out))
"""


@pytest.mark.parametrize("data_env", ["", "archives"])
def test_offline_presets_point_only_where_the_user_says(tmp_path, data_env):
    env = {k: v for k, v in os.environ.items() if k != "L2R_DATA"}
    env["L2R_CACHE"] = str(tmp_path / "cache")
    if data_env:
        env["L2R_DATA"] = str(tmp_path / data_env)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _PRESET_PATHS], cwd=repo, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)
    assert paths and all(root.startswith(env["L2R_CACHE"]) for root, _ in paths.values())
    archives = {archive for _, archive in paths.values()}
    if data_env:
        assert archives == {
            str(tmp_path / data_env / "cifar10-jpeg.tar.gz"),
            str(tmp_path / data_env / "tiny-imagenet-200-first100.tar.gz"),
        }
    else:
        assert archives == {""}


def test_unpickles_a_batch_written_by_python2_and_numpy1():
    # The official batches were pickled by Python 2: str as SHORT_BINSTRING, and a numpy 1 array
    # (numpy.core.multiarray._reconstruct, a dtype, then the raw bytes). Written out by hand.
    def py2_str(b):
        return b"U" + bytes([len(b)]) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b")
        + b"\x87R(K\x01K\x02K\x03\x86cnumpy\ndtype\n" + py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03"
        + py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + py2_str(bytes(range(6))) + b"tb"
    )  # fmt: skip
    raw = b"\x80\x02}(" + py2_str(b"data") + array + py2_str(b"labels") + b"](K\x00K\x01eu."
    batch = prepare._unpickle(raw, "a Python 2 batch")
    np.testing.assert_array_equal(batch["data"], np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert batch["data"].dtype == np.uint8 and batch["labels"] == [0, 1]
