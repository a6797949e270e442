"""Whole dataset splits as uint8 numpy arrays, from TFDS, image folders, IDX files or generators.

Every loader returns a `Dataset` of two `Split`s holding all images (uint8 [N, H, W, C]) and labels
(int32 [N]) on the host. Training code copies whole tasks to the device once and gathers batches by
index, so nothing here streams or batches.

Decoded image folders (image_folder, tiny_imagenet) are cached as .npz files under the cache dir
(`cache_dir=` kwarg, else $L2R_CACHE, else ~/.cache/l2r), keyed by the file list, sizes, mtimes
and the requested image size, so only the first load pays for decoding.
"""

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SOURCES = ("tfds", "image_folder", "tiny_imagenet", "fashion_mnist", "digits", "synthetic")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Where TFDS fetches each dataset from; probed before preparing so that offline users get an
# answer in seconds (TFDS itself retries for minutes). Unknown names probe the TFDS GCS mirror.
_TFDS_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}
_TFDS_DEFAULT_HOST = "storage.googleapis.com"
_REACH_TIMEOUT_S = 3.0
# Fewer files than this decode in-process: starting a worker process costs ~0.3 s.
_MIN_PARALLEL_FILES = 4096
# Bump when the decoding changes, so stale caches are not reused.
_CACHE_VERSION = 1


class Split(NamedTuple):
    """One split of a dataset: every image and label, on the host."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled dataset with a train and a test split.

    Attributes:
      name: what the data is, e.g. "cifar10".
      train: training split.
      test: test split (Tiny-ImageNet: the official val split).
      class_names: name of each label, indexed by label.
      descriptions: optional human-readable name per class (Tiny-ImageNet: from words.txt).
    """

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    descriptions: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DataError(ValueError):
    """Missing, unreadable or invalid data; the message says what to do about it."""


def load(
    source: str,
    *,
    name: str | None = None,
    root: str | None = None,
    image_size: int | None = None,
    data_dir: str | None = None,
    download: bool = True,
    **kwargs,
) -> Dataset:
    """Loads a whole dataset into host memory.

    Args:
      source: one of `SOURCES`: "tfds", "image_folder", "tiny_imagenet", "fashion_mnist",
        "digits" or "synthetic".
      name: TFDS dataset name (source="tfds"); for other sources, overrides `Dataset.name`.
      root: folder to read (image_folder, tiny_imagenet; fashion_mnist overrides the default
        /usr/share/datasets/fashion-mnist).
      image_size: if set, images are resized to image_size x image_size (antialiased).
        Synthetic data is generated at this size (default 16).
      data_dir: TFDS data dir (source="tfds"; None = the TFDS default).
      download: source="tfds" only: download and prepare when not prepared and TensorFlow is
        installed and the download host is reachable.
      **kwargs: per source: image_folder / tiny_imagenet: `cache_dir`, `num_workers`;
        tfds: `train_split`, `test_split`, `image_key`, `label_key`; digits: `test_fraction`,
        `seed`; synthetic: `num_classes`, `channels`, `train_per_class`, `test_per_class`,
        `seed`, `class_names`.

    Returns:
      The `Dataset`, images uint8 [N, H, W, C], labels int32 [N].

    Raises:
      DataError: unknown source or kwargs, missing or unreadable data; the message says the fix.
    """
    if source not in _LOADERS:
        raise DataError(f"Unknown data source {source!r}; choose one of {', '.join(SOURCES)}.")
    if image_size is not None and (not isinstance(image_size, int | np.integer) or image_size < 1):
        raise DataError(f"image_size={image_size!r} must be a positive integer (or None to keep).")
    loader, accepted = _LOADERS[source]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(
            f"Source {source!r} does not take {', '.join(unknown)}; it accepts "
            f"{', '.join(accepted) or 'no extra arguments'}."
        )
    if source != "tfds" and data_dir is not None:
        raise DataError(f"data_dir is only used by source='tfds'; drop it for source={source!r}.")
    if source in ("digits", "synthetic") and root is not None:
        raise DataError(f"Source {source!r} reads no files; drop root={root!r}.")
    if source == "tfds":
        return _load_tfds(name, data_dir, download, image_size, **kwargs)
    dataset = loader(root=root, image_size=image_size, **kwargs)
    return dataclasses.replace(dataset, name=name) if name else dataset


