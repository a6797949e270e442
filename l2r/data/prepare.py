"""Extracts the offline data archives (and prepares TFDS datasets) into a cache dir.

    python -m l2r.data.prepare --cifar10_archive=PATH --tiny_imagenet_archive=PATH \
        [--dest ~/.cache/l2r]
    python -m l2r.data.prepare --tfds=cifar10 [--data_dir DIR]     # needs TensorFlow + network

Extraction is idempotent: an archive already extracted into `dest` (a marker file records which
archive, by size and mtime) is skipped, so configs can call `ensure_extracted` on every run.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading

from l2r.data.decode import DataError, default_cache_dir

# Where TFDS fetches each dataset from; probed before preparing so that offline users get an
# answer in seconds (TFDS itself retries for minutes). Unknown names probe the TFDS GCS mirror.
_TFDS_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}
_TFDS_DEFAULT_HOST = "storage.googleapis.com"
_REACH_TIMEOUT_S = 3.0

# sha256 of the archives the project ships for offline machines, by file name.
KNOWN_ARCHIVES = {
    "cifar10-jpeg.tar.gz": "4f58dec86508499156642768d945cba57f2311cae67bbd0d55350a599f36d356",
    "tiny-imagenet-200-first100.tar.gz": (
        "ac97913503e491dce52b1311c7da504af1d0decf47cc3b604ed7e30562b5bea9"
    ),
}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _top_level(tar: tarfile.TarFile) -> str | None:
    """The single top-level folder of the archive, or None if it has several entries."""
    tops = {m.name.removeprefix("./").split("/", 1)[0] for m in tar.getmembers()} - {"", "."}
    return tops.pop() if len(tops) == 1 else None


def ensure_extracted(archive: str, dest: str | None = None, *, sha256: str | None = None) -> str:
    """Extracts `archive` (.tar.gz) into `dest` unless already done; returns the data root.

    Args:
      archive: path of the .tar.gz.
      dest: folder to extract into (default: the l2r cache dir, $L2R_CACHE or ~/.cache/l2r).
      sha256: expected digest; by default the known digest of the project's archives (by file
        name), none for other archives.

    Returns:
      The archive's single top-level folder inside dest (e.g. dest/cifar10), else dest.

    Raises:
      DataError: the archive is missing or its sha256 does not match.
    """
    dest = os.path.abspath(os.path.expanduser(dest or default_cache_dir()))
    if not os.path.isfile(archive):
        raise DataError(f"Archive {archive} does not exist; pass the path of the .tar.gz.")
    base = os.path.basename(archive)
    st = os.stat(archive)
    stamp = {"archive": base, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = os.path.join(dest, f".{base}.extracted.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if all(done.get(k) == v for k, v in stamp.items()) and os.path.exists(done["root"]):
            return done["root"]
    expected = sha256 or KNOWN_ARCHIVES.get(base)
    if expected:
        actual = sha256_of(archive)
        if actual != expected:
            raise DataError(
                f"sha256 of {archive} is {actual}, expected {expected}: the file is damaged or a "
                "different version. Copy the archive again."
            )
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
        top = _top_level(tar)
        root = os.path.join(dest, top) if top else dest
        if not (top and os.path.exists(root)):  # An existing folder: extracted earlier by hand.
            # Extract beside the destination, then rename, so an interrupted run leaves no
            # half-filled data root behind.
            tmp = tempfile.mkdtemp(dir=dest, prefix=".extract-")
            try:
                tar.extractall(tmp, filter="data")
                if top:
                    try:
                        os.rename(os.path.join(tmp, top), root)
                    except OSError:
                        if not os.path.exists(root):  # Not a concurrent run that won the race.
                            raise
                else:
                    for entry in os.listdir(tmp):
                        os.replace(os.path.join(tmp, entry), os.path.join(dest, entry))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    fd, tmp_marker = tempfile.mkstemp(dir=dest, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({**stamp, "root": root}, f)
    os.replace(tmp_marker, marker)
    return root


# ------------------------------------------------------------------------------------------------
# TFDS


def tensorflow_available() -> bool:
    """Whether TensorFlow is installed (TFDS needs it to prepare, not to read ArrayRecord)."""
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


def tfds_data_dir(data_dir: str | None) -> str:
    """The folder TFDS keeps prepared datasets in: `data_dir`, else $TFDS_DATA_DIR, else
    ~/tensorflow_datasets (TFDS's own default)."""
    return os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )


