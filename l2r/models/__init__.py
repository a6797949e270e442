"""Backbones (ResNet-N and a small ConvNet, GroupNorm throughout) and linear heads.

Every caller goes through a `Model` of pure functions, built by `make_model(name, **kwargs)`, or
from a config by `l2r.models.registry.from_config(config.model)` (where user code registers its
own backbones, wrapped by `from_module`):

    model = make_model("resnet", depth=32)
    params = model.init(key, (128, 32, 32, 3))        # plain nested dict
    out = model.apply(params, images, taps=True)       # Output(representation, taps)
    head = init_head(key, model.representation_dim, 10)
    logits = apply_head(head, out.representation)

Backbones return the representation (global-average-pooled features, the input of the
classification heads) and, with `taps=True`, a `Tap` per conv, GroupNorm and dense layer, keyed
by the layer's param path joined with "/" (so `taps[k]` pairs with the leaves of the params
subtree at path `k.split("/")`: a conv's kernel, a GroupNorm's scale and bias, a dense layer's
kernel and bias). Heads are separate so one backbone can carry several (Task A, Task B).

For HAT (`l2r.methods.hat`), `apply(params, x, masks={unit layer: [C] gate})` multiplies the
output channels of the named GroupNorm / dense layers by their gates (after the normalisation);
`model.units` lists those unit layers and their widths, `model.wiring` which unit layers each
parameter layer writes to and reads from. `masks=None` runs the unmasked program unchanged.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2r.models.conv import IMPLS, conv2d
from l2r.models.convnet import ConvNet, Output, Tap, Wiring, collect_taps, fast_init
from l2r.models.resnet import ResNet, check_depth

__all__ = [
    "Model",
    "Output",
    "Tap",
    "Wiring",
    "apply_head",
    "conv2d",
    "from_module",
    "init_head",
    "make_model",
]

_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet": {"depth": 32, "widths": (16, 32, 64), "groups": 8, "conv_impl": "canonical"},
    "convnet": {"widths": (32, 64, 64), "groups": 8, "hidden": None, "conv_impl": "canonical"},
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A backbone as pure functions.

    Attributes:
      name: the model's name, e.g. "resnet" (`make_model(name, **kwargs)` rebuilds a built-in).
      representation_dim: D, the width of `Output.representation`.
      init: init(key, input_shape_NHWC) -> params, a plain nested dict (only H, W, C matter).
        Built-ins: same distribution as the Flax module's init, drawn in one go (`fast_init`).
      apply: apply(params, x [N, H, W, C] float32, taps=False, masks=None) -> Output; `masks`
        {unit layer: [C]} gates output channels (any subset of `units`; None = no gating).
      kwargs: the full configuration used (defaults filled in).
      units: {unit layer: channels}, the GroupNorm / dense layers `masks` can gate.
      wiring: {parameter layer path: Wiring(unit, inputs)} for every conv, GroupNorm and dense
        layer: the unit layer gating its output, and those whose max gates its input.
    """

    name: str
    representation_dim: int
    init: Callable[..., dict]
    apply: Callable[..., Output]
    kwargs: dict = dataclasses.field(default_factory=dict)
    units: dict[str, int] = dataclasses.field(default_factory=dict)
    wiring: dict[str, Wiring] = dataclasses.field(default_factory=dict)


def _validate(name: str, cfg: dict[str, Any]) -> None:
    widths = cfg["widths"]
    if (
        not isinstance(widths, Sequence)
        or not widths
        or not all(isinstance(w, int) and w > 0 for w in widths)
    ):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}.")
    groups = cfg["groups"]
    if not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
        raise ValueError(
            f"groups={groups!r} must be a positive int dividing every width {widths}; "
            "e.g. groups=8 for widths (16, 32, 64)."
        )
    if cfg["conv_impl"] not in IMPLS:
        raise ValueError(f"conv_impl must be one of {IMPLS}, got {cfg['conv_impl']!r}.")
    if name == "resnet":
        check_depth(cfg["depth"])
    elif cfg["hidden"] is not None and (not isinstance(cfg["hidden"], int) or cfg["hidden"] < 1):
        raise ValueError(f"hidden must be None or a positive int, got {cfg['hidden']!r}.")


