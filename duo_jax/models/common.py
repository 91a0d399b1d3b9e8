"""What the model families share: options, widths, quantizer wiring."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

from duo_jax import layers, quant

Array = jax.Array


def resolve_widths(
    spec: Mapping[str, Sequence[int]],
    mode: str,
    widths: Sequence[int] | None,
    width_mult: float,
) -> tuple[int, ...]:
    """The layer widths of a family in ``mode``.

    Args:
      spec: the family's widths, ``{'baseline': ..., 'duo': ...}``: ``fp`` and
        ``binary`` use the baseline widths, ``coupled`` and ``decoupled`` the
        reduced BinaryDuo widths (the decoupled model reads twice the coupled
        input channels, see :mod:`duo_jax.layers`).
      mode: one of :data:`duo_jax.layers.MODES`.
      widths: explicit widths overriding the spec, or None.
      width_mult: multiplies every width (rounded to the nearest int; a width
        that rounds to zero is an error).

    Returns:
      The widths as ints.
    """
    layers.check_mode(mode)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    base = tuple(widths) if widths is not None else tuple(spec["duo" if mode in ("coupled", "decoupled") else "baseline"])
    if len(base) != len(spec["baseline"]):
        raise ValueError(f"expected {len(spec['baseline'])} widths, got {len(base)}: {base}")
    out = tuple(int(round(w * width_mult)) for w in base)
    if min(out) < 1:
        raise ValueError(
            f"width_mult={width_mult} gives zero channels (widths {out}); use a larger width_mult"
        )
    return out


class DuoNet(nn.Module):
    """Options every model family takes.

    Attributes:
      mode: ``'fp'``, ``'binary'``, ``'coupled'`` or ``'decoupled'``.
      num_classes: classifier outputs.
      widths: explicit widths for this mode (None: the family's, per mode).
      width_mult: scales every width (tests, small machines).
      binarize_weights: binarize the weights of layers reading a quantized
        activation, ``sign(w) * mean|w|`` (never in ``fp`` mode).
      per_channel_scale: one weight scale per output channel instead of per layer.
      surrogate: backward surrogate of the binary activations (a
        :func:`duo_jax.quant.get` name).
      dtype: computation dtype (None: float32); parameters stay float32.
    """

    mode: str = "binary"
    num_classes: int = 10
    widths: Sequence[int] | None = None
    width_mult: float = 1.0
    binarize_weights: bool = False
    per_channel_scale: bool = False
    surrogate: str = "clipped"
    dtype: Any = None

    def kernel_quantizer(self) -> Callable[[Array], Array] | None:
        """The quantizer of kernels that read a quantized activation."""
        if not self.binarize_weights or self.mode == "fp":
            return None
        return functools.partial(quant.binarize_weight, per_channel=self.per_channel_scale)

    def act(self, x: Array) -> Array:
        return layers.duo_activation(x, self.mode, self.surrogate)

    def bn_act(self, x: Array, train: bool, name: str) -> Array:
        """duplicate -> BatchNorm -> quantized activation."""
        x = layers.duplicate(x, self.mode)
        x = layers.batch_norm(train, name=name, dtype=self.dtype)(x)
        return self.act(x)

    def classifier(self, x: Array) -> Array:
        """Float dense classifier with bias, float32 logits."""
        return layers.QDense(self.num_classes, use_bias=True, dtype=self.dtype, name="classifier")(x).astype("float32")
