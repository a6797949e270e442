"""TFDS datasets: where they are prepared, whether one can be (TensorFlow, the network), and
preparing one as ArrayRecord (readable without TensorFlow). The checks are cheap and need no
import of tensorflow_datasets (seconds), so that an offline machine hears "not prepared" as fast
as any config error.
"""

import importlib.util
import os
import socket
import threading

from l2r.data.decode import DataError

# Where TFDS fetches each dataset from; probed before preparing so that offline users get an
# answer in seconds (TFDS itself retries for minutes). Unknown names probe the TFDS GCS mirror.
_TFDS_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}
_TFDS_DEFAULT_HOST = "storage.googleapis.com"
_REACH_TIMEOUT_S = 3.0


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
