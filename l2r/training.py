"""Pieces every training loop shares: device-resident tasks, batches, the chunked loop, losses.

Whole tasks live on the device as uint8 arrays; host-side index streams (`l2r.data.stream`) say
which examples form each batch, and batches are gathered, normalised and (optionally) augmented
inside the jitted scan body, so nothing is copied between host and device inside a scan. The
host steps in only between scans of `CHUNK_STEPS` steps (`run_chunked`), to report progress or
to probe.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from l2r import checkpoint, distributed
from l2r.data import stream, tasks

CHUNK_STEPS = 100  # Steps per compiled call of a training loop; the host reports between calls.


class DeviceTask(NamedTuple):
    """A task's arrays on the device plus its normalisation (0..1 units, per channel)."""

    train_images: jax.Array  # uint8 [N, H, W, C]
    train_labels: jax.Array  # int32 [N]
    test_images: jax.Array  # uint8 [M, H, W, C]
    test_labels: jax.Array  # int32 [M]
    mean: jax.Array  # float32 [C]
    std: jax.Array  # float32 [C]


class Augment(NamedTuple):
    """Per-example augmentation draws for one batch (or a stack of them)."""

    dy: jax.Array
    dx: jax.Array
    flip: jax.Array


def to_device(task: tasks.Task, mean, std) -> DeviceTask:
    return DeviceTask(
        jnp.asarray(task.train.images),
        jnp.asarray(task.train.labels, jnp.int32),
        jnp.asarray(task.test.images),
        jnp.asarray(task.test.labels, jnp.int32),
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(std, jnp.float32),
    )


def train_digest(task: DeviceTask) -> str:
    """Content hash of what training on `task` reads: its training split and normalisation.
    Part of the key of a stage that reads no test split (OML's, of its meta-training data)."""
    return checkpoint.digest([task.train_images, task.train_labels, task.mean, task.std])


def gather(task: DeviceTask, idx_B: jax.Array, aug: Augment | None = None):
    """Training batch `idx_B` of `task`: (normalised float images [B,H,W,C], labels [B])."""
    x = stream.to_float(task.train_images[idx_B], task.mean, task.std)
    if aug is not None:
        x = stream.augment(x, aug.dy, aug.dx, aug.flip)
    return x, task.train_labels[idx_B]


def augment_streams(batch_size: int, num_steps: int, seeds) -> Augment:
    """Stacked host-side augmentation draws, int32 [S, num_steps, batch_size] each."""
    draws = [stream.augment_stream(batch_size, num_steps, s) for s in seeds]
    return Augment(*(np.stack([d[k] for d in draws]) for k in ("dy", "dx", "flip")))


def slice_steps(tree, start: int, stop: int):
    """Steps [start, stop) of every [S, T, ...] leaf of `tree` (None stays None)."""
    return None if tree is None else jax.tree.map(lambda a: a[:, start:stop], tree)


def map_seeds(fn, *args, chunk: int | None = None):
    """`fn` applied over the leading (seed / checkpoint / episode) axis of `args`.

    The runs of that axis have different weights, so `vmap` turns every convolution into a
    grouped one, which XLA:CPU keeps off its fast path (2.5-4x slower, docs/benchmarks.md,
    2026-11-28). So by default the axis is a `lax.map` (sequential, each run's convs canonical)
    on CPU and a `vmap` on accelerators.

    Args:
      fn: function of one run's slices of `args`.
      *args: pytrees whose leaves share the leading axis S (None entries are allowed).
      chunk: runs vmapped together per `lax.map` step; None = 1 on CPU, all on accelerators.

    Returns:
      `fn`'s outputs stacked over S.
    """
    size = jax.tree.leaves(args)[0].shape[0]
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else size
    if chunk >= size:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk if chunk > 1 else None)


