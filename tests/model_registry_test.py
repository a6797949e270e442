"""Tests of l2r.models.registry: config -> model, user-registered models, unknown names."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from l2r import models
from l2r.configs import common
from l2r.models import registry


class TinyMLP(nn.Module):
    """A user's own backbone: flatten, one dense layer."""

    width: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.width)(x.reshape(len(x), -1)))


@registry.register("test_mlp")
def build_tiny_mlp(cfg):
    return models.from_module("test_mlp", TinyMLP(cfg.widths[-1]), cfg.widths[-1])


def pipeline_model(config) -> models.Model:
    """The if-chain the pipelines built their model with before the registry (verbatim from
    `l2r/forgetting.py`'s `make_model`), kept as the reference from_config must match."""
    m = config.model
    if m.name == "resnet":
        return models.make_model("resnet", depth=m.depth, widths=tuple(m.widths), groups=m.groups)
    return models.make_model(
        "convnet", widths=tuple(m.widths), groups=m.groups, hidden=m.hidden or None
    )


def model_cfg(name, **fields):
    cfg = common.model_config(name)
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize(
    "name, fields",
    [
        ("resnet", {"depth": 8, "widths": (8, 16, 16), "groups": 4}),
        ("convnet", {"widths": (8, 16), "groups": 4, "hidden": 0}),
        ("convnet", {"widths": (8, 16), "groups": 4, "hidden": 12}),
    ],
)
def test_from_config_builds_what_the_pipeline_builds(name, fields):
    cfg = model_cfg(name, **fields)
    model = registry.from_config(cfg)
    reference = pipeline_model(ml_collections.ConfigDict({"model": cfg}))
    assert (model.name, model.representation_dim) == (reference.name, reference.representation_dim)
    assert model.kwargs == reference.kwargs
    key, x = jax.random.key(3), jax.random.normal(jax.random.key(4), (2, 12, 12, 3))
    params = model.init(key, x.shape)
    chex.assert_trees_all_equal(params, reference.init(key, x.shape))
    chex.assert_trees_all_equal(model.apply(params, x), reference.apply(params, x))


def test_a_registered_user_model_is_built_from_its_config():
    assert registry.names()[:2] == ("resnet", "convnet") and "test_mlp" in registry.names()
    model = registry.from_config(model_cfg("test_mlp", widths=(5,)))
    assert model.name == "test_mlp" and model.representation_dim == 5
    params = model.init(jax.random.key(0), (1, 4, 4, 3))
    chex.assert_shape(params["Dense_0"]["kernel"], (48, 5))
    out = jax.jit(model.apply)(params, jnp.ones((2, 4, 4, 3)))
    chex.assert_shape(out.representation, (2, 5))
    assert out.taps is None and model.units == {}


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="'vgg'; registered: resnet, convnet, .*test_mlp"):
        registry.from_config(model_cfg("vgg"))


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered to l2r.models.registry._resnet"):
        registry.register("resnet")(build_tiny_mlp)
    assert registry.register("test_mlp")(build_tiny_mlp) is build_tiny_mlp  # A re-run.


def test_a_user_models_source_is_in_the_training_keys_and_l2rs_are_not():
    """Editing one's own model file makes new pre-training (and so HAT, Rep, Task-B) keys;
    the keys of l2r's models stay as they were."""
    from l2r import pretrain
    from l2r.configs import fig1

    config = fig1.get_config("smoke")
    assert registry.user_code(config.model) == {} and "model_code" not in pretrain.recipe(config)
    config.model.name = "test_mlp"
    ((module, sha),) = registry.user_code(config.model).items()
    assert module == __name__ and len(sha) == 64
    assert pretrain.recipe(config)["model_code"] == {module: sha}
