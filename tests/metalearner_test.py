"""Meta-learner: starts as SGD, paper sizes, meta-gradients, normalisation, vmap/jit, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from l2r import metalearner
from l2r.models import Tap, make_model

TINY = {
    "convnet": {"widths": (8, 16), "groups": 4, "hidden": 8},
    "resnet": {"depth": 8, "widths": (8, 16, 16), "groups": 4},
}
SHAPE = (4, 8, 8, 3)
LR = 0.1


def normal(seed, shape, scale=1.0, dtype=jnp.float32):
    """Host-side noise (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def perturb(tree, seed, scale):
    """tree + scale * N(0, 1) on every leaf (θ away from init, so δ depends on the LSTM)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype), tree)


def student_step(model, params, x, y):
    """(grads, taps) of the student loss mean((representation - y)^2)."""

    def loss(p):
        out = model.apply(p, x, taps=True)
        return jnp.mean(jnp.square(out.representation - y)), out.taps

    grads, taps = jax.grad(loss, has_aux=True)(params)
    return grads, taps


@functools.cache
def problem(name):
    """A tiny backbone, its params, a batch, (grads, taps) and its meta-learner."""
    model = make_model(name, **TINY[name])
    params = model.init(jax.random.key(0), SHAPE)
    x, y = normal(1, SHAPE), normal(2, (SHAPE[0], model.representation_dim))
    grads, taps = jax.jit(functools.partial(student_step, model))(params, x, y)
    return model, params, grads, taps, metalearner.make(params, taps)


@pytest.mark.parametrize("name", sorted(TINY))
def test_init_is_exactly_sgd(name):
    _, params, grads, taps, ml = problem(name)
    theta, state = ml.init(jax.random.key(3)), ml.init_state()
    deltas, state = jax.jit(ml.apply)(theta, state, params, grads, taps)
    chex.assert_trees_all_equal_shapes(deltas, params)
    chex.assert_trees_all_close(deltas, jax.tree.map(jnp.ones_like, params), rtol=0, atol=1e-6)
    stepped = metalearner.update(params, grads, deltas, LR)
    sgd = jax.tree.map(lambda w, g: w - LR * g, params, grads)
    chex.assert_trees_all_close(stepped, sgd, rtol=1e-6, atol=1e-9)
    for leaf in ml.leaves:  # The LSTM memory moved, and has the documented shapes.
        memory = functools.reduce(lambda t, k: t[k], leaf.path, state.lstm)
        assert len(memory) == 3
        chex.assert_shape(jax.tree.leaves(memory), (leaf.units, leaf.hidden))
    assert all(float(jnp.abs(m).max()) > 0 for m in jax.tree.leaves(state))


def test_exp_gate_starts_at_sgd_and_stays_positive():
    _, params, grads, taps, paper = problem("convnet")
    ml = metalearner.make(params, taps, metalearner.Config(gate="exp"))
    theta = ml.init(jax.random.key(3))
    deltas, _ = jax.jit(ml.apply)(theta, ml.init_state(), params, grads, taps)
    chex.assert_trees_all_close(deltas, jax.tree.map(jnp.ones_like, params), rtol=0, atol=1e-6)
    # Far from init the paper's tanh gate goes negative; the exp gate stays in its range.
    far = lambda th: perturb(th, 4, 3.0)  # noqa: E731
    neg, _ = jax.jit(paper.apply)(far(paper.init(jax.random.key(3))), paper.init_state(), params,
                                  grads, taps)  # fmt: skip
    pos, _ = jax.jit(ml.apply)(far(theta), ml.init_state(), params, grads, taps)
    assert min(float(d.min()) for d in jax.tree.leaves(neg)) < 0
    assert min(float(d.min()) for d in jax.tree.leaves(pos)) > 0
    with pytest.raises(ValueError, match="gate='relu'"):
        metalearner.make(params, taps, metalearner.Config(gate="relu"))


def test_meta_log_range_sets_the_exp_gate_range():
    """`meta.log_range` reaches the meta-learner: δ ≡ 1 at initialisation and, however
    saturated the head (its scale still the initial r = 4), δ inside (e^-r, e^r), both ends
    reached."""
    from l2r.configs import exp1
    from l2r.meta import episodes
    from l2r.models import registry

    config = exp1.get_config("smoke")
    config.meta.gate, config.meta.log_range = "exp", 4.0
    model = registry.from_config(config.model)
    ml = episodes.make_metalearner(config.meta, model, (1, 8, 8, 1))
    assert ml.config.log_range == 4.0
    _, params, grads, taps, _ = problem("convnet")
    ml = metalearner.make(params, taps, ml.config)
    theta = ml.init(jax.random.key(3))
    deltas, _ = ml.apply(theta, ml.init_state(), params, grads, taps)
    chex.assert_trees_all_close(deltas, jax.tree.map(jnp.ones_like, params), rtol=0, atol=1e-6)

    def keep_scale(path, far, init):  # The scale is learnable; keep its initial value.
        return init if getattr(path[-1], "key", None) == "scale" else far

    far = jax.tree_util.tree_map_with_path(keep_scale, perturb(theta, 4, 30.0), theta)
    deltas, _ = ml.apply(far, ml.init_state(), params, grads, taps)
    lo = min(float(d.min()) for d in jax.tree.leaves(deltas))
    hi = max(float(d.max()) for d in jax.tree.leaves(deltas))
    assert np.exp(-4.0) * (1 - 1e-5) <= lo < np.exp(-3.0) and np.exp(3.0) < hi <= np.exp(4.0) * (
        1 + 1e-5
    )


def test_sizes_follow_paper():
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    params = {
        "conv": {"kernel": sds(3, 3, 10, 7)},
        "gn": {"scale": sds(7), "bias": sds(7)},
        "dense": {"kernel": sds(7, 5), "bias": sds(5)},
    }
    taps = {
        "conv": Tap(sds(2, 10), sds(2, 7)),
        "gn": Tap(sds(2, 7), sds(2, 7)),
        "dense": Tap(sds(2, 7), sds(2, 5)),
    }
    ml = metalearner.make(params, taps)
    got = {"/".join(f.path): (f.units, f.in_size, f.out_size, f.hidden, f.act) for f in ml.leaves}
    assert got == {
        "conv/kernel": (7, 191, 90, 64, ""),  # §5.1: 3x3x10 conv -> 191 inputs, 90 outputs.
        "gn/scale": (1, 22, 7, 32, "inputs"),  # §5.1: Cin x 3 + 1 -> Cin.
        "gn/bias": (1, 22, 7, 32, "inputs"),
        "dense/kernel": (5, 22, 7, 64, ""),  # kH = kW = 1.
        "dense/bias": (1, 16, 5, 32, "outputs"),
    }
    theta = jax.eval_shape(ml.init, jax.random.key(0))
    conv, gn = theta["conv"]["kernel"], theta["gn"]["scale"]
    assert conv["lstm0"]["wi"].shape == (191, 4 * 64) and conv["lstm2"]["wi"].shape == (64, 256)
    assert conv["lstm2"]["wh"].shape == (64, 256) and conv["out"]["kernel"].shape == (64, 90)
    assert gn["lstm0"]["wi"].shape == (22, 4 * 32) and gn["out"]["bias"].shape == (7,)
    deltas, _ = jax.eval_shape(ml.apply, theta, ml.init_state(), params, params, taps)
    chex.assert_trees_all_equal_shapes(deltas, params)


def test_lstm_cell_matches_flax():
    theta = {"wi": normal(0, (5, 12)), "wh": normal(1, (3, 12)), "b": normal(2, (12,))}
    carry, x = (normal(3, (2, 3)), normal(4, (2, 3))), normal(5, (2, 5))
    gates = lambda w: dict(zip("ifgo", jnp.split(w, 4, axis=-1), strict=True))
    wi, wh, b = gates(theta["wi"]), gates(theta["wh"]), gates(theta["b"])
    params = {f"i{k}": {"kernel": wi[k]} for k in "ifgo"}
    params |= {f"h{k}": {"kernel": wh[k], "bias": b[k]} for k in "ifgo"}
    want = nn.LSTMCell(features=3).apply({"params": params}, carry, x)
    chex.assert_trees_all_close(metalearner.lstm_cell(theta, carry, x), want, rtol=1e-5)


def unroll(ml, model, theta, params, xs, y, first_order=False, scan=True):
    """Loss of the student's representation on xs[-1] after len(xs) - 1 inner steps."""

    def step(carry, x):
        p, state = carry
        grads, taps = student_step(model, p, x, y)
        deltas, state = ml.apply(theta, state, p, grads, taps)
        return (metalearner.update(p, grads, deltas, LR, first_order=first_order), state), None

    carry = (params, ml.init_state(jax.tree.leaves(theta)[0].dtype))
    if scan:
        carry, _ = lax.scan(jax.checkpoint(step), carry, xs[:-1])
    else:
        for x in xs[:-1]:
            carry, _ = step(carry, x)
    rep = model.apply(carry[0], xs[-1]).representation
    return jnp.mean(jnp.square(rep - y))


def micro(config, dtype=jnp.float32):
    """A 1-conv + dense net (5 leaves), 3 batches (2 inner steps + a query) and θ off init."""
    model = make_model("convnet", widths=(4,), groups=2, hidden=4)
    cast = lambda t: jax.tree.map(lambda v: jnp.asarray(v, dtype), t)
    params = cast(model.init(jax.random.key(0), (3, 5, 5, 1)))
    xs, y = normal(1, (3, 3, 5, 5, 1), dtype=dtype), normal(2, (3, 4), dtype=dtype)
    _, taps = jax.eval_shape(functools.partial(student_step, model), params, xs[0], y)
    ml = metalearner.make(params, taps, config)
    theta = perturb(cast(ml.init(jax.random.key(3))), 4, 0.3)
    return ml, model, theta, params, xs, y, taps


def test_meta_gradient_second_and_first_order():
    config = metalearner.Config(hidden_kernel=8, hidden_vector=4)
    ml, model, theta, params, xs, y, taps = micro(config)
    ml_fo = metalearner.make(params, taps, config._replace(first_order=True))
    second = jax.jit(jax.grad(lambda t: unroll(ml, model, t, params, xs, y)))(theta)
    first = jax.jit(jax.grad(lambda t: unroll(ml_fo, model, t, params, xs, y, True)))(theta)
    chex.assert_tree_all_finite((second, first))
    # Every LSTM weight gets a meta-gradient (through two steps of its memory).
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(second))
    norm = lambda t: float(optax.global_norm(t))
    assert norm(first) > 0
    assert norm(jax.tree.map(jnp.subtract, first, second)) > 1e-3 * norm(second)


