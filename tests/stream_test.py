"""Tests of l2r.data.stream: index and augmentation streams, on-device augmentation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r.data import stream
from l2r.data.sources import DataError


def test_index_stream_is_epochwise_permutation():
    idx = stream.index_stream(12, 4, 7, seed=0)
    chex.assert_shape(idx, (7, 4))
    assert idx.dtype == np.int32
    for epoch in (idx[0:3], idx[3:6]):
        np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(12))
    assert not np.array_equal(idx[0:3], idx[3:6])
    # Not divisible: each epoch's batches hold distinct examples.
    ragged = stream.index_stream(10, 4, 9, seed=0)
    for e in range(4):
        epoch = ragged[2 * e : 2 * e + 2].ravel()
        assert len(set(epoch.tolist())) == 8 and epoch.max() < 10


def test_streams_are_deterministic_in_seed():
    a = stream.index_streams(100, 8, 20, seeds=[1, 2])
    chex.assert_shape(a, (2, 20, 8))
    np.testing.assert_array_equal(a, stream.index_streams(100, 8, 20, seeds=[1, 2]))
    assert not np.array_equal(a[0], a[1])
    aug = stream.augment_stream(8, 20, seed=3, pad=2)
    chex.assert_trees_all_equal(aug, stream.augment_stream(8, 20, seed=3, pad=2))
    assert set(np.unique(aug["dy"])) == set(range(5)) and set(np.unique(aug["flip"])) == {0, 1}
    assert all(v.shape == (20, 8) and v.dtype == np.int32 for v in aug.values())
    assert not np.array_equal(aug["dy"], stream.augment_stream(8, 20, seed=4, pad=2)["dy"])


def test_batch_larger_than_data_is_refused():
    with pytest.raises(DataError, match="batch_size=64.*30 examples"):
        stream.index_stream(30, 64, 5, seed=0)


def test_augment_identity_flip_and_shift():
    x = jax.random.normal(jax.random.key(0), (3, 6, 5, 2))
    pad = 2
    zeros = jnp.zeros(3, jnp.int32)
    augment = jax.jit(stream.augment, static_argnames="pad")
    centre = jnp.full(3, pad, jnp.int32)
    chex.assert_trees_all_equal(augment(x, centre, centre, zeros, pad=pad), x)
    ones = jnp.ones(3, jnp.int32)
    once = augment(x, centre, centre, ones, pad=pad)
    chex.assert_trees_all_equal(once, x[:, :, ::-1])
    chex.assert_trees_all_equal(augment(once, centre, centre, ones, pad=pad), x)
    # Crop one row lower: row i shows input row i+1; the last row is padding.
    down = augment(x, centre + 1, centre, zeros, pad=pad)
    chex.assert_trees_all_equal(down[:, :-1], x[:, 1:])
    chex.assert_trees_all_equal(down[:, -1], jnp.zeros_like(x[:, -1]))
    # Two columns left of centre: column j shows input column j-2.
    left = augment(x, centre, centre - 2, zeros, pad=pad)
    chex.assert_trees_all_equal(left[:, :, 2:], x[:, :, :-2])


def test_to_float_normalises():
    images = np.array([[[[0, 255]]]], np.uint8)
    out = jax.jit(stream.to_float)(images, np.array([0.5, 0.5]), np.array([0.5, 0.25]))
    np.testing.assert_allclose(out, [[[[-1.0, 2.0]]]], rtol=1e-6)
    assert out.dtype == jnp.float32
