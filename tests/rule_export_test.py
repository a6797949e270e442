"""l2r.rule: a meta-trained rule in one's own optax loop takes the very steps of l2r's learned
method, and `load_rule` restores the θ that meta-training saved in a workdir."""

import logging
import os
import shutil

import chex
import jax
import numpy as np
import optax
import pytest
from rule_setup import meta_workdir
from smoke_setup import tiny

import l2r
from l2r import models, training
from l2r.meta import episodes, loop
from l2r.methods.base import Batch
from l2r.methods.learned import make_learned

STEPS = 6


@pytest.fixture(scope="module")
def problem():
    config, model, pretrained, _, data_b = tiny()
    ml = episodes.make_metalearner(config.meta, model, data_b.train_images.shape)
    # θ off its initialisation (where δ ≡ 1, plain SGD, which would prove little): δ then
    # depends on the weights, gradients, taps and the LSTM memory.
    leaves, treedef = jax.tree.flatten(ml.init(jax.random.key(1)))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    rule = l2r.Rule(ml, jax.tree.unflatten(treedef, noisy), config.task_b.learning_rate)
    net = jax.tree.map(lambda a: a[0], pretrained)
    head_b = models.init_head(jax.random.key(3), model.representation_dim, 3)
    network = {"backbone": net["backbone"], "head_a": net["head"], "head_b": head_b}
    idx = np.random.default_rng(0).integers(0, 32, (STEPS, 4))
    x, y = jax.vmap(lambda i: training.gather(data_b, i))(idx)
    return model, rule, network, x, y


def l2r_trajectory(model, rule, network, x, y):
    """The networks after each step of l2r's learned method (a scan, as the Task-B runner)."""
    method = make_learned(model, rule.ml, rule.theta, rule.learning_rate)

    def body(state, batch):
        state, _ = method.step(state, Batch(*batch), None)
        return state, method.network(state)

    return jax.jit(lambda n: jax.lax.scan(body, method.init(n, None, None), (x, y))[1])(network)


def user_step(model, tx):
    """A user's own jitted training step: their loss, `tx.update` with the taps, apply."""

    def loss_fn(network, x, y):
        out = model.apply(network["backbone"], x, taps=True)
        logits = models.apply_head(network["head_b"], out.representation)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), out.taps

    @jax.jit
    def step(network, opt_state, x, y):
        (_, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(network, x, y)
        updates, opt_state = tx.update(grads, opt_state, network, taps=taps)
        return optax.apply_updates(network, updates), opt_state

    return step


def test_an_optax_loop_takes_the_learned_methods_steps(problem):
    model, rule, network, x, y = problem
    expected = l2r_trajectory(model, rule, network, x, y)
    tx = l2r.as_optax(rule)
    step, opt_state, got = user_step(model, tx), tx.init(network), []
    for i in range(STEPS):
        network_i = network if i == 0 else got[-1]
        new, opt_state = step(network_i, opt_state, x[i], y[i])
        got.append(new)
    got = jax.tree.map(lambda *a: np.stack(a), *got)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(got["head_a"], expected["head_a"])  # not in the loss: unmoved
    # The rule is not plain SGD here: SGD at the same rate ends elsewhere.
    sgd = optax.sgd(rule.learning_rate)
    sgd_step, sgd_state, sgd_net = user_step(model, sgd), sgd.init(network), network
    for i in range(STEPS):
        sgd_net, sgd_state = sgd_step(sgd_net, sgd_state, x[i], y[i])
    gap = jax.tree.map(lambda a, b: np.max(np.abs(a[-1] - b)), got["backbone"], sgd_net["backbone"])
    assert max(jax.tree.leaves(gap)) > 1e-3, gap


def test_the_backbone_alone_and_a_chain_give_the_same_step(problem):
    model, rule, network, x, y = problem
    step = user_step(model, l2r.as_optax(rule))
    full, _ = step(network, l2r.as_optax(rule).init(network), x[0], y[0])
    chained_tx = optax.chain(optax.clip_by_global_norm(1e9), l2r.as_optax(rule))
    chained, _ = user_step(model, chained_tx)(network, chained_tx.init(network), x[0], y[0])
    chex.assert_trees_all_close(chained, full, rtol=1e-6, atol=1e-7)
    # Backbone only (heads left to another optimiser): the same backbone step.
    alone = l2r.as_optax(rule, backbone=None)
    out = model.apply(network["backbone"], x[0], taps=True)
    grads = jax.grad(lambda b: jax.numpy.sum(model.apply(b, x[0]).representation))(
        network["backbone"]
    )
    u_alone, _ = alone.update(grads, alone.init(network["backbone"]), network["backbone"],
                              taps=out.taps)  # fmt: skip
    tx = l2r.as_optax(rule)
    full_grads = {**jax.tree.map(np.zeros_like, network), "backbone": grads}
    u_full, _ = tx.update(full_grads, tx.init(network), network, taps=out.taps)
    chex.assert_trees_all_close(u_alone, u_full["backbone"], rtol=1e-6, atol=1e-7)


def test_missing_taps_or_backbone_are_named(problem):
    _, rule, network, _, _ = problem
    tx = l2r.as_optax(rule)
    with pytest.raises(ValueError, match="taps"):
        tx.update(network, tx.init(network), network)
    with pytest.raises(ValueError, match="no 'backbone' entry"):
        tx.init(network["backbone"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return meta_workdir(str(tmp_path_factory.getbasetemp() / "meta_workdir"))


def test_load_rule_returns_the_saved_theta(saved):
    (key,) = os.listdir(os.path.join(saved.path, "meta"))
    meta = os.path.join(saved.path, "meta")
    for path in (saved.path, meta, os.path.join(meta, key)):
        rule = l2r.load_rule(path)
        chex.assert_trees_all_equal(rule.theta, saved.state.theta)
        assert rule.ml == saved.run.ml and rule.learning_rate == saved.run.lr
    given = l2r.load_rule(saved.path, (8, 8, 1), config=saved.config, model=saved.model, key=key)
    chex.assert_trees_all_equal(given.theta, saved.state.theta)
    assert given.ml == saved.run.ml
    with pytest.raises(ValueError, match="does not fit"):
        l2r.load_rule(saved.path, (8, 8, 3))
    with pytest.raises(FileNotFoundError, match="run 'nope'"):
        l2r.load_rule(saved.path, key="nope")


def test_a_damaged_checkpoint_is_passed_over_and_kept(saved, tmp_path, caplog):
    work = str(shutil.copytree(saved.path, tmp_path / "work"))
    (key,) = os.listdir(os.path.join(work, "meta"))
    run_dir = os.path.join(work, "meta", key)
    assert sorted(os.listdir(run_dir)) == ["1", "2"]
    # θ after the first window, from the same compiled run.
    one = saved.config.copy_and_resolve_references()
    one.meta.max_windows = 1
    _, first, _ = loop.meta_train(one, saved.model, None, None, None, str(tmp_path / "one"),
                                  run=saved.run)  # fmt: skip
    state_dir = os.path.join(run_dir, "2", "state")
    name = max((os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs),
               key=os.path.getsize)  # fmt: skip
    with open(name, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 16)
    with caplog.at_level(logging.WARNING):
        rule = l2r.load_rule(work)
    chex.assert_trees_all_equal(rule.theta, first.theta)
    assert "passed over" in caplog.text and os.path.isdir(os.path.join(run_dir, "2"))
    os.remove(os.path.join(work, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        l2r.load_rule(work)
    chex.assert_trees_all_equal(l2r.load_rule(work, config=saved.config).theta, first.theta)
