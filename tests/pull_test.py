"""meta.pull, a learned pull towards the pre-Task-B weights (issue 17): plain SGD at
initialisation, the step equal to a float64 NumPy reference, ρ inside [0, pull_max] whatever θ,
w − w0 read by the LSTM, the same steps through `as_optax`, and meta-gradients that reach the
pull's scale at initialisation."""

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


def _perturb(tree, seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype), tree)


@functools.cache
def _problem(name="convnet"):
    kwargs = {"convnet": {"widths": (8, 16), "groups": 4, "hidden": 8},
              "resnet": {"depth": 8, "widths": (8, 16, 16), "groups": 4}}[name]  # fmt: skip
    model = make_model(name, **kwargs)
    w0 = model.init(jax.random.key(0), SHAPE)
    w = _perturb(w0, 1, 0.05)  # Some steps into the task: w ≠ w0.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    y = jnp.asarray(rng.normal(size=(SHAPE[0], model.representation_dim)), jnp.float32)

    def loss(p):
        out = model.apply(p, x, taps=True)
        return jnp.mean(jnp.square(out.representation - y)), out.taps

    grads, taps = jax.grad(loss, has_aux=True)(w)
    ml = metalearner.make(w, taps, metalearner.Config(pull=True, hidden_kernel=8,
                                                      hidden_vector=8))  # fmt: skip
    return model, w0, w, grads, taps, ml


@pytest.mark.parametrize("name", ["convnet", "resnet"])
def test_at_initialisation_the_pull_is_zero_and_the_step_is_sgd(name):
    _, w0, w, grads, taps, ml = _problem(name)
    theta = ml.init(jax.random.key(3))
    deltas, pulls, state = ml.gates(theta, ml.start(w0), w, grads, taps)
    for p in jax.tree.leaves(pulls):
        np.testing.assert_array_equal(p, 0.0)
    new = metalearner.update(w, grads, deltas, LR, pulls=pulls, anchor=state.anchor)
    sgd = jax.tree.map(lambda a, g: a - LR * g, w, grads)
    chex.assert_trees_all_close(new, sgd, atol=1e-7, rtol=0)  # δ ≡ 1 up to float rounding.
    chex.assert_trees_all_equal(state.anchor, w0)


def _with_scale(theta, value):
    """θ with every leaf's pull scale s set to `value`."""

    def fix(path, a):
        return jnp.full_like(a, value) if getattr(path[-1], "key", None) == "pull_scale" else a

    return jax.tree_util.tree_map_with_path(fix, theta)


def _sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_the_step_equals_a_float64_reference_and_reads_the_drift():
    _, w0, w, grads, taps, ml = _problem()
    theta = _with_scale(_perturb(ml.init(jax.random.key(3)), 4, 0.3), 0.5)
    deltas, pulls, state = ml.gates(theta, ml.start(w0), w, grads, taps)
    assert any(np.abs(p).max() > 1e-3 for p in jax.tree.leaves(pulls))
    new = metalearner.update(w, grads, deltas, LR, pulls=pulls, anchor=state.anchor)
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    ref = jax.tree.map(lambda a, g, d, p, a0: a - LR * d * g - p * (a - a0),
                       f64(w), f64(grads), f64(deltas), f64(pulls), f64(w0))  # fmt: skip
    chex.assert_trees_all_close(f64(new), ref, rtol=1e-5, atol=1e-7)
    # The LSTM reads w − w0: another anchor gives other gates for the same w, g and taps.
    other, _, _ = ml.gates(theta, ml.start(_perturb(w0, 5, 0.05)), w, grads, taps)
    pairs = zip(jax.tree.leaves(deltas), jax.tree.leaves(other), strict=True)
    assert not all(np.allclose(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="gates"):
        ml.apply(theta, state, w, grads, taps)
    with pytest.raises(ValueError, match="anchor"):
        ml.init_state()


def test_the_pull_stays_in_its_bounds_whatever_theta():
    _, w0, w, grads, taps, ml = _problem()
    pull_max = ml.config.pull_max
    theta = _perturb(ml.init(jax.random.key(3)), 6, 30.0)  # Saturating heads.
    for scale, top in ((5.0, pull_max), (0.5, 0.5 * pull_max), (-3.0, 0.0)):
        _, pulls, _ = ml.gates(_with_scale(theta, scale), ml.start(w0), w, grads, taps)
        for p in jax.tree.leaves(pulls):
            assert np.all(np.asarray(p) >= 0.0) and np.all(np.asarray(p) <= top + 1e-7)
    # With the pull head's kernel 0, z is its bias b and ρ = pull_max · clip(s, 0, 1) · σ(b),
    # whatever the LSTM's state: compared with float64 NumPy on fresh random biases.
    rng = np.random.default_rng(7)

    def set_head(path, a):
        keys = tuple(getattr(k, "key", None) for k in path)
        if keys[-2:] == ("pull", "kernel"):
            return jnp.zeros_like(a)
        if keys[-2:] == ("pull", "bias"):
            return jnp.asarray(rng.normal(scale=3.0, size=a.shape), a.dtype)
        return a

    theta = _with_scale(jax.tree_util.tree_map_with_path(set_head, theta), 0.25)
    _, pulls, _ = ml.gates(theta, ml.start(w0), w, grads, taps)
    biases = {tuple(getattr(k, "key", None) for k in p[:-2]): np.asarray(a, np.float64)
              for p, a in jax.tree_util.tree_flatten_with_path(theta)[0]
              if tuple(getattr(k, "key", None) for k in p[-2:]) == ("pull", "bias")}  # fmt: skip
    for path, p in jax.tree_util.tree_flatten_with_path(pulls)[0]:
        b = biases[tuple(getattr(k, "key", None) for k in path)]
        ref = pull_max * 0.25 * _sigmoid64(b)  # [K]: one ρ per weight of a unit (the last axis).
        np.testing.assert_allclose(np.asarray(p, np.float64).reshape(b.size, -1),
                                   np.broadcast_to(ref[:, None], (b.size, p.size // b.size)),
                                   rtol=1e-6)  # fmt: skip


def _tiny_pull():
    config, model, pretrained, data_a, data_b = tiny(pull=True)
    return config, model, pretrained, data_a, data_b


def test_the_learned_method_and_as_optax_take_the_same_pulled_steps():
    config, model, pretrained, _, data_b = _tiny_pull()
    ml = episodes.make_metalearner(config.meta, model, data_b.train_images.shape)
    assert ml.config.pull
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
    chex.assert_trees_all_equal(opt_state.lstm.anchor, lstm.anchor)


def test_meta_gradients_reach_the_pull_scale_at_initialisation(tmp_path):
    config, model, pretrained, data_a, data_b = _tiny_pull()
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    theta0 = run.ml.init(jax.random.key(0))
    _, state, history = loop.meta_train(config, model, None, None, None, str(tmp_path), run=run)
    assert np.all(np.isfinite(history["loss"]))
    _, new, old = _pull_leaves(state.theta, theta0)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(new, old, strict=True)]
    assert run.ml.config.pull and moved and max(moved) > 0  # The pull's scale learns at once.


def _pull_leaves(theta, theta0):
    flat = jax.tree_util.tree_flatten_with_path(theta)[0]
    flat0 = dict(jax.tree_util.tree_flatten_with_path(theta0)[0])
    keep = [(p, a) for p, a in flat if getattr(p[-1], "key", None) == "pull_scale"]
    return [p for p, _ in keep], [a for _, a in keep], [flat0[p] for p, _ in keep]
