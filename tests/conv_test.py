"""conv2d equals stock lax convolution at every order, and stays canonical inside scans."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from l2r.models import conv as conv_lib
from l2r.models.conv import conv2d

CANONICAL = "b01f_01io->b01f"
TOL = {"atol": 1e-4, "rtol": 1e-4}

# (H, W, kernel, stride, padding): odd/even sizes, 1x1/3x3, stride 1/2, SAME/VALID.
CASES = [
    (8, 8, 3, 1, "SAME"),
    (8, 8, 3, 2, "SAME"),  # Even size, stride 2: SAME pads (0, 1).
    (7, 9, 3, 2, "SAME"),  # Odd sizes, stride 2: pads (1, 1).
    (6, 7, 1, 2, "SAME"),
    (8, 8, 1, 1, "VALID"),
    (9, 8, 3, 2, "VALID"),  # Stride 2 leaves the last row of the even axis unused.
    (5, 6, 3, 1, "VALID"),
    (4, 4, 1, 2, "VALID"),
]


def stock(x, w, stride, padding):
    return lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=conv_lib._DIMS
    )


def normal(seed, shape):
    # NumPy, not jax.random: each new shape would cost a sampler compile.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_inputs(seed, h, w, k, cin=3, cout=4, n=2):
    return normal(seed, (n, h, w, cin)), normal(seed + 1000, (k, k, cin, cout))


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_stock(case):
    h, w_, k, s, p = case
    x, w = random_inputs(CASES.index(case), h, w_, k)
    y = conv2d(x, w, s, p)
    chex.assert_trees_all_close(y, stock(x, w, s, p), **TOL)
    cot = normal(7, y.shape)
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv2d(x, w, s, p) * cot), (0, 1)))(x, w)
    want = jax.jit(jax.grad(lambda x, w: jnp.sum(stock(x, w, s, p) * cot), (0, 1)))(x, w)
    chex.assert_trees_all_close(grads, want, **TOL)


def two_layer_loss(conv, ws, x, s, p):
    """Two convs, so second-order terms involve input gradients as well as weight gradients."""
    h = jnp.tanh(conv(x, ws[0], 1, "SAME"))
    return jnp.mean(jnp.sin(conv(h, ws[1], s, p)))


def meta_loss(conv, ws, x, s, p):
    """Loss after one inner SGD step: grad w.r.t. ws needs second derivatives."""
    inner = jax.grad(two_layer_loss, 1)(conv, ws, x, s, p)
    stepped = [w - 0.1 * g for w, g in zip(ws, inner, strict=True)]
    return two_layer_loss(conv, stepped, x, s, p)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]])
def test_second_order_matches_stock(case):
    h, w_, k, s, p = case
    x, w0 = random_inputs(1, h, w_, 3)
    _, w1 = random_inputs(2, h, w_, k, cin=4, cout=5)
    ws = [w0, w1]
    got = jax.jit(jax.grad(lambda ws: meta_loss(conv2d, ws, x, s, p)))(ws)
    want = jax.jit(jax.grad(lambda ws: meta_loss(stock, ws, x, s, p)))(ws)
    chex.assert_trees_all_close(got, want, **TOL)
    # Hessian-vector product as grad of <grad L, v>.
    v = [normal(3, w.shape) for w in ws]

    def hvp(conv):
        def gv(ws):
            g = jax.grad(two_layer_loss, 1)(conv, ws, x, s, p)
            return sum(jnp.vdot(a, b) for a, b in zip(g, v, strict=True))

        return jax.jit(jax.grad(gv))(ws)

    chex.assert_trees_all_close(hvp(conv2d), hvp(stock), **TOL)


def test_third_order_matches_stock():
    x, w = random_inputs(4, 7, 7, 3)

    def f(conv):
        loss = lambda w: jnp.sum(jnp.sin(conv(x, w, 2, "SAME")))
        return jax.jit(
            jax.grad(lambda w: jnp.sum(jax.grad(lambda w: jnp.sum(jax.grad(loss)(w)))(w)))
        )(w)

    chex.assert_trees_all_close(f(conv2d), f(stock), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "x_hw, k_hw, stride, padding, lhs, rhs",
    [
        ((3, 4), (5, 5), (1, 1), ((3, 3), (2, 4)), (1, 1), (2, 1)),  # Kernel larger: swapped.
        ((4, 3), (6, 2), (2, 1), ((4, -1), (0, 2)), (2, 1), (1, 2)),  # Negative padding.
        ((5, 5), (3, 3), (2, 2), ((-2, 1), (1, -2)), (2, 2), (1, 1)),
    ],
)
def test_general_primitive_matches_lax(x_hw, k_hw, stride, padding, lhs, rhs):
    """The internal primitive (strides, dilations, negative padding, operand swap) is exact."""
    x, _ = random_inputs(5, *x_hw, 1)
    w = normal(6, (*k_hw, 3, 4))
    ref = lambda x, w: lax.conv_general_dilated(
        x, w, stride, padding, lhs, rhs, dimension_numbers=conv_lib._DIMS
    )
    ours = lambda x, w: conv_lib._conv(x, w, stride, padding, lhs, rhs)
    chex.assert_trees_all_close(ours(x, w), ref(x, w), **TOL)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss(ours), (0, 1)))(x, w),
        jax.jit(jax.grad(loss(ref), (0, 1)))(x, w),
        **TOL,
    )


def conv_labels(fn, *args):
    """(dim_labels, has_window_reversal) of every convolution in fn's optimized HLO."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    lines = [line for line in hlo.splitlines() if " convolution(" in line]
    return [(re.search(r"dim_labels=([^,\s]+)", ln).group(1), "rhs_reversal" in ln) for ln in lines]


