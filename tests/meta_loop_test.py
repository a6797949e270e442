"""The host loop: resume gives the same numbers, one trace per window length, checkpoints keyed
by the run's hyper-parameters (a changed one starts afresh, a raised budget resumes), and the
Exp-1 pipeline end to end (generated data)."""

import os

import chex
import jax
import numpy as np
import pytest
from smoke_setup import tiny

from l2r.meta import episodes, loop


@pytest.fixture(scope="module")
def setup():
    config, model, pretrained, data_a, data_b = tiny()
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    return config, model, pretrained, data_a, data_b, run


def _with(config, **meta):
    config = config.copy_and_resolve_references()
    config.meta.update(meta)
    return config


def _only_dir(path):
    (name,) = os.listdir(path)
    return name


def test_resumed_run_reaches_the_same_theta(setup, tmp_path):
    config, model, _, _, _, run = setup

    def train(windows, where):
        return loop.meta_train(_with(config, max_windows=windows), model, None, None, None,
                               str(tmp_path / where), run=run)  # fmt: skip

    _, straight, _ = train(4, "straight")
    _, half, _ = train(2, "resumed")  # "killed" after 2 windows, checkpointed
    assert int(half.window) == 2
    _, resumed, history = train(4, "resumed")
    assert int(resumed.window) == 4 and len(history["loss"]) == 4
    chex.assert_trees_all_close(resumed.theta, straight.theta, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(resumed.episodes.id, straight.episodes.id)
    # One trace (one compilation) per T-BPTT length, however many windows ran.
    assert dict(run.traces) == {config.meta.tbptt: 1}, run.traces


def test_changed_hyperparameters_start_afresh_and_a_raised_budget_resumes(setup, tmp_path):
    config, model, pretrained, data_a, data_b, run = setup
    meta = str(tmp_path / "meta")
    _, first, _ = loop.meta_train(_with(config, max_windows=1), model, None, None, None, meta,
                                  run=run)  # fmt: skip
    key = _only_dir(meta)
    assert key == loop.run_key(config, run) and int(first.window) == 1
    # A raised budget (windows, episodes, minutes) resumes the same run.
    raised = _with(config, max_windows=2, episodes=2000, max_minutes=60.0)
    _, state, history = loop.meta_train(raised, model, None, None, None, meta, run=run)
    assert _only_dir(meta) == key and int(state.window) == 2 and len(history["loss"]) == 2
    # A changed hyper-parameter starts afresh in its own folder, whatever its shapes.
    for change in (dict(learning_rate=0.5), dict(hidden_kernel=2)):
        changed = _with(config, max_windows=1, **change)
        run, state, history = loop.meta_train(changed, model, pretrained, data_a, data_b, meta)
        assert len(history["loss"]) == 1, change  # started at window 0
        assert run.lr == config.task_b.learning_rate
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.theta))
    assert len(os.listdir(meta)) == 3
