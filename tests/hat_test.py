"""HAT: gated forward, annealing, compensation, conditioning, Task-A protection, pre-training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from l2r import compare, models, task_b, training
from l2r.configs import fig1
from l2r.data import sources, tasks
from l2r.methods import hat
from l2r.methods.base import Batch
from l2r.models import registry as model_registry
from l2r.models.conv import conv2d

TINY = {"widths": (8, 16), "groups": 4, "hidden": 8}


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def layers_of(params):
    return {"/".join(path[:-1]) for path in traverse_util.flatten_dict(params)}


@pytest.fixture(scope="module")
def tiny():
    model = models.make_model("convnet", **TINY)
    x = images((6, 16, 16, 3))
    return model, model.init(jax.random.key(0), x.shape), x


def reference_convnet(params, x, groups=4):
    """The unmasked ConvNet written out by hand (the forward pass before masks existed)."""
    h = x
    for i in range(2):
        h = conv2d(h, params[f"conv{i}"]["kernel"], 1 if i == 0 else 2)
        n, hh, w, c = h.shape
        g = h.reshape(n, hh, w, groups, c // groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        h = ((g - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(h.shape)
        h = jax.nn.relu(h * params[f"gn{i}"]["scale"] + params[f"gn{i}"]["bias"])
    h = h.mean(axis=(1, 2))
    return jax.nn.relu(h @ params["hidden"]["kernel"] + params["hidden"]["bias"])


def test_no_masks_is_the_unmasked_forward_and_gates_multiply_channels(tiny):
    model, params, x = tiny
    plain = jax.jit(model.apply)(params, x).representation
    np.testing.assert_array_equal(plain, jax.jit(reference_convnet)(params, x))
    ones = {k: jnp.ones((c,)) for k, c in model.units.items()}
    masked = jax.jit(lambda p, x: model.apply(p, x, masks=ones))(params, x).representation
    np.testing.assert_array_equal(masked, plain)
    # Without masks nothing extra is traced.
    masked_eqns = jax.make_jaxpr(lambda p: model.apply(p, x, masks=ones))(params).eqns
    assert len(jax.make_jaxpr(lambda p: model.apply(p, x))(params).eqns) < len(masked_eqns)
    # A zero gate silences its channel; silencing the last conv leaves relu(hidden bias).
    gate = jnp.arange(8) % 2 == 0
    rep = model.apply(params, x, masks={"hidden": gate.astype(jnp.float32)}).representation
    np.testing.assert_array_equal(rep[:, ~np.asarray(gate)], 0.0)
    np.testing.assert_array_equal(rep[:, np.asarray(gate)], plain[:, np.asarray(gate)])
    rep = model.apply(params, x, masks={"gn1": jnp.zeros((16,))}).representation
    np.testing.assert_array_equal(
        rep, jnp.broadcast_to(jax.nn.relu(params["hidden"]["bias"]), rep.shape)
    )
    with pytest.raises(ValueError, match="unknown unit layers"):
        model.apply(params, x, masks={"gn7": jnp.ones((8,))})


@pytest.mark.parametrize(
    "name, kwargs", [("convnet", TINY), ("resnet", {"depth": 14, "widths": (4, 8, 8), "groups": 2})]
)
def test_wiring_covers_every_layer_with_matching_widths(name, kwargs):
    model = models.make_model(name, **kwargs)
    x = images((2, 8, 8, 3))
    params = model.init(jax.random.key(1), x.shape)
    assert set(model.wiring) == layers_of(params)
    for path, leaf in traverse_util.flatten_dict(params).items():
        unit, inputs = model.wiring["/".join(path[:-1])]
        assert model.units[unit] == leaf.shape[-1]
        for k in inputs if leaf.ndim > 1 else ():  # Kernels read their inputs; biases don't.
            assert model.units[k] == leaf.shape[-2]
    ones = {k: jnp.ones((c,)) for k, c in model.units.items()}
    np.testing.assert_array_equal(
        model.apply(params, x, masks=ones).representation, model.apply(params, x).representation
    )


def test_gates_become_binary_as_s_grows():
    s_max, epoch = 400.0, 50
    s = [float(hat.anneal(b, epoch, s_max)) for b in range(epoch)]
    np.testing.assert_allclose([s[0], s[-1]], [1 / s_max, s_max], rtol=1e-6)
    assert np.all(np.diff(s) > 0) and float(hat.anneal(0, 1, s_max)) == s_max
    e = {"gn0": jnp.concatenate([-jnp.geomspace(6, 0.05, 20), jnp.geomspace(0.05, 6, 20)])}
    distance = [float(jnp.max(jnp.minimum(a, 1 - a))) for a in [hat.gates(e, v)["gn0"] for v in s]]
    assert np.all(np.diff(distance) < 0)
    assert distance[0] > 0.49 and distance[-1] < 1e-7


def test_embedding_compensation_matches_hat_eq3():
    s_max = 3.0
    e = jnp.linspace(-6.0, 6.0, 25)
    q = images((25,), seed=3)
    for s in (1 / s_max, 1.0, 2.0, s_max):
        raw = jax.grad(lambda e, s=s: jnp.sum(q * jax.nn.sigmoid(s * e)))(e)
        out = hat.compensate({"gn0": raw}, {"gn0": e}, s, s_max)["gn0"]
        e64, raw64 = np.asarray(e, np.float64), np.asarray(raw, np.float64)
        formula = (
            raw64 * s_max * (np.cosh(np.clip(s * e64, -50, 50)) + 1) / (s * (np.cosh(e64) + 1))
        )
        np.testing.assert_allclose(out, formula, rtol=1e-5)
        # What the compensation is for: the gradient of s_max·σ(e), whatever s is (where σ'(s·e)
        # is representable in float32: at |s·e| > ~16, σ(s·e) rounds to 0 or 1, its gradient to 0).
        sigmoid_prime = jax.nn.sigmoid(e) * (1 - jax.nn.sigmoid(e))
        ok = np.abs(s * e64) <= 8
        np.testing.assert_allclose(out[ok], (q * s_max * sigmoid_prime)[ok], rtol=1e-4, atol=1e-6)


def binary_task_a_embeddings(model):
    """±2 embeddings: at s_max = 400 channel c of every unit layer is on iff c % 3 == 0, so
    groups mix used and unused channels."""
    emb = {k: jnp.where(jnp.arange(c) % 3 == 0, 2.0, -2.0) for k, c in model.units.items()}
    return traverse_util.unflatten_dict(emb, sep="/")


def test_conditioning_factors(tiny):
    model, params, _ = tiny
    prev = hat.gates(binary_task_a_embeddings(model), 400.0)
    f = hat.conditioning(model, prev, params)
    on8, on16 = np.arange(8) % 3 == 0, np.arange(16) % 3 == 0
    np.testing.assert_array_equal(f["gn1"]["scale"], 1.0 - on16)
    np.testing.assert_array_equal(f["hidden"]["bias"], 1.0 - (np.arange(8) % 3 == 0))
    np.testing.assert_array_equal(f["hidden"]["kernel"], 1.0 - np.outer(on16, on8))
    # conv0 reads the image (always live); conv outputs are guarded by their GN group (width 2).
    group0 = np.repeat(on8.reshape(4, 2).any(1), 2)
    np.testing.assert_array_equal(f["conv0"]["kernel"][0, 0], np.broadcast_to(1.0 - group0, (3, 8)))
    group1 = np.repeat(on16.reshape(4, 4).any(1), 4)
    np.testing.assert_array_equal(f["conv1"]["kernel"][1, 2], 1.0 - np.outer(on8, group1))


def tiny_network(model, params, key=1):
    k = jax.random.key(key)
    d = model.representation_dim
    return {
        "backbone": params,
        "head_a": models.init_head(jax.random.fold_in(k, 1), d, 3),
        "head_b": models.init_head(jax.random.fold_in(k, 2), d, 3),
        "hat": {"emb_a": binary_task_a_embeddings(model)},
    }


def run_steps(method, network, xs, ys, seed=0):
    state = method.init(network, None, jax.random.key(seed))

    @jax.jit
    def run(state):
        body = lambda st, b: method.step(st, Batch(*b), None)  # noqa: E731
        return jax.lax.scan(body, state, (xs, ys))

    return state, *run(state)


def test_binary_task_a_gates_freeze_task_a_exactly(tiny):
    model, params, x = tiny
    method = hat.make_hat(model, 0.5, s_max=400.0, reg=0.75, clip_embedding=6.0, anneal_steps=4)
    network = tiny_network(model, params)
    xs = images((4, 8, 16, 16, 3), seed=1)
    ys = jnp.asarray(np.random.default_rng(2).integers(0, 3, (4, 8)), jnp.int32)
    state0, state, metrics = run_steps(method, network, xs, ys)
    assert bool(jnp.all(jnp.isfinite(metrics["loss"])))
    np.testing.assert_allclose(np.asarray(metrics["s"])[[0, -1]], [1 / 400, 400], rtol=1e-6)
    before, after = method.network(state0), method.network(state)

    # Task A through its gates: representation and original head unchanged.
    rep0, rep1 = method.represent(before, x, 0), method.represent(after, x, 0)
    np.testing.assert_allclose(rep1, rep0, atol=1e-6, rtol=1e-6)
    logits = lambda n, r: models.apply_head(n["head_a"], r)  # noqa: E731
    np.testing.assert_allclose(logits(after, rep1), logits(before, rep0), atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_equal(after["hat"]["emb_a"], before["hat"]["emb_a"])
    chex.assert_trees_all_equal(after["head_a"], before["head_a"])
    # ...while Task B learned: the backbone (its free weights), head B and e_B moved.
    moved = lambda a, b: float(jnp.max(jnp.abs(a - b)))  # noqa: E731
    assert (
        moved(
            model.apply(after["backbone"], x).representation, model.apply(params, x).representation
        )
        > 1e-3
    )
    assert moved(after["head_b"]["kernel"], before["head_b"]["kernel"]) > 1e-3
    assert moved(after["hat"]["emb_b"]["gn0"], before["hat"]["emb_b"]["gn0"]) > 1e-3
    # Weights into used units with used inputs never moved (their gradients were zeroed).
    prev = hat.gates(before["hat"]["emb_a"], 400.0)
    frozen = hat.conditioning(model, prev, params)["hidden"]["kernel"] == 0
    np.testing.assert_array_equal(
        after["backbone"]["hidden"]["kernel"][frozen], params["hidden"]["kernel"][frozen]
    )

    # Why conv outputs are guarded per GroupNorm group: changing the kernel of a channel A does
    # not use (gn0 channel 1) moves channel 0 (used, same group) through the group statistics.
    bumped = jax.tree.map(lambda a: a, params)
    bumped["conv0"]["kernel"] = params["conv0"]["kernel"].at[..., 1].multiply(3.0)
    rep2 = method.represent({**before, "backbone": bumped}, x, 0)
    assert moved(rep2, rep0) > 1e-3


def test_paper_s_max_protects_task_a_partly_and_runs_are_deterministic(tiny):
    """s_max = 3 (§4), gates σ(±6): A drifts far less than under plain SGD, but not zero."""
    model, params, x = tiny
    xs = images((4, 8, 16, 16, 3), seed=4)
    ys = jnp.asarray(np.random.default_rng(5).integers(0, 3, (4, 8)), jnp.int32)
    network = tiny_network(model, params)
    method = hat.make_hat(model, 0.1, s_max=3.0, reg=0.75, clip_embedding=6.0, anneal_steps=4)
    state0, state, _ = run_steps(method, network, xs, ys)
    _, again, _ = run_steps(method, network, xs, ys)
    chex.assert_trees_all_equal(state, again)
    other, _, _ = run_steps(method, network, xs, ys, seed=1)
    assert not np.array_equal(
        other.network["hat"]["emb_b"]["gn0"], state0.network["hat"]["emb_b"]["gn0"]
    )

    rep0 = method.represent(state0.network, x, 0)
    drift_hat = float(jnp.linalg.norm(method.represent(state.network, x, 0) - rep0))

    # Plain SGD (the same step without gates, penalty or conditioning) on the same batches.
    def sgd(p, b):
        loss = lambda p: training.cross_entropy(  # noqa: E731
            models.apply_head(network["head_b"], model.apply(p, b[0]).representation), b[1]
        )
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p)), None

    sgd_params, _ = jax.lax.scan(sgd, params, (xs, ys))
    drift_sgd = float(
        jnp.linalg.norm(method.represent({**state0.network, "backbone": sgd_params}, x, 0) - rep0)
    )
    assert 0 < drift_hat < 0.1 * drift_sgd, (drift_hat, drift_sgd)  # ~0.015 measured.


def test_pretrain_hat_caches_and_feeds_task_b(tmp_path):
    config = fig1.get_config("smoke")
    config.model.widths, config.model.groups, config.model.hidden = (8, 16), 4, 8
    config.data.synthetic.train_per_class, config.data.synthetic.test_per_class = 40, 10
    config.pretrain.steps, config.pretrain.batch_size = 12, 16
    config.num_seeds = 1
    dataset = sources.load("synthetic", **config.data.synthetic.to_dict())
    task_a, task_2 = tasks.split_task(dataset, config.data.classes_a, config.data.classes_b)
    mean, std = tasks.normalization_stats(dataset.train)
    model = model_registry.from_config(config.model)
    data_a = training.to_device(task_a, mean, std)
    nets, accs, train_s = hat.pretrain_hat(config, model, data_a, str(tmp_path))
    assert set(nets) == {"backbone", "head", "emb_a"} and accs.shape == (1,)
    assert 0.0 <= accs[0] <= 1.0
    emb = traverse_util.flatten_dict(jax.tree.map(lambda a: a[0], nets["emb_a"]), sep="/")
    assert (
        set(emb) == set(model.units) and max(float(jnp.abs(e).max()) for e in emb.values()) <= 6.0
    )
    again, accs2, _ = hat.pretrain_hat(config, model, data_a, str(tmp_path))  # From the cache.
    chex.assert_trees_all_equal(again, nets)
    np.testing.assert_array_equal(accs2, accs)

    # The Task-B pipeline: initial networks plus 'hat': {'emb_a'}, run by task_b.
    networks0 = compare.initial_networks(config, nets, 3, model.representation_dim)
    networks0["hat"] = {"emb_a": nets["emb_a"]}
    hat_cfg = config.task_b.hat
    method = hat.make_hat(
        model, 0.1, hat_cfg.s_max, hat_cfg.reg, hat_cfg.clip_embedding, config.task_b.steps
    )
    data_b = training.to_device(task_2, mean, std)
    streams = task_b.make_streams(config, len(task_2.train.labels), len(task_a.train.labels), 1)
    advance = task_b.make_advance(method)
    states = jax.vmap(lambda n, k: method.init(n, data_a, k))(networks0, jax.random.key(0)[None])
    keys = jax.random.split(jax.random.key(1), 3)[None]
    xs = (keys, streams.idx_b[:, :3], None, None, None)
    states, metrics = advance(states, xs, data_a=data_a, data_b=data_b)
    assert states.step.tolist() == [3] and bool(jnp.isfinite(metrics["loss"]).all())
    rep = jax.vmap(lambda n: method.represent(n, images((2, 16, 16, 1)), 1))(method.network(states))
    assert rep.shape == (1, 2, 8)


def test_binary_gates_freeze_tasks_1_and_2_while_task_3_learns(tiny):
    """Exp 5: after Task 2, the switch hands over to Task 3, whose weight gradients are
    conditioned on the maximum of the Task-1 and Task-2 gates: with binary gates both earlier
    tasks' gated representations are preserved exactly while head_c and e_C learn."""
    model, params, x = tiny
    d = model.representation_dim
    network = {**tiny_network(model, params),
               "head_c": models.init_head(jax.random.key(9), d, 3)}  # fmt: skip
    make = lambda head: hat.make_hat(model, 0.5, s_max=400.0, reg=0.75, clip_embedding=6.0,
                                     anneal_steps=4, head=head)  # noqa: E731  # fmt: skip
    on_2, on_3 = make("head_b"), make("head_c")
    xs = images((4, 8, 16, 16, 3), seed=1)
    ys = jnp.asarray(np.random.default_rng(2).integers(0, 3, (4, 8)), jnp.int32)
    state0, after_2, _ = run_steps(on_2, network, xs, ys)
    assert set(state0.network["hat"]) == {"emb_a", "emb_b", "emb_c"}  # drawn at init
    chex.assert_trees_all_equal(after_2.network["head_c"], network["head_c"])  # untouched

    state = on_3.switch(after_2, None, jax.random.key(5))
    assert int(state.step) == 0  # the annealing of s restarts
    body = lambda st, b: on_3.step(st, Batch(*b), None)  # noqa: E731
    after_3, metrics = jax.jit(lambda st: jax.lax.scan(body, st, (xs[::-1], ys[::-1])))(state)
    assert bool(jnp.all(jnp.isfinite(metrics["loss"])))
    before, after = after_2.network, after_3.network
    for task in (0, 1):  # Tasks 1 and 2 through their own gates: unchanged
        np.testing.assert_allclose(on_3.represent(after, x, task), on_3.represent(before, x, task),
                                   atol=1e-6, rtol=1e-6)  # fmt: skip
    for kept in ("head_a", "head_b"):
        chex.assert_trees_all_equal(after[kept], before[kept])
    for emb in ("emb_a", "emb_b"):
        chex.assert_trees_all_equal(after["hat"][emb], before["hat"][emb])
    moved = lambda a, b: float(jnp.max(jnp.abs(a - b)))  # noqa: E731
    assert moved(after["head_c"]["kernel"], before["head_c"]["kernel"]) > 1e-3
    assert moved(after["hat"]["emb_c"]["gn0"], before["hat"]["emb_c"]["gn0"]) > 1e-3
