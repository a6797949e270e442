"""Seeded host-side index streams, and the normalisation and augmentation applied on the device.

Tasks live on the device whole; a stream says which examples form each batch (int32
[num_steps, batch_size]) and which crop/flip each example gets, so a jitted scan gathers batches
by index with no host-device copies inside the loop. `to_float` and `augment` are pure jnp and
run inside jit/vmap.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2r.data.sources import DataError

# Distinct streams of one seed: the batch order and the augmentation draws must not be the same
# random numbers.
_INDEX_STREAM, _AUGMENT_STREAM = 0, 1


def _rng(seed: int, stream: int) -> np.random.Generator:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer.")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream,)))


def index_stream(num_examples: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """Batch indices for `num_steps` steps, from a fresh permutation each epoch.

    An epoch is floor(num_examples / batch_size) batches of one permutation; the remainder of
    each permutation is dropped (different examples each epoch), so no batch holds an example
    twice and no example repeats within an epoch.

    Returns:
      int32 [num_steps, batch_size], deterministic in `seed`.

    Raises:
      DataError: batch_size > num_examples, or non-positive sizes.
    """
    if batch_size > num_examples:
        raise DataError(
            f"batch_size={batch_size} is larger than the {num_examples} examples available; "
            f"lower the batch size to at most {num_examples} or use more data."
        )
    if batch_size < 1 or num_steps < 0:
        raise DataError(f"batch_size={batch_size} must be >= 1 and num_steps={num_steps} >= 0.")
    rng = _rng(seed, _INDEX_STREAM)
    per_epoch = num_examples // batch_size
    out = np.empty((num_steps, batch_size), np.int32)
    for start in range(0, num_steps, per_epoch):
        stop = min(start + per_epoch, num_steps)
        perm = rng.permutation(num_examples)[: (stop - start) * batch_size]
        out[start:stop] = perm.reshape(stop - start, batch_size)
    return out


def index_streams(
    num_examples: int, batch_size: int, num_steps: int, seeds: Sequence[int]
) -> np.ndarray:
    """`index_stream` for each seed, stacked: int32 [len(seeds), num_steps, batch_size]."""
    if len(seeds) == 0:
        raise DataError("index_streams needs at least one seed.")
    return np.stack([index_stream(num_examples, batch_size, num_steps, s) for s in seeds])


def augment_stream(batch_size: int, num_steps: int, seed: int, pad: int = 4) -> dict:
    """Per-example crop offsets and flips for CIFAR-style augmentation.

    Returns:
      dict with int32 [num_steps, batch_size] arrays: "dy", "dx" in [0, 2*pad] (crop corner in
      the padded image; pad = no shift) and "flip" in {0, 1}. Deterministic in `seed`.
    """
    if pad < 0:
        raise DataError(f"pad={pad} must be >= 0.")
    rng = _rng(seed, _AUGMENT_STREAM)
    shape = (num_steps, batch_size)
    return {
        "dy": rng.integers(0, 2 * pad + 1, shape).astype(np.int32),
        "dx": rng.integers(0, 2 * pad + 1, shape).astype(np.int32),
        "flip": rng.integers(0, 2, shape).astype(np.int32),
    }


def to_float(images_uint8, mean, std) -> jax.Array:
    """uint8 images [..., C] -> float32 (x / 255 - mean) / std, with mean, std [C] in [0, 1]."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(images, dy, dx, flip, pad: int = 4) -> jax.Array:
    """Pad-and-crop plus horizontal flip, per example (CIFAR-style); pure jnp, jit/vmap-able.

    The zero padding is in the units of `images`: after `to_float` that is the dataset mean,
    which marks the border less than black would.

    Args:
      images: float [B, H, W, C].
      dy, dx: int [B] crop corner in the padded image, in [0, 2*pad]; pad = no shift.
      flip: int [B]; 1 flips left-right (after the crop).
      pad: pixels of zero padding on each side (static).

    Returns:
      [B, H, W, C] augmented images.
    """
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, y, x):
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.dynamic_slice(
            image, (y.astype(jnp.int32), x.astype(jnp.int32), zero), (h, w, c)
        )

    out = jax.vmap(crop)(padded, jnp.asarray(dy), jnp.asarray(dx))
    return jnp.where(jnp.asarray(flip).reshape(b, 1, 1, 1) == 1, out[:, :, ::-1], out)
