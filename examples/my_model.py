"""A backbone of one's own, added from this file: a multi-layer perceptron on the flattened image.

Registering it makes "my_mlp" a value of `config.model.name`; its builder reads the fields of the
`config.model` group it needs (here `widths`: one dense layer per entry). Any Flax Linen module
that maps images [N, H, W, C] to a representation [N, D] and holds only params works through
`models.from_module`. Methods that read per-layer taps or unit masks (the learned rule, HAT)
need the module to provide them (see `l2r.models.from_module`); the others need nothing more.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from l2r import models
from l2r.models import registry


class MLP(nn.Module):
    """Flatten, then a dense layer and a relu per width; the last layer's output is the
    representation."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        h = x_NHWC.reshape(x_NHWC.shape[0], -1)
        for width in self.widths:
            h = nn.relu(nn.Dense(width)(h))
        return h


@registry.register("my_mlp")
def build_mlp(cfg) -> models.Model:
    """The model from the `config.model` group (`--config.model.name=my_mlp`)."""
    widths = tuple(cfg.widths)
    return models.from_module("my_mlp", MLP(widths), widths[-1], {"widths": widths})
