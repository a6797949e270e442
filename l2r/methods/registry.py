"""Every Task-B method by name: the baselines, the multi-task teacher and the learned rule.

A method is registered once, with a builder `(name, model, task_b, context) -> Method` for one
task after Task A and, for methods that can learn several tasks in sequence (Exp 5), a builder
of one `Method` per later task. Pipelines, config checks and sweeps ask this registry only, and
a user adds a method from their own file:

    @registry.register("mine")
    def build_mine(name, model, task_b, context):
        return Method(name, init, step, network)

`context` carries what a method needs beyond the config: the meta-trained rule (`Rule`) for
`learned`, the first task's class count for the three-task teacher.

A method with hyper-parameters of its own registers them as its config group, with defaults:

    @registry.register("mine", group=dict(coef=0.01))  # config.task_b.mine.coef
    def build_mine(name, model, task_b, context):
        return make_mine(model, task_b.learning_rate, task_b.mine.coef, name)

Every experiment config gets the groups registered when it is built (`add_config_groups`, so
`--config.task_b.mine.coef=0.1` works), and a method's cache key holds its own group and none
of the others' (`l2r.histories.history_key`), so a new method changes no existing key.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from l2r.methods import ewc, groups, hat, learned, lwf, multitask, sgd
from l2r.methods.base import Method
from l2r.methods.learned import Rule


class Context(NamedTuple):
    """What building a method may need beyond `model` and the `task_b` config group."""

    rule: Rule | None = None  # for "learned"
    num_classes_1: int | None = None  # Task 1's classes: the three-task teacher's label offset


Builder = Callable[[str, Any, Any, Context], Method]
SequenceBuilder = Callable[[str, Any, Any, Context, int], tuple[Method, ...]]


class Entry(NamedTuple):
    build: Builder
    sequence: SequenceBuilder | None  # None: one task after A only
    needs: str = ""  # "rule": a meta-trained rule; "meta_data": meta-training data (Rep, OML)
    group: str = ""  # Its hyper-parameters' `task_b` subgroup ("" = none).


_ENTRIES: dict[str, Entry] = {}
_PATTERNS: list[tuple[re.Pattern, str, Entry]] = []  # (regex, display form, entry)


def on_later_tasks(build: Builder) -> SequenceBuilder:
    """The sequence builder of a method that keeps no per-task state: the same learner on every
    later task, training that task's own head (`multitask.on_task_3`)."""

    def sequence(name, model, task_b, context, num_tasks):
        if num_tasks > 2:
            raise ValueError(f"{name}: at most two tasks after Task A are supported.")
        method = build(name, model, task_b, context)
        return (method, multitask.on_task_3(method))[:num_tasks]

    return sequence


def _where(f) -> str:
    return f"{f.__module__}.{f.__qualname__}"


def register(name: str, *, pattern: str | None = None, sequence=on_later_tasks, needs: str = "",
             group: Mapping | None = None):  # fmt: skip
    """Registers the decorated builder under `name` (or every name matching the regex
    `pattern`, shown as `name` in messages).

    Args:
      name: the method's name in `task_b.methods`.
      pattern: a regex for a family of names (`sgd_x<factor>`); None: `name` only.
      sequence: `on_later_tasks` (the default, for methods with no per-task state), a custom
        `SequenceBuilder`, or None (one task after Task A only).
      needs: "rule" (a meta-trained rule), "meta_data" (meta-training data) or "".
      group: the method's hyper-parameters and their defaults (a dict or ConfigDict, nesting
        allowed): the config group `task_b.<name>`. None: the method has none of its own.

    Raises:
      ValueError: `name` is taken by another function (re-running the same definition, as a
        reloaded module or a notebook cell does, replaces it), or `group` is given for a
        pattern or a name that is not a Python identifier.
    """
    if group is not None and (pattern is not None or not name.isidentifier()):
        raise ValueError(f"Method {name!r}: only a single method named by an identifier can "
                         "own a config group (task_b.<name>).")  # fmt: skip

    def decorator(build: Builder) -> Builder:
        seq = sequence(build) if sequence is on_later_tasks else sequence
        entry = Entry(build, seq, needs, "" if group is None else name)
        old = _ENTRIES.get(name) or next((e for _, n, e in _PATTERNS if n == name), None)
        if old is not None and _where(old.build) != _where(build):
            raise ValueError(f"Method {name!r} is already registered to {_where(old.build)}.")
        if pattern is None:
            _ENTRIES[name] = entry
        else:
            _PATTERNS[:] = [p for p in _PATTERNS if p[1] != name]
            _PATTERNS.append((re.compile(pattern + r"$"), name, entry))
        groups.declare(name, group)
        return build

    return decorator


