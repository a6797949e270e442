"""Task-B learners behind one interface (`Method`); `make_method` builds one by name."""

import re

from l2r.methods import hat
from l2r.methods.base import Batch, Method
from l2r.methods.ewc import make_ewc
from l2r.methods.lwf import make_lwf
from l2r.methods.sgd import make_sgd, make_teacher

# "sgd_x<factor>" scales SGD's learning rate (the paper's "SGD x0.1" is sgd_x0.1).
METHOD_NAMES = ("sgd", "sgd_x0.1", "teacher", "lwf", "ewc", "hat", "oml", "rep")
_SCALED_SGD = re.compile(r"sgd_x(\d+(\.\d*)?|\.\d+)$")
# "sgd_kernels_x<factor>": only conv/dense kernels' steps scaled (norms, biases, heads at lr).
_KERNEL_SGD = re.compile(r"sgd_kernels_x(\d+(\.\d*)?|\.\d+)$")


def is_method_name(name: str) -> bool:
    return name in METHOD_NAMES or bool(_SCALED_SGD.match(name) or _KERNEL_SGD.match(name))


def make_method(name: str, model, task_b) -> Method:
    """Builds the Task-B method `name` from the `task_b` config group (learning rate and each
    baseline's hyper-parameters)."""
    lr = task_b.learning_rate
    if name == "sgd":
        return make_sgd(model, lr, name)
    if match := _SCALED_SGD.match(name):
        return make_sgd(model, float(match.group(1)) * lr, name)
    if match := _KERNEL_SGD.match(name):
        return make_sgd(model, lr, name, kernel_scale=float(match.group(1)))
    if name == "teacher":
        return make_teacher(model, lr, name)
    if name == "lwf":
        return make_lwf(model, lr, task_b.lwf.coef, task_b.lwf.temperature, name)
    if name == "ewc":
        e = task_b.ewc
        return make_ewc(model, lr, e.coef, e.fisher, e.fisher_examples, name)
    if name == "hat":
        h = task_b.hat
        return hat.make_hat(model, lr, h.s_max, h.reg, h.clip_embedding, task_b.steps, name)
    if name in ("oml", "rep"):  # Their own starting network (`forgetting.method_starts`), SGD.
        return make_sgd(model, lr, name)
    raise ValueError(
        f"Unknown Task-B method {name!r}; choose from {', '.join(METHOD_NAMES)} (or sgd_x<factor>)."
    )


__all__ = [
    "Batch",
    "Method",
    "METHOD_NAMES",
    "is_method_name",
    "make_ewc",
    "make_lwf",
    "make_method",
    "make_sgd",
    "make_teacher",
]
