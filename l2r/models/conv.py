"""2-D convolution whose derivatives, at every order, stay canonical for XLA:CPU.

XLA:CPU runs a convolution on its fast Eigen kernel only in canonical form: NHWC input, HWIO
kernel, NHWC output (`dim_labels=b01f_01io->b01f`), no window reversal. The pass that rewrites
other layouts into that form visits only the entry computation, so the gradient convolutions that
stock autodiff emits (`b01f_01oi->b01f` with a reversed kernel, `f01b_i01o->01bf`) fall back to a
naive loop nest inside `lax.scan` / `fori_loop` bodies and run 7-20x slower (PERF-NOTES.md).

`conv2d` fixes this with a `jax.custom_vjp` whose backward pass is written as canonical
convolutions of the same custom-vjp'd primitive (`_conv`):

* input gradient: the output gradient, lhs-dilated by the stride, convolved with the spatially
  flipped, in/out-swapped kernel (the flip is a `rev` of the kernel tensor, not a window
  reversal);
* weight gradient: input and output gradient transposed so that batch plays the role of
  features, the output gradient rhs-dilated by the stride, the result transposed back.

Because both are again `_conv` calls, differentiating the backward pass (reverse-over-reverse:
grad-of-grad, Hessian-vector products, meta-gradients through an SGD step) produces canonical
convolutions too, to any order. The primitive is closed under this: a conv with stride s, lhs
dilation a and rhs dilation d has gradients with (stride, lhs, rhs) = (a, s, d) and (d, a, s).

Two details keep higher orders canonical: the custom-vjp forward calls the custom-vjp'd
function itself (an outer differentiation traces it), and XLA's ConvOperandSwapper, which swaps
operands (with a window reversal, non-canonically) whenever the kernel is spatially larger than
the input (some second-order convs), is pre-empted by doing that swap ourselves canonically.
Verified on kernels 1-7, strides 1-3, SAME/VALID, to third order; exotic shapes (a kernel wider
than a 1-pixel input) may still fall back to XLA's choice, with correct values.

`vmap` over inputs keeps convs canonical (the vmapped axis joins the batch); `vmap` over kernels
turns into grouped convs, which are not.

Limitation: `custom_vjp` functions have no forward-mode rule, so `jax.jvp` / `jax.jacfwd` /
forward-over-reverse Hessians raise; use reverse-over-reverse (`jax.grad(jax.grad(...))`).
`conv2d(..., impl="stock")` is plain `lax.conv_general_dilated` (all modes) for comparison.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")  # The canonical form; every conv in this module uses it.
IMPLS = ("canonical", "stock")

Pair = tuple[int, int]


def _lax_conv(x, w, stride: Pair, padding: tuple[Pair, Pair], lhs_dil: Pair, rhs_dil: Pair):
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=_DIMS,
    )


def _crop(x, padding, lhs_dil):
    """Rewrites negative padding (cropping) of the lhs-dilated `x` as a slice of `x`.

    Returns `(x', padding')` with `padding' >= 0` selecting the same dilated positions. A slice
    differentiates into a pad, never into a convolution.
    """
    if all(lo >= 0 and hi >= 0 for lo, hi in padding):
        return x, tuple(padding)
    index = [slice(None)] * 4
    new_padding = []
    for axis, ((lo, hi), a) in enumerate(zip(padding, lhs_dil, strict=True)):
        n = x.shape[axis + 1]
        first, last = 0, n - 1  # Entries kept; entry i sits at dilated position a*i.
        if lo < 0:
            first = -(lo // a)  # ceil(-lo / a): first entry at or after the cropped prefix.
            lo = a * first + lo
        if hi < 0:
            end = (n - 1) * a + hi  # Last dilated position kept.
            last = end // a
            hi = end - a * last
        index[axis + 1] = slice(first, last + 1)
        new_padding.append((lo, hi))
    return x[tuple(index)], tuple(new_padding)


def _xla_swaps(x_shape, w_shape, stride, padding, lhs_dil, rhs_dil) -> bool:
    """Whether XLA's ConvOperandSwapper would swap this conv's operands.

    It does so when the kernel is spatially larger than the input (which happens for some
    second-order gradient convs), producing a reversed, non-canonical conv. Mirrors
    `SwapConvolutionOperandsIfBeneficial` (xla/hlo/transforms/simplifiers) for our convs.
    """
    kernel_product = swapped_product = 1
    for axis in range(2):
        k, n, (lo, hi) = w_shape[axis], x_shape[axis + 1], padding[axis]
        plain = lo == 0 and hi == 0 and rhs_dil[axis] == 1
        group = plain and lhs_dil[axis] == k and stride[axis] == k - 1
        contraction = plain and k == n and lhs_dil[axis] == 1 and stride[axis] == 1
        if group or contraction:
            continue
        kernel_product *= k
        full = n == 1 and stride[axis] == 1 and rhs_dil[axis] == 1 and lo == hi == k - 1
        swapped_product *= k if full else n
    return kernel_product > swapped_product


def _out_size(n, k, padding, stride, lhs_dil, rhs_dil) -> int:
    """Output length of one spatial axis of a dilated, padded, strided correlation."""
    return ((n - 1) * lhs_dil + 1 + sum(padding) - (k - 1) * rhs_dil - 1) // stride + 1


def _out_shape(x_shape, w_shape, stride, padding, lhs_dil, rhs_dil):
    args = zip(x_shape[1:3], w_shape[:2], padding, stride, lhs_dil, rhs_dil, strict=True)
    return (x_shape[0], *(_out_size(*a) for a in args), w_shape[3])


def _raw_conv(x, w, stride, padding, lhs_dil, rhs_dil, pad_fixed=False):
    """The conv, in a canonical form that XLA keeps canonical; padding must be non-negative.

    When XLA would swap the operands, we swap them ourselves in canonical form: the kernel
    becomes the image (batch Cout, features Cin) and the input the kernel (in Cin, out N); the
    correlation then runs backwards in space, so the output is flipped back. Only values are
    computed here; derivatives come from `_conv_bwd`.
    """
    out_shape = _out_shape(x.shape, w.shape, stride, padding, lhs_dil, rhs_dil)
    if not _xla_swaps(x.shape, w.shape, stride, padding, lhs_dil, rhs_dil):
        return _lax_conv(x, w, stride, padding, lhs_dil, rhs_dil)
    pads = []
    for axis in range(2):
        k, n, lo = w.shape[axis], x.shape[axis + 1], padding[axis][0]
        # Input entry i meets kernel tap j at output o iff a*i - d*j = o*s - lo; with the
        # output reversed (o' = O-1-o) this is a correlation of the kernel by the input.
        new_lo = (out_shape[axis + 1] - 1) * stride[axis] - lo
        pads.append((new_lo, (n - 1) * lhs_dil[axis] - (k - 1) * rhs_dil[axis] + lo))
    w_img, pads = _crop(jnp.transpose(w, (3, 0, 1, 2)), pads, rhs_dil)  # [Cout, kH, kW, Cin]
    if 0 in w_img.shape[1:3]:  # No output position meets the kernel: all zeros.
        return jnp.zeros(out_shape, jnp.result_type(x, w))
    x_ker = jnp.transpose(x, (1, 2, 3, 0))  # [H, W, Cin, N]
    if not _xla_swaps(w_img.shape, x_ker.shape, stride, pads, rhs_dil, lhs_dil):
        y = _lax_conv(w_img, x_ker, stride, pads, rhs_dil, lhs_dil)  # [Cout, Ho, Wo, N]
        return jnp.transpose(jnp.flip(y, (1, 2)), (3, 1, 2, 0))
    if pad_fixed:  # Only exotic shapes get here; XLA then chooses (values stay exact).
        return _lax_conv(x, w, stride, padding, lhs_dil, rhs_dil)
    # Both orientations would be swapped: XLA leaves unpadded "group"/"contraction" axes out of
    # its size comparison. One zero row past the end makes every axis count; trim the output.
    padding = tuple((lo, hi + 1) if lo == hi == 0 else (lo, hi) for lo, hi in padding)
    y = _raw_conv(x, w, stride, padding, lhs_dil, rhs_dil, pad_fixed=True)
    return y[:, : out_shape[1], : out_shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nonneg(x, w, stride, padding, lhs_dil, rhs_dil):
    """Canonical conv with non-negative padding; derivatives via `_conv_bwd`."""
    return _raw_conv(x, w, stride, padding, lhs_dil, rhs_dil)


def _conv_fwd(x, w, stride, padding, lhs_dil, rhs_dil):
    # Call the custom-vjp'd function, not `_raw_conv`: under an outer differentiation (grad of
    # grad) this forward is traced by the outer level, which must see our rule, not lax's.
    return _conv_nonneg(x, w, stride, padding, lhs_dil, rhs_dil), (x, w)


def _conv_bwd(stride, padding, lhs_dil, rhs_dil, residuals, g):
    x, w = residuals
    dx = _input_grad(g, w, x.shape, stride, padding, lhs_dil, rhs_dil)
    dw = _weight_grad(x, g, w.shape, stride, padding, lhs_dil, rhs_dil)
    return dx, dw


_conv_nonneg.defvjp(_conv_fwd, _conv_bwd)


def _conv(x, w, stride: Pair, padding: tuple[Pair, Pair], lhs_dil: Pair, rhs_dil: Pair):
    """Canonical conv, closed under differentiation; the one primitive of this module.

    Args:
      x: [N, H, W, Cin] input.
      w: [kH, kW, Cin, Cout] kernel.
      stride: window strides (sh, sw).
      padding: ((lo_h, hi_h), (lo_w, hi_w)) of the lhs-dilated input; negative crops.
      lhs_dil: input dilation (ah, aw).
      rhs_dil: kernel dilation (dh, dw).

    Returns:
      [N, Ho, Wo, Cout] output.
    """
    cropped, nonneg_padding = _crop(x, padding, lhs_dil)
    if 0 in cropped.shape[1:3]:  # Cropped to nothing: every window sees only padding.
        out_shape = _out_shape(x.shape, w.shape, stride, padding, lhs_dil, rhs_dil)
        return jnp.zeros(out_shape, jnp.result_type(x, w))
    x, padding = cropped, nonneg_padding
    return _conv_nonneg(x, w, tuple(stride), padding, tuple(lhs_dil), tuple(rhs_dil))


def _input_grad(g, w, x_shape, stride, padding, lhs_dil, rhs_dil):
    """d(loss)/dx as a canonical conv of g [N, Ho, Wo, Cout] -> [N, H, W, Cin]."""
    pads = []
    for axis in range(2):
        k_eff = (w.shape[axis] - 1) * rhs_dil[axis] + 1
        lo = padding[axis][0]
        n, o = x_shape[axis + 1], g.shape[axis + 1]
        # Full correlation of the stride-dilated g with the flipped kernel, then every
        # lhs_dil-th position starting at the forward's low padding: output length exactly n.
        pads.append((k_eff - 1 - lo, lhs_dil[axis] * (n - 1) - (o - 1) * stride[axis] + lo))
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)  # [kH, kW, Cout, Cin]
    return _conv(g, w_t, lhs_dil, tuple(pads), stride, rhs_dil)


def _weight_grad(x, g, w_shape, stride, padding, lhs_dil, rhs_dil):
    """d(loss)/dw [kH, kW, Cin, Cout] as a canonical conv where batch plays the features."""
    pads = []
    for axis in range(2):
        k, n, o = w_shape[axis], x.shape[axis + 1], g.shape[axis + 1]
        lo = padding[axis][0]
        # High padding that makes the output exactly k (crops rows the forward never used).
        hi = rhs_dil[axis] * (k - 1) + (o - 1) * stride[axis] - (n - 1) * lhs_dil[axis] - lo
        pads.append((lo, hi))
    x_t = jnp.transpose(x, (3, 1, 2, 0))  # [Cin, H, W, N]: Cin is the batch, N the features.
    g_t = jnp.transpose(g, (1, 2, 0, 3))  # [Ho, Wo, N, Cout]: g is the kernel.
    dw_t = _conv(x_t, g_t, rhs_dil, tuple(pads), lhs_dil, stride)  # [Cin, kH, kW, Cout]
    return jnp.transpose(dw_t, (1, 2, 0, 3))


def same_padding(size: int, kernel: int, stride: int) -> Pair:
    """TensorFlow/`lax` 'SAME' padding of one spatial axis: output ceil(size / stride).

    When the total is odd, the extra row goes at the end (e.g. size 8, kernel 3, stride 2 pads
    (0, 1); size 7 pads (1, 1)).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(
    x: jax.Array,
    w: jax.Array,
    stride: int = 1,
    padding: Literal["SAME", "VALID"] = "SAME",
    impl: Literal["canonical", "stock"] = "canonical",
) -> jax.Array:
    """2-D convolution (cross-correlation, like `lax.conv`) with canonical derivatives.

    Equals `lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=
    ("NHWC", "HWIO", "NHWC"))` in value and in first and higher reverse-mode derivatives.

    Args:
      x: [N, H, W, Cin] input, float32 (or float16/bfloat16).
      w: [kH, kW, Cin, Cout] kernel.
      stride: spatial stride, the same along H and W.
      padding: 'SAME' (output ceil(H / stride), asymmetric padding when needed, extra at the
        end) or 'VALID' (no padding).
      impl: 'canonical' (custom VJP, fast inside scans on CPU; reverse mode only) or 'stock'
        (plain autodiff; supports jvp).

    Returns:
      [N, Ho, Wo, Cout] output.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"conv2d expects x [N, H, W, Cin] and w [kH, kW, Cin, Cout]; got shapes {x.shape} "
            f"and {w.shape}. Add the missing batch/channel axes (e.g. x[None] or x[..., None])."
        )
    if x.shape[3] != w.shape[2]:
        raise ValueError(
            f"conv2d: input has {x.shape[3]} channels but the kernel expects {w.shape[2]} "
            f"(x {x.shape}, w {w.shape}); make w.shape[2] equal to x.shape[-1]."
        )
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"conv2d: stride must be a positive int, got {stride!r}.")
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"conv2d: padding must be 'SAME' or 'VALID', got {padding!r}.")
    if impl not in IMPLS:
        raise ValueError(f"conv2d: impl must be one of {IMPLS}, got {impl!r}.")
    if padding == "VALID" and (x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]):
        raise ValueError(
            f"conv2d: 'VALID' needs input at least as large as the kernel; got spatial "
            f"{x.shape[1:3]} vs kernel {w.shape[:2]}. Use padding='SAME' or a larger input."
        )
    if padding == "SAME":
        pads = tuple(same_padding(x.shape[i + 1], w.shape[i], stride) for i in range(2))
    else:
        pads = ((0, 0), (0, 0))
    strides = (stride, stride)
    if impl == "stock":
        return _lax_conv(x, w, strides, pads, (1, 1), (1, 1))
    return _conv(x, w, strides, pads, (1, 1), (1, 1))