def scanned_sgd(conv, order):
    """3 scanned SGD steps of a 3-conv net; order 2 differentiates through an inner step."""
    x = jnp.ones((4, 9, 9, 3))

    def loss(ws):
        h = jax.nn.relu(conv(x, ws[0], 1, "SAME"))
        h = jax.nn.relu(conv(h, ws[1], 2, "SAME"))
        return jnp.mean(conv(h, ws[2], 2, "VALID") ** 2)

    def sgd(ws, grads, lr):
        return jax.tree.map(lambda w, g: w - lr * g, ws, grads)

    outer = loss if order == 1 else lambda ws: loss(sgd(ws, jax.grad(loss)(ws), 0.1))

    def step(ws, _):
        return sgd(ws, jax.grad(outer)(ws), 0.01), None

    ws = [jnp.ones((3, 3, 3, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((1, 1, 8, 8))]
    return lambda ws: lax.scan(step, ws, None, length=3)[0], ws


@pytest.mark.parametrize("order", [1, 2])
def test_scanned_step_has_only_canonical_convs(order):
    fn, ws = scanned_sgd(conv2d, order)
    labels = conv_labels(fn, ws)
    assert labels, "expected convolutions in the HLO"
    assert all(lab == CANONICAL and not rev for lab, rev in labels), labels
    # The check has teeth: stock autodiff does produce non-canonical convs here.
    stock_fn, _ = scanned_sgd(stock, order)
    assert any(lab != CANONICAL for lab, _ in conv_labels(stock_fn, ws))


def test_forward_mode_unsupported_but_stock_impl_supports_it():
    x, w = random_inputs(0, 5, 5, 3)
    with pytest.raises(TypeError):
        jax.jvp(lambda w: conv2d(x, w), (w,), (w,))
    jax.jvp(lambda w: conv2d(x, w, impl="stock"), (w,), (w,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": jnp.ones((5, 5, 3))}, "x\\[None\\]"),
        ({"w": jnp.ones((3, 3, 2, 4))}, "channels"),
        ({"stride": 0}, "stride"),
        ({"padding": "same"}, "padding"),
        ({"impl": "fast"}, "impl"),
        ({"x": jnp.ones((1, 2, 2, 3)), "padding": "VALID"}, "VALID"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = {"x": jnp.ones((1, 5, 5, 3)), "w": jnp.ones((3, 3, 3, 4)), **kwargs}
    with pytest.raises(ValueError, match=match):
        conv2d(**args)