# ------------------------------------------------------------------------------------------------
# TFDS


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _host_reachable(host: str, port: int = 443, timeout: float = _REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    # create_connection's timeout does not bound the DNS lookup, which can hang for long on a
    # machine without network, so the whole attempt runs in a thread we stop waiting for.
    result = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except Exception:  # Any failure to connect means: not reachable.
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _tfds_is_prepared(builder) -> bool:
    return builder.is_prepared()


def prepare_tfds(name: str, data_dir: str | None = None) -> str:
    """Downloads and prepares TFDS dataset `name` as ArrayRecord (readable without TensorFlow).

    Returns:
      The dataset's prepared directory.

    Raises:
      DataError: TensorFlow is missing, or the download host cannot be reached.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if _tfds_is_prepared(builder):
        return builder.data_dir
    if not _tensorflow_available():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}, and preparing it needs "
            'TensorFlow: pip install "l2r[tfds]" (or prepare it on another machine with `python -m '
            f"l2r.data.prepare --tfds={name}` and copy the data_dir here). Without it, use the "
            "offline presets (fashion_mnist, digits), or an extracted image-folder copy with "
            "--config.data.source=image_folder --config.data.root=PATH."
        )
    host = _TFDS_HOSTS.get(name, _TFDS_DEFAULT_HOST)
    if not _host_reachable(host):
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}, and its download host "
            f"{host} cannot be reached (no network). Fixes: run `python -m l2r.data.prepare "
            f"--tfds={name} --data_dir=DIR` on a machine with network and copy DIR to this "
            "machine's data_dir (--config.data.data_dir); or, with an extracted image-folder copy "
            "(root/{train,test}/<class>/*.jpg), use --config.data.source=image_folder "
            "--config.data.root=PATH."
        )
    # ArrayRecord is what tfds.data_source reads, and it needs no TensorFlow to read.
    builder.download_and_prepare(file_format="array_record")
    return builder.data_dir


def _load_tfds(
    name: str | None,
    data_dir: str | None,
    download: bool,
    image_size: int | None,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
) -> Dataset:
    if not name:
        raise DataError("source='tfds' needs name=..., e.g. name='cifar10' (--config.data.name).")
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"TFDS does not know dataset {name!r} ({first_line}); check the name."
        ) from e
    if not _tfds_is_prepared(builder):
        if not download:
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and download=False."
                f" Prepare it with `python -m l2r.data.prepare --tfds={name}` or allow download."
            )
        prepare_tfds(name, data_dir)
        # Preparing can fill in the builder's info (CIFAR's label names come from the download).
        builder = tfds.builder(name, data_dir=data_dir)
    splits = []
    for split in (train_split, test_split):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            records = [source[i] for i in range(len(source))]
        except NotImplementedError as e:
            # Prepared as TFRecord (e.g. by tfds.load): only TensorFlow reads that.
            if not _tensorflow_available():
                raise DataError(
                    f"TFDS dataset {name!r} in {builder.data_dir} was prepared as TFRecord, which "
                    "tfds.data_source cannot read without TensorFlow. Re-prepare it with `python "
                    f"-m l2r.data.prepare --tfds={name}` into an empty data_dir (ArrayRecord), or "
                    'pip install "l2r[tfds]".'
                ) from e
            records = tfds.as_numpy(builder.as_dataset(split=split))
        images, labels = zip(*((r[image_key], r[label_key]) for r in records), strict=True)
        images = np.stack(images).astype(np.uint8)
        labels = np.asarray(labels, np.int32)
        if images.ndim == 3:
            images = images[..., None]
        splits.append(Split(_resize_all(images, image_size), labels))
    names = tuple(builder.info.features[label_key].names)
    return Dataset(name, splits[0], splits[1], names)


# ------------------------------------------------------------------------------------------------
# Image files: image_folder and tiny_imagenet share listing, decoding and caching.


def default_cache_dir() -> str:
    """$L2R_CACHE, else ~/.cache/l2r."""
    return os.environ.get("L2R_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "l2r")


def _is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if _is_image(f) and not f.startswith(".")
    )


def _decode(path: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                # Pillow's bilinear filter widens its support when shrinking, i.e. antialiases.
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(im, np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"Cannot read image {path}: {e}. Delete or replace the file.") from e


def _size_error(path_a: str, shape_a, path_b: str, shape_b) -> DataError:
    return DataError(
        f"Images differ in size: {path_a} is {shape_a[1]}x{shape_a[0]} but {path_b} is "
        f"{shape_b[1]}x{shape_b[0]}. Set image_size (--config.data.image_size) to resize them all."
    )


def _decode_chunk(paths: Sequence[str], image_size: int | None) -> np.ndarray:
    """Decodes `paths` (all of one size) into uint8 [len(paths), H, W, 3]."""
    first = _decode(paths[0], image_size)
    out = np.empty((len(paths), *first.shape), np.uint8)
    out[0] = first
    for i in range(1, len(paths)):
        image = _decode(paths[i], image_size)
        if image.shape != first.shape:
            raise _size_error(paths[0], first.shape, paths[i], image.shape)
        out[i] = image
    return out


def _decode_all(paths: Sequence[str], image_size: int | None, num_workers: int) -> np.ndarray:
    """Decodes `paths` into one uint8 [N, H, W, 3] array, in worker processes when many."""
    if num_workers > 1 and len(paths) >= _MIN_PARALLEL_FILES:
        images = _decode_in_workers(paths, image_size, num_workers)
        if images is not None:
            return images
    chunk = 1024
    chunks = [paths[s : s + chunk] for s in range(0, len(paths), chunk)]
    return _gather((_decode_chunk(c, image_size) for c in chunks), chunks, len(paths))


# A worker decodes the files a JSON job lists into an .npy file, or writes the DataError message.
_WORKER_CODE = "import sys; from l2r.data import sources; sources._decode_worker(sys.argv[1])"


def _decode_worker(job_path: str) -> None:
    """Entry point of a decoding subprocess (see `_decode_in_workers`)."""
    with open(job_path) as f:
        job = json.load(f)
    try:
        np.save(job["out"], _decode_chunk(job["paths"], job["image_size"]))
    except DataError as e:
        with open(job["out"] + ".err", "w") as f:
            f.write(str(e))
        sys.exit(1)


def _decode_in_workers(
    paths: Sequence[str], image_size: int | None, num_workers: int
) -> np.ndarray | None:
    """Decodes contiguous shards of `paths` in fresh Python subprocesses; None if they fail.

    Processes, not threads: for small images PIL spends most of its time parsing headers in
    Python, under the GIL (threads measured no faster than one). Plain subprocesses rather than
    multiprocessing: forking a process running JAX's threads can deadlock, and "spawn" re-runs
    the caller's main script, which breaks scripts without an `if __name__ == "__main__"` guard.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    bounds = np.linspace(0, len(paths), num_workers + 1).astype(int)
    shards = [list(paths[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    with tempfile.TemporaryDirectory(prefix="l2r-decode-") as tmp:
        procs = []
        for k, shard in enumerate(shards):
            job = os.path.join(tmp, f"{k}.json")
            with open(job, "w") as f:
                json.dump({"paths": shard, "image_size": image_size, "out": f"{job}.npy"}, f)
            cmd = [sys.executable, "-c", _WORKER_CODE, job]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        stderr = [p.communicate()[1].decode(errors="replace") for p in procs]
        for k, p in enumerate(procs):
            error = os.path.join(tmp, f"{k}.json.npy.err")
            if os.path.exists(error):
                with open(error) as f:
                    raise DataError(f.read())
            if p.returncode != 0:
                logging.warning(
                    "Image-decoding workers failed (%s); decoding in this process.",
                    stderr[k].strip().splitlines()[-1:] or p.returncode,
                )
                return None
        parts = (
            np.load(os.path.join(tmp, f"{k}.json.npy"), mmap_mode="r") for k in range(len(shards))
        )
        return _gather(parts, shards, len(paths))


def _gather(parts, chunks, n: int) -> np.ndarray:
    """Copies decoded chunks, as they arrive, into one array (no second full-size copy)."""
    out = None
    for part, paths in zip(parts, chunks, strict=True):
        if out is None:
            out, start = np.empty((n, *part.shape[1:]), np.uint8), 0
        elif part.shape[1:] != out.shape[1:]:
            raise _size_error(chunks[0][0], out.shape[1:], paths[0], part.shape[1:])
        out[start : start + len(part)] = part
        start += len(part)
    return out


def _file_fingerprint(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(
                f"Cannot read image {p}: {e}. Restore the file or fix the listing."
            ) from e
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_files(
    kind: str,
    root: str,
    files: dict[str, tuple[list[str], np.ndarray]],
    image_size: int | None,
    cache_dir: str | None,
    num_workers: int | None,
) -> dict[str, Split]:
    """Decodes {split: (paths, labels)} into Splits, through the .npz cache."""
    cache_dir = cache_dir or default_cache_dir()
    key = hashlib.sha256()
    key.update(f"{_CACHE_VERSION}\0{kind}\0{os.path.abspath(root)}\0{image_size}\n".encode())
    for split, (paths, labels) in files.items():
        key.update(f"{split}\0{_file_fingerprint(paths)}\0".encode())
        key.update(np.asarray(labels, np.int32).tobytes())
    base = os.path.basename(os.path.normpath(root)) or kind
    path = os.path.join(cache_dir, "arrays", f"{kind}-{base}-{key.hexdigest()[:20]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                return {s: Split(z[f"{s}_images"], z[f"{s}_labels"]) for s in files}
        except (OSError, ValueError, KeyError):
            pass  # A damaged cache file is rebuilt below.
    workers = num_workers or min(8, len(os.sched_getaffinity(0)))
    # All splits in one pass: one pool start-up, and train and test must share a size anyway.
    images = _decode_all([p for paths, _ in files.values() for p in paths], image_size, workers)
    splits, start = {}, 0
    for s, (paths, labels) in files.items():
        splits[s] = Split(images[start : start + len(paths)], np.asarray(labels, np.int32))
        start += len(paths)
    _write_cache(path, splits)
    return splits


def _write_cache(path: str, splits: dict[str, Split]) -> None:
    """Writes the arrays atomically (tmp file + rename); a failed write only costs speed."""
    arrays = {}
    for s, split in splits.items():
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = split.images, split.labels
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # Uncompressed: reloading is then disk-speed.
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _require_dir(path: str | None, what: str, fix: str) -> str:
    if not path:
        raise DataError(f"{what} needs root=PATH ({fix}).")
    if not os.path.isdir(path):
        raise DataError(f"{what}: folder {path} does not exist ({fix}).")
    return path


def _load_image_folder(
    root: str | None,
    image_size: int | None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> Dataset:
    fix = "expected root/{train,test}/<class>/*.png|jpg; set --config.data.root"
    root = _require_dir(root, "source='image_folder'", fix)
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"No train/ folder in {root} ({fix}).")
    test_dir = next(
        (os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))),
        None,
    )
    if test_dir is None:
        raise DataError(f"No test/ (or val/) folder in {root} ({fix}).")
    class_names = tuple(
        sorted(c for c in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, c)))
    )
    if not class_names:
        raise DataError(f"No class folders in {train_dir} ({fix}).")
    test_classes = {c for c in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, c))}
    if test_classes != set(class_names):
        missing, extra = set(class_names) - test_classes, test_classes - set(class_names)
        raise DataError(
            f"{test_dir} must hold the same class folders as {train_dir}; missing: "
            f"{sorted(missing) or 'none'}, extra: {sorted(extra) or 'none'}."
        )
    files = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        paths, labels = [], []
        for label, c in enumerate(class_names):
            found = _list_images(os.path.join(folder, c))
            if not found:
                raise DataError(f"Class folder {os.path.join(folder, c)} has no .png/.jpg images.")
            paths += found
            labels += [label] * len(found)
        files[split] = (paths, np.asarray(labels, np.int32))
    splits = _load_files("image_folder", root, files, image_size, cache_dir, num_workers)
    name = os.path.basename(os.path.normpath(root))
    return Dataset(name, splits["train"], splits["test"], class_names)


