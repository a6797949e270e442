"""Tests for l2r.probe: linear readouts, head accuracy and linear CKA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from l2r import probe

K = 4
ADAM = probe.PAPER_READOUT
LBFGS = probe.ReadoutConfig(solver="lbfgs")


def gaussian_classes(seed, n, d=32, k=K, sep=3.0, m=None):
    """Features with one Gaussian mean per class, offset and scaled (the fit standardises)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * sep / np.sqrt(d)
    scale, offset = rng.uniform(0.5, 5.0, d), rng.normal(size=d) * 3

    def draw(count):
        y = rng.integers(0, k, count)
        x = (rng.normal(size=(count, d)) + means[y]) * scale + offset
        return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

    return (*draw(n), *draw(m or n))


@pytest.mark.parametrize("config", [ADAM, LBFGS], ids=["adam", "lbfgs"])
def test_separable_features_are_read_out(config):
    x, y, xt, yt = gaussian_classes(0, 2000, sep=8.0)
    acc = probe.readout_accuracy(x, y, xt, yt, K, config)
    assert acc >= 0.95, acc


@pytest.mark.parametrize("config", [ADAM, LBFGS], ids=["adam", "lbfgs"])
def test_shuffled_labels_give_chance(config):
    x, y, xt, yt = gaussian_classes(1, 2000, sep=8.0, m=8000)
    # Shuffling both splits makes labels independent of features, so the test accuracy of any
    # readout is a binomial draw around 1/K (std 0.005 at M=8000).
    key_train, key_test = jax.random.split(jax.random.key(0))
    y, yt = jax.random.permutation(key_train, y), jax.random.permutation(key_test, yt)
    acc = probe.readout_accuracy(x, y, xt, yt, K, config)
    assert abs(float(acc) - 1 / K) < 0.03, acc


@pytest.mark.parametrize("config", [ADAM, LBFGS], ids=["adam", "lbfgs"])
def test_agrees_with_sklearn(config):
    # Overlapping classes: a finite optimum that a nearly unregularised sklearn fit (C=1e4, i.e.
    # l2 = 1/(C n) = 5e-8) shares with ours at l2=0. Same shapes as above: no recompilation.
    x, y, xt, yt = gaussian_classes(2, 2000, sep=2.0)
    readout = probe.fit_readout(x, y, K, config)
    ours = np.asarray(jnp.argmax(probe.predict(readout, xt), -1))
    mean, std = np.asarray(x).mean(0), np.asarray(x).std(0)
    clf = LogisticRegression(C=1e4, max_iter=1000).fit((np.asarray(x) - mean) / std, np.asarray(y))
    theirs = clf.predict((np.asarray(xt) - mean) / std)
    assert np.mean(ours == theirs) >= 0.97
    assert 0.5 < np.mean(theirs == np.asarray(yt)) < 0.99  # a problem with errors to disagree on


def test_readout_accuracies_matches_loop():
    s0, s1, n, m, d = 2, 3, 300, 200, 16
    rng = np.random.default_rng(3)
    y, yt = jnp.asarray(rng.integers(0, K, n)), jnp.asarray(rng.integers(0, K, m))
    means = rng.normal(size=(s0, s1, K, d))
    x = jnp.asarray(rng.normal(size=(s0, s1, n, d)) + means[:, :, y], jnp.float32)
    xt = jnp.asarray(rng.normal(size=(s0, s1, m, d)) + means[:, :, yt], jnp.float32)
    config = ADAM._replace(steps=50)
    loop = jnp.array(
        [
            [probe.readout_accuracy(x[i, j], y, xt[i, j], yt, K, config) for j in range(s1)]
            for i in range(s0)
        ]
    )
    # chunk=1: lax.map one fit at a time; chunk=4: a vmapped chunk of 4 and a remainder of 2.
    for chunk in (1, 4):
        got = probe.readout_accuracies(x, y, xt, yt, K, config, chunk=chunk)
        chex.assert_shape(got, (s0, s1))
        chex.assert_trees_all_close(got, loop, atol=1e-6)
        # The fitted readouts themselves agree too (cached compilation: same static args).
        many = probe.fit_readouts(x, y, K, config, chunk=chunk)
        one = probe.fit_readout(x[1, 2], y, K, config)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[1, 2], many), one, atol=1e-5)
    # Inside a caller's jit (traced labels: the range check is skipped, shapes still checked).
    jitted = jax.jit(lambda *a: probe.readout_accuracies(*a, K, config, chunk=1))
    chex.assert_trees_all_close(jitted(x, y, xt, yt), loop, atol=1e-6)


def test_lbfgs_batched_matches_single():
    x, y, xt, yt = gaussian_classes(4, 2000, sep=2.0)  # shapes as above: single fit cached
    xs = jnp.stack([x, 2 * x + 1, x[:, ::-1]])
    xts = jnp.stack([xt, 2 * xt + 1, xt[:, ::-1]])
    got = probe.readout_accuracies(xs, y, xts, yt, K, LBFGS, chunk=3)
    want = [probe.readout_accuracy(a, y, b, yt, K, LBFGS) for a, b in zip(xs, xts, strict=True)]
    chex.assert_trees_all_close(got, jnp.array(want), atol=1e-6)


