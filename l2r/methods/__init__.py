"""Task-B learners behind one interface (`Method`), built by name through `registry`."""

from l2r.methods import registry
from l2r.methods.base import Batch, Method
from l2r.methods.ewc import make_ewc
from l2r.methods.lwf import make_lwf
from l2r.methods.registry import Context, Rule, register
from l2r.methods.sgd import make_sgd, make_teacher


def method_names() -> tuple[str, ...]:
    """Every registered method name (patterns shown as e.g. sgd_x<factor>)."""
    return registry.names()


def is_method_name(name: str) -> bool:
    return registry.entry(name) is not None


def make_method(name: str, model, task_b, context: Context | None = None) -> Method:
    """The method `name` for one task after Task A (`registry.build`)."""
    return registry.build(name, model, task_b, context)


__all__ = [
    "Batch",
    "Context",
    "Method",
    "Rule",
    "is_method_name",
    "make_ewc",
    "make_lwf",
    "make_method",
    "make_sgd",
    "make_teacher",
    "method_names",
    "register",
]