def make_model(name: str, **kwargs: Any) -> Model:
    """Builds a backbone by name.

    Args:
      name: "resnet" (kwargs: depth=32, widths=(16, 32, 64), groups=8, conv_impl='canonical')
        or "convnet" (kwargs: widths=(32, 64, 64), groups=8, hidden=None,
        conv_impl='canonical').
      **kwargs: overrides of the defaults above.

    Returns:
      The `Model`.

    Raises:
      ValueError: unknown name or kwarg, or an invalid value (depth not 6n+2, groups not
        dividing the widths, ...), before anything is built.
    """
    if name not in _DEFAULTS:
        raise ValueError(f"Unknown model {name!r}; valid names: {sorted(_DEFAULTS)}.")
    unknown = sorted(set(kwargs) - set(_DEFAULTS[name]))
    if unknown:
        raise ValueError(
            f"Unknown kwargs {unknown} for model {name!r}; valid ones: {sorted(_DEFAULTS[name])}."
        )
    cfg = {**_DEFAULTS[name], **kwargs}
    _validate(name, cfg)
    cfg["widths"] = tuple(cfg["widths"])
    module = ResNet(**cfg) if name == "resnet" else ConvNet(**cfg)
    rep_dim = cfg["widths"][-1] if cfg.get("hidden") is None else cfg["hidden"]
    return from_module(name, module, rep_dim, cfg, params_init=fast_init)


def from_module(
    name: str,
    module: nn.Module,
    representation_dim: int,
    kwargs: dict | None = None,
    *,
    params_init: Callable[[jax.Array, dict], dict] | None = None,
) -> Model:
    """Wraps a Flax Linen backbone, `module(x [N, H, W, C]) -> [N, D]`, as a `Model`.

    Args:
      name: the model's name (`Model.name`; errors name it).
      module: the backbone; it holds params only (no batch statistics).
      representation_dim: D, the width of its output.
      kwargs: the configuration it was built from (`Model.kwargs`).
      params_init: params_init(key, abstract_params) -> params; None = `module.init`.

    Returns:
      The `Model`. `apply(..., taps=True)` calls `module(x, taps=True)`, which should sow `Tap`s
      as l2r's layers do; `masks` needs a `module.layout()` (see `ConvNet.layout`).
    """

    @functools.partial(jax.jit, static_argnums=1)
    def jit_init(key: jax.Array, hwc: tuple[int, int, int]) -> dict:
        if params_init is None:
            return module.init(key, jnp.zeros((1, *hwc), jnp.float32))["params"]
        x = jax.ShapeDtypeStruct((1, *hwc), jnp.float32)
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x)["params"])
        return params_init(key, abstract)

    def init(key: jax.Array, input_shape: Sequence[int]) -> dict:
        if len(input_shape) != 4 or not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise ValueError(
                f"{name}.init expects input_shape (N, H, W, C) of positive ints, got "
                f"{tuple(input_shape)!r}; e.g. (1, 32, 32, 3)."
            )
        return jit_init(key, tuple(input_shape[1:]))

    units, wiring = module.layout() if hasattr(module, "layout") else ({}, {})

    def apply(params: dict, x: jax.Array, taps: bool = False, masks=None) -> Output:
        if x.ndim != 4:
            raise ValueError(
                f"{name}.apply expects images [N, H, W, C], got shape {x.shape}; add a batch "
                "axis (x[None]) or a channel axis (x[..., None])."
            )
        variables = {"params": params}
        extra = {}
        if masks is not None:
            unknown = sorted(set(masks) - set(units))
            if unknown:
                raise ValueError(
                    f"{name}.apply: masks for unknown unit layers {unknown}; valid ones: "
                    f"{sorted(units)}."
                )
            extra["masks"] = dict(masks)
        if not taps:
            return Output(module.apply(variables, x, **extra), None)
        rep, state = module.apply(variables, x, taps=True, mutable=["intermediates"], **extra)
        return Output(rep, collect_taps(state["intermediates"]))

    return Model(name, representation_dim, init, apply, dict(kwargs or {}), units, wiring)


def init_head(key: jax.Array, in_dim: int, num_classes: int) -> dict[str, jax.Array]:
    """Linear head {'kernel': [D, K], 'bias': [K]}: LeCun-normal kernel, zero bias."""
    if not all(isinstance(v, int) and v > 0 for v in (in_dim, num_classes)):
        raise ValueError(
            f"init_head: in_dim and num_classes must be positive ints, got {in_dim!r} and "
            f"{num_classes!r}; pass model.representation_dim and the number of classes."
        )
    kernel = jax.nn.initializers.lecun_normal()(key, (in_dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def apply_head(head: dict[str, jax.Array], representation: jax.Array) -> jax.Array:
    """[N, D] representation -> [N, K] logits."""
    return representation @ head["kernel"] + head["bias"]
