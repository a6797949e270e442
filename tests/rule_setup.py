"""A workdir after a tiny meta-training (generated data, two windows, a checkpoint after each),
as `l2r-run` leaves it for `l2r.load_rule`: `meta/<key>/<window>/` and `config.json`. Built once
per test process and shared by the tests that read it (they must not change it)."""

import functools
import os
from typing import Any, NamedTuple

from smoke_setup import tiny

from l2r import workdir as workdir_lib
from l2r.meta import loop


class MetaWorkdir(NamedTuple):
    path: str
    config: Any
    model: Any
    run: loop.MetaRun
    state: Any  # the final MetaState


@functools.cache
def meta_workdir(root: str) -> MetaWorkdir:
    """Meta-trains the `tiny` problem in `root` (one 1-step window per checkpoint: the cheapest
    program to compile) and writes `config.json` as a finished run does."""
    os.makedirs(root, exist_ok=True)
    config, model, pretrained, data_a, data_b = tiny(
        max_windows=2, checkpoint_minutes=0.0, tbptt=1, tbptt_max=1, update_every_step=False,
        num_episodes_parallel=1,
    )  # fmt: skip
    run, state, _ = loop.meta_train(config, model, pretrained, data_a, data_b,
                                    os.path.join(root, "meta"))  # fmt: skip
    workdir_lib.write_json_atomic(os.path.join(root, "config.json"), config.to_dict())
    return MetaWorkdir(root, config, model, run, state)
