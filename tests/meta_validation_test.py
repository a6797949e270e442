"""Meta-validation: held-out data the episodes never see, the best-scoring θ kept through a
resume, and the Exp-1 pipeline meta-testing that θ."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from smoke_setup import tiny

from l2r.config_checks import ConfigError
from l2r.configs import exp1, exp2, exp5
from l2r.meta import episodes, loop, validation
from l2r.pipelines import three_tasks, transfer


def _rows(split):
    """Each example's image as bytes (n-way tasks relabel), to test sets for overlap."""
    images = np.asarray(split.images).reshape(len(split.labels), -1)
    return {im.tobytes() for im in images}


def _same(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.allclose(x, y) for x, y in pairs)


@pytest.mark.parametrize("experiment", [exp1, exp2])
def test_held_out_examples_are_training_examples_the_episodes_never_see(experiment):
    config = experiment.get_config("smoke")
    config.meta.validate_every, config.meta.validate_fraction = 1, 0.25
    task_a, meta_plan, _, _ = transfer.load(config)
    held = validation.carve(config, task_a, meta_plan.meta_train, meta_plan.class_table)
    meta_train = meta_plan.meta_train
    kept = _rows(held.meta_train.train)
    original = _rows(meta_train.train)
    assert kept < original and len(kept) > 0
    assert held.task_a.train.images.shape[1:] == task_a.train.images.shape[1:]
    for (task,) in held.tasks_b:
        val = _rows(task.test)
        assert val and val <= original and not val & kept  # Held out from the episodes.
        assert not val & _rows(meta_train.test)  # No test example, and no meta-test one:
        for test_task in meta_plan.meta_test:
            assert not val & _rows(test_task.train) and not val & _rows(test_task.test)
        assert _rows(task.train) <= kept
    a_val = _rows(held.task_a.test)
    assert a_val <= _rows(task_a.train) and not a_val & _rows(held.task_a.train)
    assert not a_val & _rows(task_a.test)
    if meta_plan.class_table is not None:  # n-way tasks of the meta-training pool.
        assert len(held.tasks_b) == config.meta.validate_tasks
        assert all(t.num_classes == config.pools.n_way for (t,) in held.tasks_b)
    # Deterministic: the same examples every time.
    again = validation.carve(config, task_a, meta_plan.meta_train, meta_plan.class_table)
    assert _rows(again.tasks_b[0][0].test) == _rows(held.tasks_b[0][0].test)


def test_exp5_validation_pairs_come_from_the_held_out_pool_examples():
    config = exp5.get_config("smoke")
    config.meta.validate_every, config.meta.validate_tasks = 1, 3
    seq, _, _ = three_tasks.load(config)
    held = validation.carve(config, seq.task_1, seq.meta_train, pair_table=seq.pair_table)
    kept, original = _rows(held.meta_train.train), _rows(seq.meta_train.train)
    assert len(held.tasks_b) == 3
    for task_2, task_3 in held.tasks_b:
        for task in (task_2, task_3):
            assert task.num_classes == config.pools.n_way
            val = _rows(task.test)
            assert val and val <= original and not val & kept
        if config.pools.disjoint_tasks:
            assert not set(task_2.class_names) & set(task_3.class_names)
    assert _rows(held.task_a.test) <= _rows(seq.task_1.train)


@pytest.mark.parametrize("field,value", [("validate_fraction", 1.0), ("validate_seeds", 0),
                                         ("validate_every", -1)])  # fmt: skip
def test_bad_meta_validation_settings_are_refused_with_the_field_named(field, value):
    config = exp1.get_config("smoke")
    config.meta.validate_every = 2
    config.meta[field] = value
    with pytest.raises(ConfigError, match=f"meta.{field}"):
        transfer.check_config(config)


def test_the_best_scored_theta_is_kept_and_survives_a_resume(tmp_path):
    config, model, pretrained, data_a, data_b = tiny(validate_every=2, max_windows=6)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    scores, seen = iter([0.4, 0.9, 0.2, 0.5]), []

    def validate(ml, theta, lr):
        seen.append(theta)
        return next(scores)

    workdir = str(tmp_path / "meta")
    half = config.copy_and_resolve_references()
    half.meta.max_windows = 4  # "Killed" after window 4 (validated at 2 and 4), checkpointed.
    loop.meta_train(half, model, None, None, None, workdir, run=run, validate=validate)
    assert len(seen) == 2
    run.best_theta = None
    _, state, history = loop.meta_train(config, model, None, None, None, workdir, run=run,
                                        validate=validate)  # fmt: skip
    assert history["validation_window"] == [2, 4, 6]
    np.testing.assert_allclose(history["validation_score"], [0.4, 0.9, 0.2])
    assert len(seen) == 3  # Windows 2 and 4 were not scored again.
    chex.assert_trees_all_close(run.best_theta, seen[1])  # Window 4's θ, restored.
    assert not _same(seen[1], state.theta)
    # A rerun of the finished run scores nothing and keeps the same θ.
    run.best_theta = None
    loop.meta_train(config, model, None, None, None, workdir, run=run, validate=validate)
    assert len(seen) == 3
    chex.assert_trees_all_close(run.best_theta, seen[1])


