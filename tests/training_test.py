"""`training.run_chunked`: a scan run chunk by chunk is the same scan run at once, bit for bit,
with the host called back between chunks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import training


def body(w, x):
    """A step whose result depends on order and rounding: w <- tanh(w @ A + x)."""
    a = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    w = jnp.tanh(w @ a + x)
    return w, w.sum()


@jax.jit
def advance(w, xs):
    return jax.lax.scan(body, w, xs)


class Progress:
    def __init__(self):
        self.calls = []

    def update(self, done, **metrics):
        self.calls.append((done, metrics))


@pytest.mark.parametrize("chunk", [1, 3, 10, 25])
def test_chunks_equal_one_scan_and_call_back_between_chunks(chunk):
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
    w0 = jnp.ones(4) * 0.1
    want_w, want_out = advance(w0, xs)

    seen, progress = [], Progress()

    def on_chunk(stop, carry, out):
        seen.append((stop, out.shape[0]))
        return {"last": float(out[-1])}

    w, outs = training.run_chunked(
        advance,
        w0,
        10,
        chunk,
        lambda start, stop: xs[start:stop],
        progress=progress,
        on_chunk=on_chunk,
        offset=100,
    )
    chex.assert_trees_all_equal(w, want_w)
    np.testing.assert_array_equal(np.concatenate(outs), want_out)
    stops = [min(s + chunk, 10) for s in range(0, 10, chunk)]
    assert [s for s, _ in seen] == stops
    assert [n for _, n in seen] == [b - a for a, b in zip([0, *stops], stops, strict=False)]
    assert [d for d, _ in progress.calls] == [100 + s for s in stops]
    assert progress.calls[-1][1] == {"last": float(want_out[-1])}


def test_no_steps_and_bad_chunks():
    w, outs = training.run_chunked(advance, jnp.zeros(4), 0, 5, lambda a, b: None)
    assert outs == [] and not w.any()
    with pytest.raises(ValueError, match="chunk_steps"):
        training.run_chunked(advance, jnp.zeros(4), 10, 0, lambda a, b: None)
