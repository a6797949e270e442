"""Config checks every pipeline shares, run before anything is loaded, compiled or trained.

Each failed check raises `ConfigError` with one line naming the field and a valid choice, so
bad input costs seconds, not a run.
"""

import math

import jax
import ml_collections

from l2r import metalearner, probe
from l2r.data import sources
from l2r.methods import registry
from l2r.models import registry as model_registry

SCHEDULES = ("constant", "cosine", "step")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and a valid choice."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Numeric fields that must be > 0 (learning rates, batch sizes, step and episode counts, sizes);
# every other numeric field must be >= 0 (there, 0 means "none", "all" or "off"). Fields a
# config does not have are skipped.
POSITIVE = (
    "num_seeds", "model.groups",
    "pretrain.learning_rate", "pretrain.batch_size", "pretrain.steps", "pretrain.num_checkpoints",
    "pretrain.seeds_per_call",
    "readout.learning_rate", "readout.steps",
    "task_b.learning_rate", "task_b.batch_size", "task_b.teacher_batch_a", "task_b.steps",
    "task_b.steps_2", "task_b.steps_3", "task_b.probe_every",
    "task_b.lwf.temperature", "task_b.ewc.fisher_examples", "task_b.hat.s_max",
    "task_b.hat.clip_embedding", "task_b.oml.inner_lr", "task_b.oml.outer_lr",
    "task_b.oml.inner_steps", "task_b.oml.outer_steps", "task_b.oml.support_batch",
    "task_b.oml.query_batch",
    "meta.learning_rate", "meta.loss_scale", "meta.clip_grad_norm", "meta.episodes",
    "meta.inner_steps", "meta.num_episodes_parallel", "meta.tbptt", "meta.tbptt_max",
    "meta.curriculum_every", "meta.hidden_kernel", "meta.hidden_vector", "meta.input_clip",
)  # fmt: skip


