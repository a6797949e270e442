"""Tapped layers shared by the backbones, and the small GroupNorm ConvNet for CPU presets.

Every layer here can record a `Tap` (spatial means of its input and output) into the
'intermediates' collection, under its own module path, only when called with `taps=True`; with
`taps=False` nothing is sown, so the plain forward pass pays nothing. `collect_taps` turns that
collection into `{"path/to/layer": Tap}`, where the path is the layer's key path in the params
tree: `taps["stage1_block0/conv1"]` belongs to `params["stage1_block0"]["conv1"]["kernel"]`.

Unit masks (HAT, Serrà et al. 2018): GroupNorm and Dense take an optional per-channel `mask`
[C] that multiplies their output (after the normalisation and affine, before the relu, which
commutes with a non-negative gate). The backbones take `masks`, {unit-layer path: [C]}, keyed
like the taps by the GroupNorm / dense layer's path; `None` (the default) builds exactly the
unmasked program. `Wiring` says which unit layers a parameter layer writes to and reads from,
so that HAT can condition each weight's gradient on the gates of both ends.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from l2r.models.conv import conv2d


def kernel_std(shape: Sequence[int]) -> float:
    """He et al. (2015) normal std, sqrt(2 / fan), for a conv or dense kernel.

    Convs [kH, kW, Cin, Cout] use fan_out = kH*kW*Cout, as torchvision's ResNets do (a GroupNorm
    follows every conv, so the fan only sets the pre-norm scale); dense [Din, Dout] fan_in = Din.
    """
    fan = shape[0] * shape[1] * shape[3] if len(shape) == 4 else shape[0]
    return math.sqrt(2.0 / fan)


def he_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * kernel_std(shape)


def fast_init(key: jax.Array, abstract_params: dict) -> dict:
    """Parameters with the distribution our layers declare, from a single random draw.

    Layers here have 'kernel' (He normal), 'scale' (ones) and 'bias' (zeros) leaves only.
    XLA:CPU compiles every threefry call separately (~0.15 s each), so `module.init` of
    ResNet-32 (66 kernels) takes ~10 s to compile; one draw split into leaves takes ~0.5 s.

    Args:
      key: PRNG key.
      abstract_params: the params tree of shapes, e.g. from `jax.eval_shape(module.init, ...)`.

    Returns:
      The params tree (plain nested dict).
    """
    flat = traverse_util.flatten_dict(abstract_params)
    sizes = [math.prod(leaf.shape) for path, leaf in flat.items() if path[-1] == "kernel"]
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, offset = {}, 0
    for path, leaf in flat.items():
        if path[-1] == "kernel":
            size = math.prod(leaf.shape)
            chunk = noise[offset : offset + size].reshape(leaf.shape)
            out[path] = chunk * kernel_std(leaf.shape)
            offset += size
        elif path[-1] in ("scale", "bias"):
            out[path] = jnp.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0, jnp.float32)
        else:
            raise ValueError(f"fast_init: no rule for parameter {'/'.join(path)}.")
    return traverse_util.unflatten_dict(out)


class Wiring(NamedTuple):
    """Which gated unit layers one parameter layer writes to and reads from (for HAT).

    `unit` is the unit layer whose gate multiplies this layer's output channels: a conv's
    GroupNorm, a GroupNorm itself, a dense layer itself. `inputs` are the unit layers whose gates
    cover this layer's input channels; a channel is live when any of them is (residual sums), so
    the input gate is their elementwise max; () means the image (always live). GroupNorm layers
    have inputs () (their scale/bias act on their own channels only).
    """

    unit: str
    inputs: tuple[str, ...]


def mask_of(masks: dict | None, name: str) -> jax.Array | None:
    """`masks[name]`, or None when there are no masks or none for `name`."""
    return None if masks is None else masks.get(name)


class Tap(NamedTuple):
    """What the meta-learner sees of one layer (paper §5.1: activations averaged over space)."""

    inputs: jax.Array  # [N, Cin] spatial mean of the layer input.
    outputs: jax.Array  # [N, Cout] spatial mean of the layer output.


class Output(NamedTuple):
    """What a backbone returns."""

    representation: jax.Array  # [N, D] input of the classification heads.
    taps: dict[str, Tap] | None  # {param path joined with "/": Tap}, or None if not asked.


def _mean_hw(x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2)) if x.ndim == 4 else x


def _sow_tap(module: nn.Module, x: jax.Array, y: jax.Array) -> None:
    module.sow("intermediates", "tap", Tap(_mean_hw(x), _mean_hw(y)))


def collect_taps(intermediates: dict) -> dict[str, Tap]:
    """{"a/b": Tap} from the sown collection {"a": {"b": {"tap": (Tap,)}}}."""
    flat = traverse_util.flatten_dict(intermediates, is_leaf=lambda _, v: not isinstance(v, dict))
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "tap"}


class Conv(nn.Module):
    """Bias-free square conv through `conv2d`, He normal init (GN follows). Params: kernel."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array, taps: bool = False) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", he_normal, (k, k, x.shape[-1], self.features))
        y = conv2d(x, kernel, self.stride, "SAME", impl=self.conv_impl)
        if taps:
            _sow_tap(self, x, y)
        return y


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He, 2018) over NHWC. Params: scale [C] (ones), bias [C] (zeros)."""

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(
        self, x: jax.Array, taps: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        """[N, H, W, C] -> [N, H, W, C]; with `mask` [C], the output times the mask."""
        n, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}; "
                "pick groups that divide every width."
            )
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xg = x.reshape(n, h, w, self.num_groups, c // self.num_groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape) * scale + bias
        if mask is not None:
            y = y * mask
        if taps:
            _sow_tap(self, x, y)
        return y


class Dense(nn.Module):
    """Fully connected layer, He normal init (a relu follows). Params: kernel [D, F], bias [F]."""

    features: int

    @nn.compact
    def __call__(
        self, x: jax.Array, taps: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        """[N, D] -> [N, F]; with `mask` [F], the output times the mask."""
        kernel = self.param("kernel", he_normal, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = x @ kernel + bias
        if mask is not None:
            y = y * mask
        if taps:
            _sow_tap(self, x, y)
        return y


class ConvNet(nn.Module):
    """Small GroupNorm convnet: [3x3 conv -> GN -> relu] per width, global average pool.

    The first conv has stride 1, every later one stride 2 (a strided conv, not pooling, keeps
    the whole net on `conv2d`'s fast path). With `hidden`, a dense layer + relu follows the pool
    and its output is the representation. Params / tap keys: conv{i}, gn{i} (i = 0..), hidden.
    Unit layers (mask keys): gn{i}, hidden.

    Attributes:
      widths: output channels of the convs, e.g. (32, 64, 64).
      groups: GroupNorm groups; must divide every width.
      hidden: width of the optional dense layer, or None.
      conv_impl: 'canonical' or 'stock' (see `conv2d`).
    """

    widths: Sequence[int] = (32, 64, 64)
    groups: int = 8
    hidden: int | None = None
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(
        self, x: jax.Array, taps: bool = False, masks: dict[str, jax.Array] | None = None
    ) -> jax.Array:
        """[N, H, W, C] images -> [N, D] representation (D = hidden or widths[-1])."""
        h = x
        for i, width in enumerate(self.widths):
            h = Conv(width, 3, 1 if i == 0 else 2, self.conv_impl, name=f"conv{i}")(h, taps)
            gn = GroupNorm(self.groups, name=f"gn{i}")
            h = nn.relu(gn(h, taps, mask_of(masks, f"gn{i}")))
        h = h.mean(axis=(1, 2))
        if self.hidden is not None:
            h = nn.relu(Dense(self.hidden, name="hidden")(h, taps, mask_of(masks, "hidden")))
        return h

    def layout(self) -> tuple[dict[str, int], dict[str, Wiring]]:
        """({unit layer: channels}, {parameter layer: Wiring}), without building anything."""
        units, wiring = {}, {}
        for i, width in enumerate(self.widths):
            units[f"gn{i}"] = width
            wiring[f"conv{i}"] = Wiring(f"gn{i}", (f"gn{i - 1}",) if i else ())
            wiring[f"gn{i}"] = Wiring(f"gn{i}", ())
        if self.hidden is not None:
            units["hidden"] = self.hidden
            wiring["hidden"] = Wiring("hidden", (f"gn{len(self.widths) - 1}",))
        return units, wiring