def test_scorer_is_the_average_last_step_readout_of_a_and_b(tmp_path):
    """The score equals the mean of readout A and B at the last step of the same comparison
    run by hand; a θ with non-finite entries scores 0 for its diverged runs."""
    config = exp1.get_config("smoke")
    config.meta.validate_every, config.meta.validate_seeds = 1, 2
    config.meta.validate_steps = 4
    task_a, meta_plan, mean, std = transfer.load(config)
    from l2r import compare, pretrain
    from l2r.methods import registry
    from l2r.methods.learned import Rule
    from l2r.models import registry as model_registry

    model = model_registry.from_config(config.model)
    data_a = transfer.training.to_device(task_a, mean, std)
    nets, _, _ = pretrain.pretrained_networks(config, model, data_a, str(tmp_path))
    held = validation.carve(config, task_a, meta_plan.meta_train)
    scorer = validation.Scorer(config, model, nets, held, mean, std)
    data_b = transfer.training.to_device(held.meta_train, mean, std)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, nets, data_a, data_b))
    theta = run.ml.init(jax.random.key(3))
    score = scorer(run.ml, theta, run.lr)
    cfg = validation.validation_config(config)
    method = registry.build("learned", model, cfg.task_b,
                            registry.Context(rule=Rule(run.ml, theta, run.lr)))  # fmt: skip
    out = compare.compare(cfg, model, nets, [held.task_a, *held.tasks_b[0]], mean, std, [method])
    hist = out["methods"]["learned"]
    assert out["steps"][-1] == 4 and len(hist["readout_A"]) == 2
    expected = (np.asarray(hist["readout_A"])[:, -1] + np.asarray(hist["readout_B"])[:, -1]) / 2
    np.testing.assert_allclose(score, expected.mean(), rtol=1e-6)
    blown = jax.tree.map(lambda x: x * np.nan, theta)
    assert scorer(run.ml, blown, run.lr) == 0.0


@pytest.mark.slow
def test_exp1_smoke_meta_tests_the_theta_meta_validation_kept(tmp_path, monkeypatch):
    config = exp1.get_config("smoke")
    config.meta.max_windows, config.meta.validate_every = 5, 2
    config.task_b.methods = ("learned",)
    trained, rules = [], []
    meta_train, make_rule = loop.meta_train, transfer.Rule

    def spy_meta_train(*args, **kwargs):
        trained.append(meta_train(*args, **kwargs))
        return trained[-1]

    def spy_rule(ml, theta, lr):
        rules.append(theta)
        return make_rule(ml, theta, lr)

    monkeypatch.setattr(transfer.loop, "meta_train", spy_meta_train)
    monkeypatch.setattr(transfer, "Rule", spy_rule)
    results = transfer.run(config, str(tmp_path))
    meta = results["meta"]
    last = meta["window"][-1]
    expected = sorted({*range(2, last + 1, 2), last})
    assert meta["validation_window"] == expected and len(meta["validation_score"]) == len(expected)
    saved = json.loads(open(os.path.join(tmp_path, "results.json")).read())
    assert saved["meta"]["validation_score"] == meta["validation_score"]
    ((run, state, _),), theta = trained, rules[0]  # The meta-test's rule (figures: the same).
    chex.assert_trees_all_close(theta, run.best_theta)
    if np.argmax(meta["validation_score"]) < len(expected) - 1:  # Not the last window's θ:
        assert not _same(theta, state.theta)