def entry(name: str) -> Entry | None:
    if name in _ENTRIES:
        return _ENTRIES[name]
    return next((e for regex, _, e in _PATTERNS if regex.match(name)), None)


def names(sequences: bool = False) -> tuple[str, ...]:
    """Every registered name (patterns in their display form, e.g. sgd_x<factor>); with
    `sequences`, only those that can learn several tasks in turn."""
    found = [*_ENTRIES.items(), *((shown, e) for _, shown, e in _PATTERNS)]
    return tuple(n for n, e in found if e.sequence is not None or not sequences)


add_config_groups = groups.add_config_groups  # Re-exported: the one place users look.


def unknown(name: str) -> str:
    return f"unknown method {name!r}; choose from {', '.join(names())}"


def build(name: str, model, task_b, context: Context | None = None) -> Method:
    """The method `name` for one task after Task A."""
    found = entry(name)
    if found is None:
        raise ValueError(unknown(name).capitalize() + ".")
    return found.build(name, model, task_b, context or Context())


def build_sequence(name: str, model, task_b, num_tasks: int, context: Context | None = None):
    """The method `name` for each of `num_tasks` tasks learned in turn: a tuple of Methods."""
    found = entry(name)
    if found is None:
        raise ValueError(unknown(name).capitalize() + ".")
    context = context or Context()
    if num_tasks == 1:
        return (found.build(name, model, task_b, context),)
    if found.sequence is None:
        raise ValueError(f"{name} learns one task after Task A only.")
    return tuple(found.sequence(name, model, task_b, context, num_tasks))


# ----------------------------------------------------------------------------------------------
# The built-in methods.

_NUMBER = r"(\d+(\.\d*)?|\.\d+)"


@register("sgd")
def _sgd(name, model, task_b, context):
    return sgd.make_sgd(model, task_b.learning_rate, name)


@register("sgd_x<factor>", pattern=r"sgd_x" + _NUMBER)
def _scaled_sgd(name, model, task_b, context):
    """SGD at `factor` × the Task-B learning rate (the paper's "SGD x0.1" is sgd_x0.1)."""
    factor = float(name[len("sgd_x") :])
    return sgd.make_sgd(model, factor * task_b.learning_rate, name)


@register("sgd_kernels_x<factor>", pattern=r"sgd_kernels_x" + _NUMBER)
def _kernel_sgd(name, model, task_b, context):
    """Only conv/dense kernels' steps scaled (norms, biases, heads at the full rate)."""
    factor = float(name[len("sgd_kernels_x") :])
    return sgd.make_sgd(model, task_b.learning_rate, name, kernel_scale=factor)


def _teacher_sequence(name, model, task_b, context, num_tasks):
    if num_tasks > 2:
        raise ValueError("teacher: at most two tasks after Task A are supported.")
    return tuple(multitask.make_multitask_teacher(model, task_b.learning_rate,
                                                  context.num_classes_1, phase, name)
                 for phase in range(num_tasks))  # fmt: skip


@register("teacher", sequence=_teacher_sequence)
def _teacher(name, model, task_b, context):
    return sgd.make_teacher(model, task_b.learning_rate, name)


