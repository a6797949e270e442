"""Builds data folders from the official archives, extracts offline copies, prepares TFDS.

    python -m l2r.data.prepare --cifar10_python=PATH/cifar-10-python.tar.gz \
        --tiny_imagenet_zip=PATH/tiny-imagenet-200.zip [--dest ~/.cache/l2r] [--no_verify]
    python -m l2r.data.prepare --cifar10_archive=PATH --tiny_imagenet_archive=PATH  # .tar.gz copies
    python -m l2r.data.prepare --tfds=cifar10 [--data_dir DIR]     # needs TensorFlow + network

The official archives become `dest/cifar10` (an image folder of lossless PNGs) and
`dest/tiny-imagenet-200`, the folders the `cifar_offline` presets read. Every step is idempotent
(a marker file records which archive, by size and mtime, made a folder) and atomic (built beside
the destination, then renamed), so configs can call `ensure_extracted` on every run.
"""

import argparse
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib

import numpy as np

from l2r.data.decode import DataError, default_cache_dir
from l2r.data.tfds_prep import prepare_tfds

# sha256 of the archives the project ships for offline machines, by file name.
KNOWN_ARCHIVES = {
    "cifar10-jpeg.tar.gz": "4f58dec86508499156642768d945cba57f2311cae67bbd0d55350a599f36d356",
    "tiny-imagenet-200-first100.tar.gz": (
        "ac97913503e491dce52b1311c7da504af1d0decf47cc3b604ed7e30562b5bea9"
    ),
}
# What each of them holds (its top-level folder and entries below it) and the flag that builds the
# same data from the official archive. A file with a known name but another digest (a copy someone
# built) is not the project's archive; it is extracted when it holds this layout.
KNOWN_LAYOUTS = {
    "cifar10-jpeg.tar.gz": ("cifar10", ("train/", "test/"), "--cifar10_python=PATH"),
    "tiny-imagenet-200-first100.tar.gz": (
        "tiny-imagenet-200",
        ("wnids.txt", "train/", "val/val_annotations.txt"),
        "--tiny_imagenet_zip=PATH",
    ),
}

# The official archives `--cifar10_python` and `--tiny_imagenet_zip` read: file name, where their
# authors publish them, and their digests. This machine cannot download, so none of these digests
# was checked here against a downloaded file. cifar-10-python.tar.gz: the md5 its authors publish
# on https://www.cs.toronto.edu/~kriz/cifar.html (torchvision pins the same), and the sha256 that
# Keras pins (`keras.datasets.cifar10.load_data`, `file_hash`). tiny-imagenet-200.zip: its authors
# publish no digest; the md5 is the one common loaders pin (Avalanche's `TinyImagenet`, others).
OFFICIAL_ARCHIVES = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        {
            "md5": "c58f30108f718f92721af3b95e74349a",
            "sha256": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        },
    ),
    "tiny_imagenet": (
        "tiny-imagenet-200.zip",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        {"md5": "90528d7ca1a48142e341f4ef8d21d0de"},
    ),
}
# The flag of `python -m l2r.data.prepare` that reads each official archive.
_OFFICIAL_FLAGS = {
    "cifar-10-python.tar.gz": "--cifar10_python",
    "tiny-imagenet-200.zip": "--tiny_imagenet_zip",
}
CIFAR10_ROOT = "cifar10"  # Folder the CIFAR-10 image folder is built in, inside dest.
TINY_IMAGENET_ROOT = "tiny-imagenet-200"  # The official zip's top-level folder.


def sha256_of(path: str) -> str:
    return digests_of(path, ("sha256",))["sha256"]


def digests_of(path: str, kinds) -> dict[str, str]:
    """{kind: hex digest} of the file at `path`, for hashlib names `kinds`, in one read."""
    hashes = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {kind: h.hexdigest() for kind, h in hashes.items()}


def check_official(path: str, which: str) -> None:
    """Raises DataError unless the file at `path` has the digests of official archive `which`
    (a key of OFFICIAL_ARCHIVES)."""
    filename, url, expected = OFFICIAL_ARCHIVES[which]
    found = digests_of(path, expected)
    if found != expected:
        kind = next(k for k in expected if found[k] != expected[k])
        raise DataError(
            f"{path} is not the official {filename}: its {kind} is {found[kind]}, expected "
            f"{expected[kind]}. Download it again from {url} (an interrupted download differs "
            "too); if you built or repacked it yourself, pass --no_verify."
        )


