"""Image files to uint8 arrays: decoding (in worker processes when there are many), resizing,
IDX files, and the .npz cache of decoded folders.

The loaders of `l2r.data.sources` read files through here. A decoded folder is cached under the
cache dir (`cache_dir=`, else $L2R_CACHE, else ~/.cache/l2r), keyed by the file list, sizes,
mtimes and the requested image size, so only the first load pays for decoding.
"""

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Fewer files than this decode in-process: starting worker processes would cost more than they
# save (docs/benchmarks.md, "Image decoding").
_MIN_PARALLEL_FILES = 4096
# Bump when the decoding changes, so stale caches are not reused.
_CACHE_VERSION = 1


class DataError(ValueError):
    """Missing, unreadable or invalid data; the message says what to do about it.

    The error of all of `l2r.data`; it lives here, the lowest module, and `sources` re-exports it.
    """


def default_cache_dir() -> str:
    """$L2R_CACHE, else ~/.cache/l2r."""
    return os.environ.get("L2R_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "l2r")


def list_images(folder: str) -> list[str]:
    """The image files (by extension, not hidden) in `folder`, sorted."""
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
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
_WORKER_CODE = "import sys; from l2r.data import decode; decode._decode_worker(sys.argv[1])"


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
    Python, under the GIL (docs/benchmarks.md, "Image decoding"). Plain subprocesses rather than
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


def load_files(
    kind: str,
    root: str,
    files: dict[str, tuple[list[str], np.ndarray]],
    image_size: int | None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decodes image files through the .npz cache.

    Args:
      kind: the source reading them (part of the cache key and file name).
      root: the folder they come from (part of the cache key and file name).
      files: {split: (paths [N], labels int [N])}.
      image_size: if set, every image is resized to image_size x image_size (antialiased).
      cache_dir: where the .npz lives (None = `default_cache_dir()`).
      num_workers: decoding processes (None = up to 8, one per available core).

    Returns:
      {split: (images uint8 [N, H, W, 3], labels int32 [N])}.

    Raises:
      DataError: a file is missing or unreadable, or sizes differ and image_size is None.
    """
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
                return {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in files}
        except (OSError, ValueError, KeyError):
            pass  # A damaged cache file is rebuilt below.
    workers = num_workers or min(8, len(os.sched_getaffinity(0)))
    # All splits in one pass: one pool start-up, and train and test must share a size anyway.
    images = _decode_all([p for paths, _ in files.values() for p in paths], image_size, workers)
    splits, start = {}, 0
    for s, (paths, labels) in files.items():
        splits[s] = (images[start : start + len(paths)], np.asarray(labels, np.int32))
        start += len(paths)
    _write_cache(path, splits)
    return splits


def _write_cache(path: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Writes the arrays atomically (tmp file + rename); a failed write only costs speed."""
    arrays = {}
    for s, (images, labels) in splits.items():
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = images, labels
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


# ------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST's format) and resizing of decoded arrays


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


def resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
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


__all__ = [
    "DataError", "IMAGE_EXTENSIONS", "default_cache_dir", "list_images", "load_files", "read_idx",
    "resize",
]  # fmt: skip
