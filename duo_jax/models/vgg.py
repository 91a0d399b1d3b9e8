"""VGG-7 for CIFAR-10 (and other small images), as in the BinaryDuo authors' code.

Layout (baseline widths; ``conv in-out``)::

    conv 3-64 -> BN -> act
    conv 64-64 -> pool -> BN -> act
    conv 64-128 -> pool -> BN -> act
    conv 128-128 -> pool -> BN -> act
    conv 128-512 (4x4, stride 4) -> BN -> act
    conv 512-512 (1x1) -> BN -> ReLU (float)
    dense 512-10

The first conv and the classifier stay float; the others read a quantized
activation and binarize their weights when ``binarize_weights`` (off by
default: the authors' CIFAR-10 VGG-7 keeps float weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from duo_jax import layers
from duo_jax.models.common import DuoNet, resolve_widths

WIDTHS = {
    "baseline": (64, 64, 128, 128, 512, 512),
    "duo": (45, 45, 90, 90, 336, 512),
}


class VGG7(DuoNet):
    """VGG-7 in one of the four modes (see :class:`duo_jax.models.common.DuoNet`)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w = resolve_widths(WIDTHS, self.mode, self.widths, self.width_mult)
        kq = self.kernel_quantizer()
        conv = lambda f, name, **kw: layers.QConv(f, dtype=self.dtype, name=name, **kw)

        x = conv(w[0], "conv1", kernel_size=3)(x)
        x = self.bn_act(x, train, "bn1")
        for i in (1, 2, 3):
            x = conv(w[i], f"conv{i + 1}", kernel_size=3, kernel_quantizer=kq)(x)
            x = layers.max_pool(x, (2, 2))
            x = self.bn_act(x, train, f"bn{i + 1}")
        x = conv(w[4], "conv5", kernel_size=4, strides=4, kernel_quantizer=kq)(x)
        x = self.bn_act(x, train, "bn5")
        x = conv(w[5], "conv6", kernel_size=1, kernel_quantizer=kq)(x)
        x = layers.batch_norm(train, name="bn6", dtype=self.dtype)(x)
        x = jax.nn.relu(x)
        return self.classifier(x.reshape(x.shape[0], -1))
