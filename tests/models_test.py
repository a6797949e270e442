"""Backbones: shapes, parameter counts, taps, jit equivalence, validation, and trainability."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax import lax

from l2r.models import Model, Output, Tap, apply_head, init_head, make_model


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize(
    "name, kwargs, dim",
    [
        ("resnet", {"depth": 14}, 64),
        ("resnet", {"depth": 20}, 64),
        ("resnet", {"depth": 32}, 64),
        ("convnet", {}, 64),
        ("convnet", {"widths": (16, 32, 32), "hidden": 48}, 48),
    ],
)
@pytest.mark.parametrize("input_shape", [(2, 32, 32, 3), (2, 28, 28, 1)])
def test_representation_shapes(name, kwargs, dim, input_shape):
    model = make_model(name, **kwargs)
    assert isinstance(model, Model) and model.representation_dim == dim
    params = model.init(jax.random.key(0), input_shape)
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    assert isinstance(out, Output) and out.taps is None
    assert out.representation.shape == (input_shape[0], dim)


@pytest.mark.parametrize("hw, c", [(8, 1), (16, 1), (28, 1), (32, 3)])
def test_convnet_runs_on_preset_inputs(hw, c):
    model = make_model("convnet")
    params = model.init(jax.random.key(0), (1, hw, hw, c))
    rep = jax.jit(model.apply)(params, images((3, hw, hw, c))).representation
    assert rep.shape == (3, 64) and bool(jnp.all(jnp.isfinite(rep)))


def test_resnet32_param_count():
    params = make_model("resnet", depth=32).init(jax.random.key(0), (1, 32, 32, 3))
    # 463,792 conv weights (incl. 2 option-B 1x1 shortcuts) + 2,464 GroupNorm scales/biases.
    assert sum(p.size for p in jax.tree.leaves(params)) == 466_256


def layer_paths(params):
    """{"a/b": {leaf name: array}} for every layer (kernel, scale/bias, kernel/bias)."""
    layers = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        layers.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    return layers


@pytest.mark.parametrize(
    "name, kwargs", [("resnet", {"depth": 14}), ("convnet", {"widths": (8, 16), "hidden": 12})]
)
def test_taps_cover_every_layer_with_right_shapes(name, kwargs):
    model = make_model(name, **kwargs)
    x = images((3, 16, 16, 3))
    params = model.init(jax.random.key(1), x.shape)
    out = model.apply(params, x, taps=True)
    layers = layer_paths(params)
    assert set(out.taps) == set(layers)
    for key, tap in out.taps.items():
        assert isinstance(tap, Tap)
        leaves = layers[key]
        if "scale" in leaves:  # GroupNorm.
            c = leaves["scale"].shape[0]
            cin, cout = c, c
        else:  # Conv [kH, kW, Cin, Cout] or dense [Din, Dout].
            cin, cout = leaves["kernel"].shape[-2:]
        assert tap.inputs.shape == (3, cin) and tap.outputs.shape == (3, cout), key
    # The tap of a layer is what flows through it: the stem GN sees the stem conv's output.
    first_conv, first_gn = ("stem_conv", "stem_gn") if name == "resnet" else ("conv0", "gn0")
    chex.assert_trees_all_close(out.taps[first_conv].outputs, out.taps[first_gn].inputs)
    chex.assert_trees_all_close(out.taps[first_conv].inputs, x.mean(axis=(1, 2)), atol=1e-6)
    plain = model.apply(params, x, taps=False)
    chex.assert_trees_all_close(plain.representation, out.representation)


def test_taps_false_traces_nothing_extra():
    model = make_model("convnet", widths=(8, 16))
    x = images((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x.shape)
    plain = jax.make_jaxpr(lambda p, x: model.apply(p, x).representation)(params, x)
    tapped = jax.make_jaxpr(lambda p, x: model.apply(p, x, taps=True))(params, x)
    # Every tap adds two spatial means; without taps none of them is traced.
    assert len(tapped.jaxpr.eqns) - len(plain.jaxpr.eqns) >= 2 * 7


@pytest.mark.parametrize("name, kwargs", [("resnet", {"depth": 8}), ("convnet", {"hidden": 16})])
def test_jit_and_no_jit_agree(name, kwargs):
    model = make_model(name, **kwargs)
    x = images((2, 12, 12, 3))
    params = model.init(jax.random.key(2), x.shape)
    eager = model.apply(params, x, taps=True)
    jitted = jax.jit(model.apply, static_argnames="taps")(params, x, taps=True)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-5)


def test_canonical_and_stock_convs_agree():
    x = images((2, 9, 9, 3))
    fast, ref = (make_model("resnet", depth=8, conv_impl=impl) for impl in ("canonical", "stock"))
    params = fast.init(jax.random.key(3), x.shape)
    loss = lambda m: lambda p: jnp.sum(m.apply(p, x).representation ** 2)
    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss(fast)))(params),
        jax.jit(jax.grad(loss(ref)))(params),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet", {"depth": 33}, "6n\\+2"),
        ("resnet", {"depth": 2}, "6n\\+2"),
        ("resnet", {"groups": 3}, "divid"),
        ("resnet", {"hidden": 10}, "valid ones"),
        ("convnet", {"widths": ()}, "widths"),
        ("convnet", {"hidden": 0}, "hidden"),
        ("convnet", {"conv_impl": "xla"}, "conv_impl"),
        ("vgg", {}, "valid names"),
    ],
)
def test_invalid_config_raises(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(name, **kwargs)


def test_invalid_shapes_raise():
    model = make_model("convnet")
    with pytest.raises(ValueError, match="N, H, W, C"):
        model.init(jax.random.key(0), (28, 28, 1))
    params = model.init(jax.random.key(0), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="x\\[None\\]"):
        model.apply(params, jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match="positive ints"):
        init_head(jax.random.key(0), 0, 10)


def test_heads():
    head = init_head(jax.random.key(0), 64, 10)
    assert head["kernel"].shape == (64, 10) and not bool(jnp.any(head["bias"]))
    assert apply_head(head, jnp.ones((5, 64))).shape == (5, 10)


def test_sgd_reduces_loss_on_tiny_problem():
    """Two classes that differ in where the bright blob is; 30 SGD steps must cut the loss."""
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 2
    x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32) * 0.3
    x[labels == 0, :4] += 1.0
    x[labels == 1, 4:] += 1.0
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    model = make_model("convnet", widths=(8, 16))
    key_b, key_h = jax.random.split(jax.random.key(0))
    state = {"backbone": model.init(key_b, x.shape), "head": init_head(key_h, 16, 2)}

    def loss_fn(state):
        logits = apply_head(state["head"], model.apply(state["backbone"], x).representation)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def steps(state):
        def sgd(state, _):
            loss, grads = jax.value_and_grad(loss_fn)(state)
            return jax.tree.map(lambda p, g: p - 0.3 * g, state, grads), loss

        return lax.scan(sgd, state, None, length=30)

    _, losses = steps(state)
    assert float(losses[-1]) < 0.5 * float(losses[0]), losses


@pytest.mark.parametrize("name, kwargs, hw", [("resnet", {"depth": 8}, 8), ("convnet", {}, 28)])
def test_meta_gradient_in_scan_has_only_canonical_convs(name, kwargs, hw):
    """Second order through the whole model (incl. 2x2 maps and 1x1 strided shortcuts)."""
    model = make_model(name, **kwargs)
    x = jnp.ones((2, hw, hw, 1))
    params = model.init(jax.random.key(0), x.shape)
    loss = lambda p: jnp.mean(model.apply(p, x).representation ** 2)
    sgd = lambda p, g, lr: jax.tree.map(lambda a, b: a - lr * b, p, g)
    meta = lambda p: loss(sgd(p, jax.grad(loss)(p), 0.1))
    scan = lambda p: lax.scan(
        lambda p, _: (sgd(p, jax.grad(meta)(p), 0.01), None), p, None, length=2
    )[0]
    hlo = jax.jit(scan).lower(params).compile().as_text()
    convs = [line for line in hlo.splitlines() if " convolution(" in line]
    labels = {re.search(r"dim_labels=([^,\s]+)", line).group(1) for line in convs}
    assert convs and labels == {"b01f_01io->b01f"}, labels
    assert not any("rhs_reversal" in line for line in convs)
