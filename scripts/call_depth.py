r"""How deep the code is: the l2r/experiments frames from `experiments/run.py` down to one Task-B
step and one meta-training inner step, counted when JAX traces them.

    .venv/bin/python scripts/call_depth.py --config=experiments/configs/exp1.py:smoke \
        --workdir=/tmp/depth --overwrite

Every loss in l2r goes through `training.cross_entropy`; this wraps it, records the Python stack
the first time each kind of step calls it, runs the experiment, and prints each stack from
`experiments/run.py` to the step (the loss function below the step left out). Stages found in
the workdir's caches are not traced: use a fresh workdir to see them all.
"""

import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402

from l2r import training  # noqa: E402
from l2r.cli import run  # noqa: E402

STACKS = {}


def _ours(frame) -> bool:
    path = os.path.relpath(frame.filename, ROOT)
    return path.startswith(("l2r" + os.sep, "experiments" + os.sep))


def _kind(stack) -> str:
    files = " ".join(f.filename for f in stack)
    if any(name in files for name in ("pretrain.py", "hat.py", "rep.py", "oml.py")):
        return "pre-training step"
    if os.sep + "meta" + os.sep in files or "meta_train.py" in files:  # (and before 2026-12)
        return "meta-training inner step (student)" if any(
            f.name == "student_step" for f in stack) else "meta-training teacher step"  # fmt: skip
    return "Task-B step"


def _recording(cross_entropy):
    def wrapped(*args, **kwargs):
        stack = [f for f in traceback.extract_stack()[:-1] if _ours(f)]
        STACKS.setdefault(_kind(stack), stack)
        return cross_entropy(*args, **kwargs)

    return wrapped


def report() -> None:
    for kind, stack in STACKS.items():
        start = next(i for i, f in enumerate(stack) if f.filename.endswith("run.py"))
        frames = stack[start:]
        while frames and frames[-1].name == "loss_fn":
            frames.pop()
        files = {f.filename for f in frames}
        print(f"{kind}: {len(frames)} frames across {len(files)} files")
        for f in frames:
            print(f"    {os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}")


if __name__ == "__main__":
    training.cross_entropy = _recording(training.cross_entropy)
    try:
        app.run(run.main)
    finally:
        report()
