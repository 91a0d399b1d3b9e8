"""Flax Linen building blocks for BinaryDuo networks.

Quantizers come from :mod:`duo_jax.quant`; nothing here knows about training.

The four activation modes of one model definition:

============  =================================================================
mode          quantized activation
============  =================================================================
``fp``        ReLU (float reference)
``binary``    binary ``{0, 1}`` (baseline BNN; surrogate selectable)
``coupled``   ternary ``{0, 1/2, 1}`` (BinaryDuo phase 1)
``decoupled`` two binary activations per channel (BinaryDuo phase 2)
============  =================================================================

**The decoupled domain.** In ``decoupled`` mode every real-valued tensor that
feeds a quantized activation is carried as two copies ``[copy1, copy2]`` on the
channel axis (``2C`` channels). :func:`duplicate` makes them (before the
BatchNorm, whose features then double), :func:`duo_activation` fires copy 1 at
``x >= 0.75`` and copy 2 at ``x >= 0.25`` (fixed offsets ``-1/4`` and ``+1/4``
on the binary activation's threshold 1/2), a layer reading the activation sees
``2C`` binary inputs, and a float layer that must not grow reads :func:`merge`,
the mean of the copies. In the other modes :func:`duplicate` and :func:`merge`
are identities, so one model definition serves all four modes and the
parameter trees of the coupled and decoupled models have the same paths.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from duo_jax import quant

Array = jax.Array
PaddingLike = str | Sequence[tuple[int, int]]

MODES = ("fp", "binary", "coupled", "decoupled")

#: The offsets applied to the two copies of a decoupled activation.
DECOUPLE_OFFSETS = (-0.25, 0.25)


def check_mode(mode: str) -> str:
    """Returns ``mode`` if it is one of :data:`MODES`, else raises ValueError."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------------------
# Mode-dependent parameter-free operations
# ---------------------------------------------------------------------------


def duo_activation(x: Array, mode: str, surrogate: str = "clipped", **surrogate_kwargs) -> Array:
    """The quantized activation of ``mode`` (see the module docstring).

    Args:
      x: pre-activation, channels last. In ``decoupled`` mode it holds the two
        copies ``[x1, x2]`` (an even number of channels).
      mode: one of :data:`MODES`.
      surrogate: backward surrogate of the binary activations (``binary`` and
        ``decoupled`` modes): a name :func:`duo_jax.quant.get` knows.
      **surrogate_kwargs: passed to the surrogate (e.g. ``beta``).

    Returns:
      ``relu(x)``, ``b(x)``, ``t(x)``, or ``[b(x1 - 1/4), b(x2 + 1/4)]``.
    """
    check_mode(mode)
    if mode == "fp":
        return jax.nn.relu(x)
    if mode == "coupled":
        return quant.ternary(x)
    act = quant.get(surrogate, **surrogate_kwargs)
    if mode == "binary":
        return act(x)
    c = _half(x)
    lo, hi = DECOUPLE_OFFSETS
    return jnp.concatenate([act(x[..., :c], offset=lo), act(x[..., c:], offset=hi)], axis=-1)


def duplicate(x: Array, mode: str) -> Array:
    """``[x, x]`` on the channel axis in ``decoupled`` mode, else ``x``."""
    return jnp.concatenate([x, x], axis=-1) if check_mode(mode) == "decoupled" else x


def merge(x: Array, mode: str) -> Array:
    """The mean of the two copies in ``decoupled`` mode, else ``x``.

    At conversion the copies are equal and ``(x + x) / 2 == x`` exactly.
    """
    if check_mode(mode) != "decoupled":
        return x
    c = _half(x)
    return (x[..., :c] + x[..., c:]) * jnp.asarray(0.5, x.dtype)


def _half(x: Array) -> int:
    if x.shape[-1] % 2:
        raise ValueError(
            f"a decoupled tensor holds two copies of its channels, got {x.shape[-1]} channels"
        )
    return x.shape[-1] // 2


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------


def max_pool(x: Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: PaddingLike = "VALID") -> Array:
    """``flax.linen.max_pool`` of an ``NHWC`` batch, with the same values and gradients.

    Non-overlapping windows (``strides == window``, ``VALID`` padding) take a
    faster path: the forward is a reshape and a max, and the backward an
    element-wise mask that gives each window's gradient to its *first*
    maximum in row-major order, as the select-and-scatter of
    ``nn.max_pool``'s gradient does, ties included. On CPU XLA expands that
    select-and-scatter into index arithmetic and a scatter, the largest cost of
    VGG-7's training step outside its convolutions. Overlapping or padded
    windows (AlexNet, the ResNet stem) use ``nn.max_pool``. (A window that
    holds a NaN has a NaN maximum and passes no gradient; ``nn.max_pool``
    passes it to one of its inputs. Training stops at a NaN loss either way.)
    """
    window = tuple(window)
    strides = tuple(strides) if strides is not None else window
    if x.ndim != 4 or len(window) != 2 or strides != window or padding != "VALID":
        return nn.max_pool(x, window, strides, padding)
    kh, kw = window
    b, h, w, c = x.shape
    if h < kh or w < kw:
        return nn.max_pool(x, window, strides, padding)
    return _window_max(x[:, : h - h % kh, : w - w % kw], window)  # VALID drops a partial last window