@pytest.mark.slow
def test_exp5_smoke_runs_with_meta_validation(tmp_path, monkeypatch):
    config = exp5.get_config("smoke")
    config.meta.validate_every = 2
    config.task_b.methods = ("learned",)
    trained = []
    meta_train = loop.meta_train

    def spy(*args, **kwargs):
        trained.append(meta_train(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(three_tasks.loop, "meta_train", spy)
    results = three_tasks.run(config, str(tmp_path))
    meta = results["meta"]
    last = meta["window"][-1]
    assert meta["validation_window"] == sorted({*range(2, last + 1, 2), last})
    assert all(0.0 <= v <= 1.0 for v in meta["validation_score"])
    ((run, _, _),) = trained
    assert run.best_theta is not None


def test_a_checkpoint_saved_without_validation_resumes_with_it(tmp_path):
    """A run checkpointed by a caller that did not validate is resumed, not discarded."""
    config, model, pretrained, data_a, data_b = tiny(validate_every=2, max_windows=4)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    first = config.copy_and_resolve_references()
    first.meta.max_windows = 2
    workdir = str(tmp_path / "meta")
    loop.meta_train(first, model, None, None, None, workdir, run=run)  # No validate.
    _, state, history = loop.meta_train(config, model, None, None, None, workdir, run=run,
                                        validate=lambda ml, theta, lr: 0.5)  # fmt: skip
    assert int(state.window) == 4 and len(history["loss"]) == 4  # Resumed at window 2.
    assert history["validation_window"] == [4]
    chex.assert_trees_all_close(run.best_theta, state.theta)


def test_load_rule_returns_the_theta_meta_validation_kept(tmp_path):
    import l2r

    config, model, pretrained, data_a, data_b = tiny(validate_every=1, max_windows=3)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    scores = iter([0.3, 0.8, 0.1])  # Window 2's θ is the best.
    workdir = str(tmp_path / "meta")
    _, state, _ = loop.meta_train(config, model, None, None, None, workdir, run=run,
                                  validate=lambda ml, theta, lr: next(scores))  # fmt: skip
    rule = l2r.load_rule(workdir, (8, 8, 1), config=config, model=model)
    chex.assert_trees_all_close(rule.theta, run.best_theta)
    assert not _same(rule.theta, state.theta)


def test_a_damaged_best_theta_falls_back_to_the_checkpoint_before(tmp_path, caplog):
    """The best θ is checked against its digest like the state: a damaged one discards its
    checkpoint (one warning) and the run resumes from the one before."""
    import logging

    config, model, pretrained, data_a, data_b = tiny(validate_every=1, max_windows=2,
                                                     checkpoint_minutes=0.0)  # fmt: skip
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    workdir = str(tmp_path / "meta")
    loop.meta_train(config, model, None, None, None, workdir, run=run,
                    validate=lambda ml, theta, lr: 0.5)  # fmt: skip
    (key,) = os.listdir(workdir)
    best_dir = os.path.join(workdir, key, "2", "best")
    name = max((os.path.join(r, f) for r, _, fs in os.walk(best_dir) for f in fs),
               key=os.path.getsize)  # fmt: skip
    with open(name, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 16)
    like = run.init()
    with caplog.at_level(logging.WARNING):
        state, history, best = loop._restore_latest(
            ocp_manager(os.path.join(workdir, key)), like, os.path.join(workdir, key), best=True
        )
    assert int(state.window) == 1 and history["validation_window"] == [1]
    chex.assert_trees_all_equal(best, state.theta)  # Window 1: its θ was the best then.
    assert sum("Damaged meta-training checkpoint" in r.getMessage() for r in caplog.records) == 1


def ocp_manager(path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def test_meta_validation_keeps_the_theta_a_brute_force_loop_over_checkpoints_picks(tmp_path):
    """Scored every window by the real scorer, the kept θ is the one a brute-force loop picks:
    the same meta-training stopped after 1, 2, 3, 4 windows (each stage resuming from the
    previous stage's Orbax checkpoint), each checkpoint's θ scored afresh, the argmax taken."""
    config = exp1.get_config("smoke")
    config.meta.validate_every, config.meta.validate_seeds = 1, 2
    config.meta.validate_steps, config.meta.max_windows = 4, 4
    config.meta.episodes = 1000  # The window budget, not the episodes, ends the run.
    task_a, meta_plan, mean, std = transfer.load(config)
    from l2r import pretrain
    from l2r.models import registry as model_registry

    model = model_registry.from_config(config.model)
    data_a = transfer.training.to_device(task_a, mean, std)
    nets, _, _ = pretrain.pretrained_networks(config, model, data_a, str(tmp_path / "pre"))
    held = validation.carve(config, task_a, meta_plan.meta_train)
    scorer = validation.Scorer(config, model, nets, held, mean, std)
    data_b = transfer.training.to_device(held.meta_train, mean, std)

    def new_run():
        return loop.MetaRun(config, model, episodes.two_tasks(config, model, nets, data_a,
                                                              data_b))  # fmt: skip

    run = new_run()
    _, _, history = loop.meta_train(config, model, None, None, None, str(tmp_path / "a"),
                                    run=run, validate=scorer)  # fmt: skip
    assert history["validation_window"] == [1, 2, 3, 4]

    thetas, scores = [], []
    for windows in range(1, 5):
        stage = config.copy_and_resolve_references()
        stage.meta.max_windows = windows
        _, state, _ = loop.meta_train(stage, model, None, None, None, str(tmp_path / "b"),
                                      run=new_run())  # fmt: skip
        assert int(state.window) == windows
        thetas.append(state.theta)
        scores.append(scorer(run.ml, state.theta, run.lr))
    np.testing.assert_allclose(history["validation_score"], scores, rtol=1e-6)
    chex.assert_trees_all_close(run.best_theta, thetas[int(np.argmax(scores))])