def test_meta_gradient_matches_finite_difference(monkeypatch):
    # The RMS normalisers are stop-gradient'ed on purpose, which a finite difference cannot
    # mimic; everything else (two steps of LSTM memory, the second-order path through ĝ and
    # the taps, scan + remat) is checked exactly with the stop removed.
    monkeypatch.setattr(metalearner, "_scale", lambda x: jnp.sqrt(jnp.mean(jnp.square(x))))
    with jax.enable_x64(True):
        config = metalearner.Config(hidden_kernel=4, hidden_vector=3, clip=100.0)
        ml, model, theta, params, xs, y, _ = micro(config, jnp.float64)
        grad = jax.jit(jax.grad(lambda t: unroll(ml, model, t, params, xs, y)))(theta)
        loss = jax.jit(lambda t: unroll(ml, model, t, params, xs, y, scan=False))
        v = perturb(jax.tree.map(jnp.zeros_like, theta), 5, 1.0)
        analytic = sum(
            jnp.vdot(a, b) for a, b in zip(*map(jax.tree.leaves, (grad, v)), strict=True)
        )
        eps = 1e-5
        shift = lambda s: jax.tree.map(lambda t, d: t + s * eps * d, theta, v)
        numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
        assert abs(float(analytic)) > 1e-6
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def test_normalisation_makes_deltas_scale_invariant():
    _, params, grads, taps, ml = problem("convnet")
    theta = perturb(ml.init(jax.random.key(3)), 4, 0.5)
    apply = jax.jit(ml.apply)
    deltas, _ = apply(theta, ml.init_state(), params, grads, taps)
    assert min(float(jnp.std(d)) for d in jax.tree.leaves(deltas)) > 1e-3  # Not constant.
    times = lambda tree, c: jax.tree.map(lambda v: c * v, tree)
    for g, t in [(times(grads, 1000.0), taps), (grads, times(taps, 1000.0))]:
        chex.assert_trees_all_close(
            apply(theta, ml.init_state(), params, g, t)[0], deltas, rtol=1e-4, atol=1e-5
        )