def _load_tiny_imagenet(
    root: str | None,
    image_size: int | None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> Dataset:
    fix = (
        "point root at the extracted tiny-imagenet-200 folder, e.g. via `python -m "
        "l2r.data.prepare --tiny_imagenet_archive=PATH`"
    )
    if root is None:
        default = os.path.join(cache_dir or default_cache_dir(), "tiny-imagenet-200")
        root = default if os.path.isdir(default) else None
    root = _require_dir(root, "source='tiny_imagenet'", fix)
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise DataError(f"{wnids_path} is missing ({fix}).")
    with open(wnids_path) as f:
        wnids = tuple(line.strip() for line in f if line.strip())
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise DataError(
                f"wnids.txt lists {wnid} but {folder} is missing; the archive is incomplete. "
                f"Re-extract it, or remove {wnid} from wnids.txt."
            )
        found = _list_images(folder)
        paths += found
        labels += [label] * len(found)
    files = {"train": (paths, np.asarray(labels, np.int32))}
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise DataError(f"{annotations} is missing; it labels the val (test) split ({fix}).")
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    with open(annotations) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip() in index:
                paths.append(os.path.join(root, "val", "images", parts[0].strip()))
                labels.append(index[parts[1].strip()])
    if not paths:
        raise DataError(f"{annotations} labels no image of the classes in wnids.txt.")
    order = np.argsort(paths, kind="stable")  # A stable order, whatever the annotation order.
    files["test"] = ([paths[i] for i in order], np.asarray(labels, np.int32)[order])
    splits = _load_files("tiny_imagenet", root, files, image_size, cache_dir, num_workers)
    return Dataset(
        "tiny_imagenet", splits["train"], splits["test"], wnids, _tiny_descriptions(root, wnids)
    )


def _tiny_descriptions(root: str, wnids: Sequence[str]) -> tuple[str, ...] | None:
    words = os.path.join(root, "words.txt")
    if not os.path.isfile(words):
        return None
    wanted, found = set(wnids), {}
    with open(words) as f:
        for line in f:
            wnid, _, text = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                found[wnid] = text.strip()
    return tuple(found.get(w, w) for w in wnids)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files from the Debian package)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes into a uint8 array.

    Raises:
      DataError: the file is missing, truncated or not an IDX file of uint8.
    """
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Cannot read IDX file {path}: {e}.") from e
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    # one big-endian int32 per dimension.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic {data[:4]!r}).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated or damaged: header says {shape} = {int(np.prod(shape))} bytes, "
            f"file holds {len(data) - offset}. Reinstall or re-download it."
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _load_fashion_mnist(root: str | None, image_size: int | None) -> Dataset:
    folder = root or FASHION_MNIST_DIR
    splits = []
    for prefix in ("train", "t10k"):
        arrays = []
        for kind in ("images-idx3", "labels-idx1"):
            base = os.path.join(folder, f"{prefix}-{kind}-ubyte")
            path = next((p for p in (base + ".gz", base) if os.path.exists(p)), None)
            if path is None:
                raise DataError(
                    f"Fashion-MNIST file {base}.gz is missing. Install it with "
                    "`sudo apt-get install dataset-fashion-mnist`, or pass root= (--config.data."
                    "root) pointing at a folder of the IDX files."
                )
            arrays.append(read_idx(path))
        images, labels = arrays
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(
                f"Fashion-MNIST {prefix} files in {folder} disagree: images {images.shape}, "
                f"labels {labels.shape}."
            )
        splits.append(Split(_resize_all(images[..., None], image_size), labels.astype(np.int32)))
    return Dataset("fashion_mnist", splits[0], splits[1], FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------
# Generated / bundled data


def _load_digits(
    root: str | None, image_size: int | None, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    digits = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block; stretch them to the usual 0..255 range.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in range(10):  # Stratified: the same fraction of every class goes to test.
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True
    train = Split(_resize_all(images[~test], image_size), labels[~test])
    return Dataset(
        "digits", train, Split(_resize_all(images[test], image_size), labels[test]),
        tuple(str(c) for c in range(10)),
    )  # fmt: skip


def _load_synthetic(
    root: str | None,
    image_size: int | None,
    num_classes: int = 10,
    channels: int = 1,
    train_per_class: int = 200,
    test_per_class: int = 50,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Class templates (smooth random patterns) seen through noise and small random shifts."""
    size = 16 if image_size is None else int(image_size)
    if class_names is not None:
        class_names = tuple(str(c) for c in class_names)
        num_classes = len(class_names)
    if num_classes < 1 or channels not in (1, 3) or train_per_class < 1 or test_per_class < 1:
        raise DataError(
            f"synthetic data needs num_classes >= 1, channels in (1, 3) and per-class counts >= 1;"
            f" got num_classes={num_classes}, channels={channels}, "
            f"train_per_class={train_per_class}, test_per_class={test_per_class}."
        )
    rng = np.random.default_rng(seed)
    # Shifts up to 1/4 of the side: a linear readout of pixels then reaches only ~75% on the
    # default setting, while a convnet, being shift-invariant, can do much better.
    shift = max(1, size // 4)
    padded = size + 2 * shift
    # A coarse random grid, bilinearly upsampled, is a smooth (low-frequency) template.
    grid = 5
    up = _interp_matrix(grid, padded)  # [padded, grid]
    coarse = rng.normal(size=(num_classes, channels, grid, grid))
    templates = np.einsum("pg,kcgh,qh->kcpq", up, coarse, up)
    templates /= templates.std(axis=(1, 2, 3), keepdims=True)

    def draw(per_class):
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
        n = len(labels)
        oy, ox = rng.integers(0, 2 * shift + 1, size=(2, n))
        ar = np.arange(size)
        x = templates[
            labels[:, None, None, None],
            np.arange(channels)[None, :, None, None],
            (oy[:, None, None, None] + ar[None, None, :, None]),
            (ox[:, None, None, None] + ar[None, None, None, :]),
        ]  # [n, C, size, size]
        # Per-example contrast and brightness, and pixel noise as strong as the template, so a
        # model must pool evidence over the image rather than read off a few pixels.
        x = x * rng.uniform(0.6, 1.4, (n, 1, 1, 1)) + rng.normal(0, 0.3, (n, 1, 1, 1))
        x = x + rng.normal(0, 1.0, x.shape)
        images = np.clip(128 + 40 * x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return Split(images, labels)

    train, test = draw(train_per_class), draw(test_per_class)
    names = class_names or tuple(str(c) for c in range(num_classes))
    return Dataset("synthetic", train, test, names)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights from n_in samples to n_out samples."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _resize_all(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Resizes uint8 [N, H, W, C] images to image_size (antialiased); None or same size: as is."""
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    from PIL import Image

    out = np.empty((len(images), image_size, image_size, images.shape[3]), np.uint8)
    for i, image in enumerate(images):
        im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        im = np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR))
        out[i] = im.reshape(out.shape[1:])
    return out


# Loader and the extra kwargs it accepts, per source.
_LOADERS = {
    "tfds": (None, ("train_split", "test_split", "image_key", "label_key")),
    "image_folder": (_load_image_folder, ("cache_dir", "num_workers")),
    "tiny_imagenet": (_load_tiny_imagenet, ("cache_dir", "num_workers")),
    "fashion_mnist": (_load_fashion_mnist, ()),
    "digits": (_load_digits, ("test_fraction", "seed")),
    "synthetic": (
        _load_synthetic,
        ("num_classes", "channels", "train_per_class", "test_per_class", "seed", "class_names"),
    ),
}

__all__ = [
    "SOURCES", "Split", "Dataset", "DataError", "load", "prepare_tfds", "read_idx",
    "default_cache_dir",
]  # fmt: skip