def run_chunked(
    advance: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    num_steps: int,
    chunk_steps: int,
    xs_for: Callable[[int, int], Any],
    progress=None,
    on_chunk: Callable[[int, Any, Any], Mapping[str, float] | None] | None = None,
    offset: int = 0,
) -> tuple[Any, list]:
    """Runs `num_steps` steps as one compiled call per `chunk_steps` steps, with host work
    between calls: one scan over every step would report nothing until it ends and hold every
    step's inputs on the device at once.

    Args:
      advance: (carry, xs) -> (carry, out): a jitted `lax.scan` over the steps of `xs`.
      carry: the state before the first step.
      num_steps: steps to run; the last chunk is shorter when `chunk_steps` does not divide it.
      chunk_steps: steps per call of `advance`.
      xs_for: (start, stop) -> the scanned inputs of steps [start, stop) (slices of host-side
        index streams, step numbers), made just before their chunk runs.
      progress: a `console.Progress` updated after every chunk, at `offset + stop`, with the
        metrics `on_chunk` returns; None: no progress line.
      on_chunk: (stop, carry, out) -> {name: float} or None, called after every chunk and
        before the next one starts: a probe of the carry goes here; what it returns goes on the
        progress line.
      offset: steps run before this call (earlier phases of one run); moves the progress count.

    Returns:
      (the carry after the last step, [out of every chunk, in order]).
    """
    if chunk_steps < 1:
        raise ValueError(f"run_chunked: chunk_steps must be >= 1, got {chunk_steps!r}.")
    outs = []
    for start in range(0, num_steps, chunk_steps):
        stop = min(start + chunk_steps, num_steps)
        carry, out = advance(carry, xs_for(start, stop))
        outs.append(out)
        metrics = on_chunk(stop, carry, out) if on_chunk is not None else None
        if progress is not None:
            progress.update(offset + stop, **(metrics or {}))
    return carry, outs


class RunAxis:
    """Where the runs of a parallel axis of `size` (meta-training episodes, Task-B seeds) live:
    split over every device of every process (a 1-D mesh, axis 'data') when `size` is a
    multiple of the device count; otherwise on each process's first device, every process
    computing them all - or, when `strict`, an error.

    `split`, `replicate` and `host` move data in and out; with no mesh they change nothing.

    Raises:
      ValueError: `strict` and `size` is not a multiple of the device count.
    """

    def __init__(self, size: int, what: str = "runs", enabled: bool = True, strict: bool = False):
        n = jax.device_count()
        self.mesh = None
        if enabled and n > 1:
            if size % n == 0:
                self.mesh = jax.make_mesh((n,), ("data",),
                                          axis_types=(jax.sharding.AxisType.Auto,))  # fmt: skip
            elif strict:
                raise ValueError(
                    f"{size} {what} cannot be split evenly over {n} devices; make the count a "
                    f"multiple of {n}."
                )
            else:
                logging.info("%d %s do not split evenly over %d devices: each process runs them "
                             "all on one device.", size, what, n)  # fmt: skip
        # Runs vmapped together: all of a device's share on a mesh; the backend default otherwise.
        self.chunk = size if self.mesh is not None else None

    def split(self, whole):
        """Host or local arrays, the same whole on every process -> split over the runs axis.
        Typed PRNG keys travel as their key data."""
        if self.mesh is None:
            return whole
        is_key = lambda x: (isinstance(x, jax.Array)  # noqa: E731
                            and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))  # fmt: skip
        keys = jax.tree.map(is_key, whole)
        data = jax.tree.map(lambda x, k: jax.random.key_data(x) if k else x, whole, keys)
        out = distributed.split_rows(jax.device_get(data), self.mesh)
        return jax.tree.map(lambda x, k: jax.random.wrap_key_data(x) if k else x, out, keys)

    def replicate(self, tree):
        return tree if self.mesh is None else distributed.replicate(tree, self.mesh)

    def host(self, tree):
        """Numpy copies of (possibly split) arrays, whole on every process (a collective)."""
        return jax.device_get(tree) if self.mesh is None else distributed.gather(tree)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.P())


def split(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The leading axis split over 'data' (every other axis replicated)."""
    return jax.sharding.NamedSharding(mesh, jax.P("data"))


def cross_entropy(logits_BK: jax.Array, labels_B: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BK, labels_B).mean()


def accuracy(logits_BK: jax.Array, labels_B: jax.Array) -> jax.Array:
    return (jnp.argmax(logits_BK, -1) == labels_B).mean()


def features(apply_fn, backbone, images_u8, mean, std, chunk: int = 1000) -> jax.Array:
    """Representations [N, D] of uint8 images, computed in chunks to bound memory."""
    n = images_u8.shape[0]
    pad = (-n) % chunk if n > chunk else 0
    size = chunk if n > chunk else n
    x = jnp.concatenate([images_u8, jnp.zeros((pad, *images_u8.shape[1:]), images_u8.dtype)])
    x = x.reshape(-1, size, *images_u8.shape[1:])
    rep = jax.lax.map(
        lambda xc: apply_fn(backbone, stream.to_float(xc, mean, std)).representation, x
    )
    return rep.reshape(-1, rep.shape[-1])[:n]