def _stamp(archive: str) -> dict:
    st = os.stat(archive)
    return {"archive": os.path.basename(archive), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker(dest: str, archive: str) -> str:
    return os.path.join(dest, f".{os.path.basename(archive)}.extracted.json")


def _done_root(dest: str, archive: str) -> str | None:
    """The root an earlier run made from this very archive (same name, size, mtime), if any."""
    marker = _marker(dest, archive)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        done = json.load(f)
    if all(done.get(k) == v for k, v in _stamp(archive).items()) and os.path.exists(done["root"]):
        return done["root"]
    return None


def _write_marker(dest: str, archive: str, root: str) -> None:
    fd, tmp_marker = tempfile.mkstemp(dir=dest, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({**_stamp(archive), "root": root}, f)
    os.replace(tmp_marker, _marker(dest, archive))


def _publish(built: str, root: str) -> None:
    """Renames the finished folder `built` to `root`; a concurrent run that got there first wins."""
    try:
        os.rename(built, root)
    except OSError:
        if not os.path.exists(root):
            raise


def _layout_problem(names, top: str, entries) -> str | None:
    """What archive member paths `names` lack of `top`/`entries` (an entry ending in / is a
    folder, which must hold something), or None when nothing is missing."""
    names = {n.removeprefix("./") for n in names}
    folders = {n[: i + 1] for n in names for i, ch in enumerate(n) if ch == "/"}
    missing = [
        f"{top}/{e}" for e in entries if f"{top}/{e}" not in (folders if e.endswith("/") else names)
    ]
    return f"it has no {', '.join(missing)}" if missing else None


def _top_level(tar: tarfile.TarFile) -> str | None:
    """The single top-level folder of the archive, or None if it has several entries."""
    tops = {m.name.removeprefix("./").split("/", 1)[0] for m in tar.getmembers()} - {"", "."}
    return tops.pop() if len(tops) == 1 else None


def ensure_extracted(
    archive: str, dest: str | None = None, *, sha256: str | None = None, verify: bool = True
) -> str:
    """Extracts `archive` (.tar.gz) into `dest` unless already done; returns the data root.

    Args:
      archive: path of the .tar.gz.
      dest: folder to extract into (default: the l2r cache dir, $L2R_CACHE or ~/.cache/l2r).
      sha256: expected digest; by default the known digest of the project's archives (by file
        name), none for other archives.
      verify: check the digest. A file named as one of the project's archives but with another
        digest is extracted anyway (with a warning) when it holds that archive's layout.

    Returns:
      The archive's single top-level folder inside dest (e.g. dest/cifar10), else dest.

    Raises:
      DataError: the archive is missing, its sha256 does not match `sha256`, or it has a
        project archive's name, another digest and not that archive's layout.
    """
    dest = os.path.abspath(os.path.expanduser(dest or default_cache_dir()))
    if not os.path.isfile(archive):
        raise DataError(f"Archive {archive} does not exist; pass the path of the .tar.gz.")
    base = os.path.basename(archive)
    if base in _OFFICIAL_FLAGS:
        raise DataError(
            f"{archive} is an official archive, not a copy of a data folder: make the folder "
            f"with `python -m l2r.data.prepare {_OFFICIAL_FLAGS[base]}={archive}`."
        )
    done = _done_root(dest, archive)
    if done:
        return done
    expected = sha256 or KNOWN_ARCHIVES.get(base)
    foreign = None  # The digest of a file named as a project archive, with other content.
    if verify and expected:
        actual = sha256_of(archive)
        if actual != expected and (sha256 or base not in KNOWN_LAYOUTS):
            raise DataError(
                f"sha256 of {archive} is {actual}, expected {expected}: the file is damaged or a "
                "different version. Copy the archive again (or, if the change is intended, pass "
                "--no_verify)."
            )
        foreign = actual if actual != expected else None
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
        top = _top_level(tar)
        if foreign:
            layout_top, entries, recipe = KNOWN_LAYOUTS[base]
            problem = _layout_problem((m.name for m in tar.getmembers()), layout_top, entries)
            what = (
                f"{archive} is not the project's {base} (sha256 {foreign}, the project's is "
                f"{expected})"
            )
            if problem:
                raise DataError(
                    f"{what}, and {problem}, so the data cannot be read from it. Build the data "
                    f"from the official archive with `python -m l2r.data.prepare {recipe}`, or "
                    f"give your archive the layout {layout_top}/{{{','.join(entries)}}}."
                )
            logging.warning("%s; it holds the expected layout, so it is extracted as it is.", what)
        root = os.path.join(dest, top) if top else dest
        if not (top and os.path.exists(root)):  # An existing folder: extracted earlier by hand.
            # Extract beside the destination, then rename, so an interrupted run leaves no
            # half-filled data root behind.
            tmp = tempfile.mkdtemp(dir=dest, prefix=".extract-")
            try:
                tar.extractall(tmp, filter="data")
                if top:
                    _publish(os.path.join(tmp, top), root)
                else:
                    for entry in os.listdir(tmp):
                        os.replace(os.path.join(tmp, entry), os.path.join(dest, entry))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _write_marker(dest, archive, root)
    return root


# ------------------------------------------------------------------------------------------------
# The official archives

_CIFAR10_FOLDER = "cifar-10-batches-py"  # The official tarball's top-level folder.
_CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_TINY_IMAGENET_LAYOUT = ("wnids.txt", "train/", "val/val_annotations.txt")
# The only globals the CIFAR-10 batches refer to: numpy arrays (and, in pickles written by Python 3
# at protocol 2, the bytes of their buffers).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers, strings and numpy arrays, and refuses anything else: a pickle can run
    any code, and with --no_verify the file is not known to be the official one."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.endswith(".multiarray"):  # numpy 2 renamed numpy.core to numpy._core.
            core = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
            module = f"{core}.multiarray"
        return super().find_class(module, name)


def _unpickle(raw: bytes, what: str) -> dict:
    try:
        # encoding="bytes": the batches were pickled by Python 2, their str keys become bytes.
        out = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # Unpickling damaged data can raise almost any type.
        raise DataError(f"Cannot unpickle {what}: {e}.") from e
    if not isinstance(out, dict):
        raise DataError(f"{what} holds a {type(out).__name__}, not the dict of a CIFAR batch.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in out.items()}


def read_cifar10_python(archive: str) -> tuple[tuple[str, ...], dict[str, tuple]]:
    """Reads the official cifar-10-python.tar.gz without extracting it.

    Returns:
      (class names, {"train" | "test": (images uint8 [N, 32, 32, 3], labels int64 [N])}); train
      is data_batch_1..5 in order, test is test_batch.

    Raises:
      DataError: the file cannot be read or does not hold the official batches.
    """
    fix = f"not the official {OFFICIAL_ARCHIVES['cifar10'][0]}; download it from its authors"
    wanted = ["batches.meta", *_CIFAR10_BATCHES["train"], *_CIFAR10_BATCHES["test"]]
    batches = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:  # One pass: a .tar.gz is read front to back.
                folder, _, name = member.name.removeprefix("./").rpartition("/")
                if folder == _CIFAR10_FOLDER and name in wanted and member.isfile():
                    batches[name] = _unpickle(tar.extractfile(member).read(), f"{archive}:{name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"Cannot read {archive} ({e}): {fix}.") from e
    missing = [f"{_CIFAR10_FOLDER}/{n}" for n in wanted if n not in batches]
    if missing:
        raise DataError(f"{archive} has no {', '.join(missing)}: {fix}.")
    names = tuple(
        n.decode() if isinstance(n, bytes) else str(n)
        for n in batches["batches.meta"].get("label_names", ())
    )
    if len(set(names)) != len(names) or not all(n and n[0] != "." and "/" not in n for n in names):
        raise DataError(f"{archive}: batches.meta has no usable label_names ({names}): {fix}.")
    splits = {}
    for split, members in _CIFAR10_BATCHES.items():
        images, labels = [], []
        for name in members:
            batch = batches[name]
            data = np.asarray(batch.get("data"))
            y = np.asarray(batch.get("labels"))
            ok = data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32
            ok = ok and y.shape == data.shape[:1] and np.isin(y, np.arange(len(names))).all()
            if not ok:
                raise DataError(
                    f"{archive}:{name} is not a batch of 32x32 RGB images with labels in "
                    f"0..{len(names) - 1} (data {data.dtype} {data.shape}, {y.size} labels): {fix}."
                )
            # Each row holds the red, green, then blue 32x32 plane, row by row.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(y.astype(np.int64))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return names, splits


def _check_fresh(root: str, archive: str, flag: str) -> None:
    if os.path.exists(root):
        raise DataError(
            f"{root} already exists and was not made from {archive} by this command. Delete it to "
            f"make it again, or make it elsewhere with {flag}=... --dest=DIR (then point "
            f"--config.data.root at DIR/{os.path.basename(root)})."
        )


def _official_target(archive: str, dest: str | None, which: str, folder: str, verify: bool):
    """(dest, root, done) of building `folder` from official archive `which`: done when this
    archive built it before (root is then that folder). Otherwise checks that the archive is
    there, that root is not some other folder's, and (`verify`) the archive's digests."""
    dest = os.path.abspath(os.path.expanduser(dest or default_cache_dir()))
    filename, url, _ = OFFICIAL_ARCHIVES[which]
    if not os.path.isfile(archive):
        raise DataError(f"{archive} does not exist; download {filename} from {url}.")
    done = _done_root(dest, archive)
    if done:
        return dest, done, True
    root = os.path.join(dest, folder)
    _check_fresh(root, archive, _OFFICIAL_FLAGS[filename])
    if verify:
        check_official(archive, which)
    return dest, root, False


def build_cifar10(archive: str, dest: str | None = None, *, verify: bool = True) -> str:
    """Builds the CIFAR-10 image folder from the official cifar-10-python.tar.gz, unless done.

    Writes dest/cifar10/{train,test}/<class name>/<index>.png, lossless (the pixels of the
    batches), where index (5 digits) is the image's position in its split, so the image-folder
    source reads every class in the batches' order.

    Args:
      archive: path of cifar-10-python.tar.gz.
      dest: folder to build in (default: the l2r cache dir, $L2R_CACHE or ~/.cache/l2r).
      verify: check the archive's digests against the official ones first.

    Returns:
      The image folder's root, dest/cifar10.

    Raises:
      DataError: the archive is missing, not the official one, or dest/cifar10 exists and was
        not built from it.
    """
    from PIL import Image

    dest, root, done = _official_target(archive, dest, "cifar10", CIFAR10_ROOT, verify)
    if done:
        return root
    names, splits = read_cifar10_python(archive)
    os.makedirs(dest, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest, prefix=".build-")
    try:
        for split, (images, labels) in splits.items():
            for name in names:
                os.makedirs(os.path.join(tmp, split, name))
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                path = os.path.join(tmp, split, names[label], f"{index:05d}.png")
                Image.fromarray(image).save(path, format="PNG")
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the data folder is not.
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_marker(dest, archive, root)
    return root


def extract_tiny_imagenet(archive: str, dest: str | None = None, *, verify: bool = True) -> str:
    """Extracts the official tiny-imagenet-200.zip into dest/tiny-imagenet-200, unless done: the
    folder the tiny_imagenet source reads (wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG labelled by val/val_annotations.txt).

    Args:
      archive: path of tiny-imagenet-200.zip.
      dest: folder to extract into (default: the l2r cache dir, $L2R_CACHE or ~/.cache/l2r).
      verify: check the archive's digest against the official one first.

    Returns:
      dest/tiny-imagenet-200.

    Raises:
      DataError: the archive is missing, not the official one, or dest/tiny-imagenet-200 exists
        and was not extracted from it.
    """
    dest, root, done = _official_target(archive, dest, "tiny_imagenet", TINY_IMAGENET_ROOT, verify)
    if done:
        return root
    filename, url, _ = OFFICIAL_ARCHIVES["tiny_imagenet"]
    os.makedirs(dest, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as z:
            problem = _layout_problem(z.namelist(), TINY_IMAGENET_ROOT, _TINY_IMAGENET_LAYOUT)
            if problem:
                raise DataError(f"{archive} is not the official {filename}: {problem}.")
            tmp = tempfile.mkdtemp(dir=dest, prefix=".extract-")
            try:
                z.extractall(tmp)  # zipfile drops absolute paths and "..": nothing lands outside.
                _publish(os.path.join(tmp, TINY_IMAGENET_ROOT), root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"Cannot read {archive} ({e}); download {filename} again: {url}.") from e
    _write_marker(dest, archive, root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2r.data.prepare", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--cifar10_python", help="official cifar-10-python.tar.gz -> DEST/cifar10 (PNG folder)")
    add("--tiny_imagenet_zip", help="official tiny-imagenet-200.zip -> DEST/tiny-imagenet-200")
    add("--cifar10_archive", help="an image-folder copy, cifar10-jpeg.tar.gz")
    add("--tiny_imagenet_archive", help="a copy of the extracted folder, tiny-imagenet-200*.tar.gz")
    add("--dest", default=None, help="write here (default: $L2R_CACHE or ~/.cache/l2r)")
    add("--no_verify", action="store_true", help="skip the archives' digest checks")
    add("--tfds", action="append", default=[], help="TFDS name to prepare")
    add("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    args = parser.parse_args(argv)
    jobs = (
        ("cifar10", args.cifar10_python, build_cifar10, "image_folder"),
        ("tiny_imagenet", args.tiny_imagenet_zip, extract_tiny_imagenet, "tiny_imagenet"),
        ("cifar10", args.cifar10_archive, ensure_extracted, "image_folder"),
        ("tiny_imagenet", args.tiny_imagenet_archive, ensure_extracted, "tiny_imagenet"),
    )
    if not (any(job[1] for job in jobs) or args.tfds):
        parser.error(
            "nothing to do: pass --cifar10_python, --tiny_imagenet_zip, --cifar10_archive, "
            "--tiny_imagenet_archive or --tfds."
        )
    try:
        for what, archive, make, source in jobs:
            if archive:
                root = make(archive, args.dest, verify=not args.no_verify)
                print(f"{what}: {root}  (--config.data.source={source} --config.data.root={root})")
        for name in args.tfds:
            print(f"tfds {name}: {prepare_tfds(name, args.data_dir)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
