"""CIFAR-style ResNet-N (He et al., 2016, §4.2) with GroupNorm in place of BatchNorm.

Paper §5 (Exp. 1): ResNet-32 with every BatchNorm replaced by GroupNorm; Exp. 5 uses ResNet-14.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from l2r.models.convnet import Conv, GroupNorm, Wiring, mask_of


def check_depth(depth: int) -> int:
    """Blocks per stage n for depth = 6n + 2; ValueError otherwise."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110); got {depth!r}."
        )
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """conv3x3-GN-relu-conv3x3-GN, plus shortcut, then relu.

    When the shape changes (stride 2 or new width) the shortcut is a strided 1x1 conv + GN
    ("option B" of He et al.); otherwise the identity. Params: conv1, gn1, conv2, gn2 and, for
    projection shortcuts, shortcut_conv, shortcut_gn.
    """

    width: int
    stride: int
    groups: int
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(
        self, x: jax.Array, taps: bool = False, masks: dict[str, jax.Array] | None = None
    ) -> jax.Array:
        """`masks`: {gn1, gn2, shortcut_gn: [C]} (any subset, or None), after each GroupNorm."""
        y = Conv(self.width, 3, self.stride, self.conv_impl, name="conv1")(x, taps)
        y = nn.relu(GroupNorm(self.groups, name="gn1")(y, taps, mask_of(masks, "gn1")))
        y = Conv(self.width, 3, 1, self.conv_impl, name="conv2")(y, taps)
        y = GroupNorm(self.groups, name="gn2")(y, taps, mask_of(masks, "gn2"))
        if self.stride != 1 or x.shape[-1] != self.width:
            x = Conv(self.width, 1, self.stride, self.conv_impl, name="shortcut_conv")(x, taps)
            x = GroupNorm(self.groups, name="shortcut_gn")(x, taps, mask_of(masks, "shortcut_gn"))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet-(6n+2) backbone: stem, len(widths) stages of n basic blocks, global average pool.

    Stem: 3x3 conv (stride 1) + GN + relu. Stage s (1-based) has n blocks of width widths[s-1];
    its first block has stride 2 for s >= 2. Convs have no bias (GN follows) and use He normal
    init with fan_out. Representation: [N, widths[-1]] (64 by default).

    Params / tap keys: stem_conv, stem_gn, stage{s}_block{b}/{conv1, gn1, conv2, gn2,
    shortcut_conv, shortcut_gn}. Unit layers (mask keys): the GroupNorms. A block's output
    channel is live when its gn2 channel or its shortcut channel is, so the gate on the input of
    the next convs is the max over the residual stream's unit layers (`layout`).

    Attributes:
      depth: 6n + 2 (14, 20, 32, ...).
      widths: stage widths, (16, 32, 64) as in the paper.
      groups: GroupNorm groups; must divide every width. Default 8 (2, 4, 8 channels per group
        at widths 16, 32, 64): the paper does not say; 8 is the largest power of two <= 16 that
        leaves at least 2 channels per group.
      conv_impl: 'canonical' or 'stock' (see `conv2d`).
    """

    depth: int = 32
    widths: Sequence[int] = (16, 32, 64)
    groups: int = 8
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(
        self, x: jax.Array, taps: bool = False, masks: dict[str, jax.Array] | None = None
    ) -> jax.Array:
        """[N, H, W, C] images -> [N, widths[-1]] representation."""
        n = check_depth(self.depth)
        h = Conv(self.widths[0], 3, 1, self.conv_impl, name="stem_conv")(x, taps)
        h = nn.relu(GroupNorm(self.groups, name="stem_gn")(h, taps, mask_of(masks, "stem_gn")))
        for s, width in enumerate(self.widths, start=1):
            for b in range(n):
                stride = 2 if s > 1 and b == 0 else 1
                name = f"stage{s}_block{b}"
                block_masks = None
                if masks is not None:
                    prefix = name + "/"
                    block_masks = {
                        k[len(prefix) :]: v for k, v in masks.items() if k.startswith(prefix)
                    }
                block = BasicBlock(width, stride, self.groups, self.conv_impl, name=name)
                h = block(h, taps, block_masks)
        return h.mean(axis=(1, 2))

    def layout(self) -> tuple[dict[str, int], dict[str, Wiring]]:
        """({unit layer: channels}, {parameter layer: Wiring}), without building anything."""
        n = check_depth(self.depth)
        units = {"stem_gn": self.widths[0]}
        wiring = {"stem_conv": Wiring("stem_gn", ()), "stem_gn": Wiring("stem_gn", ())}
        stream, stream_width = ("stem_gn",), self.widths[0]  # Unit layers summed into h.
        for s, width in enumerate(self.widths, start=1):
            for b in range(n):
                name = f"stage{s}_block{b}"
                gn1, gn2, sgn = f"{name}/gn1", f"{name}/gn2", f"{name}/shortcut_gn"
                units[gn1] = units[gn2] = width
                wiring[f"{name}/conv1"] = Wiring(gn1, stream)
                wiring[gn1] = Wiring(gn1, ())
                wiring[f"{name}/conv2"] = Wiring(gn2, (gn1,))
                wiring[gn2] = Wiring(gn2, ())
                if (s > 1 and b == 0) or stream_width != width:  # Projection shortcut.
                    units[sgn] = width
                    wiring[f"{name}/shortcut_conv"] = Wiring(sgn, stream)
                    wiring[sgn] = Wiring(sgn, ())
                    stream = (sgn,)
                stream, stream_width = (gn2, *stream), width
        return units, wiring
