"""Data sources: one loader per source, registered by name, each loading a whole dataset.

`load(source, ...)` returns a `Dataset` of two `Split`s holding all images (uint8 [N, H, W, C])
and labels (int32 [N]) on the host. Training code copies whole tasks to the device once and
gathers batches by index, so nothing here streams or batches. `@register(name)` adds a source
from user code; image files are decoded and cached by `l2r.data.decode`.
"""

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from l2r.data import decode, tfds_prep
from l2r.data.decode import DataError, default_cache_dir, read_idx
from l2r.data.tfds_prep import prepare_tfds

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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


# Loaders by source name, in registration order.
_LOADERS: dict[str, Callable[..., Dataset]] = {}
SOURCES = _LOADERS.keys()  # The registered source names; a live view, so it sees later additions.
# Arguments `load` takes for every source; a loader receives those its signature names.
_COMMON = ("name", "root", "image_size", "data_dir", "download")


def register(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator adding a data source, so that `load(name)` (`--config.data.source=name`) calls it.

        @sources.register("my_data")
        def load_my_data(root, image_size, scale: float = 1.0) -> sources.Dataset: ...

    `load` calls the loader with keyword arguments: those of name, root, image_size, data_dir and
    download that its signature names (passing root, image_size or data_dir to a source whose
    loader does not name it is an error), and the source's own options: its other parameters.
    When the loader does not take `name`, `load(name=...)` renames the returned `Dataset`.

    Raises:
      ValueError: `name` is already registered to a different function.
    """

    def add(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        where = lambda f: f"{f.__module__}.{f.__qualname__}"
        old = _LOADERS.setdefault(name, loader)
        # Re-running the same definition (a reloaded module, a notebook cell) replaces it.
        if where(old) != where(loader):
            raise ValueError(f"Data source {name!r} is already registered to {where(old)}.")
        _LOADERS[name] = loader
        return loader

    return add


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
      source: a registered source (`SOURCES`); built in: "tfds", "image_folder",
        "tiny_imagenet", "fashion_mnist", "digits" and "synthetic".
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
    loader = _LOADERS[source]
    params = inspect.signature(loader).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p not in _COMMON]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise DataError(
                f"Source {source!r} does not take {', '.join(unknown)}; it accepts "
                f"{', '.join(accepted) or 'no extra arguments'}."
            )
    common = dict(name=name, root=root, image_size=image_size, data_dir=data_dir, download=download)
    for arg in ("root", "image_size", "data_dir"):
        if common[arg] is not None and arg not in params:
            raise DataError(f"Source {source!r} does not use {arg}; drop {arg}={common[arg]!r}.")
    dataset = loader(**{k: v for k, v in common.items() if k in params}, **kwargs)
    return dataclasses.replace(dataset, name=name) if name and "name" not in params else dataset


# ------------------------------------------------------------------------------------------------
# TFDS


def _tfds_is_prepared(builder) -> bool:
    return builder.is_prepared()


@register("tfds")
def _load_tfds(
    name: str | None,
    image_size: int | None,
    data_dir: str | None,
    download: bool,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
) -> Dataset:
    if not name:
        raise DataError("source='tfds' needs name=..., e.g. name='cifar10' (--config.data.name).")
    tfds_prep.check_tfds_obtainable(name, data_dir, download)  # Fails fast, before TFDS loads.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"TFDS does not know dataset {name!r} ({first_line}); check the name."
        ) from e
    if not _tfds_is_prepared(builder):
        tfds_prep.check_tfds_obtainable(name, data_dir, download, missing=True)
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
            if not tfds_prep.tensorflow_available():
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
        splits.append(Split(decode.resize(images, image_size), labels))
    names = tuple(builder.info.features[label_key].names)
    return Dataset(name, splits[0], splits[1], names)


# ------------------------------------------------------------------------------------------------
# Image folders (the files are decoded and cached by `l2r.data.decode`)


def _require_dir(path: str | None, what: str, fix: str) -> str:
    if not path:
        raise DataError(f"{what} needs root=PATH ({fix}).")
    if not os.path.isdir(path):
        raise DataError(f"{what}: folder {path} does not exist ({fix}).")
    return path


@register("image_folder")
def _load_image_folder(
    root: str | None,
    image_size: int | None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> Dataset:
    fix = "expected root/{train,test}/<class>/*.png|jpg; set --config.data.root"
    recipe = (
        "; CIFAR-10's is built from the official archive by `python -m l2r.data.prepare "
        "--cifar10_python=PATH/cifar-10-python.tar.gz` (into ~/.cache/l2r/cifar10 by default)"
    )
    root = _require_dir(root, "source='image_folder'", fix + recipe)
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
            found = decode.list_images(os.path.join(folder, c))
            if not found:
                raise DataError(f"Class folder {os.path.join(folder, c)} has no .png/.jpg images.")
            paths += found
            labels += [label] * len(found)
        files[split] = (paths, np.asarray(labels, np.int32))
    arrays = decode.load_files("image_folder", root, files, image_size, cache_dir, num_workers)
    name = os.path.basename(os.path.normpath(root))
    return Dataset(name, Split(*arrays["train"]), Split(*arrays["test"]), class_names)


@register("tiny_imagenet")
def _load_tiny_imagenet(
    root: str | None,
    image_size: int | None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> Dataset:
    fix = (
        "point root at the extracted tiny-imagenet-200 folder; `python -m l2r.data.prepare "
        "--tiny_imagenet_zip=PATH/tiny-imagenet-200.zip` extracts the official archive into "
        "~/.cache/l2r/tiny-imagenet-200 by default"
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
        found = decode.list_images(folder)
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
    arrays = decode.load_files("tiny_imagenet", root, files, image_size, cache_dir, num_workers)
    train, test = Split(*arrays["train"]), Split(*arrays["test"])
    return Dataset("tiny_imagenet", train, test, wnids, _tiny_descriptions(root, wnids))


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


@register("fashion_mnist")
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
        splits.append(Split(decode.resize(images[..., None], image_size), labels.astype(np.int32)))
    return Dataset("fashion_mnist", splits[0], splits[1], FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------
# Generated / bundled data


@register("digits")
def _load_digits(image_size: int | None, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
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
    train = Split(decode.resize(images[~test], image_size), labels[~test])
    return Dataset(
        "digits", train, Split(decode.resize(images[test], image_size), labels[test]),
        tuple(str(c) for c in range(10)),
    )  # fmt: skip


@register("synthetic")
def _load_synthetic(
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


__all__ = [
    "SOURCES", "Split", "Dataset", "DataError", "register", "load", "prepare_tfds", "read_idx",
    "default_cache_dir",
]  # fmt: skip
