"""Task-B learners behind one interface (`Method`); `make_method` builds one by name."""

from l2r.methods.base import Batch, Method
from l2r.methods.sgd import make_sgd, make_teacher

METHOD_NAMES = ("sgd", "sgd_x0.1", "teacher")


def make_method(name: str, model, learning_rate: float) -> Method:
    """Builds the Task-B method `name` with the Task-B learning rate."""
    if name == "sgd":
        return make_sgd(model, learning_rate, name)
    if name == "sgd_x0.1":
        return make_sgd(model, 0.1 * learning_rate, name)
    if name == "teacher":
        return make_teacher(model, learning_rate, name)
    raise ValueError(f"Unknown Task-B method {name!r}; choose from {', '.join(METHOD_NAMES)}.")


__all__ = ["Batch", "Method", "METHOD_NAMES", "make_method", "make_sgd", "make_teacher"]