def _blocks(x: Array, window: tuple[int, int]) -> Array:
    b, h, w, c = x.shape
    kh, kw = window
    return x.reshape(b, h // kh, kh, w // kw, kw, c)


def _first_max_mask(xr: Array, y: Array) -> Array:
    """True where each window's first maximum (row-major) is; ``xr`` from :func:`_blocks`, ``y`` its maxima."""
    kh, kw = xr.shape[2], xr.shape[4]
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            hit = xr[:, :, i, :, j, :] == y
            cols.append(hit & ~taken)
            taken = taken | hit
        rows.append(jnp.stack(cols, axis=3))
    return jnp.stack(rows, axis=2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(x: Array, window: tuple[int, int]) -> Array:
    return jnp.max(_blocks(x, window), axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(window: tuple[int, int], primals, tangents):
    # The tangent is linear in x_dot, so JAX transposes it into the backward:
    # the window's gradient goes to its first maximum, an element-wise select.
    (x,), (x_dot,) = primals, tangents
    xr = _blocks(x, window)
    y = jnp.max(xr, axis=(2, 4))
    mask = _first_max_mask(xr, y)
    return y, jnp.sum(jnp.where(mask, _blocks(x_dot, window), jnp.zeros((), x_dot.dtype)), axis=(2, 4))


# ---------------------------------------------------------------------------
# Initializer of the authors' code
# ---------------------------------------------------------------------------


def conv_init(strides: int | Sequence[int] = 1) -> Callable[..., Array]:
    """Normal init with ``std = sqrt(4 / (k*k*c_in + ceil(k/s)^2 * c_out))``.

    For a kernel of shape ``(kh, kw, c_in, c_out)`` (or ``(c_in, c_out)``,
    treated as 1x1) and strides ``s``.
    """
    sh, sw = (strides, strides) if isinstance(strides, int) else tuple(strides)

    def init(key, shape, dtype=jnp.float32):
        kh, kw = (shape[0], shape[1]) if len(shape) == 4 else (1, 1)
        c_in, c_out = shape[-2], shape[-1]
        fan = kh * kw * c_in + math.ceil(kh / sh) * math.ceil(kw / sw) * c_out
        return jax.random.normal(key, shape, dtype) * jnp.sqrt(4.0 / fan).astype(dtype)

    return init


# ---------------------------------------------------------------------------
# Quantized layers
# ---------------------------------------------------------------------------


class QConv(nn.Module):
    """2-D convolution (NHWC, no bias) with injected input and kernel quantizers.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)`` or an int.
      strides: an int or ``(sh, sw)``.
      padding: ``'SAME'``, ``'VALID'`` or explicit ``((top, bottom), (left, right))``.
      input_quantizer: applied to the input first (e.g. ``quant.binary``); None
        keeps the input as it is (the quantized activation may also be applied
        before the layer, as the models here do).
      kernel_quantizer: applied to the latent float kernel (e.g.
        ``quant.binarize_weight``); None keeps float weights.
      kernel_init: initializer of the latent kernel; defaults to
        :func:`conv_init` for the strides.
      dtype: computation dtype (None: the input's); parameters stay float32.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_quantizer: Callable[[Array], Array] | None = None
    kernel_quantizer: Callable[[Array], Array] | None = None
    kernel_init: Callable[..., Array] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        st = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        init = self.kernel_init or conv_init(st)
        kernel = self.param("kernel", init, (*ks, x.shape[-1], self.features), self.param_dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.kernel_quantizer is not None:
            kernel = self.kernel_quantizer(kernel)
        dtype = self.dtype or x.dtype
        padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
        return jax.lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            window_strides=st,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class QDense(nn.Module):
    """Dense layer with injected input and kernel quantizers (see :class:`QConv`).

    Attributes:
      features: output features.
      use_bias: add a float bias (False for layers followed by BatchNorm).
      input_quantizer, kernel_quantizer, kernel_init, dtype: as in :class:`QConv`.
    """

    features: int
    use_bias: bool = False
    input_quantizer: Callable[[Array], Array] | None = None
    kernel_quantizer: Callable[[Array], Array] | None = None
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.kernel_quantizer is not None:
            kernel = self.kernel_quantizer(kernel)
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(dtype)
        return y


class DuoDropout(nn.Module):
    """Dropout that treats the two copies of a decoupled tensor as one channel.

    In ``decoupled`` mode one mask of ``C`` channels is drawn and applied to
    both copies, so the decoupled network with the same ``'dropout'`` RNG
    computes exactly what the coupled one does in training too.
    """

    rate: float
    mode: str = "fp"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        shape = x.shape if check_mode(self.mode) != "decoupled" else (*x.shape[:-1], _half(x))
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, shape)
        if self.mode == "decoupled":
            keep = jnp.concatenate([keep, keep], axis=-1)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


def batch_norm(train: bool, name: str | None = None, dtype: Any = None) -> nn.BatchNorm:
    """BatchNorm with the authors' (Torch) settings: momentum 0.9, eps 1e-5.

    No ``axis_name``: under ``jit`` with a sharded batch the statistics are
    over the global batch, so the device count does not change the result.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )
