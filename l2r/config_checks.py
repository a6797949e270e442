"""Plumbing every experiment shares: config checks, data and tasks from a config.

All checks here run before anything is compiled or trained, so bad input costs seconds.
"""

import os

import ml_collections

from l2r import probe
from l2r.data import sources

MODEL_NAMES = ("resnet", "convnet")
SCHEDULES = ("constant", "cosine", "step")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and a valid choice."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_common(config: ml_collections.ConfigDict, task_b: bool = True) -> None:
    """Checks the fields shared by every experiment (`task_b=False`: one without a
    `data.classes_b`, whose later tasks come from class pools, as Exp 5)."""
    require(config.num_seeds >= 1, f"num_seeds={config.num_seeds}; use 1 or more.")
    require(
        config.model.name in MODEL_NAMES,
        f"model.name={config.model.name!r}; choose one of {', '.join(MODEL_NAMES)}.",
    )
    if config.model.name == "resnet":
        require(
            config.model.depth >= 8 and (config.model.depth - 2) % 6 == 0,
            f"model.depth={config.model.depth}; CIFAR ResNets have depth 6n+2 (14, 20, 32, ...).",
        )
    for w in config.model.widths:
        require(
            w % config.model.groups == 0,
            f"model.groups={config.model.groups} does not divide width {w}; pick groups that "
            f"divide every entry of model.widths={tuple(config.model.widths)}.",
        )
    p = config.pretrain
    require(p.schedule in SCHEDULES, f"pretrain.schedule={p.schedule!r}; use one of {SCHEDULES}.")
    require(
        p.steps >= 1 and p.batch_size >= 1, "pretrain.steps and pretrain.batch_size must be >= 1."
    )
    require(p.num_checkpoints >= 1, "pretrain.num_checkpoints must be >= 1.")
    require(
        config.readout.solver in probe.SOLVERS,
        f"readout.solver={config.readout.solver!r}; choose one of {', '.join(probe.SOLVERS)}.",
    )
    require(config.readout.steps >= 1, "readout.steps must be >= 1.")
    d = config.data
    require(
        d.source in sources.SOURCES,
        f"data.source={d.source!r}; choose one of {', '.join(sources.SOURCES)}.",
    )
    require(
        len(d.classes_a) > 0 and (len(d.classes_b) > 0 or not task_b),
        "data.classes_a and data.classes_b must each name at least one class.",
    )


def readout_config(config) -> probe.ReadoutConfig:
    r = config.readout
    return probe.ReadoutConfig(
        solver=r.solver, steps=r.steps, learning_rate=r.learning_rate, l2=r.l2
    )


def load_dataset(data: ml_collections.ConfigDict) -> sources.Dataset:
    """Loads the dataset a config names, extracting an offline archive first if asked."""
    if data.archive and data.root and not os.path.exists(data.root):
        from l2r.data import prepare

        if not os.path.exists(data.archive):
            raise sources.DataError(
                f"data.root={data.root} does not exist and the archive to extract it from, "
                f"data.archive={data.archive}, is missing. Point --config.data.root at an "
                "extracted copy or --config.data.archive at the .tar.gz."
            )
        prepare.ensure_extracted(data.archive, os.path.dirname(os.path.abspath(data.root)))
    kwargs = dict(
        name=data.name or None,
        root=data.root or None,
        image_size=data.image_size or None,
        data_dir=data.data_dir or None,
        download=data.download,
    )
    if data.source == "synthetic":
        kwargs.update(data.synthetic.to_dict())
    return sources.load(data.source, **kwargs)


def check_batch(name: str, batch: int, available: int, task: str) -> None:
    if batch > available:
        raise ConfigError(
            f"{name}={batch} is larger than the {available} training examples of {task}; "
            f"lower {name} to at most {available} or use more data."
        )