def test_vmap_matches_loop_and_jit_matches_eager():
    _, params, grads, taps, ml = problem("convnet")
    theta = perturb(ml.init(jax.random.key(3)), 4, 0.1)
    stack = lambda tree, seed, scale: perturb(
        jax.tree.map(lambda v: jnp.stack([v] * 3), tree), seed, scale
    )  # 3 episodes, each with its own params, grads, activations and LSTM memory.
    batch = (stack(ml.init_state(), 5, 0.5), stack(params, 6, 0.1))
    batch += (stack(grads, 7, 1e-2), stack(taps, 8, 1.0))
    batched = jax.jit(jax.vmap(ml.apply, (None, 0, 0, 0, 0)))(theta, *batch)
    apply = jax.jit(ml.apply)
    index = lambda tree, i: jax.tree.map(lambda v: v[i], tree)
    for i in range(3):
        looped = apply(theta, *index(batch, i))
        chex.assert_trees_all_close(index(batched, i), looped, rtol=1e-5, atol=1e-6)
    eager = ml.apply(theta, *index(batch, 0))
    chex.assert_trees_all_close(eager, index(batched, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_leaves_grouped_by_shape_equal_one_lstm_per_leaf(name, monkeypatch):
    """Same-shaped leaves run as one vmapped LSTM; δ and the new memory equal those of one LSTM
    per leaf (each with its own θ) bitwise, the meta-gradient to float rounding (a batched
    reduction sums in another order)."""
    _, params, grads, taps, ml = problem(name)
    groups = ml.groups()
    assert sorted(leaf.path for g in groups for leaf in g) == sorted(x.path for x in ml.leaves)
    assert len(groups) < len(ml.leaves) and any(len(g) > 1 for g in groups)
    for g in groups:
        assert len({(x.units, x.in_size, x.hidden, x.out_size) for x in g}) == 1
    theta = perturb(ml.init(jax.random.key(3)), 4, 0.3)
    memory = perturb(ml.init_state(), 5, 0.5)

    def run(theta):
        deltas, state = ml.apply(theta, memory, params, grads, taps)
        loss = sum(jnp.sum(jnp.sin(d)) for d in jax.tree.leaves(deltas))
        return loss + sum(jnp.sum(jnp.cos(v)) for v in jax.tree.leaves(state)), (deltas, state)

    grouped = jax.jit(jax.value_and_grad(run, has_aux=True))(theta)
    monkeypatch.setattr(metalearner.MetaLearner, "groups", lambda self: [(x,) for x in self.leaves])
    per_leaf = jax.jit(jax.value_and_grad(run, has_aux=True))(theta)
    chex.assert_trees_all_equal(grouped[0], per_leaf[0])
    chex.assert_trees_all_close(grouped[1], per_leaf[1], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    _, params, grads, taps, ml = problem("convnet")
    with_head = {**params, "head": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"no tap 'head' for parameter 'head/kernel'.*heads"):
        metalearner.make(with_head, taps)
    narrow = {**taps, "conv1": Tap(taps["conv1"].inputs[:, :4], taps["conv1"].outputs)}
    with pytest.raises(ValueError, match=r"tap 'conv1'.inputs has shape \(4, 4\).*\[N, 8\]"):
        metalearner.make(params, narrow)
    with pytest.raises(ValueError, match=r"'odd/kernel' has shape \(2, 2, 2\)"):
        metalearner.make({"odd": {"kernel": jnp.zeros((2, 2, 2))}}, {"odd": taps["conv0"]})
    with pytest.raises(ValueError, match="non-empty nested dict"):
        metalearner.make({}, taps)
    theta, state = jax.eval_shape(ml.init, jax.random.key(0)), ml.init_state()
    missing = {k: v for k, v in grads.items() if k != "hidden"}
    with pytest.raises(ValueError, match=r"grads do not match.*missing \['hidden/bias'"):
        jax.eval_shape(ml.apply, theta, state, params, missing, taps)
    wrong = {**params, "conv0": {"kernel": jnp.zeros((3, 3, 3, 4))}}
    with pytest.raises(ValueError, match=r"conv0/kernel: \(3, 3, 3, 4\) != \(3, 3, 3, 8\)"):
        jax.eval_shape(ml.apply, theta, state, wrong, grads, taps)
    no_tap = {k: v for k, v in taps.items() if k != "gn1"}
    with pytest.raises(ValueError, match="no tap 'gn1'"):
        jax.eval_shape(ml.apply, theta, state, params, grads, no_tap)
