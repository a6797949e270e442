"""Task-B machinery: the scanned chunk over mapped seeds equals a plain Python loop of steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import fig1
from l2r import forgetting, models, run_b, training
from l2r.data import sources, tasks
from l2r.methods import Batch, make_method

TASK_B = fig1.get_config("smoke").task_b


@pytest.fixture(scope="module")
def setup():
    config = fig1.get_config("smoke")
    config.num_seeds = 2
    dataset = sources.load("synthetic", **config.data.synthetic.to_dict())
    task_a, task_b = tasks.split_task(dataset, config.data.classes_a, config.data.classes_b)
    mean, std = tasks.normalization_stats(dataset.train)
    model = forgetting.make_model(config)
    data_a = training.to_device(task_a, mean, std)
    data_b = training.to_device(task_b, mean, std)
    key = jax.random.key(0)
    shape = (1, *task_a.train.images.shape[1:])
    networks = jax.vmap(
        lambda k: {
            "backbone": model.init(k, shape),
            "head_a": models.init_head(jax.random.fold_in(k, 1), model.representation_dim, 3),
            "head_b": models.init_head(jax.random.fold_in(k, 2), model.representation_dim, 3),
        }
    )(jax.random.split(key, config.num_seeds))
    streams = run_b.make_streams(
        config, len(task_b.train.labels), len(task_a.train.labels), config.num_seeds
    )
    return config, model, data_a, data_b, networks, streams


@pytest.mark.parametrize("name", ["sgd", "teacher"])
def test_scan_equals_python_loop(setup, name):
    config, model, data_a, data_b, networks, streams = setup
    method = make_method(name, model, TASK_B)
    steps = 6
    keys = jnp.stack([jax.random.split(jax.random.key(s), steps) for s in range(2)])
    advance = run_b.make_advance(method)
    idx_a = streams.idx_a[:, :steps] if method.uses_task_a else None
    scanned, metrics = advance(
        networks, data_a, data_b, keys, streams.idx_b[:, :steps], idx_a, None, None
    )

    step = jax.jit(method.step)
    for s in range(2):
        state = jax.tree.map(lambda a, s=s: a[s], networks)
        losses = []
        for t in range(steps):
            x_b, y_b = training.gather(data_b, streams.idx_b[s, t])
            x_a = y_a = None
            if method.uses_task_a:
                x_a, y_a = training.gather(data_a, streams.idx_a[s, t])
            state, m = step(state, Batch(x_b, y_b, x_a, y_a), keys[s, t])
            losses.append(m["loss"])
        chex.assert_trees_all_close(
            state, jax.tree.map(lambda a, s=s: a[s], scanned), rtol=2e-5, atol=2e-6
        )
        np.testing.assert_allclose(np.mean(losses), metrics["loss"][s], rtol=1e-5)


def test_sgd_never_touches_the_task_a_head(setup):
    config, model, data_a, data_b, networks, streams = setup
    method = make_method("sgd", model, TASK_B)
    keys = jnp.stack([jax.random.split(jax.random.key(s), 3) for s in range(2)])
    out, _ = run_b.make_advance(method)(
        networks, data_a, data_b, keys, streams.idx_b[:, :3], None, None, None
    )
    chex.assert_trees_all_equal(out["head_a"], networks["head_a"])
    assert not np.allclose(out["head_b"]["kernel"], networks["head_b"]["kernel"])


def test_streams_are_deterministic_and_differ_across_seeds(setup):
    config, _, data_a, data_b, _, streams = setup
    again = run_b.make_streams(
        config, data_b.train_labels.shape[0], data_a.train_labels.shape[0], config.num_seeds
    )
    np.testing.assert_array_equal(streams.idx_b, again.idx_b)
    np.testing.assert_array_equal(streams.idx_a, again.idx_a)
    assert streams.idx_b.shape == (2, config.task_b.steps, config.task_b.batch_size)
    assert not np.array_equal(streams.idx_b[0], streams.idx_b[1])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_map_seeds_equals_vmap(setup, chunk):
    """lax.map (CPU default), chunked lax.map and vmap give the same runs."""
    config, model, data_a, data_b, networks, streams = setup
    method = make_method("sgd", model, TASK_B)
    x_b, y_b = training.gather(data_b, streams.idx_b[0, 0])

    def one(network):
        state, metrics = method.step(network, Batch(x_b, y_b), None)
        return state, metrics["loss"]

    four = jax.tree.map(lambda a: jnp.concatenate([a, 2 * a]), networks)  # S = 4 runs
    reference = jax.jit(jax.vmap(one))(four)
    mapped = jax.jit(lambda n: training.map_seeds(one, n, chunk=chunk))(four)
    chex.assert_trees_all_close(mapped, reference, rtol=1e-5, atol=1e-6)
    # None entries (a method without Task-A data) pass through.
    out = training.map_seeds(lambda n, none: n["head_b"]["bias"], four, None, chunk=chunk)
    chex.assert_trees_all_equal(out, four["head_b"]["bias"])


def test_kernel_scaled_sgd_slows_only_the_kernels(setup):
    """sgd_kernels_x<k>: conv/dense kernels step k·lr, GroupNorm/bias leaves and head B step lr."""
    _, model, _, data_b, networks, streams = setup
    network = jax.tree.map(lambda a: a[0], networks)
    batch = Batch(*training.gather(data_b, streams.idx_b[0, 0]))
    full, _ = make_method("sgd", model, TASK_B).step(network, batch, None)
    slow, _ = make_method("sgd_kernels_x0.25", model, TASK_B).step(network, batch, None)
    flat = lambda t: jax.tree_util.tree_leaves_with_path(t)  # noqa: E731
    for (path, w0), (_, w1), (_, w2) in zip(flat(network), flat(full), flat(slow), strict=True):
        name = jax.tree_util.keystr(path)
        if "backbone" in name and w0.ndim > 1:
            np.testing.assert_allclose(w2 - w0, 0.25 * (w1 - w0), rtol=1e-4, atol=1e-7)
        else:
            np.testing.assert_array_equal(w2, w1)


def test_cached_history_round_trips_and_a_failed_run_leaves_no_file(tmp_path):
    history = {"readout_A": np.arange(6, dtype=np.float32).reshape(2, 3), "loss": np.ones((2, 3))}
    path = str(tmp_path / "task_b" / "sgd-key.npz")

    def broken():
        raise KeyboardInterrupt  # a run stopped midway

    with pytest.raises(KeyboardInterrupt):
        run_b.cached_history(path, broken)
    assert not (tmp_path / "task_b").exists() or not any((tmp_path / "task_b").iterdir())
    out = run_b.cached_history(path, lambda: (history, 3.0, 1.0))
    assert out[2:] == (1.0, False) and out[1] == 3.0
    again, train_s, probe_s, reused = run_b.cached_history(path, lambda: pytest.fail("reran"))
    assert (train_s, probe_s, reused) == (3.0, 1.0, True)
    chex.assert_trees_all_equal(again, history)
    assert sorted(p.name for p in (tmp_path / "task_b").iterdir()) == ["sgd-key.npz"]
    # No cache directory: always runs.
    assert run_b.cached_history(None, lambda: (history, 3.0, 1.0))[3] is False
