"""Algorithm 1: curriculum, the student at δ ≡ 1, T-BPTT meta-steps against a Python-loop
reference, non-finite guards, resume, and the Exp-1 pipeline end to end (generated data)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import common, exp1
from l2r import forgetting, meta_train, pretrain, remember, training
from l2r import workdir as workdir_lib
from l2r.methods import Batch, make_sgd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = exp1.get_config("smoke")
    task_a, task_b, mean, std = forgetting.build_tasks(config)
    model = forgetting.make_model(config)
    data_a = training.to_device(task_a, mean, std)
    data_b = training.to_device(task_b, mean, std)
    work = tmp_path_factory.mktemp("meta")
    pretrained, _, _ = pretrain.pretrained_networks(config, model, data_a, str(work))
    trainer = meta_train.MetaTrainer(config, model, pretrained, data_a, data_b)
    return config, model, pretrained, data_a, data_b, trainer


def test_curriculum_follows_the_paper():
    cfg = common.meta_config()  # §5 Exp 1: 20 / 5, +5 / +2 every 300 episodes, up to 30 / 9.
    assert meta_train.curriculum(cfg, 0) == (20.0, 5)
    assert meta_train.curriculum(cfg, 299) == (20.0, 5)
    assert meta_train.curriculum(cfg, 300) == (25.0, 7)
    assert meta_train.curriculum(cfg, 600) == (30.0, 9)
    assert meta_train.curriculum(cfg, 10_000) == (30.0, 9)


def test_student_at_initial_theta_is_sgd(setup):
    """With θ at its initialisation (δ ≡ 1) the re-run student is plain SGD on B."""
    config, model, _, _, data_b, trainer = setup
    state = trainer.init()
    idx_a, idx_b = trainer.batches(0, 3)
    eps = jax.tree.map(lambda a: a[0], state.episodes)
    h = jnp.zeros((3, idx_a.shape[-1] + idx_b.shape[-1], model.representation_dim))
    _, (student, _) = jax.jit(trainer._student_loss, static_argnums=9)(
        trainer.inputs, state.theta, eps.student, eps.lstm, idx_a[0], idx_b[0], eps.classes, h,
        3, 3,
    )  # fmt: skip
    sgd = make_sgd(model, config.task_b.learning_rate)
    network = eps.student
    for t in range(3):
        x_b, y_b = training.gather(data_b, idx_b[0, t])
        network, _ = sgd.step(network, Batch(x_b, y_b), None)
    chex.assert_trees_all_close(student, network, rtol=1e-5, atol=1e-6)


def test_every_step_meta_updates_match_a_python_loop(setup):
    """The compiled window equals: for k = 1..s, grad of L_k through k re-run steps, Adam."""
    config, _, _, _, _, trainer = setup
    state = trainer.init()
    threshold, s = meta_train.curriculum(config.meta, 0)
    new_state, metrics = trainer.run_window(state)[:2]

    idx_a, idx_b, h = _first_window(trainer, state, s)
    eps = state.episodes

    def loss(theta, k):
        per_episode = jax.vmap(
            lambda st, mem, ia, ib, cl, h_e: trainer._student_loss(
                trainer.inputs, theta, st, mem, ia, ib, cl, h_e, k, s
            )[0]
        )(eps.student, eps.lstm, idx_a, idx_b, eps.classes, h)
        return jnp.mean(per_episode), per_episode

    grad = jax.jit(jax.grad(loss, has_aux=True))
    theta, opt_state = state.theta, state.opt_state
    for k in range(1, s + 1):
        g, per_episode = grad(theta, jnp.int32(k))
        assert np.all(np.asarray(per_episode) <= threshold)  # no restart in this window
        updates, opt_state = trainer.opt.update(g, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
    chex.assert_trees_all_close(new_state.theta, theta, rtol=2e-4, atol=1e-6)
    assert _changed(theta, state.theta)
    assert int(new_state.window) == 1 and int(new_state.skipped) == 0
    assert np.isfinite(float(metrics["loss"]))


def test_non_finite_loss_never_reaches_theta(setup):
    _, _, _, _, _, trainer = setup
    state = trainer.init()
    # Episode 0's student is broken: its loss is NaN from the first step.
    broken = jax.tree.map(lambda a: a.at[0].set(jnp.nan), state.episodes.student["backbone"])
    student = {**state.episodes.student, "backbone": broken}
    state = state._replace(episodes=state.episodes._replace(student=student))
    new_state, metrics = trainer.run_window(state)[:2]
    assert int(new_state.skipped) == 1  # only k = 1; from k = 2 the episode is masked
    assert bool(metrics["restarted"][0]) and not bool(metrics["restarted"][1])
    for leaf in jax.tree.leaves(new_state.theta):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # The broken episode was replaced by a fresh one (a new id, finite weights).
    assert int(new_state.episodes.id[0]) == trainer.cfg.num_episodes_parallel
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(new_state.episodes.student)[0][0])))


def test_resumed_run_reaches_the_same_theta(setup, tmp_path):
    config, model, pretrained, data_a, data_b, trainer = setup
    run = lambda windows, ckpt: meta_train.meta_train(  # noqa: E731
        _with(config, windows), model, pretrained, data_a, data_b, str(ckpt), trainer
    )
    _, straight, _ = run(4, tmp_path / "straight")
    _, half, _ = run(2, tmp_path / "resumed")  # "killed" after 2 windows, checkpointed
    assert int(half.window) == 2
    _, resumed, history = run(4, tmp_path / "resumed")
    assert int(resumed.window) == 4 and len(history["loss"]) == 4
    chex.assert_trees_all_close(resumed.theta, straight.theta, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(resumed.episodes.id, straight.episodes.id)


def _first_window(trainer, state, s):
    """The first window's batches and the teacher's representations along it [E, s, B, D]."""
    idx_a, idx_b = trainer.batches(0, s)
    teacher = jax.vmap(trainer._teacher_window, (None, 0, 0, 0, 0))
    eps = state.episodes
    return idx_a, idx_b, teacher(trainer.inputs, eps.teacher, idx_a, idx_b, eps.classes)[1]


def _changed(new, old) -> bool:
    """Whether θ moved (only the output layers get a gradient at the very first step)."""
    pairs = zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
    return any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in pairs)


def _with(config, max_windows):
    config = config.copy_and_resolve_references()
    config.meta.max_windows = max_windows
    config.meta.episodes = 1000
    return config


@pytest.mark.slow
def test_exp1_smoke_pipeline_writes_every_artefact(tmp_path):
    config = exp1.get_config("smoke")
    with workdir_lib.locked(str(tmp_path)):
        results = remember.run(config, str(tmp_path))
    for name in ("config.json", "results.json", "results.md", "exp1_task_A.png",
                 "exp1_task_B.png", "fig6_curriculum.png", "fig7_delta.png"):  # fmt: skip
        assert os.path.getsize(tmp_path / name) > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["methods"]) == {"sgd", "sgd_x0.1", "teacher", "learned"}
    # Meta-training stopped by its own rule: the window budget, or enough finished episodes.
    history = saved["meta"]
    finished = history["episodes_done"][-1] >= config.meta.episodes
    assert len(history["loss"]) == config.meta.max_windows or finished, history
    assert len(history["loss"]) <= config.meta.max_windows
    assert results["steps"][-1] == config.task_b.steps


def test_per_window_variant_is_one_truncated_unroll(setup):
    """update_every_step=False: one Adam step on the mean of L_1..L_s of a single unroll with
    the window's starting θ; the carried student is that unroll's last state."""
    config, model, pretrained, data_a, data_b, _ = setup
    config = config.copy_and_resolve_references()
    config.meta.update_every_step = False
    trainer = meta_train.MetaTrainer(config, model, pretrained, data_a, data_b)
    state = trainer.init()
    _, s = meta_train.curriculum(config.meta, 0)
    new_state, metrics = trainer.run_window(state)[:2]

    idx_a, idx_b, h = _first_window(trainer, state, s)
    eps = state.episodes
    loss = jax.jit(trainer._student_loss, static_argnums=9)
    per_k = [
        jax.vmap(lambda st, mem, ia, ib, cl, h_e, k=k: loss(trainer.inputs, state.theta, st, mem,
                                                             ia, ib, cl, h_e, k, s))(
            eps.student, eps.lstm, idx_a, idx_b, eps.classes, h)
        for k in range(1, s + 1)
    ]  # fmt: skip
    expected = np.mean([np.asarray(losses) for losses, _ in per_k])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)
    chex.assert_trees_all_close(new_state.episodes.student, per_k[-1][1][0], rtol=1e-4, atol=1e-6)
    assert int(new_state.skipped) == 0
    assert _changed(new_state.theta, state.theta)


def test_n_way_episodes_learn_their_own_classes(setup):
    """Exps 2-4: episode i learns the classes of row i % T of the class table; its batches hold
    only those classes, relabelled 0..n_way-1 in row order, and its teacher learns them."""
    config, model, pretrained, data_a, data_b, _ = setup
    table = np.array([[2, 0], [1, 2]], np.int32)  # two 2-way tasks of data_b's 3 classes
    trainer = meta_train.MetaTrainer(config, model, pretrained, data_a, data_b, table)
    state = trainer.init()
    e = config.meta.num_episodes_parallel
    np.testing.assert_array_equal(state.episodes.classes, table[np.arange(e) % 2])
    idx_a, idx_b = trainer.batches(0, 3, np.asarray(state.episodes.classes))
    labels = np.asarray(data_b.train_labels)
    for e, row in enumerate(table):
        assert set(np.unique(labels[idx_b[e]])) <= set(row.tolist())
        _, y = trainer._gather_b(trainer.inputs, idx_b[e, 0], jnp.asarray(row))
        np.testing.assert_array_equal(np.asarray(y), np.argmax(labels[idx_b[e, 0]][:, None] == row,
                                                               axis=1))  # fmt: skip
    assert state.episodes.student["head_b"]["kernel"].shape[-1] == 2
    new_state, metrics = trainer.run_window(state)[:2]
    assert np.isfinite(float(metrics["loss"])) and int(new_state.skipped) == 0


def test_restart_rule_follows_algorithm_1(setup):
    """An episode whose loss exceeds the threshold restarts from w0 (a fresh id, its LSTM state
    zeroed) at the window's end and counts as a restart; one that reached `meta.inner_steps`
    ends too, without counting as a restart; the others carry on."""
    config, _, _, _, _, trainer = setup
    state = trainer.init()
    _, s = meta_train.curriculum(config.meta, 0)
    idx_a, idx_b = trainer.batches(0, s)
    window = trainer._window_fn(s)
    e = config.meta.num_episodes_parallel
    # Threshold 0: every loss exceeds it, so every episode restarts.
    new, metrics = window(state, trainer.inputs, idx_a, idx_b, jnp.float32(0.0))
    assert np.all(np.asarray(metrics["restarted"]))
    assert int(new.restarts) == e and int(new.episodes_done) == e
    np.testing.assert_array_equal(new.episodes.id, np.arange(e, 2 * e))
    fresh = jax.jit(trainer._fresh)(trainer.inputs, new.episodes.id)
    chex.assert_trees_all_equal(new.episodes.student, fresh.student)
    chex.assert_trees_all_equal(new.episodes.lstm, fresh.lstm)
    assert np.all(np.asarray(new.episodes.step) == 0)
    # A huge threshold: nobody restarts; the students moved on and count s steps.
    kept, metrics = window(state, trainer.inputs, idx_a, idx_b, jnp.float32(1e9))
    assert not np.any(np.asarray(metrics["restarted"])) and int(kept.restarts) == 0
    np.testing.assert_array_equal(kept.episodes.step, np.full(e, s))
    np.testing.assert_array_equal(kept.episodes.id, state.episodes.id)
    # Episodes that reach inner_steps end (new ids) without counting as restarts.
    short = config.copy_and_resolve_references()
    short.meta.inner_steps = s
    trainer.cfg = short.meta
    try:
        trainer._windows.pop(s)
        ended, _ = trainer._window_fn(s)(state, trainer.inputs, idx_a, idx_b, jnp.float32(1e9))
    finally:
        trainer.cfg = config.meta
        trainer._windows.pop(s)
    assert int(ended.restarts) == 0 and int(ended.episodes_done) == e
    np.testing.assert_array_equal(ended.episodes.id, np.arange(e, 2 * e))