def _numbers(config, prefix=""):
    """(dotted field, value) of every int or float leaf of `config`."""
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every numeric field is finite and >= 0, those of `POSITIVE` > 0."""
    for field, value in _numbers(config):
        positive = field in POSITIVE
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
        require(ok, f"{field}={value!r}: use a finite number {'> 0' if positive else '>= 0'} "
                f"(--config.{field}=...).")  # fmt: skip


def check_common(config: ml_collections.ConfigDict, task_b: bool = True) -> None:
    """Checks the fields shared by every experiment (`task_b=False`: one without a
    `data.classes_b`, whose later tasks come from class pools, as Exp 5)."""
    check_numbers(config)
    require(
        config.model.name in model_registry.names(),
        f"model.name={config.model.name!r}; choose one of {', '.join(model_registry.names())}.",
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
    v = config.get("validation", 0.0)
    require(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
        f"validation={v!r}; give the share of each class's training examples held out as the "
        "validation split, in [0, 1) (e.g. 0.1; 0 = report on the test split).",
    )
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


def check_batch(name: str, batch: int, available: int, task: str) -> None:
    if batch > available:
        raise ConfigError(
            f"{name}={batch} is larger than the {available} training examples of {task}; "
            f"lower {name} to at most {available} or use more data."
        )


def check_methods(config, num_tasks: int = 1, rule: bool = True, meta_data: bool = True) -> None:
    """`task_b.methods` names registered methods that this experiment can run: `num_tasks`
    tasks after Task A, with (`rule`) or without a meta-trained rule, with (`meta_data`) or
    without meta-training data (which Rep and OML need); the config has the `task_b` subgroup
    of each that registered one."""
    b = config.task_b
    choices = ", ".join(registry.names())
    require(len(b.methods) > 0, f"task_b.methods is empty; name one or more of {choices}.")
    for name in b.methods:
        entry = registry.entry(name)
        require(entry is not None, f"task_b.methods has an {registry.unknown(name)}.")
        require(entry.needs != "rule" or rule,
                f"task_b.methods has {name!r}, which needs a meta-trained rule; this experiment "
                "meta-trains none (run it in exp1..exp5), or drop it.")  # fmt: skip
        require(entry.needs != "meta_data" or meta_data,
                f"task_b.methods has {name!r}, which needs meta-training data; this experiment "
                "has none (Fig. 1). Run it in exp1..exp4, or drop it.")  # fmt: skip
        require(num_tasks == 1 or entry.sequence is not None,
                f"task_b.methods has {name!r}, which learns one task after Task A only; with "
                f"{num_tasks} later tasks choose from those that learn several: "
                f"{', '.join(registry.names(sequences=True))}.")  # fmt: skip
        require(not entry.group or isinstance(b.get(entry.group), ml_collections.ConfigDict),
                f"task_b.methods has {name!r}, whose hyper-parameters task_b.{entry.group} are "
                "not in the config: build the config after importing the module that registers "
                f"{name!r}, or add them with l2r.methods.registry.add_config_groups("
                "config.task_b).")  # fmt: skip


def check_steps(config, fields=("steps",)) -> None:
    """Each `task_b.<field>` is a positive multiple of `task_b.probe_every`."""
    b = config.task_b
    for k in fields:
        require(b[k] >= 1 and b.probe_every >= 1 and b[k] % b.probe_every == 0,
                f"task_b.{k}={b[k]} must be a positive multiple of task_b.probe_every="
                f"{b.probe_every}.")  # fmt: skip


def check_meta(config: ml_collections.ConfigDict) -> None:
    """Checks the `meta` group (Algorithm 1 and the meta-learner)."""
    from l2r.meta.window import REP_LOSSES  # the rep losses it knows

    m = config.meta
    require(m.rep_loss in REP_LOSSES, f"meta.rep_loss={m.rep_loss!r}; choose one of {REP_LOSSES}.")
    require(m.gate in metalearner.GATES, f"meta.gate={m.gate!r}; choose one of "
            f"{metalearner.GATES}.")  # fmt: skip
    require(m.num_episodes_parallel >= 1, "meta.num_episodes_parallel must be >= 1.")
    n_dev = jax.device_count()
    require(not m.get("shard_episodes", True) or m.num_episodes_parallel % n_dev == 0,
            f"meta.num_episodes_parallel={m.num_episodes_parallel} episodes cannot be split "
            f"evenly over {n_dev} devices: make it a multiple of {n_dev}, or set "
            "meta.shard_episodes=False to run them all on one device.")  # fmt: skip
    require(m.episodes >= 1 and m.inner_steps >= 1, "meta.episodes, meta.inner_steps must be >= 1.")
    # The parallel episodes start together and, being equally long, end together: the count
    # grows by num_episodes_parallel at a time.
    p = m.num_episodes_parallel
    require(m.episodes % p == 0,
            f"meta.episodes={m.episodes} is not a multiple of meta.num_episodes_parallel={p}: "
            f"episodes end {p} at a time, so {-(-m.episodes // p) * p} would run; make "
            "meta.episodes a multiple of it.")  # fmt: skip
    require(1 <= m.tbptt <= m.tbptt_max, f"meta.tbptt={m.tbptt} must be in [1, tbptt_max].")
    low = m.get("inner_steps_min", 0)
    require(0 <= low <= m.inner_steps,
            f"meta.inner_steps_min={low} must be in [0, meta.inner_steps={m.inner_steps}] (0: "
            "every episode runs meta.inner_steps).")  # fmt: skip
    require(m.tbptt_max <= m.inner_steps,
            f"meta.tbptt_max={m.tbptt_max} is longer than an episode (meta.inner_steps="
            f"{m.inner_steps}); lower meta.tbptt_max or raise meta.inner_steps.")  # fmt: skip
    require(m.curriculum_every >= 1, "meta.curriculum_every must be >= 1.")
    require(m.learning_rate > 0 and m.loss_scale > 0, "meta.learning_rate, loss_scale must be > 0.")
    if m.get("validate_every", 0):
        require(m.validate_every >= 1, f"meta.validate_every={m.validate_every}; give the "
                "windows between meta-validations (>= 1), or 0 to turn it off.")  # fmt: skip
        require(0.0 < m.validate_fraction < 1.0,
                f"meta.validate_fraction={m.validate_fraction!r}; give the share of each "
                "meta-training class's examples held out for meta-validation, "
                "in (0, 1).")  # fmt: skip
        require(m.validate_seeds >= 1 and m.validate_tasks >= 1 and m.validate_steps >= 0,
                "meta.validate_seeds and meta.validate_tasks must be >= 1, "
                "meta.validate_steps >= 0 (0: task_b's steps).")  # fmt: skip
    n_ckpt = config.pretrain.num_checkpoints
    require(
        0 <= m.train_checkpoints < n_ckpt,
        f"meta.train_checkpoints={m.train_checkpoints} must be 0 or leave at least one of the "
        f"pretrain.num_checkpoints={n_ckpt} networks for the meta-test (Exp 3).",
    )


def check_task_sizes(config, task_a, task_b) -> None:
    """The batch sizes fit the tasks' training sets (Task B: any task learned after A)."""
    n_a, n_b = len(task_a.train.labels), len(task_b.train.labels)
    check_batch("pretrain.batch_size", config.pretrain.batch_size, n_a, "Task A")
    check_batch("task_b.batch_size", config.task_b.batch_size, n_b, "Task B")
    if "teacher" in config.task_b.methods:
        check_batch("task_b.teacher_batch_a", config.task_b.teacher_batch_a, n_a, "Task A")
