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
"""

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from l2r.methods import ewc, hat, learned, lwf, multitask, sgd
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


def register(name: str, *, pattern: str | None = None, sequence=on_later_tasks, needs: str = ""):
    """Registers the decorated builder under `name` (or every name matching the regex
    `pattern`, shown as `name` in messages). `sequence`: `on_later_tasks` (the default, for
    methods with no per-task state), a custom `SequenceBuilder`, or None (one task only)."""

    def decorator(build: Builder) -> Builder:
        entry = Entry(build, sequence(build) if sequence is on_later_tasks else sequence, needs)
        if pattern is None:
            _ENTRIES[name] = entry
        else:
            _PATTERNS.append((re.compile(pattern + r"$"), name, entry))
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


@register("lwf", sequence=_lwf_sequence)
def _lwf(name, model, task_b, context):
    return lwf.make_lwf(model, task_b.learning_rate, task_b.lwf.coef, task_b.lwf.temperature, name)


def _ewc_sequence(name, model, task_b, context, num_tasks):
    e = task_b.ewc
    return tuple(ewc.make_ewc(model, task_b.learning_rate, e.coef, e.fisher, e.fisher_examples,
                              name, head=head)
                 for head in _heads(num_tasks))  # fmt: skip


@register("ewc", sequence=_ewc_sequence)
def _ewc(name, model, task_b, context):
    e = task_b.ewc
    return ewc.make_ewc(model, task_b.learning_rate, e.coef, e.fisher, e.fisher_examples, name)


def _hat_sequence(name, model, task_b, context, num_tasks):
    h = task_b.hat
    return tuple(hat.make_hat(model, task_b.learning_rate, h.s_max, h.reg, h.clip_embedding,
                              task_b[f"steps_{k}"], name, head)
                 for k, head in enumerate(_heads(num_tasks), 2))  # fmt: skip


@register("hat", sequence=_hat_sequence)
def _hat(name, model, task_b, context):
    h = task_b.hat
    return hat.make_hat(model, task_b.learning_rate, h.s_max, h.reg, h.clip_embedding,
                        task_b.steps, name)  # fmt: skip


# OML and Rep learn Task B by SGD from their own starting network (`compare.method_starts`).
@register("oml", needs="meta_data")
def _oml(name, model, task_b, context):
    return sgd.make_sgd(model, task_b.learning_rate, name)


@register("rep", needs="meta_data")
def _rep(name, model, task_b, context):
    return sgd.make_sgd(model, task_b.learning_rate, name)


@register("learned", needs="rule")
def _learned(name, model, task_b, context):
    if context.rule is None:
        raise ValueError("learned needs a meta-trained rule (registry.Context.rule).")
    r = context.rule
    return learned.make_learned(model, r.ml, r.theta, r.learning_rate, name)
