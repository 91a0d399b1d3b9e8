"""ResNet-18 for ImageNet with binary activations, as in the BinaryDuo authors' code.

Stem (float): conv 7x7/2 -> BN -> maxpool 3/2. Four stages of two blocks; a
block is::

    act -> conv3x3 (stride s) -> BN -> act -> conv3x3 -> BN   (+ shortcut)

The shortcut is the identity, or for a down-sampling block
``avgpool 2x2 -> float conv 1x1 -> BN``. Stage widths are 64, 128, 256, 512
(baseline) or 64, 90, 180, 360 (BinaryDuo); the network's last conv always
outputs ``final_width`` (512) channels, and its block's shortcut pads the
stream with zero channels when it is narrower. Head: global average pool ->
float dense classifier.

In ``decoupled`` mode the residual stream itself carries the two copies; a
down-sampling shortcut reads their mean, and the last block writes a single
copy (its shortcut reads the mean), so stem, shortcuts and classifier keep the
coupled model's shapes. Block convs read a quantized activation and binarize
their weights when ``binarize_weights`` (on by default); the stem, the 1x1
shortcut convs and the classifier stay float.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from duo_jax import layers
from duo_jax.models.common import DuoNet, resolve_widths

WIDTHS = {
    "baseline": (64, 128, 256, 512),
    "duo": (64, 90, 180, 360),
}
FINAL_WIDTH = 512
BLOCKS_PER_STAGE = (2, 2, 2, 2)


class ResNet18(DuoNet):
    """ResNet-18 in one of the four modes (see :class:`duo_jax.models.common.DuoNet`)."""

    num_classes: int = 1000
    binarize_weights: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w = resolve_widths(WIDTHS, self.mode, self.widths, self.width_mult)
        final = max(1, int(round(FINAL_WIDTH * self.width_mult)))
        kq = self.kernel_quantizer()
        mode = self.mode

        x = layers.QConv(w[0], 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype, name="stem")(x)
        x = layers.duplicate(x, mode)
        x = layers.batch_norm(train, name="stem_bn", dtype=self.dtype)(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")

        in_width = w[0]
        num_blocks = sum(BLOCKS_PER_STAGE)
        b = 0
        for stage, n in enumerate(BLOCKS_PER_STAGE):
            for i in range(n):
                b += 1
                last = b == num_blocks
                x = self._block(
                    x,
                    in_width=in_width,
                    width=w[stage],
                    out_width=final if last else w[stage],
                    strides=2 if (stage > 0 and i == 0) else 1,
                    last=last,
                    train=train,
                    kq=kq,
                    name=f"stage{stage + 1}_block{i + 1}",
                )
                in_width = w[stage]
        x = jnp.mean(x, axis=(1, 2))
        return self.classifier(x)

    def _block(
        self,
        x: jax.Array,
        *,
        in_width: int,
        width: int,
        out_width: int,
        strides: int,
        last: bool,
        train: bool,
        kq: Callable | None,
        name: str,
    ) -> jax.Array:
        mode, dt = self.mode, self.dtype
        y = layers.QConv(width, 3, strides, kernel_quantizer=kq, dtype=dt, name=f"{name}_conv1")(self.act(x))
        y = self.bn_act(y, train, f"{name}_bn1")
        y = layers.QConv(out_width, 3, 1, kernel_quantizer=kq, dtype=dt, name=f"{name}_conv2")(y)
        if not last:
            y = layers.duplicate(y, mode)
        y = layers.batch_norm(train, name=f"{name}_bn2", dtype=dt)(y)

        if strides != 1:
            s = nn.avg_pool(layers.merge(x, mode), (2, 2), (2, 2), padding="SAME")
            s = layers.QConv(out_width, 1, 1, dtype=dt, name=f"{name}_down")(s)
            if not last:
                s = layers.duplicate(s, mode)
            s = layers.batch_norm(train, name=f"{name}_down_bn", dtype=dt)(s)
        elif last:
            s = layers.merge(x, mode)
            if out_width > in_width:
                s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, out_width - in_width)])
            elif out_width < in_width:
                raise ValueError(f"the last block narrows {in_width} -> {out_width} channels")
        else:
            s = x
        return y + s
