"""AlexNet for ImageNet (XNOR-Net style layout), as in the BinaryDuo authors' code.

Layout (baseline widths)::

    conv 3-96 (11x11, stride 4, pad 2) -> maxpool 3/2 -> BN -> act
    conv 96-256 (5x5) -> maxpool 3/2 -> BN -> act
    conv 256-384 (3x3) -> BN -> act
    conv 384-384 (3x3) -> BN -> act
    conv 384-256 (3x3) -> maxpool 3/2 -> BN -> act
    fc6 256-4096 (a conv whose kernel covers the whole map: 6x6 at 224) -> BN -> act -> dropout 0.1
    fc7 4096-4096 -> BN -> ReLU (float) -> dropout 0.1
    fc8 4096-1000

conv1 and fc8 stay float; every other layer reads a quantized activation and
binarizes its weights when ``binarize_weights`` (on by default). Needs inputs of
about 64x64 or larger (224x224 for the authors' shapes).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from duo_jax import layers
from duo_jax.models.common import DuoNet, resolve_widths

WIDTHS = {
    "baseline": (96, 256, 384, 384, 256, 4096, 4096),
    "duo": (88, 192, 256, 256, 192, 2400, 4096),
}


class AlexNet(DuoNet):
    """AlexNet in one of the four modes (see :class:`duo_jax.models.common.DuoNet`)."""

    num_classes: int = 1000
    binarize_weights: bool = True
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w = resolve_widths(WIDTHS, self.mode, self.widths, self.width_mult)
        kq = self.kernel_quantizer()
        conv = lambda f, name, **kw: layers.QConv(f, dtype=self.dtype, name=name, **kw)
        pool = lambda x: nn.max_pool(x, (3, 3), (2, 2))

        x = conv(w[0], "conv1", kernel_size=11, strides=4, padding=((2, 2), (2, 2)))(x)
        x = self.bn_act(pool(x), train, "bn1")
        x = conv(w[1], "conv2", kernel_size=5, kernel_quantizer=kq)(x)
        x = self.bn_act(pool(x), train, "bn2")
        x = conv(w[2], "conv3", kernel_size=3, kernel_quantizer=kq)(x)
        x = self.bn_act(x, train, "bn3")
        x = conv(w[3], "conv4", kernel_size=3, kernel_quantizer=kq)(x)
        x = self.bn_act(x, train, "bn4")
        x = conv(w[4], "conv5", kernel_size=3, kernel_quantizer=kq)(x)
        x = self.bn_act(pool(x), train, "bn5")
        if min(x.shape[1:3]) < 1:
            raise ValueError("AlexNet needs inputs of at least 64x64 pixels")
        x = conv(w[5], "fc6", kernel_size=x.shape[1:3], padding="VALID", kernel_quantizer=kq)(x)
        x = self.bn_act(x.reshape(x.shape[0], -1), train, "bn6")
        x = layers.DuoDropout(self.dropout_rate, self.mode, name="drop6")(x, deterministic=not train)
        x = layers.QDense(w[6], kernel_quantizer=kq, dtype=self.dtype, name="fc7")(x)
        x = layers.batch_norm(train, name="bn7", dtype=self.dtype)(x)
        x = jax.nn.relu(x)
        x = layers.DuoDropout(self.dropout_rate, "fp", name="drop7")(x, deterministic=not train)
        return self.classifier(x)