def _heads(num_tasks: int) -> list[str]:
    if num_tasks > 2:
        raise ValueError("at most two tasks after Task A are supported.")
    return ["head_b", "head_c"][:num_tasks]


def _lwf_sequence(name, model, task_b, context, num_tasks):
    cfg = task_b.lwf
    return tuple(lwf.make_lwf(model, task_b.learning_rate, cfg.coef, cfg.temperature, name, head)
                 for head in _heads(num_tasks))  # fmt: skip


@register("lwf", sequence=_lwf_sequence, group=dict(
    coef=1.0,  # §4: distillation coefficient 1.0.
    temperature=2.0,  # Li & Hoiem 2016: T = 2.
))  # fmt: skip
def _lwf(name, model, task_b, context):
    return lwf.make_lwf(model, task_b.learning_rate, task_b.lwf.coef, task_b.lwf.temperature, name)


def _ewc_sequence(name, model, task_b, context, num_tasks):
    e = task_b.ewc
    return tuple(ewc.make_ewc(model, task_b.learning_rate, e.coef, e.fisher, e.fisher_examples,
                              name, head=head)
                 for head in _heads(num_tasks))  # fmt: skip


@register("ewc", sequence=_ewc_sequence, group=dict(
    coef=1.0,  # §4: coefficient 1.0.
    fisher="empirical",  # empirical (labels of A) | true (labels sampled from the model)
    fisher_examples=1024,  # Task-A training examples the diagonal Fisher averages over.
))  # fmt: skip
def _ewc(name, model, task_b, context):
    e = task_b.ewc
    return ewc.make_ewc(model, task_b.learning_rate, e.coef, e.fisher, e.fisher_examples, name)


def _hat_sequence(name, model, task_b, context, num_tasks):
    h = task_b.hat
    return tuple(hat.make_hat(model, task_b.learning_rate, h.s_max, h.reg, h.clip_embedding,
                              task_b[f"steps_{k}"], name, head)
                 for k, head in enumerate(_heads(num_tasks), 2))  # fmt: skip


@register("hat", sequence=_hat_sequence, group=dict(
    s_max=3.0,  # §4: s_max 3.0 (Serrà et al. 2018 default: 400).
    reg=0.75,  # §4: attention regulariser λ = 0.75.
    clip_embedding=6.0,  # Serrà et al.: embeddings clamped to [-6, 6].
))  # fmt: skip
def _hat(name, model, task_b, context):
    h = task_b.hat
    return hat.make_hat(model, task_b.learning_rate, h.s_max, h.reg, h.clip_embedding,
                        task_b.steps, name)  # fmt: skip


# OML and Rep learn Task B by SGD from their own starting network (`compare.method_starts`);
# their groups configure how that network is made (`l2r.methods.oml`, `l2r.methods.rep`).
@register("oml", needs="meta_data", group=dict(
    inner_steps=10,  # §4: 10 SGD steps of the linear readout on B support batches.
    inner_lr=0.1,  # Readout SGD step in the inner loop.
    outer_lr=1e-4,  # Adam on the backbone, from the query loss through the unroll.
    outer_steps=500,  # Meta-training steps of the backbone before Task B.
    support_batch=16,  # Examples per inner step.
    query_batch=64,  # Query examples (Task-B meta-training classes and Task A).
))  # fmt: skip
def _oml(name, model, task_b, context):
    return sgd.make_sgd(model, task_b.learning_rate, name)


@register("rep", needs="meta_data", group=dict(
    steps=0,  # Extra pre-training steps on A ∪ meta-training classes (0 = pretrain.steps).
))  # fmt: skip
def _rep(name, model, task_b, context):
    return sgd.make_sgd(model, task_b.learning_rate, name)


@register("learned", needs="rule")
def _learned(name, model, task_b, context):
    if context.rule is None:
        raise ValueError("learned needs a meta-trained rule (registry.Context.rule).")
    r = context.rule
    return learned.make_learned(model, r.ml, r.theta, r.learning_rate, name)
