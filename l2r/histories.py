"""The cache of finished Task-B histories (`task_b.Run`).

A method's histories are saved (`save_history`, `load_history`) under a key of exactly what they
depend on (`history_key`), so an interrupted comparison resumes at its first unfinished method and
adding a method to a finished one costs only that method. A damaged file is recomputed, never
reused.
"""

import contextlib
import os
import zipfile

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from l2r import checkpoint, distributed, keys
from l2r.methods import groups
from l2r.task_b import Run


def cache_dir(config, workdir: str) -> str:
    """Where finished Task-B histories are cached: `task_b.cache_dir` or <workdir>/task_b."""
    return config.task_b.get("cache_dir") or os.path.join(workdir, "task_b")


def _functions(methods) -> list:
    return [f for m in methods for f in (m.init, m.step, m.network, m.represent, m.switch,
                                          m.taps) if f is not None]  # fmt: skip


def _in_l2r(module: str) -> bool:
    return module.partition(".")[0] == __name__.partition(".")[0]


def method_modules(methods) -> list[str]:
    """The l2r modules that define `methods`' functions: what their runs execute besides this
    one (for a method defined outside l2r, see `user_code`)."""
    return sorted({f.__module__ for f in _functions(methods) if _in_l2r(f.__module__)})


def user_code(methods) -> dict[str, str]:
    """`keys.user_sources` of `methods`' functions: {} for l2r's own methods."""
    return keys.user_sources(_functions(methods))


def history_key(config, methods, start, data_digest: str) -> str:
    """Hash of everything a method's histories depend on: its name, the `params` and code of
    its per-phase `methods`, its starting networks, the data (`data_digest`: every task and
    the normalisation, by content), the seeds, the `task_b` group (its shared fields and the
    method's own subgroup), the `readout` and `model` groups, and the source of the modules the
    run executes (this one and the methods' own, `user_code` included).

    The subgroups that configure one method each are those the methods registered
    (`l2r.methods.groups`, named after their method): a method's key holds its own only, so a
    sweep of one baseline's hyper-parameter reuses the other methods' runs, and a new method
    changes no existing key."""
    name = methods[0].name
    others = set(groups.names()) - {name}
    task_b = {
        k: v
        for k, v in config.task_b.to_dict().items()
        if k not in ("methods", "cache_dir") and k not in others
    }
    params = [None if m.params is None else checkpoint.digest(m.params) for m in methods]
    outside = user_code(methods)  # {} for l2r's methods, whose keys so stay as they were
    return keys.stage_key(
        method=name,
        params=params,
        start=checkpoint.digest(start),
        data=data_digest,
        augment=config.data.augment,
        seed=config.seed,
        num_seeds=config.num_seeds,
        task_b=task_b,
        readout=config.readout.to_dict(),
        model=config.model.to_dict(),
        code=keys.source_digest(__name__, *method_modules(methods)),
        **({"user_code": outside} if outside else {}),
    )


_HISTORY_DIGEST = "_sha256"  # In the .npz: `checkpoint.digest` of the histories it holds.
_LAYERS = "_layers_"  # In the .npz: the prefix of `Run.layers`' entries.


def _digest(history: dict, layers: dict) -> str:
    return checkpoint.digest([history[k] for k in sorted(history)]
                             + [layers[k] for k in sorted(layers)])  # fmt: skip


def load_history(path: str | None) -> Run | None:
    """The `Run` saved at `path` (.npz) by `save_history`, or None when there is none (or
    `path` is None). Every process reads, and they share one decision.

    A damaged file (unreadable, or histories other than those saved) is reported in one
    warning, deleted and treated as absent: the method runs again."""
    if path is None:
        return None
    loaded = _read_history(path) if os.path.exists(path) else None
    found = np.asarray(loaded is not None)
    if jax.process_count() > 1:  # One decision for all processes: they run collectives.
        found = multihost_utils.broadcast_one_to_all(found)
    if not found:
        return None
    logging.info("Reusing the Task-B histories in %s (trained for %.0f s then).", path,
                 loaded.train_s)  # fmt: skip
    return loaded


def _read_history(path: str) -> Run | None:
    try:
        with np.load(path) as f:
            history = {k: f[k] for k in f.files if not k.startswith("_")}
            layers = {k[len(_LAYERS) :]: f[k] for k in f.files if k.startswith(_LAYERS)}
            train_s, probe_s = float(f["_train_s"]), float(f["_probe_s"])
            expected = str(f[_HISTORY_DIGEST])
        if _digest(history, layers) != expected:
            raise ValueError("its histories differ from those saved (digest mismatch)")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logging.warning("Damaged Task-B cache %s, recomputed: %s.", path,
                        checkpoint.describe_error(e))  # fmt: skip
        if distributed.is_main():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return None
    if "teacher_key" in layers:
        layers["teacher_key"] = str(layers["teacher_key"])
    return Run(history, train_s, probe_s, layers)


def save_history(path: str | None, history, train_s: float, probe_s: float,
                 layers: dict | None = None) -> None:  # fmt: skip
    """Saves a method's histories and per-layer CKA (`Run.layers`) at `path` (process 0,
    through a temporary name, so a killed run leaves no half file), with their digest; `path`
    None: nothing."""
    if path is None or not distributed.is_main():
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    history = {k: np.asarray(v) for k, v in history.items()}
    layers = {k: np.asarray(v) for k, v in (layers or {}).items()}
    sha = _digest(history, layers)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **history, **{_LAYERS + k: v for k, v in layers.items()}, _train_s=train_s,
                 _probe_s=probe_s, **{_HISTORY_DIGEST: sha})  # fmt: skip
    os.replace(tmp, path)
