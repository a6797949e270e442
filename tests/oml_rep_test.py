"""The OML and Rep baselines: OML's meta-gradient through the readout unroll against finite
differences and a Python loop, and Rep's joint labels, heads, training and cache."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import models, pretrain, rng, training
from l2r.configs import fig1
from l2r.methods import oml, rep

SIZE = 8  # Image side of the synthetic data.


def tiny_model():
    return models.make_model("convnet", widths=(4,), groups=2, hidden=4)


def rep_model():
    # Rep trains from scratch: a 4-unit representation too often starts with dead ReLUs.
    return models.make_model("convnet", widths=(8,), groups=4, hidden=8)


def tiny_config():
    config = fig1.get_config("smoke")
    config.pretrain.batch_size = 16
    config.pretrain.steps = 60
    config.pretrain.num_checkpoints = 2
    o = config.task_b.oml
    o.inner_steps, o.support_batch, o.query_batch = 10, 4, 8
    o.outer_steps, o.outer_lr = 60, 3e-2
    return config


def textures(patterns, per_class, seed) -> training.DeviceTask:
    """Classes of noisy stripes (orientation x period, random phase): easy for a convnet that
    pools over space, so a few dozen steps show learning."""
    r = np.arange(SIZE)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    gen = np.random.default_rng(seed)

    def image(pattern):
        phase = gen.integers(0, 4)
        coord = (yy, xx, xx + yy)[pattern % 3] + phase
        return np.cos(np.pi / (1 + pattern // 3) * coord)

    def split(n):
        y = np.repeat(np.arange(len(patterns), dtype=np.int32), n)
        x = 128 + 50 * np.stack([image(patterns[c]) for c in y])
        x = np.clip(x + gen.normal(0, 30, x.shape), 0, 255).astype(np.uint8)[..., None]
        return jnp.asarray(x), jnp.asarray(y)

    return training.DeviceTask(
        *split(per_class), *split(per_class // 4), jnp.array([0.5]), jnp.array([0.25])
    )


@pytest.fixture(scope="module")
def data():
    """(Task A, meta-training task): 3 classes each, 40 training examples per class."""
    return textures((0, 1, 2), 40, seed=0), textures((3, 4, 5), 40, seed=1)


def pretrained(model, n=2):
    keys = jax.random.split(jax.random.key(1), n)
    return jax.vmap(lambda k: pretrain.init_network(model, k, (1, SIZE, SIZE, 1), 3))(keys)


def episode(data_m, t=10, b=4, q=8, seed=0):
    idx, y = oml.sample_episode(jax.random.key(seed), data_m.train_labels, 3, 3, t * b, q)
    x, _ = training.gather(data_m, idx)
    return x[: t * b].reshape(t, b, *x.shape[1:]), y[: t * b].reshape(t, b), x[t * b :], y[t * b :]


# -- OML ------------------------------------------------------------------------------------------


def test_adapt_readout_equals_python_loop():
    k1, k2 = jax.random.split(jax.random.key(0))
    h = jax.random.normal(k1, (10, 4, 5))
    y = jnp.argmax(h[..., :3], -1)  # Learnable labels, so the loss falls.
    head0 = models.init_head(k2, 5, 3)
    scanned, losses = jax.jit(oml.adapt_readout, static_argnums=3)(head0, h, y, 0.1)
    head, ref_losses = head0, []
    for i in range(10):
        loss_fn = lambda w, i=i: training.cross_entropy(models.apply_head(w, h[i]), y[i])
        loss, g = jax.value_and_grad(loss_fn)(head)
        head = jax.tree.map(lambda w, g: w - 0.1 * g, head, g)
        ref_losses.append(loss)
    chex.assert_trees_all_close(scanned, head, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_meta_gradient_matches_finite_differences(data):
    _, data_m = data
    model = tiny_model()
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        backbone = f64(model.init(jax.random.key(2), (1, SIZE, SIZE, 1)))
        xs, ys, xq, yq = episode(data_m)
        xs, xq = f64(xs), f64(xq)
        # A large inner lr makes the second-order path through the unroll matter.
        loss = jax.jit(lambda p: oml.meta_loss(model, p, xs, ys, xq, yq, 3, 1.0)[0])
        grad = jax.jit(jax.grad(lambda p: oml.meta_loss(model, p, xs, ys, xq, yq, 3, 1.0)[0]))
        g = grad(backbone)
        leaves, treedef = jax.tree.flatten(backbone)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        v = treedef.unflatten(
            [jax.random.normal(k, a.shape, jnp.float64) for k, a in zip(keys, leaves, strict=True)]
        )
        analytic = sum(jnp.vdot(a, b) for a, b in zip(*map(jax.tree.leaves, (g, v)), strict=True))
        eps = 1e-5
        shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, backbone, v)  # noqa: E731
        numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
        assert abs(float(analytic)) > 1e-4
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)

        # The unroll is differentiated: treating the adapted readout as a constant gives a
        # different gradient.
        def frozen_head_loss(p):
            t, b = ys.shape
            x = jnp.concatenate([xs.reshape(t * b, *xs.shape[2:]), xq])
            h = model.apply(p, x).representation
            head = jax.lax.stop_gradient(
                oml.adapt_readout(
                    {"kernel": jnp.zeros((h.shape[-1], 3)), "bias": jnp.zeros(3)},
                    h[: t * b].reshape(t, b, -1),
                    ys,
                    1.0,
                )[0]
            )
            y = jnp.concatenate([ys.reshape(-1), yq])
            return training.cross_entropy(models.apply_head(head, h), y)

        g_frozen = jax.jit(jax.grad(frozen_head_loss))(backbone)
        diff = jax.tree.map(jnp.subtract, g, g_frozen)
        norm = lambda t: float(jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(t))))  # noqa: E731
        assert norm(diff) > 1e-3 * norm(g)


def test_sample_episode_draws_distinct_examples_of_n_way_classes():
    labels = jnp.repeat(jnp.arange(6), 20)
    idx, y = oml.sample_episode(jax.random.key(0), labels, 6, 2, 30, 8)
    idx, y = np.asarray(idx), np.asarray(y)
    assert len(set(idx.tolist())) == 38
    original = np.asarray(labels)[idx]
    assert len(set(original.tolist())) == 2 and set(y.tolist()) <= {0, 1}
    # The remapping is consistent: each original class maps to one new label.
    assert all(len(set(y[original == c].tolist())) == 1 for c in set(original.tolist()))
    idx_all, y_all = oml.sample_episode(jax.random.key(0), labels, 6, 6, 30, 8)
    np.testing.assert_array_equal(np.asarray(labels)[np.asarray(idx_all)], y_all)


def test_meta_training_lowers_the_query_loss_and_is_deterministic(data):
    data_a, data_m = data
    config, model = tiny_config(), tiny_model()
    nets0 = pretrained(model)
    key = jax.random.key(7)
    nets, losses, _ = oml.meta_train_oml(config, model, nets0, data_a, data_m, key)
    assert losses.shape == (2, config.task_b.oml.outer_steps)
    chex.assert_trees_all_equal(nets["head"], nets0["head"])  # Task-A heads untouched.
    chex.assert_trees_all_equal_shapes(nets, nets0)

    # Fixed held-out episodes: the meta-loss is lower after meta-training, for each checkpoint.
    episodes = [episode(data_m, 10, 4, 8, seed=100 + i) for i in range(4)]
    evaluate = jax.jit(
        lambda bb: jnp.mean(jnp.stack([oml.meta_loss(model, bb, *e, 3, 0.1)[0] for e in episodes]))
    )
    for i in range(2):
        before = evaluate(jax.tree.map(lambda a, i=i: a[i], nets0["backbone"]))
        after = evaluate(jax.tree.map(lambda a, i=i: a[i], nets["backbone"]))
        assert float(after) < float(before) - 0.2, (float(before), float(after))

    again, losses2, _ = oml.meta_train_oml(config, model, nets0, data_a, data_m, key)
    chex.assert_trees_all_equal(again, nets)
    np.testing.assert_array_equal(losses, losses2)
    # Checkpoint i's result does not depend on how the checkpoints are grouped.
    config.pretrain.seeds_per_call = 1
    alone, losses1, _ = oml.meta_train_oml(config, model, nets0, data_a, data_m, key)
    chex.assert_trees_all_close(alone, nets, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses1, losses, rtol=1e-4, atol=1e-5)
    other, _, _ = oml.meta_train_oml(config, model, nets0, data_a, data_m, jax.random.key(8))
    leaves = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    assert not np.allclose(leaves(other["backbone"]), leaves(nets["backbone"]))


def test_oml_starts_are_cached_per_checkpoint(data, tmp_path, monkeypatch):
    data_a, data_m = data
    config, model = tiny_config(), tiny_model()
    config.task_b.oml.outer_steps = 4
    nets0 = pretrained(model)
    key = jax.random.key(3)
    direct, _, _ = oml.meta_train_oml(config, model, nets0, data_a, data_m, key)
    # Checkpoint 1 trained alone (ids=[1]) is checkpoint 1 of the whole run.
    second = jax.tree.map(lambda a: a[1:], nets0)
    alone, _, _ = oml.meta_train_oml(config, model, second, data_a, data_m, key, ids=[1])
    chex.assert_trees_all_close(alone, jax.tree.map(lambda a: a[1:], direct), atol=1e-6)

    config.pretrain.seeds_per_call = 1
    starts, seconds = oml.oml_starts(config, model, nets0, data_m, key, str(tmp_path))
    chex.assert_trees_all_close(starts, direct, atol=1e-6)
    root = tmp_path / "pretrain" / f"oml-{oml.fingerprint(config, nets0, data_m, key, None)}"
    assert sorted(os.listdir(root)) == ["ckpt_0", "ckpt_1"] and seconds > 0

    # A second call reads the checkpoints back and trains nothing.
    monkeypatch.setattr(oml, "meta_train_oml", lambda *a, **k: pytest.fail("retrained"))
    again, seconds = oml.oml_starts(config, model, nets0, data_m, key, str(tmp_path))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, again), jax.tree.map(np.asarray, starts))
    assert seconds < 1e-3
    # Other starting networks or another recipe: another folder.
    moved = jax.tree.map(lambda a: a + 1e-3, nets0)
    assert f"oml-{oml.fingerprint(config, moved, data_m, key, None)}" != root.name
    config.task_b.oml.inner_lr = 0.2
    assert f"oml-{oml.fingerprint(config, nets0, data_m, key, None)}" != root.name


def test_n_way_outer_steps_use_a_narrower_readout(data):
    data_a, data_m = data
    config, model = tiny_config(), tiny_model()
    config.task_b.oml.outer_steps = 3
    nets0 = pretrained(model, n=1)
    nets, losses, _ = oml.meta_train_oml(
        config, model, nets0, data_a, data_m, jax.random.key(0), n_way=2
    )
    # A zero readout's first inner loss is log(n_way); the meta-loss starts near it.
    assert losses.shape == (1, 3) and abs(losses[0, 0] - np.log(2)) < 0.2, losses
    chex.assert_tree_all_finite(nets)


def test_too_little_meta_data_is_a_clear_error(data):
    data_a, data_m = data
    config, model = tiny_config(), tiny_model()
    config.task_b.oml.query_batch = 200
    with pytest.raises(ValueError, match="distinct examples"):
        oml.meta_train_oml(config, model, pretrained(model), data_a, data_m, jax.random.key(0))


# -- Rep ------------------------------------------------------------------------------------------


def test_joint_labels_and_heads():
    np.testing.assert_array_equal(rep.joint_labels(jnp.array([0, 2, 1]), 5), [5, 7, 6])
    head = models.init_head(jax.random.key(0), 6, 3 + 4)
    head = {**head, "bias": jnp.arange(7.0)}
    head_a, head_m = rep.split_head(head, 3)
    h = jax.random.normal(jax.random.key(1), (5, 6))
    joint = models.apply_head(head, h)
    np.testing.assert_array_equal(models.apply_head(head_a, h), joint[:, :3])
    np.testing.assert_array_equal(models.apply_head(head_m, h), joint[:, 3:])
    assert rep.batch_split(128, 25000, 12500) == (85, 43)
    assert rep.batch_split(128, 100, 100) == (64, 64)
    assert rep.batch_split(4, 1000, 1) == (3, 1)


def test_rep_pretraining_lowers_the_loss_is_cached_and_deterministic(data, tmp_path):
    data_a, data_m = data
    config, model = tiny_config(), rep_model()
    nets, accs, train_s = rep.pretrain_rep(config, model, data_a, data_m, str(tmp_path))
    assert nets["head"]["kernel"].shape == (2, model.representation_dim, 3)  # A's block only.
    assert train_s > 0
    root = tmp_path / "pretrain"
    assert len(os.listdir(root)) == 1 and os.listdir(root)[0].startswith("rep-")
    same, same_accs, same_s = rep.pretrain_rep(config, model, data_a, data_m, str(tmp_path))
    chex.assert_trees_all_equal(same, nets)  # Restored from the cache, not retrained.
    np.testing.assert_array_equal(same_accs, accs)
    assert same_s < train_s

    # A fresh run with the same seeds reproduces the cached networks; its joint head's A block
    # is the returned head.
    seeds = [rng.seed_for(config.seed, "rep_data", i) for i in range(2)]
    joint, acc_a, acc_m, losses = rep.train_joint(config, model, data_a, data_m, seeds, [0, 1])
    k_a = rep.num_classes(data_a)
    assert joint["head"]["kernel"].shape == (2, model.representation_dim, 6)
    chex.assert_trees_all_close(nets["backbone"], joint["backbone"], rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        nets["head"], rep.split_head(joint["head"], k_a)[0], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(accs, acc_a)

    # Training lowers the loss; the easy classes are learnt (chance is 1/3 in each block).
    assert losses.shape == (2, config.pretrain.steps)
    assert np.all(losses[:, -5:].mean(1) < 0.6 * losses[:, :5].mean(1)), losses
    assert np.all(acc_a > 0.6) and np.all(acc_m > 0.6), (acc_a, acc_m)

    def union_loss(p):
        x_a, y_a = training.gather(data_a, jnp.arange(data_a.train_labels.shape[0]))
        x_m, y_m = training.gather(data_m, jnp.arange(data_m.train_labels.shape[0]))
        h = model.apply(p["backbone"], jnp.concatenate([x_a, x_m])).representation
        y = jnp.concatenate([y_a, rep.joint_labels(y_m, k_a)])
        return training.cross_entropy(models.apply_head(p["head"], h), y)

    init = pretrain.init_network(
        model, rng.key_for(config.seed, "rep_init", 0), (1, SIZE, SIZE, 1), 6
    )
    trained = jax.tree.map(lambda a: a[0], joint)
    assert float(union_loss(trained)) < 0.7 * float(union_loss(init))


def test_fingerprint_tracks_the_meta_data(data):
    data_a, data_m = data
    config = tiny_config()
    fp = rep.fingerprint(config, data_a, data_m)
    assert fp == rep.fingerprint(config, data_a, data_m)
    fewer = data_m._replace(
        train_images=data_m.train_images[:-1], train_labels=data_m.train_labels[:-1]
    )
    assert rep.fingerprint(config, data_a, fewer) != fp
    config.task_b.rep.steps = 7
    assert rep.fingerprint(config, data_a, data_m) != fp


def test_rep_with_augmentation_splits_the_draws(data):
    data_a, data_m = data
    config, model = tiny_config(), rep_model()
    config.data.augment, config.task_b.rep.steps = True, 3  # rep.steps overrides pretrain.steps
    joint, acc_a, _, losses = rep.train_joint(config, model, data_a, data_m, [5], [0])
    assert losses.shape == (1, 3) and np.all(np.isfinite(losses))
    chex.assert_tree_all_finite(joint)
