"""meta.history, meta-learner inputs that carry more history (issue 17): a momentum of the
gradient per weight and log(1 + t) / 8 per unit. Plain SGD at initialisation, the momentum and
step count equal to a float64 loop, the LSTM input equal to an independent NumPy construction,
gates that read the history, the same steps through `as_optax`, and a meta-training that runs.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import tiny

import l2r
from l2r import metalearner
from l2r.meta import episodes, loop
from l2r.methods.learned import student_step
from l2r.models import make_model

SHAPE = (4, 8, 8, 3)
LR = 0.1
BETA = 0.9


def _perturb(tree, seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype), tree)


@functools.cache
def _problem(name="convnet", pull=False):
    kwargs = {"convnet": {"widths": (8, 16), "groups": 4, "hidden": 8},
              "resnet": {"depth": 8, "widths": (8, 16, 16), "groups": 4}}[name]  # fmt: skip
    model = make_model(name, **kwargs)
    w = model.init(jax.random.key(0), SHAPE)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    y = jnp.asarray(rng.normal(size=(SHAPE[0], model.representation_dim)), jnp.float32)

    def loss(p):
        out = model.apply(p, x, taps=True)
        return jnp.mean(jnp.square(out.representation - y)), out.taps

    grads, taps = jax.grad(loss, has_aux=True)(w)
    config = metalearner.Config(history=True, pull=pull, hidden_kernel=8, hidden_vector=8)
    return model, w, grads, taps, metalearner.make(w, taps, config)


@pytest.mark.parametrize(("name", "pull"), [("convnet", False), ("resnet", False),
                                            ("convnet", True)])  # fmt: skip
def test_at_initialisation_the_step_is_sgd(name, pull):
    _, w, grads, taps, ml = _problem(name, pull)
    theta = ml.init(jax.random.key(3))
    deltas, pulls, state = ml.gates(theta, ml.start(w), w, grads, taps)
    new = metalearner.update(w, grads, deltas, LR, pulls=pulls, anchor=state.anchor)
    sgd = jax.tree.map(lambda a, g: a - LR * g, w, grads)
    chex.assert_trees_all_close(new, sgd, atol=1e-7, rtol=0)  # δ ≡ 1 up to float rounding.
    assert float(state.step) == 1.0


def test_momentum_and_step_follow_a_float64_loop():
    _, w, grads, taps, ml = _problem()
    theta = _perturb(ml.init(jax.random.key(3)), 4, 0.3)
    state = ml.start(w)
    m64 = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), w)
    for t in range(4):
        g = _perturb(grads, 10 + t, 1e-2)
        _, _, state = ml.gates(theta, state, w, g, taps)
        m64 = jax.tree.map(lambda m, gi: BETA * m + (1 - BETA) * np.asarray(gi, np.float64),
                           m64, g)  # fmt: skip
        assert float(state.step) == t + 1
    got = jax.tree.map(lambda a: np.asarray(a, np.float64), state.momentum)
    chex.assert_trees_all_close(got, m64, rtol=1e-5, atol=1e-9)


def _norm64(x, clip=5.0, eps=1e-8):
    x = np.asarray(x, np.float64)
    return np.clip(x / (np.sqrt(np.mean(x * x)) + eps), -clip, clip)


def test_the_lstm_input_of_a_kernel_equals_numpy():
    _, w, grads, taps, ml = _problem()
    leaf = next(leaf for leaf in ml.leaves if len(leaf.shape) == 4)
    rng = np.random.default_rng(5)
    get = lambda tree: functools.reduce(lambda t, k: t[k], leaf.path, tree)  # noqa: E731
    w_l, g_l = get(w), get(grads)
    m_l = jnp.asarray(rng.normal(size=w_l.shape), jnp.float32)
    t = 37.0
    x = ml._lstm_input(leaf, w_l, g_l, taps[leaf.tap], (m_l,), (jnp.log1p(t) / 8.0,))
    cout = leaf.shape[-1]
    tap = taps[leaf.tap]
    h_in = _norm64(np.asarray(tap.inputs, np.float64).mean(0))
    h_out = _norm64(np.asarray(tap.outputs, np.float64).mean(0))
    cols = [_norm64(a).reshape(-1, cout).T for a in (w_l, g_l, m_l)]
    ref = np.concatenate([*cols, np.tile(h_in, (cout, 1)), h_out[:, None],
                          np.full((cout, 1), np.log1p(t) / 8.0)], axis=1)  # fmt: skip
    assert x.shape == (cout, leaf.in_size) == ref.shape
    np.testing.assert_allclose(np.asarray(x, np.float64), ref, rtol=1e-5, atol=1e-6)


def test_the_gates_read_the_momentum_and_the_step():
    _, w, grads, taps, ml = _problem()
    theta = _perturb(ml.init(jax.random.key(3)), 4, 0.3)
    state = ml.start(w)
    base, _, _ = ml.gates(theta, state, w, grads, taps)
    other_m = state._replace(momentum=_perturb(state.momentum, 6, 1e-2))
    other_t = state._replace(step=jnp.asarray(400.0))
    for changed in (other_m, other_t):
        deltas, _, _ = ml.gates(theta, changed, w, grads, taps)
        pairs = zip(jax.tree.leaves(base), jax.tree.leaves(deltas), strict=True)
        assert not all(np.allclose(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="momentum"):
        ml.gates(theta, state._replace(momentum={"x": jnp.zeros(3)}), w, grads, taps)


def test_the_learned_method_and_as_optax_take_the_same_steps():
    config, model, pretrained, _, data_b = tiny(history=True)
    ml = episodes.make_metalearner(config.meta, model, data_b.train_images.shape)
    assert ml.config.history
    theta = _perturb(ml.init(jax.random.key(1)), 2, 0.3)
    rule = l2r.Rule(ml, theta, config.task_b.learning_rate)
    net = jax.tree.map(lambda a: a[0], pretrained)
    head_b = l2r.models.init_head(jax.random.key(3), model.representation_dim, 3)
    network = {"backbone": net["backbone"], "head_a": net["head"], "head_b": head_b}
    idx = np.random.default_rng(0).integers(0, 32, (3, 4))
    tx = l2r.as_optax(rule)
    opt_state = tx.init(network)
    ours, lstm = network, ml.start(network["backbone"])
    for i in idx:
        x, y = l2r.training.gather(data_b, i)
        ours, lstm, _, _ = student_step(model, ml, theta, rule.learning_rate, ours, lstm, x, y)

        def loss_fn(n, x=x, y=y):
            out = model.apply(n["backbone"], x, taps=True)
            logits = l2r.models.apply_head(n["head_b"], out.representation)
            return l2r.training.cross_entropy(logits, y), out.taps

        (_, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(network)
        updates, opt_state = tx.update(grads, opt_state, network, taps=taps)
        network = jax.tree.map(lambda p, u: p + u, network, updates)
    chex.assert_trees_all_close(network["backbone"], ours["backbone"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(opt_state.lstm.momentum, lstm.momentum, rtol=1e-5, atol=1e-8)
    assert float(lstm.step) == float(opt_state.lstm.step) == len(idx)


def test_meta_training_with_history_runs(tmp_path):
    config, model, pretrained, data_a, data_b = tiny(history=True)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    theta0 = run.ml.init(jax.random.key(0))
    _, state, history = loop.meta_train(config, model, None, None, None, str(tmp_path), run=run)
    assert run.ml.config.history and np.all(np.isfinite(history["loss"]))
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                         state.theta, theta0)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0
