"""Model builders by name: `config.model.name` picks one, and user code can register its own.

A builder turns the `config.model` ConfigDict into a `Model`. A Flax backbone in a user's file
becomes `--config.model.name=mine` with

    @registry.register("mine")
    def build(cfg):
        return models.from_module("mine", MyNet(width=cfg.widths[-1]), cfg.widths[-1])
"""

from collections.abc import Callable

import ml_collections

from l2r import keys, models

Builder = Callable[[ml_collections.ConfigDict], models.Model]

_BUILDERS: dict[str, Builder] = {}  # In registration order.


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding `builder(model_cfg) -> Model` as model `name`.

    Raises:
      ValueError: `name` is already registered to a different function.
    """

    def add(builder: Builder) -> Builder:
        where = lambda f: f"{f.__module__}.{f.__qualname__}"
        old = _BUILDERS.setdefault(name, builder)
        # Re-running the same definition (a reloaded module, a notebook cell) replaces it.
        if where(old) != where(builder):
            raise ValueError(f"Model {name!r} is already registered to {where(old)}.")
        _BUILDERS[name] = builder
        return builder

    return add


def names() -> tuple[str, ...]:
    """The registered model names, built-ins first."""
    return tuple(_BUILDERS)


def user_code(model_cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """`keys.user_sources` of the builder of model `model_cfg.name`: a model registered from a
    user's file is in the keys of the stages that train it; {} for l2r's own models."""
    builder = _BUILDERS.get(model_cfg.name)
    return {} if builder is None else keys.user_sources([builder])


def from_config(model_cfg: ml_collections.ConfigDict) -> models.Model:
    """Builds the model `model_cfg.name` names from the fields of `model_cfg` (`config.model`).

    Raises:
      ValueError: the name is not registered (the message lists those that are), or a field is
        invalid for the model.
    """
    builder = _BUILDERS.get(model_cfg.name)
    if builder is None:
        raise ValueError(
            f"Unknown model {model_cfg.name!r}; registered: {', '.join(names())}. Add one with "
            "@l2r.models.registry.register(name)."
        )
    return builder(model_cfg)


@register("resnet")
def _resnet(cfg: ml_collections.ConfigDict) -> models.Model:
    return models.make_model("resnet", depth=cfg.depth, widths=tuple(cfg.widths), groups=cfg.groups)


@register("convnet")
def _convnet(cfg: ml_collections.ConfigDict) -> models.Model:
    # hidden 0 means no dense layer before the head.
    hidden = cfg.hidden or None
    return models.make_model("convnet", widths=tuple(cfg.widths), groups=cfg.groups, hidden=hidden)


__all__ = ["Builder", "from_config", "names", "register"]