def tfds_maybe_prepared(name: str, data_dir: str | None = None) -> bool:
    """Whether some prepared version of TFDS dataset `name` ("cifar10", "cifar10/plain:3.0.2")
    may be in `data_dir`: a `dataset_info.json` below its folder. Cheap, and needs no import of
    tensorflow_datasets (seconds): a False here is certain, a True is confirmed by TFDS."""
    folder = os.path.join(tfds_data_dir(data_dir), name.split(":")[0].split("/")[0])
    return any("dataset_info.json" in files for _, _, files in os.walk(folder))


def check_tfds_obtainable(
    name: str, data_dir: str | None, download: bool, missing: bool = False
) -> None:
    """Raises DataError, in a second or two and before TFDS is imported, when dataset `name` is
    surely not prepared in `data_dir` (or is `missing`, as TFDS found) and cannot be prepared
    here: `download` is off, TensorFlow is missing, or the download host cannot be reached."""
    if not missing and tfds_maybe_prepared(name, data_dir):
        return
    where = tfds_data_dir(data_dir)
    if not download:
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {where} and download=False. Prepare it "
            f"with `python -m l2r.data.prepare --tfds={name}` or allow download "
            "(--config.data.download=True)."
        )
    if not tensorflow_available():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {where}, and preparing it needs "
            'TensorFlow: pip install "l2r[tfds]" (or prepare it on another machine with `python -m '
            f"l2r.data.prepare --tfds={name}` and copy the data_dir here). Without it, use the "
            "offline presets (fashion_mnist, digits), or an extracted image-folder copy with "
            "--config.data.source=image_folder --config.data.root=PATH."
        )
    host = _TFDS_HOSTS.get(name, _TFDS_DEFAULT_HOST)
    if not _host_reachable(host):
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {where}, and its download host "
            f"{host} cannot be reached (no network). Fixes: run `python -m l2r.data.prepare "
            f"--tfds={name} --data_dir=DIR` on a machine with network and copy DIR to this "
            "machine's data_dir (--config.data.data_dir); or, with an extracted image-folder copy "
            "(root/{train,test}/<class>/*.jpg), use --config.data.source=image_folder "
            "--config.data.root=PATH."
        )


def prepare_tfds(name: str, data_dir: str | None = None) -> str:
    """Downloads and prepares TFDS dataset `name` as ArrayRecord (readable without TensorFlow).

    Returns:
      The dataset's prepared directory.

    Raises:
      DataError: TensorFlow is missing, or the download host cannot be reached.
    """
    check_tfds_obtainable(name, data_dir, download=True)  # Before the slow import of TFDS.
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder.data_dir
    check_tfds_obtainable(name, data_dir, download=True, missing=True)
    # ArrayRecord is what tfds.data_source reads, and it needs no TensorFlow to read.
    builder.download_and_prepare(file_format="array_record")
    return builder.data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2r.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cifar10_archive", help="path of cifar10-jpeg.tar.gz")
    parser.add_argument("--tiny_imagenet_archive", help="path of tiny-imagenet-200*.tar.gz")
    parser.add_argument("--dest", default=None, help="extract here (default: ~/.cache/l2r)")
    parser.add_argument("--tfds", action="append", default=[], help="TFDS name to prepare")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    args = parser.parse_args(argv)
    if not (args.cifar10_archive or args.tiny_imagenet_archive or args.tfds):
        parser.error("nothing to do: pass --cifar10_archive, --tiny_imagenet_archive or --tfds.")
    try:
        for flag, archive, source in (
            ("cifar10", args.cifar10_archive, "image_folder"),
            ("tiny_imagenet", args.tiny_imagenet_archive, "tiny_imagenet"),
        ):
            if archive:
                root = ensure_extracted(archive, args.dest)
                print(f"{flag}: {root}  (--config.data.source={source} --config.data.root={root})")
        for name in args.tfds:
            print(f"tfds {name}: {prepare_tfds(name, args.data_dir)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