def test_fit_is_deterministic_and_jittable():
    x, y, _, _ = gaussian_classes(5, 300, d=8)
    config = ADAM._replace(steps=20)
    a = probe.fit_readout(x, y, K, config)
    b = jax.jit(probe.fit_readout, static_argnums=(2, 3))(x, y, K, config)
    chex.assert_trees_all_equal(a, probe.fit_readout(x, y, K, config))
    chex.assert_trees_all_close(a, b, atol=1e-6)
    chex.assert_shape([a.kernel, a.bias, a.mean, a.std], [(8, K), (K,), (8,), (8,)])


def test_standardisation_handles_dead_units_and_scale():
    x, y, xt, yt = gaussian_classes(6, 500, d=8, sep=4.0)
    dead = jnp.zeros((x.shape[0], 2))
    x_dead = jnp.concatenate([x, dead], 1)
    xt_dead = jnp.concatenate([xt, jnp.zeros((xt.shape[0], 2))], 1)
    readout = probe.fit_readout(x_dead, y, K, ADAM._replace(steps=100))
    assert np.all(np.isfinite(np.asarray(readout.kernel)))
    chex.assert_trees_all_close(readout.std[-2:], jnp.ones(2))
    # Standardised fits do not depend on the features' scale or offset.
    a = probe.readout_accuracy(x, y, xt, yt, K, ADAM._replace(steps=100))
    b = probe.readout_accuracy(100 * x + 7, y, 100 * xt + 7, yt, K, ADAM._replace(steps=100))
    assert a == b
    assert probe.readout_accuracy(x_dead, y, xt_dead, yt, K, ADAM._replace(steps=100)) == a


def test_head_accuracy():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    assert probe.head_accuracy(logits, jnp.array([0, 1, 2, 1])) == 0.75
    batched = jnp.stack([logits, -logits])
    chex.assert_trees_all_close(
        probe.head_accuracy(batched, jnp.array([0, 1, 2, 1])), jnp.array([0.75, 0.25])
    )


def cka_reference(x, y):
    """HSIC formula on N x N Gram matrices, in float64 numpy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, lc = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc))


def test_linear_cka():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(200, 16)) + 3.0, jnp.float32)
    y = jnp.asarray(np.tanh(np.asarray(x) @ rng.normal(size=(16, 24))) + rng.normal(size=(200, 24)))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    cka = probe.linear_cka(x, y)
    np.testing.assert_allclose(probe.linear_cka(x, x), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cka, cka_reference(x, y), rtol=1e-5)
    np.testing.assert_allclose(probe.linear_cka(y, x), cka, rtol=1e-5)
    np.testing.assert_allclose(probe.linear_cka(x @ q, y), cka, rtol=1e-5)
    np.testing.assert_allclose(probe.linear_cka(x, 1e3 * y), cka, rtol=1e-5)
    np.testing.assert_allclose(probe.linear_cka(1e-3 * x, y), cka, rtol=1e-5)
    assert 0.0 < float(cka) < 1.0
    # Large activations and many rows do not overflow float32.
    big = jnp.asarray(rng.normal(size=(4000, 8)) * 1e6, jnp.float32)
    np.testing.assert_allclose(probe.linear_cka(big, big[:, ::-1]), 1.0, rtol=1e-5)
    # vmap over snapshots.
    xs, ys = jnp.stack([x, 2 * x]), jnp.stack([y, y])
    chex.assert_trees_all_close(jax.vmap(probe.linear_cka)(xs, ys), jnp.array([cka, cka]))


def test_bad_input_is_named():
    x, y, xt, yt = gaussian_classes(8, 50, d=4)
    with pytest.raises(ValueError, match="solver.*choose one of 'adam', 'lbfgs'"):
        probe.fit_readout(x, y, K, probe.ReadoutConfig(solver="sgd"))
    with pytest.raises(ValueError, match="steps=0"):
        probe.fit_readout(x, y, K, probe.ReadoutConfig(steps=0))
    with pytest.raises(ValueError, match="num_classes"):
        probe.fit_readout(x, y, 1)
    with pytest.raises(ValueError, match=r"ids in \[0, 3\]"):
        probe.fit_readout(x, y, 3)
    with pytest.raises(ValueError, match="one label per training row"):
        probe.fit_readout(x, y[:-1], K)
    with pytest.raises(ValueError, match="integer class ids"):
        probe.fit_readout(x, y.astype(jnp.float32), K)
    with pytest.raises(ValueError, match="same leading"):
        probe.readout_accuracies(x[None], y, xt[None, :, :3], yt, K)
    with pytest.raises(ValueError, match="chunk"):
        probe.readout_accuracies(x[None], y, xt[None], yt, K, chunk=0)
    with pytest.raises(ValueError, match="pass \\[N, D\\] and \\[N, E\\]"):
        probe.linear_cka(x, xt[:10])
