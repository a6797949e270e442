"""A config file of one's own: Fig. 1 with the method of `my_method.py` and the model of
`my_model.py`, next to l2r's SGD and EWC. The runner loads a config file by executing it, so
importing the two files here registers them in every process the runner starts:

    python -m experiments.run --config=examples/my_config.py:smoke --workdir=/tmp/l2r_example
    l2r-run --config=examples/my_config.py:smoke --workdir=/tmp/l2r_example \
        --config.task_b.l2_pull.coef=0.3 --config.model.name=convnet

The preset (`:smoke`, `:cpu`, ...) is that of `l2r/configs/fig1.py`; every field can be
overridden as usual, the user's group `task_b.l2_pull` included.
"""

import os
import sys

# This folder's modules by their file names, wherever the runner is started from.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import my_method  # noqa: E402, F401  (registers the method "l2_pull" and task_b.l2_pull)
import my_model  # noqa: E402, F401  (registers the model "my_mlp")

from l2r.configs import fig1  # noqa: E402


def get_config(arg=None):
    c = fig1.get_config(arg or "smoke")  # Built after the imports: it has task_b.l2_pull.
    c.task_b.methods = ("sgd", "ewc", "l2_pull")  # The user's method next to two built-ins.
    c.model.name = "my_mlp"  # The user's backbone (convnet, resnet: l2r's).
    return c
